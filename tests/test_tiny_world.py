"""tiny_world.py: the tiny world's German and French against hand-written grammar, its scenes against its
images and sentences, its held-out pairs, its tokenizer against transformers', and its folder: deterministic,
cached, written by its command line. Everything runs on CPU in seconds. (Stage 0 is tested in test_train.py.)"""

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import stage0  # noqa: E402
import tiny_world  # noqa: E402
from tiny_world import Scene, Thing  # noqa: E402

import transformers  # noqa: E402  (a test dependency: requirements.txt)


# -----------------------------------------------------------------------------
# The tiny world. German and French are checked against hand-written phrase tables (one entry per noun,
# from a grammar book, not from tiny_world.py), relations against the grid positions, colours against pixels.

SMALL = dict(n_train=300, n_val=40, n_test=60, seed=0, image_size=64)
DE_ADJ = {"small": "klein", "large": "groß", "red": "rot", "blue": "blau", "green": "grün", "yellow": "gelb",
          "black": "schwarz", "white": "weiß"}
# noun -> (nominative "ein...", dative "einem/einer...", "dem/der X", "vom/von der X"); {s} {c}: adjective stems
DE_PHRASES = {
    "circle": ("ein {s}er {c}er Kreis", "einem {s}en {c}en Kreis", "dem Kreis", "vom Kreis"),
    "star": ("ein {s}er {c}er Stern", "einem {s}en {c}en Stern", "dem Stern", "vom Stern"),
    "square": ("ein {s}es {c}es Quadrat", "einem {s}en {c}en Quadrat", "dem Quadrat", "vom Quadrat"),
    "triangle": ("ein {s}es {c}es Dreieck", "einem {s}en {c}en Dreieck", "dem Dreieck", "vom Dreieck"),
    "cross": ("ein {s}es {c}es Kreuz", "einem {s}en {c}en Kreuz", "dem Kreuz", "vom Kreuz"),
    "diamond": ("eine {s}e {c}e Raute", "einer {s}en {c}en Raute", "der Raute", "von der Raute"),
    "ellipse": ("eine {s}e {c}e Ellipse", "einer {s}en {c}en Ellipse", "der Ellipse", "von der Ellipse"),
}
FR_ADJ = {"small": ("petit", "petite"), "large": ("grand", "grande"), "red": ("rouge", "rouge"),
          "blue": ("bleu", "bleue"), "green": ("vert", "verte"), "yellow": ("jaune", "jaune"),
          "black": ("noir", "noire"), "white": ("blanc", "blanche")}
