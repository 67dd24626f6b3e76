"""data.py against real references: transformers' tokenizers and CLIP image processor on real Multi30k text,
and the Multi30k files themselves. (The tiny world's tests are in test_tiny_world.py.)

No hub: the tokenizer.json files are trained here with `tokenizers` on Multi30k lines (en, de, fr, cs) and
laid out like mBART-50's; transformers then reads the same file. Everything runs on CPU in seconds."""

import functools
import gzip
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import runs  # noqa: E402  (the feature cache: runs.features)
import tiny_world  # noqa: E402  (its build_tokenizer lays a trained tokenizer out as mBART-50's)
from data import DataError, LengthBucketSampler  # noqa: E402

import transformers  # noqa: E402  (a test dependency: requirements.txt)

from conftest import assert_close  # noqa: E402
from conftest import MULTI30K  # noqa: E402  (the real Multi30k text: a test that needs it fails without it)
LANGS = ["en", "de", "fr", "cs"]


def gz_lines(split, lang):
    with gzip.open(MULTI30K / "raw" / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
        return [line.strip() for line in f]


# -----------------------------------------------------------------------------
# Languages


def test_languages_match_transformers():
    from transformers.models.mbart50.tokenization_mbart50 import FAIRSEQ_LANGUAGE_CODES
    assert data.MBART50_LANGS == FAIRSEQ_LANGUAGE_CODES
    for code in FAIRSEQ_LANGUAGE_CODES:
        assert data.lang_code(code) == code
        assert data.lang_code(code.split("_")[0]) == code
    assert [data.lang_code(s) for s in ("en", "de", "fr", "cs", "ro")] == ["en_XX", "de_DE", "fr_XX", "cs_CZ", "ro_RO"]
    with pytest.raises(ValueError, match="unknown language 'klingon'.*short names.*cs, de, en, es"):
        data.lang_code("klingon")


# -----------------------------------------------------------------------------
# Tokenizers: token for token equal to transformers on the same tokenizer.json


@pytest.fixture(scope="session")
def spm_json(tmp_path_factory):
    """A SentencePiece-style Unigram tokenizer trained on Multi30k (4 languages), in mBART-50's layout."""
    lines = [line for lang in LANGS for line in gz_lines("train", lang)[:2000]]
    trainer_tok = Tokenizer(models.Unigram())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer_tok.train_from_iterator(lines, trainers.UnigramTrainer(
        vocab_size=1500, special_tokens=data.SPECIALS, unk_token="<unk>"))
    pieces = json.loads(trainer_tok.to_str())["model"]["vocab"]
    path = tmp_path_factory.mktemp("spm") / "tokenizer.json"
    tiny_world.build_tokenizer(pieces).save(str(path))
    return path


@pytest.fixture(scope="session")
def xlmr_json(spm_json):
    """The same pieces with XLM-R's pre-tokenizer (whitespace split, then Metaspace, no normaliser),
    as transformers' XLMRobertaTokenizer builds it."""
    tok = Tokenizer.from_file(str(spm_json))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    path = spm_json.parent / "xlmr_tokenizer.json"
    tok.save(str(path))
    return path


@functools.lru_cache
def tokenizer_sentences():
    """Real sentences for the tokenizer checks: unseen validation lines, the longest training lines,
    and lines with non-breaking spaces, quotes, dashes and diacritics."""
    out = {}
    for lang in LANGS:
        train, val = gz_lines("train", lang), gz_lines("val", lang)
        special = [s for s in train if any(c in s for c in "\xa0„“–’«ßřžůçœ")][:40]
        longest = sorted(train, key=len)[-10:]
        out[lang] = val[:150] + special + longest
    return out


@pytest.mark.parametrize("src,tgt", [("en", "de"), ("de", "fr"), ("fr", "cs"), ("cs", "en")])
def test_mbart_tokenizer_matches_transformers(spm_json, src, tgt):
    hf = transformers.MBart50TokenizerFast(tokenizer_file=str(spm_json), src_lang=data.lang_code(src),
                                           tgt_lang=data.lang_code(tgt))
    ours = data.MBartTokenizer(spm_json)
    sents = tokenizer_sentences()
    assert (ours.pad_id, ours.eos_id, ours.bos_id) == (hf.pad_token_id, hf.eos_token_id, hf.cls_token_id) == (1, 2, 0)
    assert ours.vocab_size == len(hf)
    for code in data.MBART50_LANGS:  # found by string, ids right after the pieces
        assert ours.lang_id(code) == hf.convert_tokens_to_ids(code)
    assert ours.lang_id("en") == ours.vocab_size - 1 - 52 + 3  # en_XX is the 4th code; <mask> is last

    for max_len in (None, 12):
        kw = dict(padding=True, return_tensors="pt")
        if max_len:
            kw.update(truncation=True, max_length=max_len)
        ref = hf(sents[src], **kw)
        input_ids, mask = ours.encode(sents[src], src, max_len=max_len)
        assert torch.equal(input_ids, ref.input_ids) and torch.equal(mask, ref.attention_mask)
        ref = hf(text_target=sents[tgt], **kw)
        input_ids, mask = ours.encode(sents[tgt], tgt, max_len=max_len)
        assert torch.equal(input_ids, ref.input_ids) and torch.equal(mask, ref.attention_mask)
        # decode drops language codes, </s> and padding, and restores spacing as transformers does
        assert ours.decode(input_ids) == hf.batch_decode(input_ids, skip_special_tokens=True)
    assert input_ids[:, 0].eq(ours.lang_id(tgt)).all() and mask.sum(1).max() == 12
    # untruncated, the decoded text is the sentence itself (up to runs of spaces and unknown characters)
    ids, _ = ours.encode(sents[src], src)
    same = sum(d == s for d, s in zip(ours.decode(ids), sents[src]))
    assert same > 0.8 * len(sents[src])


def test_text_tower_tokenizer_matches_transformers(xlmr_json):
    hf = transformers.XLMRobertaTokenizerFast(tokenizer_file=str(xlmr_json))
    ours = data.TextTowerTokenizer(xlmr_json)
    sents = tokenizer_sentences()
    for lang in LANGS:
        for max_len in (512, 10):
            ref = hf(sents[lang], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            input_ids, mask = ours.encode(sents[lang], max_len=max_len)
            assert torch.equal(input_ids, ref.input_ids) and torch.equal(mask, ref.attention_mask)
            assert ours.decode(input_ids) == hf.batch_decode(input_ids, skip_special_tokens=True)
    assert input_ids[:, 0].eq(0).all()


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="tokenizer file .* not found"):
        data.MBartTokenizer(tmp_path / "missing.json")
    # a tokenizer without language codes: say which token is missing and what to use instead
    tok = Tokenizer(models.Unigram([(t, 0.0) for t in data.SPECIALS] + [("▁a", -1.0)], unk_id=3))
    tok.save(str(tmp_path / "plain.json"))
    plain = data.MBartTokenizer(tmp_path / "plain.json")
    with pytest.raises(ValueError, match="no language token 'de_DE'.*mbart-large-50"):
        plain.lang_id("de")
    with pytest.raises(ValueError, match="unknown language"):
        plain.lang_id("xx")
    with pytest.raises(ValueError, match="non-empty list"):
        data.TextTowerTokenizer(tmp_path / "plain.json").encode("a single string")


# -----------------------------------------------------------------------------
# Images: equal to transformers' CLIPImageProcessor (PIL backend)


def random_image(mode, w, h, seed):
    g = torch.Generator().manual_seed(seed)
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}
    if mode == "P":  # palette image, one palette entry transparent
        image = random_image("RGB", w, h, seed).quantize(16)
        image.info["transparency"] = 3
        return image
    raw = torch.randint(0, 256, (h * w * channels[mode],), generator=g, dtype=torch.uint8)
    return Image.frombytes(mode, (w, h), bytes(raw.tolist()))


