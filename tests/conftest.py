"""Shared pytest fixtures: tiny random Hugging Face checkpoints, built offline from explicit configs.

No hub access: every model is built from a config written here, given random weights (seeded, fp32),
and saved with `save_pretrained`, so the converter in weights.py reads the same files a real checkpoint
folder holds. Default-valued tensors hide loading bugs, so LayerNorm weights/biases and mBART's
`final_logits_bias` are randomised before saving. As in the real files (saved by transformers < 4.31),
the CLIP and M-CLIP weights also hold stale `*.embeddings.position_ids` buffers.

The builders are plain functions (`build_tiny_mbart(path)`, ...) so other scripts (the benchmark) can
reuse them; the fixtures are thin, session-scoped wrappers. Everything together builds in about ten seconds.

    tiny_tokenizer_json   tokenizer.json in mBART-50's id layout, 250054 ids as mbart-large-50's
    tiny_xlmr_tokenizer_json  the same pieces in XLM-R's layout (no language codes), 250002 ids as xlm-roberta-large's
    hf_mbart_dir          MBartForConditionalGeneration, model.safetensors (the real vocabulary size: 250054)
    hf_mbart_bin_dir      the same weights as pytorch_model.bin (as transformers 4 wrote them)
    hf_mbart_sharded_dir  the same weights in model-0000x-of-0000y.safetensors + index
    hf_clip_dir           full CLIPModel (text + vision)
    hf_clip_vision_dir    CLIPVisionModelWithProjection only (the vision-only repos' layout)
    hf_xlmr_dir           XLMRobertaModel with pooler (M-CLIP's modelBase; vocabulary 250002)
    hf_mclip_dir          multilingual_clip MultilingualCLIP, pytorch_model.bin (as the real repo ships)
    hf_mclip              that model loaded, eval mode, eager attention
    device                "cuda" when available, else "cpu"
"""

import gzip
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent  # the repo: cliptrans.py, weights.py
# shared/ sits beside the repo (CI runs a fresh clone next to it); MULTI30K_DIR points elsewhere
MULTI30K = Path(os.environ.get("MULTI30K_DIR", Path(__file__).resolve().parents[2] / "shared" / "multi30k"))

for p in (str(ROOT), str(TESTS)):  # `import weights` and `from hf_configs import ...` under plain `pytest`
    if p not in sys.path:
        sys.path.insert(0, p)

from hf_configs import MBART_LARGE_50, XLM_ROBERTA_LARGE, hf_param_counts  # noqa: E402,F401  (re-exported)
import weights  # noqa: E402
from cliptrans import CLIPTrans  # noqa: E402

SEED = 0


# ----------------------------------------------------------------------------- pytest setup

# The slow files: training runs (resume after kill -9, DDP, every flag), the command lines, bench.py's smoke run.
# `python -m pytest` runs the rest, the parity and shape checks, in about two minutes on two cores; `--all` runs
# everything, as CI does. A file or test named on the command line always runs.
SLOW = ("test_train.py", "test_translate.py", "test_bench.py")


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true",
                     help=f"also run the slow tests ({', '.join(SLOW)}): training runs, the command lines, bench.py")


def pytest_collection_modifyitems(config, items):
    named = any(arg.split("::")[0].endswith(".py") for arg in config.args)
    if config.getoption("--all") or named:
        return
    slow = [item for item in items if item.path.name in SLOW]
    config.hook.pytest_deselected(items=slow)
    items[:] = [item for item in items if item.path.name not in SLOW]


def pytest_configure(config):
    # parity tests also run on CUDA: TF32 matmuls differ from fp32 by ~1e-3, far above our tolerances
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:  # transformers 5 draws "Loading weights" / "Writing model shards" bars for every tiny model
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


@pytest.fixture(scope="session")
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- helpers for the tests


