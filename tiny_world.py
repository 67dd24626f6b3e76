"""
The tiny world, and stage 0: what lets the tiny preset train and be tested on any CPU, in minutes.

The paper starts from pretrained models: M-CLIP (an image tower and a multilingual text tower aligned on
image-caption pairs) and mBART-50 (pre-trained as a denoising autoencoder). The tiny preset has neither. So
this file makes a world small enough to learn in minutes, and stand-ins for both pretrained models on it:

- The world: scenes of one to three coloured shapes on a 3x3 grid, drawn as 64x64 images and described in
  English, German and French by a small grammar with correct agreement. Some colour-shape pairs are held out
  of training and make up the test split, so a model is scored on new combinations of words it knows. It is
  written in the Multi30k layout, with its own tokenizer (`tokenizer.json`, in mBART-50's id layout), and read
  back by the same reader as the real data (data.read_split).
- Stage 0: the tiny towers aligned contrastively on the world's images and captions in all its languages (as
  M-CLIP's were), then the tiny mBART pre-trained as a denoising autoencoder on its text (as mBART's was).
  Its output, `runs/tiny/stage0/last`, is the folder a converted checkpoint would be: the starting point of
  stage 1.

    python tiny_world.py --out data/tiny     # write the world into a folder (it takes ~5 s)
    python train.py --stage 0                # stage 0 (stage 1 of the tiny preset runs it when it is missing)

    root = tiny_world()                      # the default world, made once into ~/.cache/cliptrans/tiny_world
"""

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import Unigram
from tqdm import tqdm

import data
import weights
from cliptrans import CLIPTrans, CLIPTransConfig, MappingConfig

# -----------------------------------------------------------------------------
# The tiny world: a synthetic multimodal translation task that trains in minutes on a CPU.
#
# Each scene shows one to three coloured shapes on a grey background, placed in a 3x3 grid, and is
# described in English, German and French by a small grammar with correct agreement:
#   A small red circle is to the left of a large blue star and a small green square is below the star.
#   Ein kleiner roter Kreis ist links von einem großen blauen Stern und ein kleines grünes Quadrat ist
#   unter dem Stern.
#   Un petit cercle rouge est à gauche d'une grande étoile bleue et un petit carré vert est au-dessous de
#   l'étoile.
# German: gender (m/n/f), nominative for the subject, dative after von / über / unter (von + dem -> vom).
# French: gender, size before and colour after the noun with agreement, d'un / d'une / du / de la / de l'.
#
# Held out (generalisation, not memorisation): red star, blue triangle, green cross, yellow circle, black
# diamond and white square (HELD_OUT) never occur in train or val; every test scene holds at least one of
# them. Every word form still occurs in train ("roter" with Kreis, "blaues" with Quadrat, "verte" with
# étoile, ...), so the test split asks for new combinations of known words.
# Splits: train, val (same distribution as train, for model selection), test (held-out pairs).

TINY_WORLD_VERSION = 1
SHAPES = ["circle", "square", "triangle", "star", "diamond", "cross", "ellipse"]
COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 230), "green": (40, 170, 60), "yellow": (245, 215, 30),
           "black": (15, 15, 15), "white": (250, 250, 250)}
BACKGROUND = (140, 140, 140)
SIZES = ["small", "large"]
HELD_OUT = [("red", "star"), ("blue", "triangle"), ("green", "cross"), ("yellow", "circle"),
            ("black", "diamond"), ("white", "square")]

EN_RELATION = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
DE_NOUN = {"circle": ("Kreis", "m"), "square": ("Quadrat", "n"), "triangle": ("Dreieck", "n"),
           "star": ("Stern", "m"), "diamond": ("Raute", "f"), "cross": ("Kreuz", "n"),
           "ellipse": ("Ellipse", "f")}
DE_ADJECTIVE = {"small": "klein", "large": "groß", "red": "rot", "blue": "blau", "green": "grün",
                "yellow": "gelb", "black": "schwarz", "white": "weiß"}