def hf_clip_processor(size):
    cls = getattr(transformers, "CLIPImageProcessorPil", None)
    kw = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return cls(**kw) if cls is not None else transformers.CLIPImageProcessor(use_fast=False, **kw)


@pytest.mark.parametrize("size", [224, 32])
def test_clip_preprocess_matches_transformers(size):
    processor = hf_clip_processor(size)
    shapes = [(224, 224), (225, 333), (640, 480), (333, 225), (101, 37), (31, 17), (17, 31), (1, 50), (299, 298)]
    modes = ["RGB", "RGBA", "L", "LA", "P", "CMYK"]
    for k, (w, h) in enumerate(shapes):
        for mode in modes:
            image = random_image(mode, w, h, seed=k)
            ref = processor(image, return_tensors="pt")["pixel_values"][0]
            ours = data.clip_preprocess(image, size)
            assert ours.shape == (3, size, size) and ours.dtype == torch.float32
            diff = (ours - ref).abs().max().item()
            assert diff <= 1e-6, f"{mode} {w}x{h} at {size}: max |diff| {diff:.2e}"


def test_load_image(tmp_path):
    image = random_image("RGB", 70, 50, seed=1)
    image.save(tmp_path / "a.png")
    assert torch.equal(data.load_image(tmp_path / "a.png", 32), data.clip_preprocess(image, 32))
    with pytest.raises(DataError, match="not found"):
        data.load_image(tmp_path / "missing.jpg", 32)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot read image .*bad.jpg"):
        data.load_image(tmp_path / "bad.jpg", 32)


