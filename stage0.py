"""
Stage 0, for the tiny preset only: stand-ins, made on the tiny world (tiny_world.py), for the pretrained models
the paper starts from: M-CLIP's towers, aligned contrastively on image-caption pairs (`align_towers`, scored by
`retrieval`), and mBART-50, pre-trained as a denoising autoencoder (`denoise`, with `infill`'s noise). Its
output, `OUT/last`, is the folder a converted checkpoint would be (weights.py): the starting point of stage 1.

    python train.py --stage 0        # stage 1 of the tiny preset runs it when its output is missing
"""

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import folders
import weights
from cliptrans import CLIPTrans, CLIPTransConfig, MappingConfig, teacher_forcing
from tiny_world import LANGS


def run(c, env):
    """Stage 0 with the settings `c` (stage 0's, or settings.for_stage0's) into c.out, in one process (the others
    wait), in a folder of its own held while it runs, as every run is."""
    if env.rank == 0:
        folders.hold(c.out, new=True)
        stage0(c, env.device)
        folders.release(c.out)
    if dist.is_initialized():
        dist.barrier()


def stage0(c, device) -> Path:
    """Both stand-ins, then OUT/last (weights, config, the world's tokenizer for both) and OUT/summary.json: the
    final losses and the towers' retrieval on the validation split."""
    t_start = time.time()
    tok_path = Path(c.data) / "tokenizer.json"
    if not tok_path.is_file():
        raise SystemExit(f"error: stage 0 makes the tiny preset's stand-in models on a tiny world (the "
                         f"default, or a folder written by `python tiny_world.py`, which holds their "
                         f"tokenizer.json); {c.data} has no tokenizer.json. Other data needs the "
                         f"pretrained models: --preset paper --weights (converted with weights.py)")
    langs = c.langs.split() or LANGS
    if [x for x in langs if x not in LANGS]:
        raise SystemExit(f"error: --langs {c.langs!r}: expected some of the tiny world's languages {' '.join(LANGS)}")
    mtok, ttok = data.MBartTokenizer(tok_path), data.TextTowerTokenizer(tok_path)
    cfg = CLIPTransConfig.preset("tiny")
    cfg.mbart.vocab_size = cfg.text.vocab_size = mtok.vocab_size
    cfg.mapping = MappingConfig(c.mapping or "mlp", 10 if c.prefix_len < 0 else c.prefix_len)  # as weights.py's
    torch.manual_seed(c.seed)
    model = CLIPTrans(cfg).to(device)
    images = c.images or Path(c.data) / "images"
    train = data.read_split(c.data, c.train_split, LANGS, images=images, limit=c.n_pairs)
    val = data.read_split(c.data, c.val_split, LANGS, images=images)
    g = torch.Generator().manual_seed(c.seed)  # the batches and the noise of both objectives
    summary = {"stage": 0, "contrastive_loss": align_towers(model, ttok, train, c, langs, g, device)}
    summary["retrieval"] = retrieval(model, ttok, val, device)
    tqdm.write(f"stage 0: {c.val_split} retrieval recall@1 in groups of 64, image -> text / text -> image: "
               + ", ".join(f"{lang} {r['image_to_text_r1']:.2f} / {r['text_to_image_r1']:.2f}"
                           for lang, r in summary["retrieval"].items()))
    summary["denoising_loss"] = denoise(model, mtok, train, c, langs, g, device)
    out = Path(c.out) / "last"
    tokenizers = {weights.MBART_TOKENIZER: tok_path, weights.TEXT_TOKENIZER: tok_path}
    settings = {k: v for k, v in dataclasses.asdict(c).items() if k != "given"}
    weights.save(model, out, {"train": settings}, files=tokenizers, state={"stage": 0})
    summary.update(minutes=round((time.time() - t_start) / 60, 2), checkpoint=str(out))
    folders.atomic_write(Path(c.out) / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))
    print(json.dumps(summary))
    return out


