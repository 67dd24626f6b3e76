"""The training recipe's parts against references written here or taken from Hugging Face.

- Stage 0's objectives (stage0.py): the contrastive loss is CLIP's symmetric InfoNCE on the towers' normalised
  embeddings, image i paired with its own caption; text infilling replaces spans of one to three words by one
  <mask> each and keeps the language code and </s>, as a reference written here does (it masks 27% of the words,
  not mBART's 35%: an expected failure records it).
- The learning rate (train.lr_at): constant with and without warmup, cosine after a warmup, at exact steps.
- fp16's gradient scaler through a checkpoint and --resume (runs.Run): its scale and growth tracker come back.
- Training mode: the stage 2 loss and gradients with dropout on, against Hugging Face's MBart in train mode fed the
  same prefix and mask, under the same random seed (the dropout masks are drawn in the same order, at the same
  places).
- From files to the towers: a text file and image files through data.py's readers, tokenizers and CLIP
  preprocessing into the towers, against Hugging Face's tokenizers, CLIPImageProcessor and models."""

import gzip
import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import folders
import runs
import stage0
import tiny_world
import train
import transformers
import weights
from bench import bench  # bench/bench.py: Hugging Face's models on the same weights, its stage 2 step
from cliptrans import CLIPTrans, CLIPTransConfig
from conftest import MULTI30K, assert_close, bench_models
from settings import Config, defaults


# ----------------------------------------------------------------------------- stage 0


class Stop(Exception):
    pass


def info_nce(image, text, scale):
    """CLIP's symmetric InfoNCE, written out: image i's caption is text i, every other caption of the batch is a
    negative, and the other way round; image, text (B, D) L2-normalised."""
    sim = scale * image @ text.T  # (B, B): image i against caption j
    image_to_text = -sim.log_softmax(dim=1).diagonal().mean()  # each row: which caption is image i's?
    text_to_image = -sim.log_softmax(dim=0).diagonal().mean()  # each column: which image is caption j's?
    return (image_to_text + text_to_image) / 2


def test_stage0_contrastive_loss_is_symmetric_infonce(tmp_path, monkeypatch):
    """The first step of stage 0's contrastive objective, caught in flight: the loss it backpropagates equals
    `info_nce` on the embeddings it normalised, at CLIP's initial temperature 0.07; and the images and captions
    of the batch are pairs (image j's pixels are those of the scene caption j describes, in its language)."""
    world = tiny_world.make_tiny_world(tmp_path / "world", n_train=32, n_val=2, n_test=2, image_size=32)
    seen = {"normalized": [], "pixels": [], "texts": []}

    class SpyF:  # stage0's torch.nn.functional, recording what it normalises
        def __getattr__(self, name):
            return getattr(F, name)

        def normalize(self, x, dim):
            seen["normalized"].append(F.normalize(x, dim=dim).detach())
            return F.normalize(x, dim=dim)

    def backward(loss, *args, **kw):  # the first loss stage 0 backpropagates: the contrastive one
        seen["loss"] = loss.detach()
        raise Stop

    encode_image, encode = CLIPTrans.encode_image, data.TextTowerTokenizer.encode
    monkeypatch.setattr(stage0, "F", SpyF())
    monkeypatch.setattr(torch.Tensor, "backward", backward)
    monkeypatch.setattr(CLIPTrans, "encode_image", lambda m, x: seen["pixels"].append(x) or encode_image(m, x))
    monkeypatch.setattr(data.TextTowerTokenizer, "encode", lambda t, texts, *a, **k: seen["texts"].append(texts)
                        or encode(t, texts, *a, **k))
    settings = defaults(Config(stage=0, data=str(world), out=str(tmp_path / "stage0"), batch_size=8, epochs=1,
                               lr=1e-3, seed=0, log_every=1))
    with pytest.raises(Stop):
        stage0.stage0(settings, "cpu")
    image, text = seen["normalized"][:2]  # (B, D) each, in the order stage 0 embeds them
    assert image.shape == text.shape == (8, 64)
    assert_close(seen["loss"], info_nce(image, text, 1 / 0.07), atol=1e-6, name="contrastive loss")
    # and the tolerance tells it from the losses it could be instead: without the temperature, one-sided
    one_sided = -(image @ text.T / 0.07).log_softmax(dim=1).diagonal().mean()
    for wrong in (info_nce(image, text, 1.0), one_sided):
        assert (seen["loss"] - wrong).abs() > 1e-4

    split = data.read_split(world, "train", ["en", "de", "fr"], images=world / "images")
    pixels, captions = seen["pixels"][0], seen["texts"][0]  # (B, 3, 32, 32), B strings
    for j, caption in enumerate(captions):  # the scenes this caption describes, in any language
        scenes = [i for lang in ("en", "de", "fr") for i, s in enumerate(split.sentences[lang]) if s == caption]
        assert any(torch.equal(pixels[j], data.load_image(split.images[i], 32)) for i in scenes), caption


