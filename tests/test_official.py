"""The authors' trained models (`official.py`): files laid out as their code saves them, converted,
then decoded as their code decodes (`--prompt official`).

No released file can be downloaded here: tests/their_code.py re-types their modules (the adapters, the saved
module, the training dict and the shards) and their decoding (their prompt `P1..Pp </s>` and the decoder mask of
their patched mBART, run through Hugging Face's MBartForConditionalGeneration). The mBART is the parity tests'
tiny one with large weights (`peaked_pair`), so that the tokens depend on the prefix and on the mask; the towers'
folder is `converted`, whose mBART has its sizes."""

import os
import pickle

import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file

import cliptrans
import data
import official
import their_code
import translate
import weights
from cliptrans import PROMPTS, MappingConfig
from conftest import assert_close, load_hf_mclip, mclip_reference, tiny_mbart_config
from test_model import padded_batch


@pytest.fixture(scope="module")
def hf(peaked_pair):
    return peaked_pair[0]


def sizes(converted):
    config, _ = weights.read_config(converted)
    return config.vision.embed_dim, config.mbart.d_model, config.mbart.vocab_size  # D, d, V


def their_model(kind, P, converted, hf, seed=0):
    D, d, _ = sizes(converted)
    return their_code.CLIPTransModule(their_code.random_adapter(kind, D, d, P, seed).to(hf.device), hf)


def convert(files, converted, out, **kw):
    return official.convert_official(files, converted, "en", "de", out, **kw)


def inputs(converted, device, B=4, seed=3):
    """Sources `[en_XX] x </s>` (B, S), their mask, CLIP vectors (B, D) of both signs, and de_DE's id."""
    D, _, V = sizes(converted)
    ids, mask = padded_batch(V, [9, 6, 4, 7, 5, 8][:B], lang_id=V - 51, seed=seed, device=device)
    clip = torch.randn(B, D, generator=torch.Generator().manual_seed(seed)).to(device) * 2
    return ids, mask, clip, V - 48


# ----------------------------------------------------------------------------- what their files hold


@pytest.mark.parametrize("kind", ["mlp", "hidden_mlp", "transformer"])
def test_the_mapping_network_equals_their_adapter(kind, converted, hf, tmp_path, device):
    """Each adapter of theirs, 4 prefix vectors (read from the shapes, not assumed), in a training dict: the
    converted mapping network makes the same prefix."""
    module = their_model(kind, 4, converted, hf)
    path = their_code.save_training_dict(module, tmp_path / "model_pretrained.pth")
    model = weights.load(convert([path], converted, tmp_path / "out", stage=1), device=device)
    assert model.config.mapping == MappingConfig(kind, 4) and model.config.prompt == "official"
    x = inputs(converted, device, B=6)[2]
    with torch.no_grad():
        ref = module.adapter(x)
        assert (ref < 0).float().mean() > 0.2, "outputs of both signs: PReLU's slope is used"
        assert_close(model.mapping(x), ref, atol=1e-5, name=f"{kind} prefix")


def test_every_layout_of_their_files_converts_to_the_same_model(converted, hf, tmp_path):
    """A training dict, one saved under DDP (`module.`), a released model's shards found from its name, and the
    same shards given one by one: one model, whose mBART is theirs, whose towers are the towers folder's (a hard
    link), recording where it came from."""
    module = their_model("mlp", 10, converted, hf)
    for name in "abcd":
        (tmp_path / name).mkdir()
    layouts = {
        "training dict": [their_code.save_training_dict(module, tmp_path / "a" / "model_best_test.pth")],
        "training dict, DDP": [their_code.save_training_dict(module, tmp_path / "b" / "m.pth", ddp=True)],
        "shards by name": [tmp_path / "c" / "model_best_test.pth"],
        "shards given": list(reversed(their_code.save_shards(module, tmp_path / "d", ddp=False))),
    }
    their_code.save_shards(module, tmp_path / "c", shards=3)
    tensors = {}
    for layout, files in layouts.items():
        out = convert(files, converted, tmp_path / f"out {layout}")
        tensors[layout] = load_file(out / weights.WEIGHTS_FILE)
        assert os.path.samefile(out / weights.TOWERS_FILE, converted / weights.TOWERS_FILE)
    first = tensors["training dict"]
    for layout, t in tensors.items():
        assert t.keys() == first.keys() and all(torch.equal(t[k], first[k]) for k in t), layout
    assert torch.equal(first["mbart.shared.weight"], hf.model.shared.weight.cpu())
    qkv = first["mbart.decoder.layers.1.cross.qkv.weight"]
    assert torch.equal(qkv.chunk(3)[1], hf.model.decoder.layers[1].encoder_attn.k_proj.weight.cpu())
    config = weights.read_config(tmp_path / "out shards by name")[1]
    assert config["train"] == {"stage": 2, "src": "en", "tgt": "de"}
    assert config["official"]["files"] == [str(tmp_path / "c" / f"model_best_test_{i}.pth") for i in (1, 2, 3)]
    assert config["official"]["unfreeze_clip"] is False and config["cliptrans"]["prompt"] == "official"