DE_INDEFINITE = {  # (case, gender) -> (article, adjective ending): mixed declension after "ein"
    ("nom", "m"): ("ein", "er"), ("nom", "n"): ("ein", "es"), ("nom", "f"): ("eine", "e"),
    ("dat", "m"): ("einem", "en"), ("dat", "n"): ("einem", "en"), ("dat", "f"): ("einer", "en")}
DE_DEFINITE_DATIVE = {"m": "dem", "n": "dem", "f": "der"}
DE_RELATION = {"left": "links von", "right": "rechts von", "above": "über", "below": "unter"}  # + dative
FR_NOUN = {"circle": ("cercle", "m"), "square": ("carré", "m"), "triangle": ("triangle", "m"),
           "star": ("étoile", "f"), "diamond": ("losange", "m"), "cross": ("croix", "f"),
           "ellipse": ("ellipse", "f")}
FR_ADJECTIVE = {"small": ("petit", "petite"), "large": ("grand", "grande"), "red": ("rouge", "rouge"),
                "blue": ("bleu", "bleue"), "green": ("vert", "verte"), "yellow": ("jaune", "jaune"),
                "black": ("noir", "noire"), "white": ("blanc", "blanche")}
FR_RELATION = {"left": "à gauche", "right": "à droite", "above": "au-dessus", "below": "au-dessous"}  # + de


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str
    row: int  # grid cell, 0..2 from the top
    col: int  # 0..2 from the left


@dataclass(frozen=True)
class Scene:
    """things[0] is the subject; things[1] the landmark of every relation; things[2] is related to it too."""
    things: tuple[Thing, ...]

    def relation(self, a: Thing, b: Thing) -> str:  # where a is, seen from b (same row or same column)
        if a.row == b.row:
            return "left" if a.col < b.col else "right"
        return "above" if a.row < b.row else "below"


def _a(t):
    return f"a {t.size} {t.colour} {t.shape}"


def _ein(t, case):
    noun, gender = DE_NOUN[t.shape]
    article, ending = DE_INDEFINITE[case, gender]
    return f"{article} {DE_ADJECTIVE[t.size]}{ending} {DE_ADJECTIVE[t.colour]}{ending} {noun}"


def _dem(t):
    noun, gender = DE_NOUN[t.shape]
    return f"{DE_DEFINITE_DATIVE[gender]} {noun}"


def _un(t):
    noun, gender = FR_NOUN[t.shape]
    f = gender == "f"
    return f"{'une' if f else 'un'} {FR_ADJECTIVE[t.size][f]} {noun} {FR_ADJECTIVE[t.colour][f]}"


def _le(t):
    noun, gender = FR_NOUN[t.shape]
    return f"l'{noun}" if noun[0] in "aeiouéè" else f"{'la' if gender == 'f' else 'le'} {noun}"


def _de(phrase):  # de + un -> d'un, de + une -> d'une, de + le -> du, de + la -> de la, de + l' -> de l'
    if phrase.startswith("le "):
        return "du " + phrase[3:]
    return ("d'" if phrase[0] in "aeiouéè" else "de ") + phrase


# per language: subject (nominative), landmark (after a relation), "the" landmark, relation + phrase, verb,
# "and"
GRAMMAR = {
    "en": (_a, _a, lambda t: f"the {t.shape}", lambda rel, p: f"{EN_RELATION[rel]} {p}", "is", "and"),
    "de": (lambda t: _ein(t, "nom"), lambda t: _ein(t, "dat"), _dem,
           lambda rel, p: f"{DE_RELATION[rel]} {p}".replace("von dem ", "vom "), "ist", "und"),
    "fr": (_un, _un, _le, lambda rel, p: f"{FR_RELATION[rel]} {_de(p)}", "est", "et"),
}


def describe(scene: Scene, lang: str) -> str:
    """'{A} is {rel} {B}.' or '{A} is {rel} {B} and {C} is {rel} {the B}.', the same order in all three."""
    subject, landmark, the, relate, verb, conjunction = GRAMMAR[lang]
    a, *rest = scene.things
    out = subject(a)
    if rest:
        out += f" {verb} {relate(scene.relation(a, rest[0]), landmark(rest[0]))}"
    if len(rest) > 1:
        relation = relate(scene.relation(rest[1], rest[0]), the(rest[0]))
        out += f" {conjunction} {subject(rest[1])} {verb} {relation}"
    return out[0].upper() + out[1:] + "."