def align_towers(model, ttok, train: data.Split, c, langs, g, device):
    """CLIP's contrastive objective: image i and its caption (in any language) are a pair, every other caption
    in the batch is a negative, so the text tower learns all languages into one space with the images. Three
    times the denoiser's steps, from twice its learning rate, warmed up then decayed on a cosine: recall@1 0.93
    among 64 captions (0.79 with the denoiser's recipe: EXPERIMENTS.md). Returns the last loss."""
    size = model.config.vision.image_size
    tqdm.write(f"stage 0: aligning the tiny towers on {len(train)} images x {len(langs)} languages")
    pixels = torch.stack([data.load_image(f, size) for f in tqdm(train.images, desc="load images",
                                                                  leave=False)])  # (N, 3, size, size)
    temp = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))
    towers = list(model.vision.parameters()) + list(model.text.parameters()) + [temp]
    opt = torch.optim.AdamW(towers, lr=2 * c.lr, weight_decay=0.01)
    n, B = len(train), c.batch_size
    steps, warmup = 3 * c.epochs * (n // B), 30
    bar = tqdm(range(steps), desc="stage 0: contrastive")
    for step in bar:
        progress = max(0, step - warmup) / max(1, steps - warmup)
        opt.param_groups[0]["lr"] = 2 * c.lr * min(1, (step + 1) / warmup) * (1 + math.cos(math.pi * progress)) / 2
        idx = torch.randint(n, (B,), generator=g)
        lang = [langs[j] for j in torch.randint(len(langs), (B,), generator=g).tolist()]
        ids, mask = ttok.encode([train.sentences[lang[j]][i] for j, i in enumerate(idx.tolist())],
                                model.text.max_tokens)
        img = F.normalize(model.encode_image(pixels[idx].to(device)), dim=-1)  # (B, D)
        txt = F.normalize(model.encode_text(ids.to(device), mask.to(device)), dim=-1)  # (B, D)
        logits = img @ txt.T * temp.exp().clamp(max=100)  # (B, B): image i against caption j
        target = torch.arange(B, device=device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        step_on(opt, loss, bar, step, c.log_every)
    return round(loss.item(), 4)


def denoise(model, mtok, train: data.Split, c, langs, g, device):
    """mBART's denoising pre-training: reconstruct each sentence from its `infill`ed copy. Returns the last
    loss."""
    mask_id = mtok.tok.token_to_id("<mask>")
    encoded = [row for lang in langs for row in mtok.rows(train.sentences[lang], lang)]  # `[lang] x </s>`
    opt = torch.optim.AdamW(model.mbart.parameters(), lr=c.lr)
    bar = tqdm(range(c.epochs * (len(train) // c.batch_size)), desc="stage 0: denoising")
    for step in bar:
        rows = [encoded[i] for i in torch.randint(len(encoded), (c.batch_size,), generator=g).tolist()]
        tgt, _ = data.pad(rows, mtok.pad_id)  # (B, L)
        src_ids, src_mask = data.pad([infill(r, mask_id, g) for r in rows], mtok.pad_id)  # (B, S)
        dec, labels = teacher_forcing(tgt, model.config.mbart)  # `</s> [lang] x` -> `[lang] x </s>`
        logits = model.mbart(src_ids.to(device), src_mask.to(device), dec.to(device))  # (B, L, V)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.to(device).flatten())
        step_on(opt, loss, bar, step, c.log_every)
    return round(loss.item(), 4)


def step_on(opt, loss, bar, step, log_every):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if step % log_every == 0:
        bar.set_postfix(loss=f"{loss.item():.3f}")


def infill(ids, mask_id, g, ratio=0.35):
    """`[lang] w1 .. wn </s>` -> the same with spans of one to three words replaced by one <mask> each: mBART's
    text infilling in miniature. `ratio` of the words is the budget; spans start at budget // 2 random places and
    end at the budget, an earlier span or the sentence's end: about 27% masked (mBART: 35%)."""
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


@torch.no_grad()
def retrieval(model, ttok, split: data.Split, device, group=64):
    """Recall@1 and @5 of image -> text and text -> image retrieval on `split`, per language (see `recall`)."""
    model.eval()
    image = data.embed_images(model.encode_image, split.images, model.config.vision.image_size, 256, device)
    out = {lang: recall(image, data.embed_texts(model.encode_text, ttok, split.sentences[lang], 256, device,
                                                model.text.max_tokens), split.sentences[lang], group)
           for lang in LANGS}
    model.train()
    return out


def recall(image, text, texts, group=64, ks=(1, 5)):
    """image, text (N, D): the embeddings of N examples and their captions `texts`. Within groups of `group`
    examples, the share of images (and of captions) whose partner is among the k most similar by cosine; a
    caption that reads exactly like the right one counts (one-shape scenes repeat). Whole groups only, so chance
    is k / group; a split smaller than one group is one group."""
    image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    group = min(group, len(texts))
    hits = {f"{d}_r{k}": 0 for d in ("image_to_text", "text_to_image") for k in ks}
    for g in range(0, len(texts) - group + 1, group):
        sim = image[g:g + group] @ text[g:g + group].T  # (group, group): image i, caption j
        same = torch.tensor([[a == b for b in texts[g:g + group]] for a in texts[g:g + group]])
        for k in ks:  # (group, k): the k nearest captions of each image, the k nearest images of each caption
            top = min(k, group)
            to_text, to_image = sim.topk(top, dim=1).indices, sim.T.topk(top, dim=1).indices
            hits[f"image_to_text_r{k}"] += same.gather(1, to_text.cpu()).any(1).sum().item()
            hits[f"text_to_image_r{k}"] += same.gather(1, to_image.cpu()).any(1).sum().item()
    n = len(texts) // group * group
    return {name: round(h / n, 3) for name, h in hits.items()}