def test_high_bit_depth_images_are_scaled_to_8_bits(tmp_path):
    """A 16-bit greyscale image is the same picture as its 8-bit copy (value v of 65535 is v / 257 of 255),
    not all white as pillow's convert("RGB") and transformers make it; so are 32-bit int and float images."""
    grey = random_image("L", 45, 30, seed=3)
    values = torch.tensor(list(grey.tobytes()), dtype=torch.int32)
    grey.save(tmp_path / "8bit.png")
    want = data.load_image(tmp_path / "8bit.png", 32)
    deep = Image.frombytes("I", grey.size, (values * 257).numpy().tobytes())  # b * 257: b in both bytes
    deep.convert("I;16").save(tmp_path / "16bit.png")
    assert Image.open(tmp_path / "16bit.png").mode == "I;16"
    assert_close(data.load_image(tmp_path / "16bit.png", 32), want, atol=0, name="16-bit PNG")
    floats = Image.frombytes("F", grey.size, (values / 255).float().numpy().tobytes())
    for image in (deep, deep.convert("I;16"), deep.convert("I;16B"), floats,
                  floats.point(lambda v: v * 65535)):
        assert_close(data.clip_preprocess(image, 32), want, atol=0, name=image.mode)
    # a 16-bit value that is not b * 257 rounds to the nearest 8-bit one: 1000 / 257 = 3.9 -> 4
    assert_close(data.clip_preprocess(Image.new("I;16", (2, 2), 1000), 32),
                 data.clip_preprocess(Image.new("L", (2, 2), 4), 32), atol=0, name="1000 of 65535")


# -----------------------------------------------------------------------------
# Datasets


def test_read_split_multi30k():
    train = data.read_split(MULTI30K, "train", LANGS)
    assert len(train) == 29000 and train.name == "train" and train.images is None
    for lang in LANGS:
        assert train.sentences[lang] == gz_lines("train", lang)
    val = data.read_split(MULTI30K, "val", ["en_XX", "de_DE"])  # full codes find the short file names
    assert len(val.sentences["en_XX"]) == 1014 and val.sentences["de_DE"][0] == gz_lines("val", "de")[0]


def write_dataset(root, split, texts, image_names=None, gz=False, raw=True):
    folder = root / "raw" if raw else root
    folder.mkdir(parents=True, exist_ok=True)
    for lang, lines in texts.items():
        payload = "".join(line + "\n" for line in lines).encode()
        path = folder / f"{split}.{lang}{'.gz' if gz else ''}"
        path.write_bytes(gzip.compress(payload) if gz else payload)
    if image_names is not None:
        (root / "image_splits").mkdir(exist_ok=True)
        (root / "image_splits" / f"{split}.txt").write_text("".join(n + "\n" for n in image_names))