def make_scenes(split: str, n: int, seed: int = 0) -> list[Scene]:
    """n deterministic scenes. Shapes within a scene differ, so "the star" names one thing."""
    rng = random.Random(f"tiny-world-{seed}-{split}")  # str seeds hash the same on every run and machine
    held_out = set(HELD_OUT)
    cells = [(r, c) for r in range(3) for c in range(3)]
    scenes = []
    for _ in range(n):
        count = rng.choice([1, 2, 2, 3, 3])
        shapes = rng.sample(SHAPES, count)
        colours = [rng.choice(list(COLOURS)) for _ in shapes]
        if split == "test":  # force one held-out pair in, anywhere in the scene
            colour, shape = rng.choice(HELD_OUT)
            k = rng.randrange(count)
            others = [s for s in shapes if s != shape][:count - 1]
            shapes, colours[k] = others[:k] + [shape] + others[k:], colour
        else:  # keep every held-out pair out
            for k, shape in enumerate(shapes):
                while (colours[k], shape) in held_out:
                    colours[k] = rng.choice(list(COLOURS))
        # the landmark (things[1]) anywhere; the others in its row or column, so each relation is exact
        landmark = rng.choice(cells)
        place = [landmark]
        for _ in range(count - 1):
            free = [c for c in cells if c not in place and (c[0] == landmark[0] or c[1] == landmark[1])]
            place.append(rng.choice(free))
        if count > 1:
            place[0], place[1] = place[1], place[0]
        sizes = [rng.choice(SIZES) for _ in shapes]
        things = zip(shapes, colours, sizes, place)
        scenes.append(Scene(tuple(Thing(s, c, z, r, q) for s, c, z, (r, q) in things)))
    return scenes


def _centre(thing: Thing, image_size: int):
    cell = image_size / 3
    return (thing.col + 0.5) * cell, (thing.row + 0.5) * cell


def render(scene: Scene, image_size: int = 64) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for t in scene.things:
        x, y = _centre(t, image_size)
        r = image_size / 3 * (0.42 if t.size == "large" else 0.25)  # radius in pixels
        fill = COLOURS[t.colour]
        if t.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif t.shape == "ellipse":
            draw.ellipse((x - r, y - 0.55 * r, x + r, y + 0.55 * r), fill=fill)
        elif t.shape == "square":
            draw.rectangle((x - 0.8 * r, y - 0.8 * r, x + 0.8 * r, y + 0.8 * r), fill=fill)
        elif t.shape == "cross":
            draw.rectangle((x - r, y - 0.3 * r, x + r, y + 0.3 * r), fill=fill)
            draw.rectangle((x - 0.3 * r, y - r, x + 0.3 * r, y + r), fill=fill)
        else:  # polygons given as (angle in degrees from the top, radius factor)
            corners = {"triangle": [(0, 1), (120, 1), (240, 1)],
                       "diamond": [(0, 1), (90, 0.7), (180, 1), (270, 0.7)],
                       "star": [(36 * k, 1 if k % 2 == 0 else 0.45) for k in range(10)]}[t.shape]
            draw.polygon([(x + f * r * math.sin(math.radians(a)), y - f * r * math.cos(math.radians(a)))
                          for a, f in corners], fill=fill)
    return image


# -----------------------------------------------------------------------------
# The world's tokenizer: its words as the pieces of a SentencePiece Unigram model in mBART-50's layout, so
# that the tiny mBART and the tiny text tower read it as the real ones read theirs.


