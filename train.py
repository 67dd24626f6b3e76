"""
Train CLIPTrans in its two stages, as the paper does, and score it.

    python train.py --stage 1        # captioning: image embedding -> mapping network -> prefix -> mBART decoder
    python train.py --stage 2        # translation: the same, from the M-CLIP embedding of the source sentence

With no other argument this runs the tiny preset on the built-in tiny world (en -> de) on any CPU, in
minutes. The paper's models come from pretrained checkpoints; the tiny ones have none, so stage 0 makes
their stand-ins first (stage 1 runs it when its output is missing, and says so):

    python train.py --stage 0        # tiny preset only: align the tiny towers contrastively on the tiny world's
                                     # images and captions in all its languages, and pre-train the tiny mBART
                                     # as a denoising autoencoder on its text (mBART's own pre-training task)

The paper's setting (after `python weights.py ... --out weights/paper`, with Multi30k and its images):

    python train.py --stage 1 --preset paper --weights weights/paper --data multi30k --images flickr30k-images
    python train.py --stage 2 --preset paper --weights weights/paper --data multi30k --images flickr30k-images
    torchrun --nproc_per_node 4 train.py --stage 2 --preset paper ...        # DDP, one process per GPU

Scoring a checkpoint on any split, and resuming after an interruption:

    python train.py --stage 2 --eval_only --split test          # the best stage 2 checkpoint, test split
    python train.py --stage 2 --eval_only --ablate prefix       # ... with another sentence's prefix
    python train.py --stage 2 --resume                          # continues exactly where `last` left off

Every checkpoint folder (`OUT/last`, `OUT/best`) holds the model (`cliptrans.safetensors`, `config.json`,
the tokenizers: `weights.load` and translate.py read it) and the training state (`state.pt`: optimizer,
scaler, step, RNG states; loads with `torch.load(weights_only=True)`), written atomically.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import weights
from cliptrans import Attention, CLIPTrans, CLIPTransConfig, MappingConfig

# -----------------------------------------------------------------------------
# Settings. Every field is a command-line flag (`--batch_size 32`); unknown flags are errors. Defaults
# that depend on the preset and the stage are filled in by `defaults()`.


@dataclass
class Config:
    stage: int = 1  # 0: tiny stand-ins for the pretrained models; 1: captioning; 2: translation
    preset: str = "tiny"  # tiny | paper
    weights: str = ""  # starting weights: a folder from weights.py (paper) or stage 0 (tiny)
    init: str = ""  # stage 2: the stage 1 checkpoint to start from (default: stage 1's `last`)
    data: str = ""  # a folder in the Multi30k layout (default: the tiny world)
    images: str = ""  # the images folder (default: DATA/images)
    features: str = ""  # where the frozen towers' features are cached (default: DATA/features)
    src: str = "en"
    tgt: str = "de"
    caption_lang: str = "en"  # stage 1 captions (the official code's default: English)
    train_split: str = "train"
    val_split: str = "val"
    split: str = ""  # --eval_only: the split to score (default: the test split)
    test_split: str = ""  # scored at the end of training (tiny world: test; Multi30k: test_2016_flickr)
    n_pairs: int = 0  # use only the first n training examples (0: all); the low-resource experiment
    mapping: str = "mlp"  # mlp | hidden_mlp | transformer (the mapping network, for new weights)
    batch_size: int = 0  # per process
    grad_accum: int = 0  # micro-batches per optimizer step (the loss is divided accordingly; paper: 4)
    epochs: int = 0
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs)
    lr: float = 0.0
    schedule: str = "constant"  # constant (the paper) | cosine (linear warmup, cosine decay to 0)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    dropout: float = -1.0  # override the model's dropout (-1: keep it)
    eval_every: int = 0  # evaluate every n steps (0: at the end of each epoch)
    save_every: int = 100  # write `last` every n steps (and at every evaluation)
    log_every: int = 10
    beam: int = 5
    max_new_tokens: int = 60
    eval_batch_size: int = 64
    max_eval: int = 0  # evaluate on the first n examples only (0: all)
    seed: int = 29
    dtype: str = "auto"  # auto (bf16 on GPUs that have it, else fp16 + GradScaler; fp32 on CPU) | bf16 | fp16 | fp32
    compile: bool = False  # torch.compile the model
    device: str = "auto"
    out: str = ""  # default: runs/{preset}/stage{stage}
    checkpoint: str = ""  # --eval_only / --resume: the checkpoint folder (default: OUT/best or OUT/last)
    resume: bool = False
    eval_only: bool = False
    from_scratch_stage2: bool = False  # the ablation: stage 2 without stage 1
    test_with_image: bool = False  # stage 2 evaluation from the image embedding instead of the text's
    ablate: str = ""  # --eval_only, stage 2: "prefix" (each sentence gets the previous sentence's embedding) or
    # "source" (the encoder sees only `<src_lang> </s>`): how much the model reads each of its two inputs


# The flags with a fixed set of values (argparse rejects the others), and the numbers that must be positive or
# non-negative (checked once the preset's defaults are in).
CHOICES = {"stage": (0, 1, 2), "preset": ("tiny", "paper"), "mapping": ("mlp", "hidden_mlp", "transformer"),
           "schedule": ("constant", "cosine"), "dtype": ("auto", "bf16", "fp16", "fp32")}
POSITIVE = ("batch_size", "grad_accum", "epochs", "lr", "save_every", "log_every", "beam", "max_new_tokens",
            "eval_batch_size")
NON_NEGATIVE = ("n_pairs", "max_steps", "max_eval", "warmup_steps", "eval_every", "weight_decay")


def defaults(c: Config):
    """Fill what the command line left at 0 / empty from the preset and stage."""
    tiny = c.preset == "tiny"
    table = {  # (batch, epochs, lr)
        ("tiny", 0): (128, 4, 1e-3), ("tiny", 1): (64, 3, 5e-4), ("tiny", 2): (64, 2, 5e-4),
        # the official recipe: batch 32 x accumulation 4, 15 epochs, constant 1e-5
        ("paper", 1): (32, 15, 1e-5), ("paper", 2): (32, 15, 1e-5),
    }
    if (c.preset, c.stage) not in table:
        raise SystemExit(f"error: stage {c.stage} exists for the tiny preset only (the paper's towers and mBART "
                         f"come pretrained: convert them with weights.py)")
    if c.ablate and (c.ablate not in ("prefix", "source") or not c.eval_only or c.stage != 2):
        raise SystemExit(f"error: --ablate {c.ablate}: expected --ablate prefix or --ablate source, with --stage 2 "
                         f"--eval_only (it scores a trained translation model with one of its inputs taken away)")
    batch, epochs, lr = table[(c.preset, c.stage)]
    c.batch_size, c.epochs, c.lr = c.batch_size or batch, c.epochs or epochs, c.lr or lr
    c.grad_accum = c.grad_accum or (4 if c.preset == "paper" else 1)
    for name in POSITIVE + NON_NEGATIVE:
        value, positive = getattr(c, name), name in POSITIVE
        if value < 0 or (value == 0 and positive):
            raise SystemExit(f"error: --{name} {value}: expected a {'positive' if positive else 'non-negative'} "
                             f"number")
    if not (c.dropout == -1 or 0 <= c.dropout < 1):
        raise SystemExit(f"error: --dropout {c.dropout}: expected a rate in [0, 1), or -1 to keep the model's")
    if not c.data:
        if not tiny:
            raise SystemExit("error: --data is required with --preset paper (a folder in the Multi30k layout: "
                             "raw/{split}.{lang}[.gz] and image_splits/{split}.txt; `python data.py multi30k`)")
        c.data = str(data.tiny_world())
    c.test_split = c.test_split or ("test" if tiny else "test_2016_flickr")
    c.split = c.split or c.test_split
    c.out = c.out or f"runs/{c.preset}/stage{c.stage}"
    if not c.weights:
        if not tiny:
            raise SystemExit("error: --weights is required with --preset paper (write it with weights.py)")
        c.weights = "" if c.stage == 0 else str(Path(c.out).parent / "stage0" / "last")
    if c.stage == 2 and not c.init:
        c.init = str(Path(c.out).parent / "stage1" / "last")
    return c


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        if f.type is bool or f.type == "bool":
            p.add_argument("--" + f.name, action="store_true", default=f.default)
        else:
            p.add_argument("--" + f.name, type=type(f.default), default=f.default, choices=CHOICES.get(f.name))
    return defaults(Config(**vars(p.parse_args(argv))))


# -----------------------------------------------------------------------------
# Processes, devices and precision.


def setup(c: Config):
    """DDP from torchrun's environment (NCCL on GPUs, gloo on CPUs), the device, and autocast."""
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() and c.device != "cpu" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if c.device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    else:
        device = c.device
    try:
        device = torch.device(device)
    except RuntimeError:
        raise SystemExit(f"error: --device {c.device}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {c.device}, but PyTorch sees no GPU here: use --device cpu (or auto)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = c.dtype
    if dtype == "auto":
        dtype = "fp32" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if device.type != "cuda" and dtype != "fp32":
        raise SystemExit(f"error: --dtype {dtype} needs a GPU; on {device} training runs in fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[dtype]
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext())
    return rank, world, device, dtype, autocast


def log0(rank, *args):
    if rank == 0:
        tqdm.write(" ".join(str(a) for a in args))


# -----------------------------------------------------------------------------
# Checkpoints: the model as safetensors (weights.save), the rest in state.pt; each folder written into a
# temporary folder and renamed into place, so an interruption never leaves a half-written checkpoint.


def save_checkpoint(folder, model, c: Config, state, tokenizers_from):
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    weights.save(model, tmp, extra_config={"train": dataclasses.asdict(c)})
    for name in (weights.MBART_TOKENIZER, weights.TEXT_TOKENIZER):
        shutil.copyfile(Path(tokenizers_from) / name, tmp / name)
    torch.save(state, tmp / "state.pt")
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(folder):
    """`folder`, or the copy a crash between the two renames of save_checkpoint left aside."""
    folder = Path(folder)
    old = folder.with_name(f".{folder.name}.old")
    return folder if folder.exists() or not old.exists() else old


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# What fixes a run's data order and what it trains: --resume must continue with the same.
RESUME_SAME = ("stage", "preset", "train_split", "src", "tgt", "caption_lang", "n_pairs", "batch_size", "grad_accum",
               "seed")


def check_resumable(state, c: Config, folder, world):
    """--resume continues a run exactly: its checkpoint must hold a training state, from the same settings."""
    saved = state.get("config")
    if "optimizer" not in state or saved is None:
        raise SystemExit(f"error: {folder} holds no training state to resume (a stage {state.get('stage', '?')} "
                         f"checkpoint or converted weights): --resume continues a stage 1 or 2 run from its `last`; "
                         f"to start stage 2 from a stage 1 checkpoint, give it as --init without --resume")
    diff = [k for k in RESUME_SAME if saved.get(k) != getattr(c, k)]
    if diff:
        raise SystemExit(f"error: {folder} was trained with " + ", ".join(f"--{k} {saved.get(k)}" for k in diff)
                         + "; this run has " + ", ".join(f"--{k} {getattr(c, k)}" for k in diff) + ": resume with "
                         "the same settings (they fix the data order and what trains), or start a new run")
    ranks = len(state["rng"]) if isinstance(state["rng"], list) else 1
    if ranks != world:
        raise SystemExit(f"error: {folder} was trained by {ranks} process(es), this run has {world}: resume with "
                         f"{ranks} (each process continues its own share of the data)")


def load_model(folder, c: Config, device, what):
    folder = find_checkpoint(folder)
    try:
        model = weights.load(folder, device=device)
    except weights.ConversionError as e:
        raise SystemExit(f"error: {what}: {e}")
    expected = CLIPTransConfig.preset(c.preset)
    got = model.config
    for part in ("vision", "text", "mbart"):  # the vocabulary comes from the tokenizer; all else from the preset
        a, b = dataclasses.asdict(getattr(expected, part)), dataclasses.asdict(getattr(got, part))
        diff = [k for k in a if k not in ("vocab_size", "dropout") and a[k] != b[k]]
        if diff:
            raise SystemExit(f"error: {what} {folder} is not a {c.preset} model: its {part} differs in {diff} "
                             f"(found {[b[k] for k in diff]}, the {c.preset} preset has {[a[k] for k in diff]}). "
                             f"Use --preset to match it, or another checkpoint")
    if c.dropout >= 0:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = c.dropout
            elif isinstance(m, Attention) and m.dropout:  # mBART's attention has none: keep it so
                m.dropout = c.dropout
    return model, folder


# -----------------------------------------------------------------------------
# Data: tokenised sentences and precomputed tower features.


def langs_for(c: Config):
    return {0: sorted({c.src, c.tgt, c.caption_lang}), 1: [c.caption_lang], 2: [c.src, c.tgt]}[c.stage]


def read(c: Config, split, langs, need_images):
    images = (c.images or str(Path(c.data) / "images")) if need_images else None
    try:
        s = data.read_split(c.data, split, langs, images=images)
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    if split == c.train_split and c.n_pairs:
        s.sentences = {k: v[:c.n_pairs] for k, v in s.sentences.items()}
        s.images = s.images[:c.n_pairs] if s.images else s.images
    if c.max_eval and split != c.train_split:
        s.sentences = {k: v[:c.max_eval] for k, v in s.sentences.items()}
        s.images = s.images[:c.max_eval] if s.images else s.images
    return s


def features(model, c: Config, split: data.Split, kind, folder, device, rank):
    """(N, D) frozen-tower embeddings of a split: its images, or its source sentences. Cached next to the
    data, keyed by the tower's weights and the preprocessing; rank 0 computes, the others wait and read."""
    if kind == "image":
        size = model.config.vision.image_size
        key = data.fingerprint(model.vision, "clip_preprocess", size, *map(str, split.images))
        compute = lambda: data.embed_images(model.encode_image, split.images, size, 64, device)  # noqa: E731
    else:
        tok = data.TextTowerTokenizer(Path(folder) / weights.TEXT_TOKENIZER)
        sentences = split.sentences[c.src]
        key = data.fingerprint(model.text, "text", *sentences)
        compute = lambda: data.embed_texts(model.encode_text, tok, sentences, 64, device,  # noqa: E731
                                           max_len=model.text.max_tokens)
    cache_dir = Path(c.features or Path(c.data) / "features")

    def get():
        try:
            return data.cached_embeddings(cache_dir, f"{split.name}.{kind}", key, compute)
        except data.DataError as e:
            raise SystemExit(f"error: {e}")
    if rank == 0:
        feats = get()
    if dist.is_initialized():
        dist.barrier()
    return feats if rank == 0 else get()


# -----------------------------------------------------------------------------
# Evaluation: beam search, detokenised hypotheses against the raw references, sacrebleu's corpus BLEU.


@torch.no_grad()
def evaluate(model, c: Config, split, clip, tok, src_ids, tgt_lang, refs, rank, world, device, autocast, path):
    """Generate for this rank's share of the split, gather every rank's hypotheses in the split's order,
    write them to `path` and return the BLEU (rank 0; None elsewhere)."""
    import sacrebleu
    model.eval()
    n = len(refs)
    sampler = data.LengthBucketSampler([len(s) for s in src_ids], c.eval_batch_size, shuffle=False,
                                       rank=rank, world_size=world)
    mine = {}
    for batch in tqdm(sampler, desc=f"eval {split}", disable=rank != 0, leave=False):
        if not batch:
            continue
        ids, mask = pad([src_ids[i] for i in batch], tok.pad_id)
        with autocast:
            out = model.generate(clip[batch].to(device), ids.to(device), mask.to(device), tok.lang_id(tgt_lang),
                                 num_beams=c.beam, max_new_tokens=c.max_new_tokens)
        for i, text in zip(batch, tok.decode(out.cpu())):
            mine[i] = text
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
        mine = {k: v for part in parts for k, v in part.items()}
    model.train()
    if rank != 0:
        return None
    hyps = [mine[i] for i in range(n)]  # every example exactly once, in the split's order
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(hyps) + "\n")
    return sacrebleu.corpus_bleu(hyps, [refs]).score