def test_read_split_layouts(tmp_path):
    texts = {"en": ["A dog.", " A cat runs. "], "de": ["Ein Hund.", "Eine Katze rennt."]}
    # Multi30k, gzipped, images in one sub-folder per split, MSCOCO names with '#id'
    write_dataset(tmp_path / "m", "test_2017_mscoco", texts, ["COCO_1.jpg#2", "COCO_2.jpg#0"], gz=True)
    (tmp_path / "img" / "test_2017_mscoco").mkdir(parents=True)
    for i in (1, 2):
        random_image("RGB", 8, 8, i).save(tmp_path / "img" / "test_2017_mscoco" / f"COCO_{i}.jpg", format="JPEG")
    s = data.read_split(tmp_path / "m", "test_2017_mscoco", ["en", "de"], images=tmp_path / "img")
    assert s.sentences == {"en": ["A dog.", "A cat runs."], "de": texts["de"]}
    assert s.images == [tmp_path / "img" / "test_2017_mscoco" / f"COCO_{i}.jpg" for i in (1, 2)]
    # flat images folder
    write_dataset(tmp_path / "m", "val", texts, ["COCO_1.jpg", "COCO_2.jpg"])
    flat = tmp_path / "img" / "test_2017_mscoco"
    s = data.read_split(tmp_path / "m", "val", ["en"], images=flat)
    assert s.images == [flat / "COCO_1.jpg", flat / "COCO_2.jpg"]
    # WIT MMT: root/{src}_{tgt}/{split}.{lang}, no raw/ folder
    write_dataset(tmp_path / "wit" / "en_ro", "valid", {"en": ["Hello."], "ro": ["Salut."]}, raw=False)
    wit = data.read_split(tmp_path / "wit" / "en_ro", "valid", ["en", "ro_RO"])
    assert wit.sentences == {"en": ["Hello."], "ro_RO": ["Salut."]}
    # limit: the first n examples, sentences and images alike; the whole split is still checked
    s = data.read_split(tmp_path / "m", "val", ["en", "de"], images=flat, limit=1)
    assert s.sentences == {"en": ["A dog."], "de": ["Ein Hund."]} and s.images == [flat / "COCO_1.jpg"]
    assert data.read_split(tmp_path / "m", "val", ["en"], limit=5).sentences == {"en": ["A dog.", "A cat runs."]}
    (flat / "COCO_2.jpg").unlink()
    with pytest.raises(DataError, match="1 of 2 images are missing"):
        data.read_split(tmp_path / "m", "val", ["en"], images=flat, limit=1)