def _word_pieces(lines) -> list[tuple[str, float]]:
    """Unigram pieces for a closed vocabulary: whole words, with punctuation and the French elided
    article split off ('▁d'', 'une'), scored by log frequency, plus every character as a fallback."""
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    counts = {}
    for line in lines:
        for word, _ in metaspace.pre_tokenize_str(line):
            for piece in re.findall(r"▁?\w+'?|▁?[^\w▁]", word):
                counts[piece] = counts.get(piece, 0) + 1
    total = sum(counts.values())
    pieces = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    chars = sorted({c for p in counts for c in p} - set(counts))
    floor = math.log(1 / total) - 10  # characters only where no word fits
    return [(p, math.log(c / total)) for p, c in pieces] + [(c, floor) for c in chars]


def build_tokenizer(pieces: list[tuple[str, float]]) -> Tokenizer:
    """A SentencePiece-style Unigram tokenizer in mBART-50's id layout: <s> <pad> </s> <unk>, the pieces
    ('▁word', log-probability), the 52 language codes, <mask>. Normaliser, pre-tokenizer and decoder are the
    ones transformers' MBart50Tokenizer builds, so both read the file the same way."""
    reserved = set(data.SPECIALS + data.MBART50_LANGS + ["<mask>"])
    vocab = ([(t, 0.0) for t in data.SPECIALS] + [(p, float(s)) for p, s in pieces if p not in reserved]
             + [(code, 0.0) for code in data.MBART50_LANGS] + [("<mask>", 0.0)])
    tok = Tokenizer(Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.add_special_tokens(data.SPECIALS + data.MBART50_LANGS + ["<mask>"])  # never split, skipped by decode
    return tok


# -----------------------------------------------------------------------------
# Writing the world: into any folder, or once into a cache folder that every run shares.


def make_tiny_world(out_dir, n_train: int = 10000, n_val: int = 500, n_test: int = 500, seed: int = 0,
                    image_size: int = 64) -> Path:
    """Write the tiny world into out_dir in the Multi30k layout, plus tokenizer.json and stamp.json."""
    out = Path(out_dir)
    for sub in ("raw", "image_splits", "images"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        scenes = make_scenes(split, n, seed)
        names = [f"{split}_{i:05d}.png" for i in range(n)]
        for scene, name in zip(scenes, names):
            render(scene, image_size).save(out / "images" / name)
        (out / "image_splits" / f"{split}.txt").write_text("".join(name + "\n" for name in names))
        for lang in GRAMMAR:
            lines = "".join(describe(s, lang) + "\n" for s in scenes)
            (out / "raw" / f"{split}.{lang}").write_text(lines, "utf-8")
    # the tokenizer sees the training text only; every word form is in it (see HELD_OUT above)
    train_text = [line for lang in GRAMMAR
                  for line in (out / "raw" / f"train.{lang}").read_text("utf-8").splitlines()]
    tokenizer = build_tokenizer(_word_pieces(train_text))
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), "utf-8")
    stamp = dict(version=TINY_WORLD_VERSION, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test,
                 image_size=image_size, held_out=[" ".join(p) for p in HELD_OUT])
    (out / "stamp.json").write_text(json.dumps(stamp, indent=1))  # written last: marks a complete world
    return out


def tiny_world(cache_dir=None, **settings) -> Path:
    """The tiny world's folder, `{cache_dir}/tiny_world`, generated on first use (cache_dir defaults to
    $CLIPTRANS_CACHE or ~/.cache/cliptrans). Regenerated when its version or settings differ."""
    cache = Path(cache_dir or os.environ.get("CLIPTRANS_CACHE") or Path.home() / ".cache" / "cliptrans")
    final = cache / "tiny_world"
    wanted = dict(version=TINY_WORLD_VERSION, seed=0, n_train=10000, n_val=500, n_test=500, image_size=64)
    wanted.update(settings)

    def current():
        with contextlib.suppress(OSError, ValueError):
            stamp = json.loads((final / "stamp.json").read_text())
            return all(stamp.get(k) == v for k, v in wanted.items())
        return False
    if current():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".tiny_world."))  # same filesystem: rename is atomic
    try:
        make_tiny_world(tmp, **{k: v for k, v in wanted.items() if k != "version"})
        if final.exists():  # stale: move it aside, then swap the new one in
            old = Path(tempfile.mkdtemp(dir=cache, prefix=".tiny_world.old."))
            os.replace(final, old / "world")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
    except OSError:
        if not current():  # another process may have won the race; anything else is a real error
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# -----------------------------------------------------------------------------
# Stage 0 (tiny preset only): stand-ins for the pretrained towers and mBART.


