"""
The tiny world: a synthetic multimodal translation task that lets the tiny preset train, and be tested, on any
CPU in minutes. Scenes of one to three coloured shapes on a 3x3 grid, drawn as 64x64 images and described in
English, German and French by a small grammar with correct agreement:

    A small red circle is to the left of a large blue star and a small green square is below the star.
    Ein kleiner roter Kreis ist links von einem großen blauen Stern und ein kleines grünes Quadrat ist unter dem Stern.
    Un petit cercle rouge est à gauche d'une grande étoile bleue et un petit carré vert est au-dessous de l'étoile.

Six colour-shape pairs (HELD_OUT) never occur in train or val, and every test scene holds one: a model is scored on
new combinations of words it knows. The world is written in the Multi30k layout with its own tokenizer
(`tokenizer.json`, in mBART-50's id layout); stage 0 (stage0.py) makes the pretrained models' stand-ins on it.

    python tiny_world.py --out data/tiny     # write the world into a folder (it takes ~5 s)
    root = tiny_world()                      # the default world, made once into ~/.cache/cliptrans/tiny_world
"""

import argparse
import contextlib
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import Unigram

import data
import folders

TINY_WORLD_VERSION = 1
SHAPES = ["circle", "square", "triangle", "star", "diamond", "cross", "ellipse"]
COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 230), "green": (40, 170, 60), "yellow": (245, 215, 30),
           "black": (15, 15, 15), "white": (250, 250, 250)}
SIZES = ["small", "large"]
HELD_OUT = [("red", "star"), ("blue", "triangle"), ("green", "cross"), ("yellow", "circle"),
            ("black", "diamond"), ("white", "square")]
BACKGROUND = (140, 140, 140)
# in radii: ellipses and rectangles as (half width, half height), polygons as (degrees from the top, radius)
OUTLINES = {
    "circle": ("ellipse", [(1, 1)]), "ellipse": ("ellipse", [(1, 0.55)]), "square": ("rectangle", [(0.8, 0.8)]),
    "cross": ("rectangle", [(1, 0.3), (0.3, 1)]), "triangle": ("polygon", [(0, 1), (120, 1), (240, 1)]),
    "diamond": ("polygon", [(0, 1), (90, 0.7), (180, 1), (270, 0.7)]),
    "star": ("polygon", [(36 * k, 1 if k % 2 == 0 else 0.45) for k in range(10)])}

# German: gender (m/n/f), nominative for the subject, dative after von / über / unter (von + dem -> vom).
# French: gender, size before and colour after the noun with agreement, d'un / d'une / du / de la / de l'.
EN_RELATION = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
DE_NOUN = {"circle": ("Kreis", "m"), "square": ("Quadrat", "n"), "triangle": ("Dreieck", "n"), "star": ("Stern", "m"),
           "diamond": ("Raute", "f"), "cross": ("Kreuz", "n"), "ellipse": ("Ellipse", "f")}
DE_ADJECTIVE = {"small": "klein", "large": "groß", "red": "rot", "blue": "blau", "green": "grün",
                "yellow": "gelb", "black": "schwarz", "white": "weiß"}
DE_INDEFINITE = {  # (case, gender) -> (article, adjective ending): mixed declension after "ein"
    ("nom", "m"): ("ein", "er"), ("nom", "n"): ("ein", "es"), ("nom", "f"): ("eine", "e"),
    ("dat", "m"): ("einem", "en"), ("dat", "n"): ("einem", "en"), ("dat", "f"): ("einer", "en")}
DE_DEFINITE_DATIVE = {"m": "dem", "n": "dem", "f": "der"}
DE_RELATION = {"left": "links von", "right": "rechts von", "above": "über", "below": "unter"}  # + dative
FR_NOUN = {"circle": ("cercle", "m"), "square": ("carré", "m"), "triangle": ("triangle", "m"), "star": ("étoile", "f"),
           "diamond": ("losange", "m"), "cross": ("croix", "f"), "ellipse": ("ellipse", "f")}
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


# per language: subject, landmark (after a relation), "the" landmark, relation + phrase, verb, "and"
GRAMMAR = {
    "en": (_a, _a, lambda t: f"the {t.shape}", lambda rel, p: f"{EN_RELATION[rel]} {p}", "is", "and"),
    "de": (lambda t: _ein(t, "nom"), lambda t: _ein(t, "dat"),
           lambda t: f"{DE_DEFINITE_DATIVE[DE_NOUN[t.shape][1]]} {DE_NOUN[t.shape][0]}",
           lambda rel, p: f"{DE_RELATION[rel]} {p}".replace("von dem ", "vom "), "ist", "und"),
    "fr": (_un, _un, _le, lambda rel, p: f"{FR_RELATION[rel]} {_de(p)}", "est", "et"),
}
LANGS = list(GRAMMAR)


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
                while (colours[k], shape) in HELD_OUT:
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