def test_skip_missing_images_drops_their_pairs_and_names_them(tmp_path):
    """--skip_missing_images, as the official WIT loader: the pairs whose image is missing are dropped from every
    language, the others keep their order; unreadable images stay an error; none found is an error."""
    texts = {"en": ["a", "b", "c", "d"], "de": ["A", "B", "C", "D"]}
    write_dataset(tmp_path, "train", texts, ["1.png", "2.png", "3.png", "4.png"])
    for name in ("1.png", "3.png"):
        random_image("RGB", 4, 4, 0).save(tmp_path / name)
    s = data.read_split(tmp_path, "train", ["en", "de"], images=tmp_path, skip_missing_images=True)
    assert s.sentences == {"en": ["a", "c"], "de": ["A", "C"]}
    assert s.images == [tmp_path / "1.png", tmp_path / "3.png"] and s.skipped == ["2.png", "4.png"]
    assert data.read_split(tmp_path, "train", ["en"], images=tmp_path, skip_missing_images=True,
                           limit=1).sentences == {"en": ["a"]}
    with pytest.raises(DataError, match=r"2 of 4 images are missing .*--skip_missing_images"):
        data.read_split(tmp_path, "train", ["en"], images=tmp_path)
    (tmp_path / "3.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"1 of 2 images .* cannot be read .*3\.png"):
        data.read_split(tmp_path, "train", ["en"], images=tmp_path, skip_missing_images=True)
    with pytest.raises(DataError, match=r"none of the 4 images of split 'train'"):
        data.read_split(tmp_path, "train", ["en"], images=tmp_path / "raw", skip_missing_images=True)
    assert data.languages(tmp_path, "train") == ["de", "en"]


def test_read_split_errors(tmp_path):
    with pytest.raises(DataError, match=r"Tried: .*raw/train\.en.*train\.en\.gz.*image_splits"):
        data.read_split(tmp_path, "train", ["en"])
    write_dataset(tmp_path, "train", {"en": ["a", "b", "c"], "de": ["a", "b"]})
    with pytest.raises(DataError, match=r"train\.en has 3 lines but .*train\.de has 2"):
        data.read_split(tmp_path, "train", ["en", "de"])
    write_dataset(tmp_path, "val", {"en": ["a", "", "c", " ", "e"]})
    with pytest.raises(DataError, match=r"val\.en has 2 empty line\(s\), at line 2, 4"):
        data.read_split(tmp_path, "val", ["en"])
    (tmp_path / "raw" / "val.en").write_text("")
    with pytest.raises(DataError, match=r"val\.en is empty: expected one line per example"):
        data.read_split(tmp_path, "val", ["en"])
    # images: list of another length, then missing and unreadable files, all counted and named
    write_dataset(tmp_path, "test", {"en": ["a", "b", "c"]}, ["1.png", "2.png"])
    with pytest.raises(DataError, match=r"test\.txt lists 2 images but .*test\.en has 3"):
        data.read_split(tmp_path, "test", ["en"], images=tmp_path)
    write_dataset(tmp_path, "test", {"en": ["a", "b", "c"]}, ["1.png", "2.png", "3.png"])
    write_dataset(tmp_path, "dev", {"en": ["a"]})
    with pytest.raises(DataError, match=r"no image list for split 'dev'.*image_splits/dev\.txt"):
        data.read_split(tmp_path, "dev", ["en"], images=tmp_path)
    with pytest.raises(DataError, match=r"3 of 3 images are missing .*1\.png, 2\.png, 3\.png"):
        data.read_split(tmp_path, "test", ["en"], images=tmp_path)
    random_image("RGB", 4, 4, 0).save(tmp_path / "1.png")
    (tmp_path / "2.png").write_bytes(b"junk")
    (tmp_path / "3.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"2 of 3 images .* cannot be read .*2\.png, 3\.png"):
        data.read_split(tmp_path, "test", ["en"], images=tmp_path)
    assert data.read_split(tmp_path, "test", ["en"]).images is None  # images are only checked when asked for


@pytest.mark.parametrize("gz", [False, True])
def test_read_split_strips_a_byte_order_mark(tmp_path, gz):
    """Notepad and some exports start a UTF-8 file with U+FEFF: it is not part of the first sentence."""
    texts = {"en": ["A dog.", "A cat."], "de": ["Ein Hund.", "Eine Katze."]}
    marked = {lang: ["\ufeff" + lines[0], *lines[1:]] for lang, lines in texts.items()}
    write_dataset(tmp_path, "val", marked, gz=gz)
    assert data.read_split(tmp_path, "val", ["en", "de"]).sentences == texts


def test_read_split_damaged_gz(tmp_path):
    write_dataset(tmp_path, "val", {"en": [f"sentence number {i}" for i in range(200)]}, gz=True)
    path = tmp_path / "raw" / "val.en.gz"
    damaged = bytearray(path.read_bytes())
    damaged[20] ^= 0xFF  # inside the deflate stream: zlib.error, not an OSError
    path.write_bytes(damaged)
    with pytest.raises(DataError, match=r"cannot read .*val\.en\.gz \(.*\): .*damaged.*download it again"):
        data.read_split(tmp_path, "val", ["en"])


# -----------------------------------------------------------------------------
# Frozen-tower feature cache


def test_fingerprint():
    net = torch.nn.Linear(4, 3)
    key = runs.fingerprint(net, "size=224")
    assert key == runs.fingerprint(net.state_dict(), "size=224") and len(key) == 64
    assert key != runs.fingerprint(net, "size=32")
    assert runs.fingerprint({"w": torch.zeros(2)}) != runs.fingerprint({"w": torch.zeros(2, dtype=torch.float64)})
    assert runs.fingerprint({"w": torch.zeros(2)}) != runs.fingerprint({"w": torch.zeros(1, 2)})
    with torch.no_grad():
        net.weight[0, 0] += 1e-6
    assert runs.fingerprint(net, "size=224") != key
    big = torch.randn(100, 50)
    assert runs.fingerprint({"w": big[:, 10:20]}) == runs.fingerprint({"w": big[:, 10:20].clone()})


def test_cached_embeddings(tmp_path, monkeypatch):
    calls = []

    def compute(value=1.0):
        calls.append(value)
        return torch.full((5, 3), value)
    first = runs.cached_embeddings(tmp_path, "val.text", "a" * 64, compute)
    path = tmp_path / f"val.text.{'a' * 16}.safetensors"
    assert path.is_file() and calls == [1.0]
    hit = runs.cached_embeddings(tmp_path, "val.text", "a" * 64, lambda: pytest.fail("cache hit recomputed"))
    assert torch.equal(hit, first)
    # the same 16-character prefix but another key: recomputed and replaced
    runs.cached_embeddings(tmp_path, "val.text", "a" * 63 + "b", lambda: compute(2.0))
    assert calls == [1.0, 2.0] and runs.cached_embeddings(tmp_path, "val.text", "a" * 63 + "b", None)[0, 0] == 2.0

    # a crash while computing or while writing leaves neither the final file nor a temporary one
    def crash():
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        runs.cached_embeddings(tmp_path, "test.text", "c" * 64, crash)
    monkeypatch.setattr(data.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(DataError, match=r"cannot write the feature cache .*test\.text.* \(disk full\).*--features"):
        runs.cached_embeddings(tmp_path, "test.text", "c" * 64, compute)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_embed_images_and_texts(tmp_path):
    files = []
    for i in range(7):
        random_image("RGB", 20 + i, 30, i).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    torch.manual_seed(0)
    image_net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.Flatten(), torch.nn.LazyLinear(6))
    pixels = torch.stack([data.clip_preprocess(Image.open(f), 32) for f in files])
    expected = image_net(pixels).detach()
    got = data.embed_images(image_net, files, 32, batch_size=3, device="cpu")
    assert got.shape == (7, 6) and not got.requires_grad
    torch.testing.assert_close(got, expected)

    tok = Tokenizer(models.Unigram([(t, 0.0) for t in data.SPECIALS] + [(c, -1.0) for c in "▁abcdefgh"], unk_id=3))
    tok.save(str(tmp_path / "tok.json"))
    tokenizer = data.TextTowerTokenizer(tmp_path / "tok.json")
    emb = torch.nn.Embedding(20, 5)

    def mean_pool(input_ids, attention_mask):  # M-CLIP's pooling, as a stand-in text tower
        m = attention_mask.unsqueeze(-1).float()
        return (emb(input_ids) * m).sum(1) / m.sum(1)
    sentences = ["abc", "a", "hgfedcba ab", "b c d", "e"]
    got = data.embed_texts(mean_pool, tokenizer, sentences, batch_size=2, device="cpu")
    expected = torch.cat([mean_pool(*tokenizer.encode([s])) for s in sentences]).detach()
    torch.testing.assert_close(got, expected)
    # cut to max_len tokens: "hgfedcba ab" is embedded from `<s>`, its first 2 pieces and `</s>`
    got = data.embed_texts(mean_pool, tokenizer, sentences, batch_size=2, device="cpu", max_len=4)
    ids, mask = tokenizer.encode(["hgfedcba ab"], 4)
    assert ids.shape == (1, 4)
    torch.testing.assert_close(got[2:3], mean_pool(ids, mask).detach())
    assert not torch.allclose(got[2], expected[2])


# -----------------------------------------------------------------------------
# Batching


def epoch_batches(lengths, world_size, epoch=0, **kw):
    per_rank = []
    for rank in range(world_size):
        s = LengthBucketSampler(lengths, rank=rank, world_size=world_size, **kw)
        s.set_epoch(epoch)
        per_rank.append(list(s))
        assert len(per_rank[-1]) == len(s)
    return per_rank


def test_pad():
    ids, mask = data.pad([[5, 6, 7], [8], [9, 1]], pad_id=1)  # a row may hold the pad id itself: masked by length
    assert ids.tolist() == [[5, 6, 7], [8, 1, 1], [9, 1, 1]] and ids.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]] and mask.dtype == torch.long