def assert_close(actual, expected, atol=1e-4, rtol=0, name=""):
    """torch.testing-style closeness with a message that says how far apart the tensors are."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    label = f"{name}: " if name else ""
    assert actual.shape == expected.shape, f"{label}shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{label}NaN in actual, shape {tuple(actual.shape)}"
    assert not torch.isnan(expected).any(), f"{label}NaN in expected, shape {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    diff = (a - e).abs()
    ok = bool((diff <= atol + rtol * e.abs()).all())
    assert ok, (f"{label}max abs diff {diff.max().item():.3e}, mean abs diff {diff.mean().item():.3e} "
                f"(atol {atol}, rtol {rtol}), shape {tuple(actual.shape)}")


def mclip_reference(model, input_ids, attention_mask):
    """M-CLIP's text embedding from token ids, exactly as MultilingualCLIP.forward computes it from text.

    The package's forward takes raw strings and a tokenizer; we start after tokenisation so both sides
    see the same (B, T) ids. Returns (B, numDims)."""
    embs = model.transformer(input_ids=input_ids, attention_mask=attention_mask)[0]  # (B, T, C)
    att = attention_mask
    embs = (embs * att.unsqueeze(2)).sum(dim=1) / att.sum(dim=1)[:, None]  # mean over real tokens, (B, C)
    return model.LinearTransformation(embs)  # (B, numDims)


# ----------------------------------------------------------------------------- tokenizer


def _fairseq_language_codes():
    from transformers.models.mbart50.tokenization_mbart50 import FAIRSEQ_LANGUAGE_CODES
    return list(FAIRSEQ_LANGUAGE_CODES)  # 52 codes, ar_AR first, sl_SI last


def _stable_pieces(trained, n_specials):
    """The trained pieces [(piece, score)] in an order that every run writes alike, padded to the real models'."""
    # The trainer finds the same pieces every run, but not in the same order: scores differ in the last
    # bits, equal scores come in any order, and the characters it keeps without choosing them get made-up
    # scores (lowest, 1e-4 apart) in hash-map order. Round, hand those scores out alphabetically, and sort,
    # so that every run writes the same ids.
    pieces = [(p, round(s, 6)) for p, s in trained]
    low = min(s for _, s in pieces)
    kept = sorted(p for p, s in pieces if s < low + 0.1)
    kept_scores = sorted((s for _, s in pieces if s < low + 0.1), reverse=True)
    pieces = [(p, s) for p, s in pieces if s >= low + 0.1] + list(zip(kept, kept_scores))
    pieces = sorted(pieces, key=lambda v: (-v[1], v[0]))
    # Pad to the real number of pieces with 2-character strings from the private-use area (U+E000..U+F8FF).
    # Their score is the lowest trained one, so that the Unigram model's penalty for unknown characters (the
    # lowest score minus 10) stays the same too.
    num_real = MBART_LARGE_50["vocab_size"] - n_specials - 52 - 1
    assert num_real == XLM_ROBERTA_LARGE["vocab_size"] - n_specials - 1 == 249997
    private = [chr(c) for c in range(0xE000, 0xF900)]
    pad = num_real - len(pieces)
    pieces += [(private[i // len(private)] + private[i % len(private)], pieces[-1][1]) for i in range(pad)]
    return pieces


def build_tiny_tokenizer(path, layout="mbart", num_lines=300, num_pieces=300):
    """Train a SentencePiece-style Unigram tokenizer on Multi30k and save it as tokenizer.json at `path`.

    layout "mbart": mBART-50's ids, <s>0 <pad>1 </s>2 <unk>3, pieces, the 52 language codes, <mask> last, and
    its post-processor `en_XX $A </s>`; "xlmr": XLM-R's, the same without the language codes, `<s> $A </s>`.
    (The HF tokenizer classes set their own post-processor anyway.) The pieces are padded to the real models'
    249997, so the tokenizer has exactly as many ids as mbart-large-50 (250054) or xlm-roberta-large (250002),
    as the converter checks; the padding pieces are strings of private-use characters, which no text holds, so
    a sentence gets the same ids as from the trained pieces alone."""
    if layout not in ("mbart", "xlmr"):
        raise ValueError(f"layout must be mbart or xlmr, got {layout!r}")
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors, trainers

    if not (MULTI30K / "raw").is_dir():
        raise FileNotFoundError(f"Multi30k text not found at {MULTI30K / 'raw'}: the tests expect the shared/ "
                                f"folder (shared/multi30k/raw/train.en.gz, ...) next to the repository")
    lines = []
    for lang in ("en", "de"):  # the pair the tests translate; umlauts and ß become pieces too
        with gzip.open(MULTI30K / "raw" / f"train.{lang}.gz", "rt", encoding="utf-8") as f:
            lines += [next(f).strip() for _ in range(num_lines // 2)]

    specials = ["<s>", "<pad>", "</s>", "<unk>"]

    def pipeline(tok):  # as in facebook/mbart-large-50's tokenizer.json (minus the precompiled charsmap)
        tok.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)

    trainer_tok = Tokenizer(models.Unigram())
    pipeline(trainer_tok)
    trainer = trainers.UnigramTrainer(vocab_size=len(specials) + num_pieces, special_tokens=specials,
                                      unk_token="<unk>", show_progress=False)
    trainer_tok.train_from_iterator(lines, trainer)
    vocab = [tuple(v) for v in json.loads(trainer_tok.to_str())["model"]["vocab"]]
    assert [v[0] for v in vocab[:4]] == specials, vocab[:4]
    vocab = vocab[:4] + _stable_pieces(vocab[4:], len(specials))

    # language codes (mBART-50 only) and <mask> go after the pieces, in the Unigram vocab itself
    codes = _fairseq_language_codes() if layout == "mbart" else []
    vocab += [(c, 0.0) for c in codes] + [("<mask>", 0.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    pipeline(tok)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + codes]
                           + [AddedToken("<mask>", special=True, normalized=False, lstrip=True)])
    first = "en_XX" if layout == "mbart" else "<s>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{first} $A </s>", pair=f"{first} $A $B </s>",
        special_tokens=[(first, tok.token_to_id(first)), ("</s>", tok.token_to_id("</s>"))])
    size = (MBART_LARGE_50 if layout == "mbart" else XLM_ROBERTA_LARGE)["vocab_size"]
    assert tok.get_vocab_size() == len(vocab) == size and tok.token_to_id("<mask>") == size - 1

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def tokenizer_vocab_size(tokenizer_json):
    """Number of ids in a tokenizer.json built by build_tiny_tokenizer (pieces, codes and <mask> included):
    250054 or 250002, the real models' vocab_size."""
    return len(json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))["model"]["vocab"])


# ----------------------------------------------------------------------------- models


def _randomise_layer_norms(model, scale=0.1):
    # default LayerNorm ones/zeros would hide a swapped or missing norm in a converter
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.add_(torch.randn_like(m.weight) * scale)
                m.bias.add_(torch.randn_like(m.bias) * scale)


def tiny_mbart_config(vocab_size):
    from transformers import MBartConfig
    # set everything mbart-large-50 sets: MBartConfig() defaults differ (vocab 50265, scale_embedding False)
    return MBartConfig(
        vocab_size=vocab_size, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=64, scale_embedding=True, activation_function="gelu",
        dropout=0.1, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
        tie_word_embeddings=True, tokenizer_class="MBart50Tokenizer",  # as the real config.json says
        # init_std 0.25, not 0.02: at width 32, std 0.02 gives logits of std ~0.15 that hardly depend on the
        # source, so greedy/beam search emit one token forever and an EOS boost ends every sentence at once;
        # 0.25 gives logits of std ~1.5 and sentences that end at different lengths (test_generate_equals_hf)
        init_std=0.25)


def _build_mbart_model(vocab_size):
    from transformers import MBartForConditionalGeneration
    torch.manual_seed(SEED)
    model = MBartForConditionalGeneration(tiny_mbart_config(vocab_size)).float().eval()
    with torch.no_grad():  # a zeros buffer by default: random values prove the converter loads it
        model.final_logits_bias.copy_(torch.randn_like(model.final_logits_bias) * 0.1)
    _randomise_layer_norms(model)
    return model


def build_tiny_mbart(path, tokenizer_json, fmt="safetensors"):
    """Tiny random mBART-50 (d_model 32, 2+2 layers, 4 heads, ffn 64, 64 positions) saved at `path`.

    fmt: "safetensors" (model.safetensors), "bin" (pytorch_model.bin with the tied copies
    model.{encoder,decoder}.embed_tokens.weight and lm_head.weight, as transformers 4 wrote it) or
    "sharded" (model-0000x-of-0000y.safetensors + model.safetensors.index.json).
    Same seed, so all three hold the same weights. tokenizer.json is copied in."""
    path = Path(path)
    model = _build_mbart_model(tokenizer_vocab_size(tokenizer_json))
    if fmt == "safetensors":
        model.save_pretrained(path)
    elif fmt == "sharded":
        model.save_pretrained(path, max_shard_size=100_000)  # bytes: the 32 MB embedding + ~250 KB -> 4 shards
    elif fmt == "bin":
        # transformers 5 dropped save_pretrained(safe_serialization=False): write the .bin ourselves
        model.save_pretrained(path)
        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    else:
        raise ValueError(f"fmt must be safetensors, bin or sharded, got {fmt!r}")
    shutil.copy(tokenizer_json, path / "tokenizer.json")
    return path


def tiny_clip_config():
    from transformers import CLIPConfig
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  image_size=32, patch_size=8, num_channels=3, projection_dim=16,  # 4 x 4 = 16 patches + CLS
                  hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0)
    text = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=16, projection_dim=16, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def _add_stale_position_ids(path, prefixes, num_positions):
    # openai/clip-vit-base-patch32 and M-CLIP's files come from transformers < 4.31, when position_ids
    # was a persistent buffer: the real files hold `*.embeddings.position_ids`, so ours do too
    from safetensors.torch import load_file, save_file
    state = load_file(path / "model.safetensors")
    for prefix, n in zip(prefixes, num_positions):
        state[f"{prefix}.embeddings.position_ids"] = torch.arange(n)[None]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def build_tiny_clip(path):
    """Tiny random CLIPModel (text + vision; vision hidden 32, 2 layers, 4 heads, ffn 64, image 32,
    patch 8, projection 16, quick_gelu) saved at `path` as model.safetensors."""
    from transformers import CLIPModel
    torch.manual_seed(SEED)
    config = tiny_clip_config()
    model = CLIPModel(config).float().eval()
    _randomise_layer_norms(model)
    model.save_pretrained(path)
    v, t = config.vision_config, config.text_config
    _add_stale_position_ids(Path(path), ["vision_model", "text_model"],
                            [(v.image_size // v.patch_size) ** 2 + 1, t.max_position_embeddings])
    return Path(path)


def build_tiny_clip_vision(path):
    """Tiny random CLIPVisionModelWithProjection, same vision config as build_tiny_clip (different weights)."""
    from transformers import CLIPVisionModelWithProjection
    torch.manual_seed(SEED + 1)
    config = tiny_clip_config().vision_config
    model = CLIPVisionModelWithProjection(config).float().eval()
    _randomise_layer_norms(model)
    model.save_pretrained(path)
    _add_stale_position_ids(Path(path), ["vision_model"], [(config.image_size // config.patch_size) ** 2 + 1])
    return Path(path)


def tiny_xlmr_config(vocab_size):
    from transformers import XLMRobertaConfig
    # layer_norm_eps must be set: XLMRobertaConfig() says 1e-12, xlm-roberta-large says 1e-5
    return XLMRobertaConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64 + 2, type_vocab_size=1, layer_norm_eps=1e-5, hidden_act="gelu",
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, pad_token_id=1, bos_token_id=0, eos_token_id=2)


def build_tiny_xlmr(path, tokenizer_json):
    """Tiny random XLM-R (hidden 32, 2 layers, 4 heads, ffn 64, 66 positions) with its pooler, as the
    real xlm-roberta-large checkpoint has one; saved at `path` with tokenizer.json."""
    from transformers import XLMRobertaModel
    torch.manual_seed(SEED + 2)
    model = XLMRobertaModel(tiny_xlmr_config(tokenizer_vocab_size(tokenizer_json)), add_pooling_layer=True)
    model = model.float().eval()
    _randomise_layer_norms(model)
    model.save_pretrained(path)
    shutil.copy(tokenizer_json, Path(path) / "tokenizer.json")
    return Path(path)


def build_tiny_mclip(path, xlmr_dir, image_dim=16):
    """M-CLIP (multilingual_clip.pt_multilingual_clip.MultilingualCLIP) on the tiny XLM-R at `xlmr_dir`,
    saved at `path` as config.json + pytorch_model.bin, the real M-CLIP repos' layout.

    config.json: modelBase = str(xlmr_dir), transformerDimensions 32, numDims = image_dim.
    Keys: transformer.* (XLM-R with pooler, plus a stale embeddings.position_ids as in the real file)
    and LinearTransformation.{weight,bias}."""
    from multilingual_clip.Config_MCLIP import MCLIPConfig
    from multilingual_clip.pt_multilingual_clip import MultilingualCLIP
    torch.manual_seed(SEED + 3)
    config = MCLIPConfig(modelBase=str(xlmr_dir), transformerDimSize=32, imageDimSize=image_dim)
    model = MultilingualCLIP(config).float().eval()  # loads the XLM-R weights from xlmr_dir
    with torch.no_grad():  # nn.Linear's default bias init is fine, but make it clearly non-zero
        model.LinearTransformation.bias.copy_(torch.randn_like(model.LinearTransformation.bias) * 0.1)
    path = Path(path)
    model.save_pretrained(path)  # writes config.json (+ model.safetensors, replaced below)
    (path / "model.safetensors").unlink()
    state = dict(model.state_dict())
    state["transformer.embeddings.position_ids"] = torch.arange(model.transformer.config.max_position_embeddings)[None]
    torch.save(state, path / "pytorch_model.bin")
    return path


def load_hf_mclip(path):
    """MultilingualCLIP from `path`, eval mode, fp32, eager attention in its XLM-R.

    transformers 5: the package's `_load_state_dict_into_model` override is never called any more, and
    `from_pretrained` builds the module on the meta device while __init__ itself calls
    AutoModel.from_pretrained(modelBase). So we build it from its config (which loads modelBase's weights)
    and load the state dict ourselves, strictly, minus the stale position_ids buffer."""
    from multilingual_clip.Config_MCLIP import MCLIPConfig
    from multilingual_clip.pt_multilingual_clip import MultilingualCLIP
    path = Path(path)
    config = MCLIPConfig.from_pretrained(path)
    model = MultilingualCLIP(config)
    state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    model.load_state_dict(state, strict=True)
    model.transformer.set_attn_implementation("eager")
    return model.float().eval()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_tokenizer_json(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")


@pytest.fixture(scope="session")
def tiny_xlmr_tokenizer_json(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer_xlmr") / "tokenizer.json", layout="xlmr")


@pytest.fixture(scope="session")
def hf_mbart_dir(tmp_path_factory, tiny_tokenizer_json):
    return build_tiny_mbart(tmp_path_factory.mktemp("hf_mbart"), tiny_tokenizer_json)


@pytest.fixture(scope="session")
def hf_mbart_bin_dir(tmp_path_factory, tiny_tokenizer_json):
    return build_tiny_mbart(tmp_path_factory.mktemp("hf_mbart_bin"), tiny_tokenizer_json, fmt="bin")


@pytest.fixture(scope="session")
def hf_mbart_sharded_dir(tmp_path_factory, tiny_tokenizer_json):
    return build_tiny_mbart(tmp_path_factory.mktemp("hf_mbart_sharded"), tiny_tokenizer_json, fmt="sharded")


@pytest.fixture(scope="session")
def hf_clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("hf_clip"))


@pytest.fixture(scope="session")
def hf_clip_vision_dir(tmp_path_factory):
    return build_tiny_clip_vision(tmp_path_factory.mktemp("hf_clip_vision"))


@pytest.fixture(scope="session")
def hf_xlmr_dir(tmp_path_factory, tiny_xlmr_tokenizer_json):
    return build_tiny_xlmr(tmp_path_factory.mktemp("hf_xlmr"), tiny_xlmr_tokenizer_json)


@pytest.fixture(scope="session")
def hf_mclip_dir(tmp_path_factory, hf_xlmr_dir):
    return build_tiny_mclip(tmp_path_factory.mktemp("hf_mclip"), hf_xlmr_dir)


@pytest.fixture(scope="session")
def hf_mclip(hf_mclip_dir):
    return load_hf_mclip(hf_mclip_dir)


# ----------------------------------------------------------------------------- the converted models
# (session fixtures of test_model.py, test_agreement.py and test_recipe.py)


@pytest.fixture(scope="session")
def converted(tmp_path_factory, hf_mbart_dir, hf_mclip_dir, hf_xlmr_dir, hf_clip_dir):
    out = tmp_path_factory.mktemp("converted")
    weights.convert_all(hf_mbart_dir, hf_mclip_dir, hf_xlmr_dir, hf_clip_dir, out)
    return out


@pytest.fixture(scope="session")
def model(converted, device):
    return weights.load(converted, device=device)


@pytest.fixture(scope="session")
def hf_mbart(hf_mbart_dir, device):
    import transformers
    return transformers.MBartForConditionalGeneration.from_pretrained(
        hf_mbart_dir, attn_implementation="eager", dtype=torch.float32).eval().to(device)


@pytest.fixture(scope="session")
def peaked_pair(tmp_path_factory, hf_mbart, hf_mbart_dir, hf_mclip_dir, hf_xlmr_dir, hf_clip_dir, device):
    """mBART with large random weights (std 0.3), so that what it generates depends on its input: with a small
    init every sentence decodes alike. Returns (Hugging Face model, ours), converted through weights.py."""
    import transformers
    folder = tmp_path_factory.mktemp("peaked")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        state = {k: (torch.randn(v.shape, generator=g) * 0.3 if v.dim() == 2 else v.clone())
                 for k, v in hf_mbart.cpu().state_dict().items()}
    hf_mbart.to(device)
    peaked = transformers.MBartForConditionalGeneration(hf_mbart.config)
    peaked.load_state_dict(state, strict=False)
    peaked.tie_weights()
    peaked.save_pretrained(folder / "mbart")
    shutil.copy(hf_mbart_dir / "tokenizer.json", folder / "mbart")  # the converter checks the model's tokenizer
    weights.convert_all(folder / "mbart", hf_mclip_dir, hf_xlmr_dir, hf_clip_dir, folder / "ours")
    hf = transformers.MBartForConditionalGeneration.from_pretrained(
        folder / "mbart", attn_implementation="eager", dtype=torch.float32).eval().to(device)
    return hf, weights.load(folder / "ours", device=device)


def bench_models(cfg):
    """bench.py's two sides on the same weights: CLIPTrans, Hugging Face's mBART (converted into ours with the
    converter's rules) and a copy of our mapping network for Hugging Face's side."""
    from bench import bench
    mbart_hf, xlmr_hf, head_hf, vision_hf = bench.hf_models(cfg)
    ours = CLIPTrans(cfg)
    bench.convert_from_hf(ours, mbart_hf, xlmr_hf, head_hf, vision_hf)
    mapping_hf = type(ours.mapping)(cfg.mapping, cfg.text.embed_dim, cfg.mbart.d_model)
    mapping_hf.load_state_dict(ours.mapping.state_dict())
    return ours, mbart_hf, mapping_hf