def reference_infill(ids, mask_id, g, ratio=0.35):
    """Text infilling as mBART's noise, written again: of the n words between the language code and </s>, a budget
    of round(ratio * n) (at least 1) is masked, in spans that start at budget // 2 (at least 1) positions drawn
    at random (a permutation of the word positions, its first ones), each span 1 to 3 words (uniform, cut to the
    budget left) replaced by one <mask>; a start inside an earlier span is skipped. The same random draws in the
    same order as stage0.infill, so the same generator state gives the same noise."""
    words = list(ids[1:-1])
    budget = max(1, round(len(words) * ratio))
    starts = torch.randperm(len(words), generator=g)[:max(1, budget // 2)].tolist()
    masked = [False] * len(words)
    span_of = {}  # the first word of each span -> its length
    i = 0
    while i < len(words):
        if i in starts and budget > 0:
            n = min(budget, int(torch.randint(3, (1,), generator=g)) + 1)
            span_of[i] = n
            for k in range(i, min(i + n, len(words))):
                masked[k] = True
            budget -= n
            i += n
        else:
            i += 1
    out = []
    for i, w in enumerate(words):
        if i in span_of:
            out.append(mask_id)
        elif not masked[i]:
            out.append(w)
    return [ids[0]] + out + [ids[-1]]


def test_infill_equals_a_reference_and_masks_spans():
    """stage0.infill against `reference_infill` on a seeded generator (the same draws in the same order: equal
    outputs), and its properties on 400 sentences of 3 to 24 distinct word ids: the language code and </s> kept,
    at least one <mask>, the kept words in order, each run of k <mask>s standing for k to 3k consecutive words,
    never more than round(35%) of a sentence's words masked, and 25 to 30% of all words (see the next test)."""
    MASK, LANG, EOS = 999, 900, 2
    g_ours, g_ref, g = (torch.Generator().manual_seed(70) for _ in range(3))
    masked = total = 0
    for _ in range(400):
        n = int(torch.randint(3, 25, (1,), generator=g))
        ids = [LANG] + list(range(10, 10 + n)) + [EOS]  # distinct words: the masked ones are the missing ones
        out = stage0.infill(ids, MASK, g_ours)
        assert out == reference_infill(ids, MASK, g_ref), ids
        assert out[0] == LANG and out[-1] == EOS and MASK in out
        kept = [w for w in out[1:-1] if w != MASK]
        assert kept == sorted(kept) and set(kept) <= set(ids[1:-1]), out
        # before each kept word (and after the last): how many words are missing, and how many <mask>s stand there
        missing = [b - a - 1 for a, b in zip([9] + kept, kept + [10 + n])]
        masks, run = [], 0
        for w in out[1:-1]:
            if w == MASK:
                run += 1
            else:
                masks.append(run)
                run = 0
        masks.append(run)
        for gap, m in zip(missing, masks):
            assert m <= gap <= 3 * m, f"{gap} words under {m} <mask>: {out}"
        assert n - len(kept) <= max(1, round(0.35 * n)), out
        masked += n - len(kept)
        total += n
    assert 0.25 < masked / total < 0.30, f"{masked / total:.3f} of the words masked"


# ----------------------------------------------------------------------------- the learning rate


def test_learning_rate_schedule():
    """train.lr_at at the steps where the schedule turns, against values worked out by hand (steps count from 0;
    `total` steps in all)."""
    lr = lambda step, total=110, **kw: train.lr_at(step, Config(lr=1e-3, **kw), total)  # noqa: E731
    approx = lambda x: pytest.approx(x, rel=1e-12, abs=0)  # noqa: E731
    # constant (the paper): the same rate at every step
    assert [lr(s) for s in (0, 1, 55, 109)] == [1e-3] * 4
    # constant after a linear warmup of 10 steps: 1/10, 2/10, .. of the rate, the full rate from step 9 on
    assert [lr(s, warmup_steps=10) for s in (0, 4, 8, 9, 10, 109)] == [approx(1e-4), approx(5e-4), approx(9e-4),
                                                                       1e-3, 1e-3, 1e-3]
    # cosine after a warmup of 10: the warmup's last step at the full rate, then 0.5 (1 + cos(pi t)), t the
    # fraction of the 100 decay steps gone: 1 at step 10, 1/2 halfway (step 60), 0 at step `total`
    cos = dict(schedule="cosine", warmup_steps=10)
    assert [lr(s, **cos) for s in (0, 9)] == [approx(1e-4), approx(1e-3)]
    assert lr(10, **cos) == approx(1e-3)
    assert lr(35, **cos) == approx(1e-3 * (2 + math.sqrt(2)) / 4)  # a quarter of the way: cos(pi/4) = 1/sqrt(2)
    assert lr(60, **cos) == approx(5e-4)
    assert lr(109, **cos) == approx(1e-3 * (1 - math.cos(math.pi / 100)) / 2)  # the last step: 2.47e-7
    assert lr(110, **cos) == pytest.approx(0, abs=1e-18)
    # cosine without warmup: the full rate at step 0, half at total / 2
    assert lr(0, total=50, schedule="cosine") == 1e-3 and lr(25, total=50, schedule="cosine") == approx(5e-4)


# ----------------------------------------------------------------------------- fp16's gradient scaler


def scaler_steps(scaler, opt, param, grads):
    """One optimizer step per gradient scale factor in `grads` (inf: an overflow, the step skipped)."""
    for g in grads:
        opt.zero_grad()
        scaler.scale((param * g).sum()).backward()
        scaler.step(opt)
        scaler.update()


def test_grad_scaler_state_survives_a_resume(tmp_path):
    """fp16 training's GradScaler (enabled here on the CPU, which torch.amp supports) through runs.Run's
    checkpoint and --resume: after an overflow (scale halved) and two clean steps (growth tracker 2 of 3), the
    resumed run's fresh scaler has the same scale and tracker, and the next clean step doubles both scales alike.
    The optimizer's state comes back too (AdamW's step count and moments)."""
    env = runs.Env(0, 1, torch.device("cpu"), "fp16", nullcontext())
    cfg = CLIPTransConfig.preset("tiny")
    cfg.mbart.vocab_size = cfg.text.vocab_size = 128
    (tmp_path / "any.json").write_text("{}")  # a checkpoint carries its start's tokenizers: any files do here
    tokenizers = tmp_path / "start"  # and shares its towers file
    weights.save(CLIPTrans(cfg), tokenizers, files=dict.fromkeys((weights.MBART_TOKENIZER, weights.TEXT_TOKENIZER),
                                                                 tmp_path / "any.json"))

    def new_run(resume, start):
        torch.manual_seed(0)
        model = CLIPTrans(cfg)
        param = model.mapping.net[0].bias  # (P d,): one parameter trains
        opt = torch.optim.AdamW([param], lr=1e-3)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
        settings = {"out": str(tmp_path / "run")}
        return runs.Run(settings, (), env, model, opt, scaler, start, resume=resume), param

    run, param = new_run(False, tokenizers)
    assert run.scaler.is_enabled()
    scaler_steps(run.scaler, run.opt, param, [math.inf, 1.0, 1.0])
    assert run.scaler.get_scale() == 512.0 and run.scaler.state_dict()["_growth_tracker"] == 2
    run.step = 3
    run.save("last")
    folders.release(run.out)
    resumed, param2 = new_run(True, tmp_path / "run" / "last")
    assert resumed.step == 3
    assert resumed.scaler.state_dict() == run.scaler.state_dict()
    assert resumed.opt.state_dict()["state"][0]["step"] == run.opt.state_dict()["state"][0]["step"] == 2
    assert_close(resumed.opt.state_dict()["state"][0]["exp_avg"], run.opt.state_dict()["state"][0]["exp_avg"],
                 atol=0, name="AdamW's first moment")
    scaler_steps(run.scaler, run.opt, param, [1.0])
    scaler_steps(resumed.scaler, resumed.opt, param2, [1.0])
    assert run.scaler.get_scale() == resumed.scaler.get_scale() == 1024.0  # grown after 3 clean steps
    folders.release(resumed.out)


# ----------------------------------------------------------------------------- training mode


def test_training_mode_equals_hf_with_the_same_dropout_masks():
    """The stage 2 training loss with dropout on (train mode, dropout 0.1 as mbart-large-50; its attention and
    activation dropouts are 0, as there) against Hugging Face's MBartForConditionalGeneration in train mode, fed the
    same prefix and our prefix mask (bench.py's `hf_forward`), on the same weights: under the same seed the two
    draw the same dropout masks in the same order at the same places (after the embeddings' LayerNorm, after each
    attention and each feed-forward, encoder then decoder), so the losses and every gradient agree. Another seed
    gives another loss: the dropout is on."""
    torch.manual_seed(0)
    cfg = CLIPTransConfig.preset("tiny")
    assert cfg.mbart.dropout == 0.1
    ours, mbart_hf, mapping_hf = bench_models(cfg)
    assert (mbart_hf.config.dropout, mbart_hf.config.attention_dropout, mbart_hf.config.activation_dropout) == (
        0.1, 0.0, 0.0), "mbart-large-50's dropouts (tests/hf_configs.py)"
    g = torch.Generator().manual_seed(1)
    V = cfg.mbart.vocab_size
    src, src_mask = torch.randint(4, V - 60, (4, 10), generator=g), torch.ones(4, 10, dtype=torch.long)
    src[:, 0], src[:, -1], src_mask[3, 6:] = V - 51, 2, 0
    tgt = torch.randint(4, V - 60, (4, 9), generator=g)
    tgt[:, 0], tgt[:, -1], tgt[2, 5:] = V - 48, 2, 1  # one target padded
    clip = torch.randn(4, cfg.text.embed_dim, generator=g)
    for m in (ours, mbart_hf, mapping_hf):
        m.train()

    def grads(loss, module):
        module.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    losses = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        _, labels = ours.decoder_inputs(clip, tgt)
        ref = bench.hf_forward(mbart_hf, mapping_hf, clip, src, src_mask, tgt, labels, cfg.mapping.prefix_len).loss
        hf_grads = grads(ref, mbart_hf)
        torch.manual_seed(seed)
        loss = ours(clip, src, src_mask, tgt)
        our_grads = grads(loss, ours.mbart)
        assert_close(loss, ref, atol=2e-6, name=f"loss, seed {seed}")
        losses[seed] = loss.item()
        # Hugging Face's gradients under our names, by the converter's own rules (the tied embedding's once)
        named = {k: hf_grads[k] for k in mbart_hf.state_dict() if k in hf_grads}
        named.update({k: hf_grads["model.shared.weight"] for k in mbart_hf.state_dict()
                      if k.endswith(("embed_tokens.weight", "lm_head.weight"))})
        named["final_logits_bias"] = torch.zeros(V)  # a buffer: no gradient on either side
        shapes = {k[len("mbart."):]: tuple(v.shape) for k, v in ours.state_dict().items() if k.startswith("mbart.")}
        converted_grads = weights.convert(named, weights.MBART_RULES, {f"mbart.{k}": s for k, s in shapes.items()},
                                          "hf grads")
        assert {f"mbart.{k}" for k in our_grads} <= set(converted_grads)
        for k, grad in our_grads.items():  # within 1e-5 of each gradient's largest entry (measured: 4e-7 at most)
            ref = converted_grads[f"mbart.{k}"]
            scale = ref.abs().max().item()
            assert scale > 0, k
            assert_close(grad, ref, atol=1e-5 * scale, name=f"gradient of {k}, seed {seed}")
    assert abs(losses[0] - losses[1]) > 1e-3, "the dropout masks change the loss"


# ----------------------------------------------------------------------------- from files to the towers


def openai_clip_processor(size):
    """Hugging Face's CLIPImageProcessor as openai/clip-vit-base-patch32's preprocessor_config.json sets it (at
    `size` pixels instead of 224): the shortest side resized to `size`, bicubic; a centre crop; RGB; pixels / 255;
    normalised by CLIP's mean and std. Its PIL backend: torchvision, its other backend, is not installed here."""
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(do_resize=True, size={"shortest_edge": size}, resample=Image.BICUBIC, do_center_crop=True,
               crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
               do_normalize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
               image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True)


def write_split(root, pairs):
    """A val split in the Multi30k layout at `root`: the pairs' en and de lines, and six images of several sizes,
    modes and formats (PNG, JPEG) of seeded noise, listed in image_splits/val.txt."""
    (root / "raw").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "raw" / "val.en").write_text("".join(en + "\n" for en, _ in pairs), "utf-8")
    (root / "raw" / "val.de").write_text("".join(de + "\n" for _, de in pairs), "utf-8")
    g = torch.Generator().manual_seed(80)
    names = []
    for i, (mode, w, h, ext) in enumerate([("RGB", 45, 37, "png"), ("RGB", 50, 70, "jpg"), ("RGBA", 33, 33, "png"),
                                           ("L", 64, 40, "png"), ("RGB", 31, 90, "jpg"), ("P", 40, 41, "png")]):
        raw = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
        image = Image.fromarray(raw.numpy(), "RGB")
        image = image.quantize(16) if mode == "P" else image.convert(mode)
        names.append(f"{i}.{ext}")
        image.save(root / "images" / names[-1])
    (root / "image_splits").mkdir()
    (root / "image_splits" / "val.txt").write_text("".join(n + "\n" for n in names))
    return root


def test_text_and_image_files_to_the_towers_equal_hf(tmp_path, converted, model, hf_mbart, hf_mclip,  # noqa: F811
                                                     hf_clip_dir, hf_mbart_dir, hf_xlmr_dir):
    """A split written as files (raw/val.{en,de}, image_splits/val.txt, PNG and JPEG images of several sizes and
    modes), read by data.read_split, tokenised by data.py's tokenizers from the converted folder and preprocessed
    by data.load_image, into the towers; against Hugging Face reading the same files: XLMRobertaTokenizerFast and
    M-CLIP's own forward (tokenizer and all), MBart50TokenizerFast and mBART's encoder, CLIPImageProcessor
    (OpenAI's settings) and CLIPModel.get_image_features. The same ids; embeddings and states within 1e-4.

    Pixels: data.clip_preprocess resizes with PIL, as Hugging Face's PIL backend does, and rescales in float64 as
    it does: the pixels are equal here (measured: 0 on all six files); 1e-6 leaves room for float32 rounding only.
    Hugging Face's other backend, torchvision (not installed here), resizes on tensors (antialiased bicubic) and
    would need a looser tolerance."""
    with gzip.open(MULTI30K / "raw" / "val.en.gz", "rt", encoding="utf-8") as f_en, \
            gzip.open(MULTI30K / "raw" / "val.de.gz", "rt", encoding="utf-8") as f_de:
        pairs = [(en.strip(), de.strip()) for en, de, _ in zip(f_en, f_de, range(40))]
    text_tok = data.TextTowerTokenizer(converted / weights.TEXT_TOKENIZER)
    mbart_tok = data.MBartTokenizer(converted / weights.MBART_TOKENIZER)
    pairs = [(en, de) for en, de in pairs if len(text_tok.rows([en], None)[0]) <= model.text.max_tokens
             and len(mbart_tok.rows([de], "de")[0]) <= model.config.mbart.max_positions][:6]  # what the tiny models take
    assert len(pairs) == 6
    root = write_split(tmp_path / "split", pairs)
    split = data.read_split(root, "val", ["en", "de"], images=root / "images")
    assert [s for s in split.sentences["en"]] == [en for en, _ in pairs]
    size = model.config.vision.image_size
    with torch.no_grad():
        # the text tower: M-CLIP's forward with its tokenizer, from the strings
        hf_text_tok = transformers.XLMRobertaTokenizerFast(tokenizer_file=str(hf_xlmr_dir / "tokenizer.json"))
        ids, mask = text_tok.encode(split.sentences["en"], max_len=model.text.max_tokens)
        ref = hf_text_tok(split.sentences["en"], padding=True, return_tensors="pt")
        assert torch.equal(ids, ref.input_ids) and torch.equal(mask, ref.attention_mask)
        assert_close(model.encode_text(ids, mask), hf_mclip(split.sentences["en"], hf_text_tok), name="M-CLIP")
        # mBART's encoder on the German side, its language code first
        hf_mbart_tok = transformers.MBart50TokenizerFast(tokenizer_file=str(hf_mbart_dir / "tokenizer.json"),
                                                         src_lang="de_DE")
        ids, mask = mbart_tok.encode(split.sentences["de"], "de")
        ref = hf_mbart_tok(split.sentences["de"], padding=True, return_tensors="pt")
        assert torch.equal(ids, ref.input_ids) and torch.equal(mask, ref.attention_mask)
        states = hf_mbart.model.encoder(input_ids=ref.input_ids.to(hf_mbart.device),
                                        attention_mask=ref.attention_mask.to(hf_mbart.device)).last_hidden_state
        ours = model.mbart.encode(ids.to(states.device), mask.to(states.device))
        real = mask.bool().to(states.device)
        assert_close(ours[real], states[real], name="mBART encoder states (real tokens)")
        # the image tower, from the files
        pixels = torch.stack([data.load_image(p, size) for p in split.images])  # (B, 3, size, size)
        processor = openai_clip_processor(size)
        ref_pixels = torch.cat([processor(Image.open(p), return_tensors="pt")["pixel_values"] for p in split.images])
        assert_close(pixels, ref_pixels, atol=1e-6, name="pixels")
        hf_clip = transformers.CLIPModel.from_pretrained(hf_clip_dir, attn_implementation="eager",
                                                         dtype=torch.float32).eval()
        ref = hf_clip.get_image_features(pixel_values=ref_pixels)
        ref = ref if torch.is_tensor(ref) else ref.pooler_output
        assert_close(model.encode_image(pixels.to(model.mbart.shared.weight.device)), ref, name="image embeddings")