def test_sampler_covers_every_example_once():
    lengths = torch.randint(1, 40, (1003,), generator=torch.Generator().manual_seed(0)).tolist()
    for world_size in (1, 2, 3, 4):
        for shuffle in (True, False):
            per_rank = epoch_batches(lengths, world_size, batch_size=16, seed=5, shuffle=shuffle, bucket_size=100)
            assert len({len(b) for b in per_rank}) == 1  # every rank takes the same number of steps
            seen = sorted(i for batches in per_rank for b in batches for i in b)
            assert seen == list(range(len(lengths)))
            for step in zip(*per_rank):  # within one step the ranks' batches differ by at most one example
                assert max(map(len, step)) - min(map(len, step)) <= 1 and max(map(len, step)) <= 16
    dropped = epoch_batches(lengths, 3, batch_size=16, seed=5, drop_last=True)
    assert all(len(b) == 16 for batches in dropped for b in batches) and len(dropped[0]) == 1003 // 48


def test_sampler_deterministic_and_shuffled_per_epoch():
    lengths = [i % 37 for i in range(500)]
    a = epoch_batches(lengths, 2, epoch=3, batch_size=8, seed=1)
    assert a == epoch_batches(lengths, 2, epoch=3, batch_size=8, seed=1)
    assert a != epoch_batches(lengths, 2, epoch=4, batch_size=8, seed=1)
    assert a != epoch_batches(lengths, 2, epoch=3, batch_size=8, seed=2)
    # evaluation order: longest first, original indices, so outputs can be put back in dataset order
    (ordered,) = epoch_batches(lengths, 1, batch_size=8, seed=0, shuffle=False)
    flat = [i for b in ordered for i in b]
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    restored = [None] * len(lengths)
    for i in flat:
        restored[i] = lengths[i]
    assert restored == lengths