def infill(ids, mask_id, g, ratio=0.35):
    """`[lang] w1 .. wn </s>` -> the same with spans of one to three words replaced by one <mask> each: mBART's
    text infilling in miniature. `ratio` of the words is the budget; spans start at budget // 2 random places and
    end at the budget, at an earlier span or at the sentence's end, so about 27% of the words end up masked
    (measured: tests/test_recipe.py; mBART masks 35%)."""
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
def retrieval(model, ttok, split, langs, device, group=64):
    """How well the towers align: recall@1 and @5 of image -> text and text -> image retrieval on `split`, per
    language (see `recall`)."""
    model.eval()
    size = model.config.vision.image_size
    chunks = [split.images[i:i + 256] for i in range(0, len(split), 256)]
    image = torch.cat([model.encode_image(torch.stack([data.load_image(f, size) for f in c]).to(device))
                       for c in chunks])
    out = {}
    for lang in langs:
        texts = split.sentences[lang]
        text = torch.cat([model.encode_text(*(t.to(device) for t in ttok.encode(texts[i:i + 256],
                                                                                 model.text.max_tokens)))
                          for i in range(0, len(texts), 256)])
        out[lang] = recall(image, text, texts, group)
    model.train()
    return out


def recall(image, text, texts, group=64, ks=(1, 5)):
    """image, text (N, D): the embeddings of N examples and their captions `texts`. Within groups of `group`
    examples, each image against the captions of its group (and each caption against the images): the share
    whose right partner is among the k most similar by cosine. A caption that reads exactly like the right one
    counts as right (one-shape scenes repeat). Whole groups only, so chance is k / group; a split smaller than
    one group is one group."""
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