def pad(rows, pad_id):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
    return ids, (ids != pad_id).long()


# -----------------------------------------------------------------------------
# Stage 0 (tiny preset only): stand-ins for the pretrained towers and mBART.


def stage0(c: Config, rank, world, device, autocast):
    """The paper starts from M-CLIP (text and image towers aligned contrastively on image-caption pairs)
    and from mBART-50 (pre-trained as a denoising autoencoder). Stage 0 gives the tiny models both."""
    if world > 1:
        raise SystemExit("error: stage 0 runs in one process (it takes a minute on a CPU)")
    world_dir = Path(c.data)
    tok_path = world_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise SystemExit(f"error: stage 0 makes the tiny preset's stand-in models on a tiny world (the default, or a "
                         f"folder written by `python data.py tiny`, which holds their tokenizer.json); {world_dir} has "
                         f"no tokenizer.json. Other data needs the pretrained models: --preset paper --weights "
                         f"(converted with weights.py)")
    mtok = data.MBartTokenizer(tok_path)
    ttok = data.TextTowerTokenizer(tok_path)
    cfg = CLIPTransConfig.preset("tiny")
    cfg.mbart.vocab_size = cfg.text.vocab_size = mtok.vocab_size
    cfg.mapping = MappingConfig(kind=c.mapping)
    torch.manual_seed(c.seed)
    model = CLIPTrans(cfg).to(device)
    langs = ["en", "de", "fr"]
    train = read(c, c.train_split, langs, need_images=True)
    size = cfg.vision.image_size
    log0(rank, f"stage 0: aligning the tiny towers on {len(train)} images x {len(langs)} languages")
    pixels = torch.stack([data.load_image(f, size) for f in tqdm(train.images, desc="load images", leave=False)])

    # (a) CLIP's contrastive objective: image i and its caption (in any language) are a pair, every other
    # caption in the batch is a negative. The text tower learns all languages into one space with the images.
    temp = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))
    towers = list(model.vision.parameters()) + list(model.text.parameters()) + [temp]
    opt = torch.optim.AdamW(towers, lr=c.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(c.seed)
    n, B = len(train), c.batch_size
    steps = c.epochs * (n // B)
    bar = tqdm(range(steps), desc="stage 0: contrastive", disable=rank != 0)
    for step in bar:
        idx = torch.randint(n, (B,), generator=g)
        lang = [langs[j] for j in torch.randint(len(langs), (B,), generator=g).tolist()]
        ids, mask = ttok.encode([train.sentences[lang[j]][i] for j, i in enumerate(idx.tolist())],
                                model.text.max_tokens)
        img = F.normalize(model.encode_image(pixels[idx].to(device)), dim=-1)
        txt = F.normalize(model.encode_text(ids.to(device), mask.to(device)), dim=-1)
        logits = img @ txt.T * temp.exp().clamp(max=100)
        target = torch.arange(B, device=device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % c.log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")

    # (b) mBART's denoising pre-training: reconstruct a sentence from a copy with 35% of its words
    # masked in spans ("text infilling"), in every language of the world.
    mask_id = mtok.tok.token_to_id("<mask>")
    encoded = [row[row != mtok.pad_id].tolist() for lang in langs for row in mtok.encode(train.sentences[lang], lang)[0]]
    opt = torch.optim.AdamW(model.mbart.parameters(), lr=c.lr)
    bar = tqdm(range(steps), desc="stage 0: denoising", disable=rank != 0)
    for step in bar:
        rows = [encoded[i] for i in torch.randint(len(encoded), (B,), generator=g).tolist()]  # `[lang] x </s>`
        tgt, _ = pad(rows, mtok.pad_id)
        src_ids, src_mask = pad([infill(r, mask_id, g) for r in rows], mtok.pad_id)
        dec = torch.cat([torch.full_like(tgt[:, :1], mtok.eos_id), tgt[:, :-1]], 1)  # `</s> [lang] x`
        logits = model.mbart(src_ids.to(device), src_mask.to(device), dec.to(device))
        labels = tgt.masked_fill(tgt == mtok.pad_id, -100).to(device)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % c.log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")

    # The folder a converted checkpoint would be: weights, config, tokenizers.
    out = Path(c.out) / "last"
    tmp_tok = Path(c.out) / ".tokenizers"
    tmp_tok.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tok_path, tmp_tok / weights.MBART_TOKENIZER)
    shutil.copyfile(tok_path, tmp_tok / weights.TEXT_TOKENIZER)
    save_checkpoint(out, model, c, {"stage": 0}, tmp_tok)
    shutil.rmtree(tmp_tok)
    log0(rank, f"stage 0: wrote {out}")


def infill(ids, mask_id, g, ratio=0.35):
    """`[lang] w1 .. wn </s>` -> the same with spans of words replaced by one <mask> each (mBART's noise)."""
    body = ids[1:-1]
    n_mask = max(1, round(len(body) * ratio))
    out, i = [], 0
    starts = set(torch.randperm(len(body), generator=g)[:max(1, n_mask // 2)].tolist())
    while i < len(body):
        if i in starts and n_mask > 0:
            span = min(n_mask, 1 + int(torch.randint(3, (1,), generator=g)))
            out.append(mask_id)
            i += span
            n_mask -= span
        else:
            out.append(body[i])
            i += 1
    return [ids[0]] + out + [ids[-1]]


# -----------------------------------------------------------------------------
# Stages 1 and 2.


def main(argv=None):
    c = parse_args(argv)
    rank, world, device, dtype, autocast = setup(c)
    if c.stage == 0:
        stage0(c, rank, world, device, autocast)
        return
    out = Path(c.out)
    if not (c.resume or c.eval_only) and find_checkpoint(out / "last").exists():  # before any slow preparation
        raise SystemExit(f"error: {out} already holds a checkpoint: --resume to continue it, or give another "
                         f"--out (or delete the folder) to start over")

    # ---- the starting point: converted weights (stage 1, ablation), stage 1's checkpoint (stage 2), or our own
    if c.resume or c.eval_only:
        start = find_checkpoint(c.checkpoint or out / ("best" if c.eval_only and c.stage == 2 else "last"))
        if not start.exists():
            raise SystemExit(f"error: no checkpoint in {start} to {'score' if c.eval_only else 'resume'}: "
                             f"train first (python train.py --stage {c.stage})")
        what = "checkpoint"
    elif c.stage == 2 and not c.from_scratch_stage2:
        start = Path(c.init)
        if not find_checkpoint(start).exists():
            raise SystemExit(f"error: stage 2 starts from a stage 1 checkpoint, and {start} does not exist. "
                             f"Run `python train.py --stage 1` first (or give --init), or pass "
                             f"--from_scratch_stage2 for the ablation without stage 1")
        what = "stage 1 checkpoint"
    else:
        start = Path(c.weights)
        if c.preset == "tiny" and not find_checkpoint(start).exists():
            if start.name != "last":
                raise SystemExit(f"error: {start} does not exist: give --weights a stage 0 `last` folder "
                                 f"(stage 0 writes OUT/last), or leave it out to use runs/tiny/stage0/last")
            log0(rank, f"stage 0 output {start} is missing: running stage 0 first")
            if rank == 0:
                stage0(dataclasses.replace(defaults(Config(stage=0, data=c.data, seed=c.seed, mapping=c.mapping,
                                                           device=c.device)), out=str(start.parent)),
                       0, 1, device, autocast)
            if dist.is_initialized():
                dist.barrier()
        what = "starting weights"
    # Seeded here, after a stage 0 this run may have had to do: the same run whether stage 0 was missing or not
    torch.manual_seed(c.seed + rank)
    random.seed(c.seed + rank)
    model, start = load_model(start, c, device, what)
    if c.stage == 2 and not (c.resume or c.eval_only) and not c.from_scratch_stage2:
        state = torch.load(start / "state.pt", weights_only=True) if (start / "state.pt").exists() else {}
        if state.get("config", {}).get("stage") != 1:
            raise SystemExit(f"error: {start} is not a stage 1 checkpoint (its state.pt says stage "
                             f"{state.get('config', {}).get('stage')}): give --init a stage 1 `last` folder")
    folder = start  # tokenizers travel with every checkpoint
    tok = data.MBartTokenizer(folder / weights.MBART_TOKENIZER)

    # ---- data: token ids and frozen-tower features (the towers never train in stages 1 and 2)
    kind = "image" if c.stage == 1 else "text"
    tgt_lang = c.caption_lang if c.stage == 1 else c.tgt

    def prepare(split_name):
        # --test_with_image: stage 2 evaluated from the image embedding instead of the source sentence's
        k = "image" if c.test_with_image and split_name != c.train_split else kind
        s = read(c, split_name, langs_for(c), need_images=k == "image")
        feats = features(model, c, s, k, folder, device, rank)
        targets = tok.encode(s.sentences[tgt_lang], tgt_lang)[0]
        tgt_ids = [row[row != tok.pad_id].tolist() for row in targets]
        if c.stage == 1:  # "the encoder input is trivial": only `<lang> </s>`
            src_ids = [[tok.lang_id(tgt_lang), tok.eos_id]] * len(s)
        else:
            src = tok.encode(s.sentences[c.src], c.src)[0]
            src_ids = [row[row != tok.pad_id].tolist() for row in src]
        return s, feats, src_ids, tgt_ids

    if c.eval_only:
        s, feats, src_ids, _ = prepare(c.split)
        if c.ablate == "prefix":  # each sentence with the previous one's prefix: what the source alone carries
            feats = feats.roll(1, dims=0)
        elif c.ablate == "source":  # no source words for the encoder: what the prefix alone carries
            src_ids = [[ids[0], tok.eos_id] for ids in src_ids]
        path = out / "hyps" / f"{c.split}.eval{'.ablate_' + c.ablate if c.ablate else ''}.txt"
        bleu = evaluate(model, c, c.split, feats, tok, src_ids, tgt_lang, s.sentences[tgt_lang], rank, world,
                        device, autocast, path)
        if rank == 0:
            print(json.dumps({"split": c.split, "bleu": round(bleu, 2), "checkpoint": str(start),
                              "hypotheses": str(path), **({"ablate": c.ablate} if c.ablate else {})}))
        if dist.is_initialized():
            dist.destroy_process_group()
        return

    train_set, train_feats, train_src, train_tgt = prepare(c.train_split)
    val_set, val_feats, val_src, _ = prepare(c.val_split)
    val_refs = val_set.sentences[tgt_lang]

    # ---- what trains: stage 1 freezes the towers and the mBART encoder (with the shared embedding and the
    # tied output layer); stage 2 trains all of mBART. The mapping network trains in both.
    model.requires_grad_(False)
    model.mapping.requires_grad_(True)
    if c.stage == 1:
        model.mbart.decoder.requires_grad_(True)
    else:
        model.mbart.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=c.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=c.weight_decay, fused=fused)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "fp16")
    # Several processes: drop an epoch's short last step, so that no process gets an empty share.
    sampler = data.LengthBucketSampler([len(t) for t in train_tgt], c.batch_size, seed=c.seed, rank=rank,
                                       world_size=world, bucket_size=100 * c.batch_size * world, drop_last=world > 1)
    steps_per_epoch = len(sampler) // c.grad_accum
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(train_tgt)} training examples make no optimizer step of batch {c.batch_size} "
                         f"x grad_accum {c.grad_accum} x {world} process(es): lower --batch_size or --grad_accum")
    total = c.max_steps or steps_per_epoch * c.epochs

    def lr_at(step):
        if c.schedule == "constant":
            return c.lr * min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps else c.lr
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        return c.lr * 0.5 * (1 + math.cos(math.pi * (step - c.warmup_steps) / max(1, total - c.warmup_steps)))

    # ---- resume: model, optimizer, scaler, position in the data and RNG states, exactly
    step, epoch, batch_in_epoch, best = 0, 0, 0, -1.0
    if c.resume:
        state = torch.load(start / "state.pt", weights_only=True) if (start / "state.pt").exists() else {}
        check_resumable(state, c, start, world)
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, batch_in_epoch, best = state["step"], state["epoch"], state["batch_in_epoch"], state["best"]
        if start.parent.resolve() != out.resolve():  # continued in a new folder: its own `best` from now on
            best = -1.0
        set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
        log0(rank, f"resuming {start} at step {step} (epoch {epoch}, batch {batch_in_epoch})")

    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(train_model, device_ids=[device] if
                                                                device.type == "cuda" else None)
    if c.compile:  # after DDP: the compiler then splits the graph at DDP's gradient buckets, so they overlap
        train_model = torch.compile(train_model)

    def checkpoint(name):
        nonlocal pause_s
        t = time.time()
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = rng_state()
        if rank == 0:
            state = {"optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "step": step, "epoch": epoch,
                     "batch_in_epoch": batch_in_epoch, "best": best, "rng": rngs, "config": dataclasses.asdict(c)}
            save_checkpoint(out / name, model, c, state, folder)
        pause_s += time.time() - t

    def run_eval():
        nonlocal best, pause_s
        t = time.time()
        bleu = evaluate(model, c, c.val_split, val_feats, tok, val_src, tgt_lang, val_refs, rank, world, device,
                        autocast, out / "hyps" / f"{c.val_split}.step{step}.txt")
        pause_s += time.time() - t
        if rank == 0:
            log(dict(step=step, epoch=epoch, split=c.val_split, bleu=round(bleu, 2)))
            log0(rank, f"step {step}: {c.val_split} BLEU {bleu:.2f}")
        bleu = broadcast(bleu)
        if c.stage == 2 and bleu > best:  # stage 2 keeps the best validation BLEU; stage 1 the last
            best = bleu
            checkpoint("best")
        checkpoint("last")

    def broadcast(x):
        if world == 1:
            return x
        box = [x]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    out.mkdir(parents=True, exist_ok=True)
    metrics = None
    if rank == 0:
        path = out / "metrics.jsonl"
        if c.resume and path.exists():  # drop what was logged after the checkpoint: those steps run again
            kept = []
            for n, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the last line of a run killed while writing it
                    log0(rank, f"{path}: line {n} is not a complete record (cut short by the interruption?): "
                               f"dropped")
                    continue
                if record.get("step", step + 1) <= step:
                    kept.append(line + "\n")
            data.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))
        metrics = open(path, "a" if c.resume else "w")

    def log(record):
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()

    log0(rank, f"stage {c.stage} ({'captioning' if c.stage == 1 else 'translation'}): {len(train_set)} examples, "
               f"{steps_per_epoch} steps per epoch, {total} steps, {world} process(es) on {device}, {dtype}; "
               f"training {sum(p.numel() for p in params):,} parameters")
    # tokens/s count the time spent training only, not pause_s (evaluating and writing checkpoints)
    t_start, tokens_seen, pause_s = time.time(), 0, 0.0
    bar = tqdm(total=total, initial=step, desc=f"stage {c.stage}", disable=rank != 0)
    model.train()
    while step < total:
        sampler.set_epoch(epoch)
        batches = list(sampler)
        usable = len(batches) - len(batches) % c.grad_accum
        t0, pause_t0, tok_window = time.time(), pause_s, 0
        while batch_in_epoch < usable and step < total:
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss_sum = torch.zeros((), device=device)
            micro = batches[batch_in_epoch:batch_in_epoch + c.grad_accum]
            # The loss is a mean over all target tokens of the global batch: each process divides its sum by
            # the global count, times world (DDP averages gradients), over the accumulated micro-batches.
            sizes = [sum(len(train_tgt[i]) for i in b) for b in micro]  # target tokens of each micro-batch
            counts = torch.tensor(sizes, device=device, dtype=torch.float)
            if world > 1:
                dist.all_reduce(counts)
            for j, batch in enumerate(micro):
                sync = j == len(micro) - 1
                ctx = train_model.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
                with ctx:
                    ids, mask = pad([train_src[i] for i in batch], tok.pad_id)
                    tgt, _ = pad([train_tgt[i] for i in batch], tok.pad_id)
                    n_tok = sizes[j]
                    with autocast:
                        mean = train_model(train_feats[batch].to(device), ids.to(device), mask.to(device),
                                           tgt.to(device))
                    loss = mean * n_tok / counts.sum() * world
                    scaler.scale(loss).backward()
                loss_sum += mean.detach() * n_tok / counts.sum()
                tok_window += n_tok
                tokens_seen += n_tok
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            step += 1
            batch_in_epoch += c.grad_accum
            if world > 1:
                dist.all_reduce(loss_sum)
            bar.update(1)
            if step % c.log_every == 0 or step == 1 or step == total:
                dt = time.time() - t0 - (pause_s - pause_t0)
                tps = tok_window * world / max(dt, 1e-9)
                loss_value = loss_sum.item()
                if rank == 0:
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_at(step - 1):.2e}", tok_s=f"{tps:.0f}")
                    log(dict(step=step, epoch=epoch, loss=loss_value, lr=lr_at(step - 1), tokens_per_s=round(tps)))
                t0, pause_t0, tok_window = time.time(), pause_s, 0
            if c.eval_every and step % c.eval_every == 0:
                run_eval()
            elif step % c.save_every == 0:
                checkpoint("last")
        if batch_in_epoch >= usable:
            epoch, batch_in_epoch = epoch + 1, 0
            if not c.eval_every and step < total:
                run_eval()
    bar.close()
    if not c.eval_every or step % c.eval_every:
        run_eval()
    elapsed = time.time() - t_start
    if world > 1:  # the target tokens of every process
        counted = torch.tensor(float(tokens_seen), device=device)
        dist.all_reduce(counted)
        tokens_seen = int(counted.item())

    # ---- the summary: test BLEU of the kept checkpoint
    kept = out / ("best" if c.stage == 2 else "last")
    if c.stage == 2:
        model, _ = load_model(kept, c, device, "best checkpoint")
    test_set, test_feats, test_src, _ = prepare(c.test_split)
    test_bleu = evaluate(model, c, c.test_split, test_feats, tok, test_src, tgt_lang, test_set.sentences[tgt_lang],
                         rank, world, device, autocast, out / "hyps" / f"{c.test_split}.final.txt")
    if rank == 0:
        summary = dict(stage=c.stage, steps=step, minutes=round(elapsed / 60, 2),
                       tokens_per_s=round(tokens_seen / max(elapsed - pause_s, 1e-9)),
                       best_val_bleu=round(best, 2) if c.stage == 2 else None,
                       test_split=c.test_split, test_bleu=round(test_bleu, 2), checkpoint=str(kept))
        log(dict(summary=summary))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary))
        metrics.close()
    if dist.is_initialized():
        dist.barrier()
        del train_model
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