def test_sampler_reduces_padding_on_multi30k():
    lengths = [len(s.split()) for s in gz_lines("train", "de")]

    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches if b)
    (bucketed,) = epoch_batches(lengths, 1, batch_size=32, seed=0)
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0))
    random_batches = [b.tolist() for b in order.split(32)]
    real = sum(lengths)
    assert padding(bucketed) < 0.1 * padding(random_batches), (padding(bucketed) / real, padding(random_batches) / real)


def test_an_image_over_pillows_pixel_limit_fails_clearly_unless_allowed(tmp_path, monkeypatch):
    """pillow refuses an image of more than twice MAX_IMAGE_PIXELS (a decompression-bomb guard): a DataError that
    says so and names the way out, from load_image and from read_split; data.allow_large_images lifts it."""
    write_dataset(tmp_path, "train", {"en": ["a"]}, ["big.png"])
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "images" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels: over twice the limit
    with pytest.raises(DataError, match="decompression bombs.*--allow_large_images"):
        data.load_image(tmp_path / "images" / "big.png", 32)
    with pytest.raises(DataError, match="big.png is too large"):
        data.read_split(tmp_path, "train", ["en"], images=tmp_path / "images")
    data.allow_large_images()
    assert data.load_image(tmp_path / "images" / "big.png", 32).shape == (3, 32, 32)


def test_a_damaged_tokenizer_file_fails_clearly(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"version": "1.0", "model": {')  # cut short
    with pytest.raises(DataError, match=f"cannot read the tokenizer {path}.*damaged"):
        data.MBartTokenizer(path)