def render(scene: Scene, image_size: int = 64) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size / 3
    for t in scene.things:
        x, y = (t.col + 0.5) * cell, (t.row + 0.5) * cell
        r = cell * (0.42 if t.size == "large" else 0.25)  # radius in pixels
        kind, points = OUTLINES[t.shape]
        if kind == "polygon":
            draw.polygon([(x + f * r * math.sin(math.radians(a)), y - f * r * math.cos(math.radians(a)))
                          for a, f in points], fill=COLOURS[t.colour])
        else:
            for w, h in points:
                getattr(draw, kind)((x - w * r, y - h * r, x + w * r, y + h * r), fill=COLOURS[t.colour])
    return image


# The world's tokenizer, read by the tiny mBART and text tower as the real ones read theirs.
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
    specials = data.SPECIALS + data.MBART50_LANGS + ["<mask>"]
    vocab = ([(t, 0.0) for t in data.SPECIALS] + [(p, float(s)) for p, s in pieces if p not in specials]
             + [(code, 0.0) for code in data.MBART50_LANGS] + [("<mask>", 0.0)])
    tok = Tokenizer(Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.add_special_tokens(specials)  # never split, skipped by decode
    return tok


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
        for lang in LANGS:
            (out / "raw" / f"{split}.{lang}").write_text("".join(describe(s, lang) + "\n" for s in scenes), "utf-8")
    # the tokenizer sees the training text only: every word form is in it ("roter" with Kreis, "verte" with étoile)
    train_text = [line for lang in LANGS
                  for line in (out / "raw" / f"train.{lang}").read_text("utf-8").splitlines()]
    tokenizer = build_tokenizer(_word_pieces(train_text))
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), "utf-8")
    stamp = dict(version=TINY_WORLD_VERSION, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test,
                 image_size=image_size, held_out=[" ".join(p) for p in HELD_OUT])
    (out / "stamp.json").write_text(json.dumps(stamp, indent=1))  # written last: marks a complete world
    return out


def default_path(cache_dir=None) -> Path:
    """`{cache_dir}/tiny_world`, cache_dir defaulting to $CLIPTRANS_CACHE or ~/.cache/cliptrans."""
    return Path(cache_dir or os.environ.get("CLIPTRANS_CACHE") or Path.home() / ".cache" / "cliptrans") / "tiny_world"


def tiny_world(cache_dir=None, **settings) -> Path:
    """The default world's folder (default_path), generated on first use, and again when its version or
    settings differ."""
    final = default_path(cache_dir)
    wanted = dict(version=TINY_WORLD_VERSION, seed=0, n_train=10000, n_val=500, n_test=500, image_size=64)
    wanted.update(settings)
    with contextlib.suppress(OSError, ValueError):
        stamp = json.loads((final / "stamp.json").read_text())
        if all(stamp.get(k) == v for k, v in wanted.items()):
            return final
    with folders.written_aside(final) as tmp:
        make_tiny_world(tmp, **{k: v for k, v in wanted.items() if k != "version"})
    return final


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the folder to write the world into")
    for name, default, text in (("n_train", 10000, "scenes in train"), ("n_val", 500, "scenes in val"),
                                ("n_test", 500, "scenes in test"), ("seed", 0, "the world's seed"),
                                ("image_size", 64, "image side, in pixels")):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default, help=f"{text} (default: {default})")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    args = p.parse_args(argv)
    small = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k.startswith("n_") and v < 1]
    if small or args.image_size < 8:
        what = ", ".join(small) or f"--image-size {args.image_size}"
        p.error(f"{what}: every split needs at least one scene, and an image at least 8 pixels")
    return p, args


def main(argv=None):
    p, args = parse_args(argv)
    t0 = time.time()
    try:
        folders.check_new_folder(args.out, args.overwrite)
    except folders.FolderError as e:
        p.exit(1, f"error: {e}\n")
    try:
        with folders.written_aside(args.out) as tmp:  # renamed into place when complete
            make_tiny_world(tmp, args.n_train, args.n_val, args.n_test, args.seed, args.image_size)
    except OSError as e:  # a full or read-only disk: the half-written world is removed
        p.exit(1, f"error: cannot write {args.out} ({e.strerror or e}): free some space or make its folder writable\n")
    print(f"tiny world in {args.out} ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