# noun -> (feminine?, "un/une ...", "d'un/d'une ...", "du/de la/de l' X")
FR_PHRASES = {
    "circle": (0, "un {s} cercle {c}", "d'un {s} cercle {c}", "du cercle"),
    "square": (0, "un {s} carré {c}", "d'un {s} carré {c}", "du carré"),
    "triangle": (0, "un {s} triangle {c}", "d'un {s} triangle {c}", "du triangle"),
    "diamond": (0, "un {s} losange {c}", "d'un {s} losange {c}", "du losange"),
    "star": (1, "une {s} étoile {c}", "d'une {s} étoile {c}", "de l'étoile"),
    "cross": (1, "une {s} croix {c}", "d'une {s} croix {c}", "de la croix"),
    "ellipse": (1, "une {s} ellipse {c}", "d'une {s} ellipse {c}", "de l'ellipse"),
}
WHERE = {"en": {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"},
         "de": {"left": "links", "right": "rechts", "above": "über", "below": "unter"},
         "fr": {"left": "à gauche", "right": "à droite", "above": "au-dessus", "below": "au-dessous"}}


def where(a, b):
    """Where a is, seen from b, from their grid cells (they share a row or a column)."""
    if a.row == b.row:
        return "left" if a.col < b.col else "right"
    assert a.col == b.col, "related things must share a row or a column"
    return "above" if a.row < b.row else "below"


def expected_sentence(scene, lang):
    def phrase(t):  # (subject, after a relation, "the" after a relation; German: (plain, after von))
        if lang == "en":
            return [f"a {t.size} {t.colour} {t.shape}"] * 2 + [f"the {t.shape}"]
        if lang == "de":
            p = DE_PHRASES[t.shape]
            s, c = DE_ADJ[t.size], DE_ADJ[t.colour]
            return p[0].format(s=s, c=c), p[1].format(s=s, c=c), (p[2], p[3])
        fem, *p = FR_PHRASES[t.shape]
        s, c = FR_ADJ[t.size][fem], FR_ADJ[t.colour][fem]
        return p[0].format(s=s, c=c), p[1].format(s=s, c=c), p[2]

    def relation(a, b, definite):
        w, ph = where(a, b), phrase(b)
        if lang == "en":
            return f"{WHERE['en'][w]} {ph[2] if definite else ph[1]}"
        if lang == "fr":
            return f"{WHERE['fr'][w]} {ph[2] if definite else ph[1]}"
        if w in ("left", "right"):  # von + dative, "von dem" -> "vom"
            return f"{WHERE['de'][w]} " + (ph[2][1] if definite else f"von {ph[1]}")
        return f"{WHERE['de'][w]} " + (ph[2][0] if definite else ph[1])
    verb, conj = {"en": ("is", "and"), "de": ("ist", "und"), "fr": ("est", "et")}[lang]
    t = scene.things
    s = phrase(t[0])[0]
    if len(t) > 1:
        s += f" {verb} {relation(t[0], t[1], False)}"
    if len(t) > 2:
        s += f" {conj} {phrase(t[2])[0]} {verb} {relation(t[2], t[1], True)}"
    return s[0].upper() + s[1:] + "."


def test_tiny_world_gold_sentences():
    """Hand-written translations of hand-made scenes."""
    gold = [
        (Scene((Thing("star", "red", "small", 1, 0), Thing("diamond", "blue", "large", 1, 1),
                Thing("cross", "white", "small", 0, 1))),
         "A small red star is to the left of a large blue diamond and a small white cross is above the diamond.",
         "Ein kleiner roter Stern ist links von einer großen blauen Raute und ein kleines weißes Kreuz ist über der Raute.",
         "Une petite étoile rouge est à gauche d'un grand losange bleu et une petite croix blanche est au-dessus du losange."),
        (Scene((Thing("ellipse", "black", "large", 2, 2), Thing("circle", "green", "small", 0, 2),
                Thing("triangle", "yellow", "large", 0, 0))),
         "A large black ellipse is below a small green circle and a large yellow triangle is to the left of the circle.",
         "Eine große schwarze Ellipse ist unter einem kleinen grünen Kreis und ein großes gelbes Dreieck ist links vom Kreis.",
         "Une grande ellipse noire est au-dessous d'un petit cercle vert et un grand triangle jaune est à gauche du cercle."),
        (Scene((Thing("square", "white", "large", 0, 1), Thing("star", "green", "small", 1, 1),
                Thing("circle", "blue", "small", 1, 2))),
         "A large white square is above a small green star and a small blue circle is to the right of the star.",
         "Ein großes weißes Quadrat ist über einem kleinen grünen Stern und ein kleiner blauer Kreis ist rechts vom Stern.",
         "Un grand carré blanc est au-dessus d'une petite étoile verte et un petit cercle bleu est à droite de l'étoile."),
        (Scene((Thing("cross", "yellow", "small", 1, 1),)),
         "A small yellow cross.", "Ein kleines gelbes Kreuz.", "Une petite croix jaune."),
    ]
    for scene, en, de, fr in gold:
        assert [tiny_world.describe(scene, lang) for lang in ("en", "de", "fr")] == [en, de, fr]
        assert [expected_sentence(scene, lang) for lang in ("en", "de", "fr")] == [en, de, fr]


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    return tiny_world.make_tiny_world(tmp_path_factory.mktemp("world"), **SMALL)


def test_tiny_world_matches_its_scenes(small_world):
    for split in ("train", "val", "test"):
        s = data.read_split(small_world, split, ["en", "de", "fr"], images=small_world / "images")
        scenes = tiny_world.make_scenes(split, SMALL[f"n_{split}"], SMALL["seed"])
        assert len(s) == len(scenes) == len(s.images)
        for k, scene in enumerate(scenes):
            for lang in ("en", "de", "fr"):
                assert s.sentences[lang][k] == expected_sentence(scene, lang)
            image = Image.open(s.images[k])
            assert image.size == (64, 64)
            for t in scene.things:  # the centre of each thing's grid cell has its colour
                x, y = int((t.col + 0.5) * 64 / 3), int((t.row + 0.5) * 64 / 3)
                assert image.getpixel((x, y)) == tiny_world.COLOURS[t.colour], (split, k, t)


def test_tiny_world_holds_out_combinations(small_world):
    def pairs_in(text):
        return {(c, s) for c, s in tiny_world.HELD_OUT if f"{c} {s}" in text}
    for split in ("train", "val"):
        text = (small_world / "raw" / f"{split}.en").read_text()
        assert not pairs_in(text)
        de, fr = (small_world / "raw" / f"{split}.de").read_text(), (small_world / "raw" / f"{split}.fr").read_text()
        assert not any(w in de for w in ("roter Stern", "roten Stern", "blaues Dreieck", "blauen Dreieck"))
        assert "étoile rouge" not in fr and "triangle bleu" not in fr
    test_lines = (small_world / "raw" / "test.en").read_text().splitlines()
    assert all(pairs_in(line) for line in test_lines)
    assert len(set().union(*map(pairs_in, test_lines))) == len(tiny_world.HELD_OUT)  # all of them are tested


def test_tiny_world_tokenizer(small_world):
    path = small_world / "tokenizer.json"
    hf = transformers.MBart50TokenizerFast(tokenizer_file=str(path), src_lang="en_XX", tgt_lang="de_DE")
    ours, text = data.MBartTokenizer(path), data.TextTowerTokenizer(path)
    assert ours.vocab_size == len(hf) < 400
    assert hf.convert_ids_to_tokens(list(range(4))) == data.SPECIALS
    assert [ours.lang_id(c) for c in data.MBART50_LANGS] == [hf.lang_code_to_id[c] for c in data.MBART50_LANGS]
    assert hf.convert_tokens_to_ids("<mask>") == ours.vocab_size - 1
    for lang in ("en", "de", "fr"):
        sents = data.read_split(small_world, "test", [lang]).sentences[lang]
        hf.src_lang = data.lang_code(lang)
        ref = hf(sents, padding=True, return_tensors="pt")
        input_ids, mask = ours.encode(sents, lang)
        assert torch.equal(input_ids, ref.input_ids) and torch.equal(mask, ref.attention_mask)
        assert ours.decode(input_ids) == sents  # no <unk>: every test word form is in the training text
        assert mask.sum(1).max() < 30
        assert torch.equal(text.encode(sents)[0][:, 1:], input_ids[:, 1:])  # <s> instead of the language


def hash_tree(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_tiny_world_is_deterministic(tmp_path, small_world):
    again = tiny_world.make_tiny_world(tmp_path / "again", **SMALL)
    assert hash_tree(again) == hash_tree(small_world)
    other = tiny_world.make_tiny_world(tmp_path / "other", **{**SMALL, "seed": 1})
    assert (other / "raw" / "train.de").read_bytes() != (small_world / "raw" / "train.de").read_bytes()


def test_tiny_world_cache(tmp_path, monkeypatch):
    settings = dict(n_train=20, n_val=5, n_test=5)
    monkeypatch.setenv("CLIPTRANS_CACHE", str(tmp_path / "env"))
    root = tiny_world.tiny_world(**settings)
    assert root == tmp_path / "env" / "tiny_world" and (root / "stamp.json").is_file()
    stamp = (root / "stamp.json").stat().st_mtime_ns
    monkeypatch.setattr(tiny_world, "make_tiny_world", lambda *a, **k: pytest.fail("regenerated a current world"))
    assert tiny_world.tiny_world(**settings) == root and (root / "stamp.json").stat().st_mtime_ns == stamp
    monkeypatch.undo()
    root2 = tiny_world.tiny_world(tmp_path / "explicit", **{**settings, "seed": 3})
    assert root2 == tmp_path / "explicit" / "tiny_world"
    assert json.loads((root2 / "stamp.json").read_text())["seed"] == 3
    tiny_world.tiny_world(tmp_path / "explicit", **{**settings, "seed": 4})  # stale stamp: regenerated in place
    assert json.loads((root2 / "stamp.json").read_text())["seed"] == 4
    assert sorted(p.name for p in (tmp_path / "explicit").iterdir()) == ["tiny_world"]  # no temp folders left


def test_tiny_cli(tmp_path):
    tiny_world.main(["--out", str(tmp_path / "w"), "--n-train", "10", "--n-val", "2", "--n-test", "3"])
    s = data.read_split(tmp_path / "w", "test", ["en", "fr"], images=tmp_path / "w" / "images")
    assert len(s) == 3 and all(p.is_file() for p in s.images)


def test_tiny_cli_never_overwrites_without_being_asked(tmp_path, capsys):
    """--out holding anything is refused (--overwrite replaces it); empty splits are refused before any work."""
    out = tmp_path / "w"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as stop:
        tiny_world.main(["--out", str(out), "--n-train", "4", "--n-val", "2", "--n-test", "2"])
    assert stop.value.code == 1 and "is not empty (it holds keep.txt)" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    tiny_world.main(["--out", str(out), "--n-train", "4", "--n-val", "2", "--n-test", "2", "--overwrite"])
    assert not (out / "keep.txt").exists() and (out / "stamp.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    with pytest.raises(SystemExit) as stop:
        tiny_world.main(["--out", str(tmp_path / "v"), "--n-train", "0"])
    assert stop.value.code == 2 and "--n-train 0" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def test_retrieval_recall_against_counted_hits():
    """stage0.recall, on made-up embeddings whose ranks are known: within each group of 4, image i is closest
    to caption i except where the test swaps two captions; an identical caption counts as right."""
    text = torch.eye(8)  # caption j: the j-th unit vector, so every similarity below is known
    texts = ["a", "b", "c", "d", "e", "f", "g", "h"]
    r = stage0.recall(text.clone(), text, texts, group=4, ks=(1, 2))
    assert r == {"image_to_text_r1": 1.0, "image_to_text_r2": 1.0, "text_to_image_r1": 1.0, "text_to_image_r2": 1.0}
    image = text.clone()
    image[[0, 1]] = text[[1, 0]] + 0.5 * text[[0, 1]]  # images 0 and 1: each other's caption first, then theirs
    image[5] = text[4] + 0.5 * text[5]  # image 5 looks like caption 4, then like its own: wrong at 1, right at 2
    r = stage0.recall(image, text, texts, group=4, ks=(1, 2))
    # captions 0 and 1 find the swapped images; caption 5 still finds image 5 (its only non-zero similarity)
    assert r == {"image_to_text_r1": 5 / 8, "image_to_text_r2": 1.0, "text_to_image_r1": 6 / 8,
                 "text_to_image_r2": 1.0}
    # captions 4 and 5 identical: image 5 finding caption 4 is right
    r = stage0.recall(image, text, ["a", "b", "c", "d", "e", "e", "g", "h"], group=4, ks=(1,))
    assert r["image_to_text_r1"] == 6 / 8
    # one group of all 8: the same hits (every wrong partner is within its group of 4)
    assert stage0.recall(image, text, texts, group=8, ks=(1,))["image_to_text_r1"] == 5 / 8