def test_a_model_trained_with_unfreeze_clip_brings_its_own_towers(converted, hf, hf_mclip_dir, hf_clip_dir,
                                                                  tmp_path, device):
    """--unfreeze_clip: M-CLIP (text_encoder) and the CLIPModel (image_encoder) are in their file, fine-tuned. The
    converted towers are those, in a towers file of the folder's own, and embed as the Hugging Face modules do."""
    text, image = load_hf_mclip(hf_mclip_dir), transformers.CLIPModel.from_pretrained(hf_clip_dir).eval()
    with torch.no_grad():  # as after fine-tuning: not the towers folder's weights
        for p in list(text.parameters()) + list(image.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    module = their_model("mlp", 10, converted, hf)
    module.clip = their_code.MClip(text, image)
    path = their_code.save_training_dict(module, tmp_path / "model_best_test.pth", ddp=True)
    out = convert([path], converted, tmp_path / "out")
    assert not os.path.samefile(out / weights.TOWERS_FILE, converted / weights.TOWERS_FILE)
    assert weights.read_config(out)[1]["official"]["unfreeze_clip"] is True
    model = weights.load(out, device=device)
    ids, mask = padded_batch(250002, [7, 5, 3], lang_id=None, seed=1)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(model.encode_text(ids.to(device), mask.to(device)).cpu(), mclip_reference(text, ids, mask),
                     atol=1e-4, name="fine-tuned text tower")
        ref = image.get_image_features(pixel_values=pixels)
        ref = ref if torch.is_tensor(ref) else ref.pooler_output  # (transformers 5: an output object)
        assert_close(model.encode_image(pixels.to(device)).cpu(), ref, atol=1e-4, name="image tower")


# ----------------------------------------------------------------------------- decoding as their code decodes


@pytest.mark.parametrize("P", [10, 4, 12])
def test_official_prompt_logits_equal_theirs(P, converted, hf, tmp_path, device):
    """The decoder over their test-time prompt `P1..Pp </s>` under their patched mask, against Hugging Face fed
    the same decoder_inputs_embeds and the 4D mask of their patch: the logits at every position. P = 4 and 12:
    the hard-coded columns 1..10 hold another part of the prompt."""
    module = their_model("mlp", P, converted, hf)
    model = weights.load(convert([their_code.save_training_dict(module, tmp_path / "m.pth")], converted,
                                 tmp_path / "out"), device=device)
    ids, mask, clip, _ = inputs(converted, device)
    with torch.no_grad():
        theirs = their_code.prompt(module.adapter, hf, clip)  # (B, P + 1, d)
        ref = hf(input_ids=ids, attention_mask=mask, decoder_inputs_embeds=theirs,
                 decoder_attention_mask=their_code.decoder_mask(len(ids), P + 1, theirs.dtype).to(device)).logits
        layout, make_mask = PROMPTS["official"]
        eos = model.mbart.embed_tokens(torch.full((len(ids), 1), 2, device=device))
        embeds = layout(eos, model.mapping(clip))
        assert_close(embeds, theirs, atol=1e-5, name="prompt")
        h = model.mbart.decoder(embeds, model.mbart.encode(ids, mask), mask, mask=make_mask(P, P + 1, device))
        assert_close(model.mbart.logits(h), ref, atol=1e-4, name="logits")


@pytest.mark.parametrize("num_beams", [1, 5])
@pytest.mark.parametrize("P", [10, 12])
def test_official_decoding_equals_theirs(num_beams, P, converted, hf, tmp_path, device):
    """Greedy and beam-5 search from their prompt, with their mask at the first step, as their generate runs: the
    same tokens. The tokens depend on what is tested: their causal-only mask, another sentence's prefix and our
    training layout each give other tokens."""
    module = their_model("transformer", P, converted, hf, seed=1)
    model = weights.load(convert([their_code.save_training_dict(module, tmp_path / "m.pth")], converted,
                                 tmp_path / "out"), device=device)
    patched = their_code.patched(hf)
    ids, mask, clip, lang = inputs(converted, device, B=6)
    args = dict(num_beams=num_beams, max_new_tokens=16)
    theirs = their_code.generate(module.adapter, patched, clip, ids, mask, lang, **args)
    ours = model.generate(clip, ids, mask, lang, **args)  # the converted model's prompt: official
    assert ours[:, 0].eq(lang).all()
    assert torch.equal(ours, theirs), f"\nours:\n{ours}\ntheirs:\n{theirs}"
    differ = lambda a, b: a.shape != b.shape or not torch.equal(a, b)  # noqa: E731
    assert differ(theirs, their_code.generate(module.adapter, patched, clip, ids, mask, lang, patched=False, **args))
    assert differ(theirs, their_code.generate(module.adapter, patched, clip.roll(1, 0), ids, mask, lang, **args))
    assert differ(ours, model.generate(clip, ids, mask, lang, prompt="train", **args))


# ----------------------------------------------------------------------------- bad input: a message each


class RunsCode:
    """A pickle that would run code when loaded without weights_only: it writes a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def broken(case, module, tmp_path):
    """Files of one kind of damage, for a model `module` (mlp adapter, 10 prefix vectors)."""
    state = module.state_dict()
    path = tmp_path / "model_best_test.pth"
    if case == "no file":
        return [path]
    if case == "shard missing":
        files = their_code.save_shards(module, tmp_path, shards=3)
        files[1].unlink()
        return [path]
    if case == "lfs pointer":  # `git clone` without git lfs: a small text file where the model should be
        path.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{'0' * 64}\nsize 1234\n")
        return [path]
    if case == "pickle with code":
        with open(path, "wb") as f:
            pickle.dump({"model": RunsCode(tmp_path / "code ran")}, f)
        return [path]
    edits = {
        "not a state dict": lambda: [1, 2, 3],
        "training dict of other things": lambda: {"model": {"step": 3}},
        "unknown training entry": lambda: {"model": state, "lr_scheduler": {}},
        "no adapter": lambda: {k: v for k, v in state.items() if not k.startswith("adapter.")},
        "adapter key missing": lambda: {k: v for k, v in state.items() if k != "adapter.hidden.1.weight"},
        "unknown key": lambda: {**state, "mbart.model.extra.weight": torch.zeros(2)},
        "other vocabulary": lambda: {**state, **{"mbart." + k: v for k, v in transformers.MBartForConditionalGeneration(
            tiny_mbart_config(300)).state_dict().items()}},
        "other clip width": lambda: their_code.CLIPTransModule(their_code.MLPAdapter(8, 32, 10), module.mbart).state_dict(),
    }
    torch.save(edits[case](), path)
    return [path]


@pytest.mark.parametrize("case, message", [
    ("no file", "model_best_test.pth not found, nor shards model_best_test_1.pth"),
    ("shard missing", "holds 2 shards of model_best_test (up to model_best_test_3.pth) but not 1: "
                      "model_best_test_2.pth: download every shard"),
    ("lfs pointer", "model_best_test.pth is a Git LFS pointer, not the weights"),
    ("pickle with code", "it holds more than tensors, and loading it would run code"),
    ("not a state dict", "holds a list that is not a state dict of tensors"),
    ("training dict of other things", "holds a dict that is not a state dict of tensors"),
    ("unknown training entry", "a training dict with unexpected entries ['lr_scheduler']"),
    ("no adapter", "no mapping network (adapter.* keys)"),
    ("adapter key missing", "are not those of one of the official adapters"),
    ("unknown key", "1 unexpected keys, first: ['mbart.model.extra.weight']"),
    ("other vocabulary", "its mBART has 300 ids of width 32, the one of"),
    ("other clip width", "adapter.hidden.0.weight has shape (320, 8), expected (320, 16)"),
])
def test_bad_files_get_a_message_and_write_nothing(case, message, converted, hf, tmp_path):
    module = their_model("mlp", 10, converted, hf)
    files = broken(case, module, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        official.main([*map(str, files), "--towers", str(converted), "--src", "en", "--tgt", "de",
                      "--out", str(out)])
    assert str(e.value.code).startswith("error: ") and message in str(e.value.code), e.value.code
    assert not out.exists() and not (tmp_path / "code ran").exists()


def test_a_missing_transformer_part_is_named(converted, hf, tmp_path):
    module = their_model("transformer", 10, converted, hf)
    state = {k: v for k, v in module.state_dict().items() if "norm2" not in k}
    torch.save(state, tmp_path / "m.pth")
    with pytest.raises(weights.ConversionError, match=r"2 missing keys, first: \['mapping.block.ln_mlp.weight', "
                                                      r"'mapping.block.ln_mlp.bias'\]; their released models"):
        convert([tmp_path / "m.pth"], converted, tmp_path / "out")


@pytest.mark.parametrize("cli, message", [
    (["--towers", "T", "--src", "en", "--tgt", "de"], "the following arguments are required: FILE"),
    (["m.pth", "--src", "en", "--tgt", "de"], "the following arguments are required: --towers"),
])
def test_command_line_asks_for_what_is_missing(cli, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        official.main([*cli, "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_unknown_language_and_used_folder_are_refused(converted, hf, tmp_path):
    path = their_code.save_training_dict(their_model("mlp", 10, converted, hf), tmp_path / "m.pth")
    with pytest.raises(weights.ConversionError, match="unknown language 'xx'"):
        official.convert_official([path], converted, "xx", "de", tmp_path / "out")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(weights.ConversionError, match="is not empty"):
        convert([path], converted, tmp_path / "used")


# ----------------------------------------------------------------------------- what a hostile user broke


def test_a_tensor_of_the_wrong_shape_is_named_in_one_line(converted, hf, tmp_path):
    """`python official.py m.pth ...` whose decoder q_proj weight is twice its size: one line names the
    key, the shape expected and the one found, before q, k and v are joined (which failed with a traceback)."""
    state = their_model("mlp", 10, converted, hf).state_dict()
    key, d = "mbart.model.decoder.layers.0.self_attn.q_proj.weight", sizes(converted)[1]
    state[key] = torch.zeros(2 * d, d)
    torch.save(state, tmp_path / "m.pth")
    with pytest.raises(SystemExit) as e:
        official.main([str(tmp_path / "m.pth"), "--towers", str(converted), "--src", "en", "--tgt", "de", "--out",
                       str(tmp_path / "out")])
    assert f"{key} has shape {(2 * d, d)}, expected {(d, d)}" in str(e.value.code), e.value.code
    assert len(str(e.value.code).splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_file_named_like_a_shard_converts_as_itself(converted, hf, tmp_path):
    """`official.py en_de_2016.pth ...`, a whole model under a name that ends in a number: the file itself, not
    shard 2016 of a set; `official.py ckpt[v2].pth` finds ckpt[v2]_1.pth and ckpt[v2]_2.pth (names matched
    literally, not as a pattern); a set missing most of its shards is named in a few words."""
    module = their_model("mlp", 10, converted, hf)
    whole = their_code.save_training_dict(module, tmp_path / "en_de_2016.pth")
    assert official.files_of([whole]) == [whole]
    reference = load_file(convert([whole], converted, tmp_path / "whole") / weights.WEIGHTS_FILE)
    (tmp_path / "v2").mkdir()
    shards = their_code.save_shards(module, tmp_path / "v2", name="ckpt[v2]")
    assert official.files_of([tmp_path / "v2" / "ckpt[v2].pth"]) == shards
    got = load_file(convert([tmp_path / "v2" / "ckpt[v2].pth"], converted, tmp_path / "sharded") / weights.WEIGHTS_FILE)
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)
    (tmp_path / "many").mkdir()
    torch.save({}, tmp_path / "many" / "m_1.pth")
    torch.save({}, tmp_path / "many" / "m_500.pth")
    with pytest.raises(weights.ConversionError) as e:
        official.files_of([tmp_path / "many" / "m.pth"])
    assert "but not 498: m_2.pth, m_3.pth, m_4.pth ..." in str(e.value) and len(str(e.value)) < 300, str(e.value)


@pytest.mark.parametrize("flags", [["--mapping", "transformer"], ["--prefix_len", "4"], ["--mbart", "x"]])
def test_official_refuses_what_the_file_decides(flags, tmp_path, capsys):
    """`official.py m.pth --mapping transformer ...`: the file decides its mapping network, so the flag is
    refused, not ignored (`official.py` took it: exit 0, an mlp of 10 vectors whatever was asked)."""
    with pytest.raises(SystemExit) as e:
        official.main(["m.pth", "--towers", "T", "--src", "en", "--tgt", "de", *flags, "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and f"unrecognized arguments: {' '.join(flags)}" in capsys.readouterr().err


def test_a_stage1_model_of_a_pair_into_english_captions_in_english(converted, hf, tmp_path, monkeypatch, capsys):
    """`official.py model_pretrained.pth --src de --tgt en --stage 1`: their captions are in English when
    the pair has English on either side (Spanish only without it), and translate.py --image captions in it."""
    path = their_code.save_training_dict(their_model("mlp", 10, converted, hf), tmp_path / "model_pretrained.pth")
    out = official.convert_official([path], converted, "de", "en", tmp_path / "out", stage=1)
    assert weights.read_config(out)[1]["train"]["caption_lang"] == "en"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    forced = []
    generate = cliptrans.CLIPTrans.generate
    monkeypatch.setattr(cliptrans.CLIPTrans, "generate", lambda self, *a, **k: forced.append(a[3]) or
                        generate(self, *a, **k))
    translate.main(["--checkpoint", str(out), "--beam", "1", "--max_new_tokens", "4", "--image", str(tmp_path / "red.png")])
    en = data.MBartTokenizer(out / weights.MBART_TOKENIZER).lang_id("en")
    assert forced == [en] and "warning" not in capsys.readouterr().err