def stage0(settings: dict, device) -> Path:
    """The paper starts from M-CLIP (text and image towers aligned contrastively on image-caption pairs)
    and from mBART-50 (pre-trained as a denoising autoencoder). Stage 0 gives the tiny models both.

    `settings`: train.py's settings as a dict, saved with the checkpoint; stage 0 reads data (a tiny
    world), images, train_split, val_split, n_pairs, mapping, batch_size, epochs, lr, seed, log_every and out.
    Writes OUT/last, the folder a converted checkpoint would be, and OUT/summary.json: the final losses and
    how well the towers retrieve (`retrieval`, on the validation split)."""
    t_start = time.time()
    c = SimpleNamespace(**settings)
    world_dir = Path(c.data)
    tok_path = world_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise SystemExit(f"error: stage 0 makes the tiny preset's stand-in models on a tiny world (the "
                         f"default, or a folder written by `python tiny_world.py`, which holds their "
                         f"tokenizer.json); {world_dir} has no tokenizer.json. Other data needs the "
                         f"pretrained models: --preset paper --weights (converted with weights.py)")
    mtok = data.MBartTokenizer(tok_path)
    ttok = data.TextTowerTokenizer(tok_path)
    cfg = CLIPTransConfig.preset("tiny")
    cfg.mbart.vocab_size = cfg.text.vocab_size = mtok.vocab_size
    cfg.mapping = MappingConfig(kind=c.mapping)
    torch.manual_seed(c.seed)
    model = CLIPTrans(cfg).to(device)
    langs = ["en", "de", "fr"]
    try:
        train = data.read_split(world_dir, c.train_split, langs, images=c.images or world_dir / "images",
                                limit=c.n_pairs)
        val = data.read_split(world_dir, c.val_split, langs, images=c.images or world_dir / "images")
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    size = cfg.vision.image_size
    tqdm.write(f"stage 0: aligning the tiny towers on {len(train)} images x {len(langs)} languages")
    images = tqdm(train.images, desc="load images", leave=False)
    pixels = torch.stack([data.load_image(f, size) for f in images])  # (N, 3, size, size)

    # (a) CLIP's contrastive objective: image i and its caption (in any language) are a pair, every other
    # caption in the batch is a negative. The text tower learns all languages into one space with the images.
    # Three times the denoiser's steps, from twice its learning rate, warmed up then decayed on a cosine: the
    # towers then find an image's caption among 64 at recall@1 0.93 (0.79 with the denoiser's recipe:
    # measured, EXPERIMENTS.md).
    temp = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))
    towers = list(model.vision.parameters()) + list(model.text.parameters()) + [temp]
    opt = torch.optim.AdamW(towers, lr=2 * c.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(c.seed)
    n, B = len(train), c.batch_size
    steps, warmup = c.epochs * (n // B), 30
    bar = tqdm(range(3 * steps), desc="stage 0: contrastive")
    for step in bar:
        progress = max(0, step - warmup) / max(1, 3 * steps - warmup)
        warm = min(1, (step + 1) / warmup)
        opt.param_groups[0]["lr"] = 2 * c.lr * warm * (1 + math.cos(math.pi * progress)) / 2
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
    summary = {"stage": 0, "contrastive_loss": round(loss.item(), 4)}
    # How good a stand-in for M-CLIP the towers are: does an image find its caption among others, and back?
    summary["retrieval"] = retrieval(model, ttok, val, langs, device)
    tqdm.write(f"stage 0: {c.val_split} retrieval recall@1 in groups of 64, image -> text / text -> image: "
               + ", ".join(f"{lang} {r['image_to_text_r1']:.2f} / {r['text_to_image_r1']:.2f}"
                           for lang, r in summary["retrieval"].items()))

    # (b) mBART's denoising pre-training: reconstruct a sentence from a copy with about 27% of its words
    # masked in spans ("text infilling"), in every language of the world.
    mask_id = mtok.tok.token_to_id("<mask>")
    encoded = [row[row != mtok.pad_id].tolist()
               for lang in langs for row in mtok.encode(train.sentences[lang], lang)[0]]
    opt = torch.optim.AdamW(model.mbart.parameters(), lr=c.lr)
    bar = tqdm(range(steps), desc="stage 0: denoising")
    for step in bar:
        picked = torch.randint(len(encoded), (B,), generator=g).tolist()
        rows = [encoded[i] for i in picked]  # `[lang] x </s>`
        tgt, _ = data.pad(rows, mtok.pad_id)
        src_ids, src_mask = data.pad([infill(r, mask_id, g) for r in rows], mtok.pad_id)
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
    weights.save_checkpoint(out, model, settings, {"stage": 0}, tmp_tok)
    shutil.rmtree(tmp_tok)
    summary.update(denoising_loss=round(loss.item(), 4), minutes=round((time.time() - t_start) / 60, 2),
                   checkpoint=str(out))
    text = json.dumps(summary, indent=2)
    data.atomic_write(Path(c.out) / "summary.json", lambda p: Path(p).write_text(text))
    print(json.dumps(summary))
    return out


# -----------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the folder to write the world into")
    for name, default, text in (("n_train", 10000, "scenes in train"), ("n_val", 500, "scenes in val"),
                                ("n_test", 500, "scenes in test"), ("seed", 0, "the world's seed"),
                                ("image_size", 64, "image side, in pixels")):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default,
                       help=f"{text} (default: {default})")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    args = p.parse_args(argv)
    small = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k.startswith("n_") and v < 1]
    if small or args.image_size < 8:
        what = ", ".join(small) or f"--image-size {args.image_size}"
        p.error(f"{what}: every split needs at least one scene, and an image at least 8 pixels")
    t0 = time.time()
    try:
        data.check_new_folder(args.out, args.overwrite)
    except data.DataError as e:
        p.exit(1, f"error: {e}\n")
    try:
        with data.written_aside(args.out) as tmp:  # renamed into place when complete
            make_tiny_world(tmp, args.n_train, args.n_val, args.n_test, args.seed, args.image_size)
    except OSError as e:  # a full or read-only disk: the half-written world is removed
        p.exit(1, f"error: cannot write {args.out} ({e.strerror or e}): free some space or make its folder "
                  f"writable\n")
    print(f"tiny world in {args.out} ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
