"""
Data for CLIPTrans: tokenizers, CLIP image preprocessing, the Multi30k reader, a cache for the frozen
towers' features, length-bucketed batching, and a built-in tiny world to train on without downloads.

    python data.py multi30k --out data/multi30k     # Multi30k task-1 text + image lists from GitHub
    python data.py tiny --out data/tiny             # write the tiny world (images, en/de/fr, tokenizer.json)

    root = tiny_world()                             # generated once (~5 s) into ~/.cache/cliptrans/tiny_world
    train = read_split(root, "train", ["en", "de"], images=root / "images")
    tok = MBartTokenizer(root / "tokenizer.json")
    input_ids, attention_mask = tok.encode(train.sentences["en"][:32], "en")   # (B, T) each

What each part matches, number for number (tests/test_data.py checks it against transformers):
- MBartTokenizer:      transformers MBart50Tokenizer (`[lang_code] x </s>`), from any mBART-50 tokenizer.json
- TextTowerTokenizer:  transformers XLMRobertaTokenizer (`<s> x </s>`), M-CLIP's text tower
- clip_preprocess:     transformers CLIPImageProcessor (the PIL one), OpenAI CLIP's resize / crop / normalise
- read_split:          Multi30k task 1 (github multi30k/dataset) and the WIT MMT release of VALHALLA

Only torch, tokenizers, safetensors, pillow and tqdm are needed.
"""

import argparse
import contextlib
import ctypes
import gzip
import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import Unigram
from tqdm import tqdm


class DataError(ValueError):
    """A dataset on disk is missing, misaligned or damaged. The message says what to fix."""


# -----------------------------------------------------------------------------
# Languages. mBART-50 appends one token per language after the SentencePiece pieces, in fairseq's order
# (transformers/models/mbart50/tokenization_mbart50.py, FAIRSEQ_LANGUAGE_CODES).

MBART50_LANGS = [
    "ar_AR", "cs_CZ", "de_DE", "en_XX", "es_XX", "et_EE", "fi_FI", "fr_XX", "gu_IN", "hi_IN", "it_IT", "ja_XX",
    "kk_KZ", "ko_KR", "lt_LT", "lv_LV", "my_MM", "ne_NP", "nl_XX", "ro_RO", "ru_RU", "si_LK", "tr_TR", "vi_VN",
    "zh_CN", "af_ZA", "az_AZ", "bn_IN", "fa_IR", "he_IL", "hr_HR", "id_ID", "ka_GE", "km_KH", "mk_MK", "ml_IN",
    "mn_MN", "mr_IN", "pl_PL", "ps_AF", "pt_XX", "sv_SE", "sw_KE", "ta_IN", "te_IN", "th_TH", "tl_XX", "uk_UA",
    "ur_PK", "xh_ZA", "gl_ES", "sl_SI",
]
_SHORT_NAMES = {code.split("_")[0]: code for code in MBART50_LANGS}  # "de" -> "de_DE"


def lang_code(name: str) -> str:
    """'de' or 'de_DE' -> 'de_DE'."""
    if name in MBART50_LANGS:
        return name
    if name in _SHORT_NAMES:
        return _SHORT_NAMES[name]
    raise ValueError(f"unknown language {name!r}: expected an mBART-50 code such as 'de_DE' or one of the "
                     f"short names {', '.join(sorted(_SHORT_NAMES))}")


# -----------------------------------------------------------------------------
# Tokenizers. Both read a `tokenizers` tokenizer.json and add the special tokens themselves, so the file's
# own post-processor (mBART-50's is hard-wired to en_XX) never matters. Padding is on the right: mBART's
# learned positions and XLM-R's padding-aware positions both expect that.

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3 in both mBART-50 and XLM-R


class _SentencePieceTokenizer:
    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file {self.path} not found: expected a tokenizer.json "
                                    f"(weights.py writes one next to the converted weights; the tiny world has one)")
        self.tok = Tokenizer.from_file(str(self.path))
        self.tok.no_padding()  # we pad and truncate ourselves, whatever the file says
        self.tok.no_truncation()
        self.bos_id, self.pad_id, self.eos_id = self._id("<s>"), self._id("<pad>"), self._id("</s>")
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        # decode skips what transformers treats as special: <s> <pad> </s> <unk> <mask> and language codes
        maybe = [self.tok.token_to_id(t) for t in SPECIALS + ["<mask>"] + MBART50_LANGS]
        self.special_ids = {i for i in maybe if i is not None}

    def _id(self, token):
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.path} has no token {token!r}: expected a SentencePiece tokenizer.json in "
                             f"mBART-50 / XLM-R layout (<s> <pad> </s> <unk>, pieces, language codes, <mask>)")
        return i

    def _encode(self, texts, first_id, max_len):
        """(B, T) ids `first x </s>` right-padded with pad_id, and the (B, T) attention mask (1 = token)."""
        if isinstance(texts, str) or not texts:
            raise ValueError(f"expected a non-empty list of strings, got {texts!r:.80}")
        if max_len is not None and max_len < 3:
            raise ValueError(f"max_len={max_len} leaves no room for text between the two special tokens")
        keep = None if max_len is None else max_len - 2  # truncation keeps both special tokens
        rows = [[first_id] + e.ids[:keep] + [self.eos_id]
                for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]
        T = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
        for b, row in enumerate(rows):
            input_ids[b, :len(row)] = torch.tensor(row)
            attention_mask[b, :len(row)] = 1
        return input_ids, attention_mask

    def decode(self, ids) -> list[str]:
        """(B, T) ids (tensor or lists) -> B strings, special tokens dropped, spacing restored."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if ids and isinstance(ids[0], int):
            ids = [ids]
        return self.tok.decode_batch([[i for i in row if i not in self.special_ids] for row in ids],
                                     skip_special_tokens=True)


class MBartTokenizer(_SentencePieceTokenizer):
    """mBART-50: `[lang_code] x </s>` for the encoder and the target alike (the decoder input is
    `shift_tokens_right` of the target: `</s> [lang_code] x`)."""

    def lang_id(self, name: str) -> int:
        code = lang_code(name)
        i = self.tok.token_to_id(code)  # by string: a tokenizer.json with another layout still works
        if i is None:
            raise ValueError(f"{self.path} has no language token {code!r}: use mBART-50's tokenizer.json "
                             f"(facebook/mbart-large-50) or one built by data.build_tokenizer")
        return i

    def encode(self, texts: list[str], lang: str, max_len: int | None = None):
        return self._encode(texts, self.lang_id(lang), max_len)

    encode_target = encode


class TextTowerTokenizer(_SentencePieceTokenizer):
    """XLM-R (M-CLIP's text tower): `<s> x </s>`, at most 512 tokens (514 positions minus the 2 skipped)."""

    def encode(self, texts: list[str], max_len: int | None = 512):
        return self._encode(texts, self.bos_id, max_len)


def build_tokenizer(pieces: list[tuple[str, float]]) -> Tokenizer:
    """A SentencePiece-style Unigram tokenizer in mBART-50's id layout: <s> <pad> </s> <unk>, the pieces
    ('▁word', log-probability), the 52 language codes, <mask>. Normaliser, pre-tokenizer and decoder are the
    ones transformers' MBart50Tokenizer builds, so both read the file the same way."""
    reserved = set(SPECIALS + MBART50_LANGS + ["<mask>"])
    vocab = ([(t, 0.0) for t in SPECIALS] + [(p, float(s)) for p, s in pieces if p not in reserved]
             + [(code, 0.0) for code in MBART50_LANGS] + [("<mask>", 0.0)])
    tok = Tokenizer(Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.add_special_tokens(SPECIALS + MBART50_LANGS + ["<mask>"])  # never split, skipped by decode
    return tok


# -----------------------------------------------------------------------------
# Images: exactly what transformers' CLIPImageProcessor (PIL backend) does for OpenAI CLIP.
# (F.interpolate's bicubic is not PIL's, so the resize must go through PIL.)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(image):
    # transparency is composited onto white, as transformers' convert_to_rgb does (a plain
    # .convert("RGB") would keep the hidden colour of transparent pixels)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def clip_preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> (3, size, size) float32: shortest side to `size` (bicubic), centre crop, normalise."""
    image = _to_rgb(image)
    w, h = image.size
    long = int(size * max(w, h) / min(w, h))  # transformers' get_resize_output_image_size truncates
    w, h = (size, long) if w <= h else (long, size)
    image = image.resize((w, h), resample=Image.BICUBIC)
    # the short side is now `size`, so the crop always fits (no padding case); offsets round down
    top, left = (h - size) // 2, (w - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    x = (x.double() * (1 / 255)).float()  # (3, s, s); rescaled in float64 then cast, as transformers does
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def load_image(path, size: int) -> torch.Tensor:
    """Open an image file and preprocess it: (3, size, size)."""
    try:
        with Image.open(path) as image:
            image.load()
            return clip_preprocess(image, size)
    except FileNotFoundError:
        raise DataError(f"image {path} not found: check its path (for a split, the images folder)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path} ({e}): the file is damaged or not an image; "
                        f"download it again") from None


# -----------------------------------------------------------------------------
# Datasets. One reader for the Multi30k task-1 layout, which the WIT MMT release and the tiny world share:
#   root/raw/{split}.{lang}[.gz]   one sentence per line (or the same files directly under root)
#   root/image_splits/{split}.txt  one image file name per line, aligned with the sentences
#   images/[{split}/]{name}        the images (Flickr30k and MSCOCO are not redistributable: fetch them)


@dataclass
class Split:
    name: str
    sentences: dict[str, list[str]]  # language as given -> one sentence per example
    images: list[Path] | None = None  # one file per example, when images were asked for

    def __len__(self):
        return len(next(iter(self.sentences.values())))


LAYOUT = ("expected root/raw/{split}.{lang}[.gz] and root/image_splits/{split}.txt (Multi30k task 1: "
          "`python data.py multi30k --out DIR` fetches them), or the text files directly under root "
          "(WIT MMT: root/{src}_{tgt}/{split}.{lang})")


def _find(candidates, what):
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(f"no {what}. Tried: {', '.join(map(str, candidates))}. " + LAYOUT)


def _read_lines(path) -> list[str]:
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
            lines = [line.strip() for line in f]  # strip: newline and stray spaces around the sentence
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"cannot read {path} ({e}): expected UTF-8 text, one sentence per line") from None
    if not lines:
        raise DataError(f"{path} is empty: expected one line per example of the split")
    empty = [i + 1 for i, line in enumerate(lines) if not line]
    if empty:
        raise DataError(f"{path} has {len(empty)} empty line(s), at line {', '.join(map(str, empty[:5]))}"
                        f"{' ...' if len(empty) > 5 else ''}: every line must hold one sentence aligned with "
                        f"the other files of the split; fix those lines in all of them")
    return lines


def _check_images(files, names, folder):
    missing = [n for n, f in zip(names, files) if not f.is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(files)} images are missing from {folder}, e.g. "
                        f"{', '.join(missing[:5])}: point `images` at the folder holding them (flat, or one "
                        f"sub-folder per split)")
    unreadable = []
    for name, f in zip(names, files):
        try:
            with Image.open(f):  # reads the header only: cheap enough for 29k files
                pass
        except (OSError, SyntaxError, ValueError):
            unreadable.append(name)
    if unreadable:
        raise DataError(f"{len(unreadable)} of {len(files)} images in {folder} cannot be read as images, e.g. "
                        f"{', '.join(unreadable[:5])}: download them again")


def read_split(root, split: str, langs: list[str], images=None) -> Split:
    """The sentences of `split` in each language, aligned, and the image files when `images` is given.

    read_split("data/multi30k", "train", ["en", "de"], images="data/flickr30k-images")
    read_split("data/wit/en_ro", "valid", ["en", "ro"])"""
    root = Path(root)
    if not langs:
        raise ValueError("read_split needs at least one language")
    sentences, files = {}, {}
    for lang in langs:
        suffixes = dict.fromkeys([lang, lang.split("_")[0]])  # 'en_XX' also finds 'train.en'
        candidates = [folder / f"{split}.{s}{gz}" for folder in (root / "raw", root) for s in suffixes
                      for gz in ("", ".gz")]
        files[lang] = _find(candidates, f"{lang} text for split {split!r} in {root}")
        sentences[lang] = _read_lines(files[lang])
    first = langs[0]
    for lang in langs[1:]:
        if len(sentences[lang]) != len(sentences[first]):
            raise DataError(f"{files[first]} has {len(sentences[first])} lines but {files[lang]} has "
                            f"{len(sentences[lang])}: the files of one split must be aligned line by line")
    if images is None:
        return Split(split, sentences)

    image_list = _find([root / "image_splits" / f"{split}.txt"], f"image list for split {split!r} in {root}")
    names = [line.split("#")[0] for line in _read_lines(image_list)]  # MSCOCO: 'COCO_...jpg#2' -> 'COCO_...jpg'
    if len(names) != len(sentences[first]):
        raise DataError(f"{image_list} lists {len(names)} images but {files[first]} has {len(sentences[first])} "
                        f"lines: they must be aligned line by line")
    folder = Path(images) / split if (Path(images) / split).is_dir() else Path(images)
    image_files = [folder / n for n in names]
    _check_images(image_files, names, folder)
    return Split(split, sentences, image_files)


MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/"
MULTI30K_SPLITS = {"train": "en de fr cs", "val": "en de fr cs", "test_2016_flickr": "en de fr cs",
                   "test_2017_flickr": "en de fr", "test_2017_mscoco": "en de fr", "test_2018_flickr": "en de fr cs"}
MULTI30K_FILES = ([f"raw/{s}.{lang}.gz" for s, langs in MULTI30K_SPLITS.items() for lang in langs.split()]
                  + [f"image_splits/{s}.txt" for s in MULTI30K_SPLITS])


def atomic_write(path, write):
    """Write `path` through `write(tmp_path)` into a temporary file in the same folder, fsync, rename: readers see
    the old file or the new one, never a half-written one (the converter and the checkpoints use it too)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the file is as readable as any other
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def download_multi30k(out, timeout: float = 5.0) -> Path:
    """Multi30k task-1 text and image lists (not the images) into out/raw and out/image_splits."""
    out = Path(out)
    for rel in tqdm(MULTI30K_FILES, desc="multi30k", unit="file"):
        if (out / rel).exists():
            continue
        try:
            with urllib.request.urlopen(MULTI30K_URL + rel, timeout=timeout) as response:
                data = response.read()
        except (urllib.error.URLError, OSError) as e:
            raise DataError(f"cannot download {MULTI30K_URL + rel} ({e}). Without internet, copy the files "
                            f"of github.com/multi30k/dataset data/task1 yourself: raw/{{split}}.{{lang}}.gz into "
                            f"{out / 'raw'} and image_splits/{{split}}.txt into {out / 'image_splits'}") from None
        atomic_write(out / rel, lambda tmp: Path(tmp).write_bytes(data))
    return out


# -----------------------------------------------------------------------------
# Frozen-tower feature cache. The towers never change during training, so each split is embedded once
# ("the M-CLIP embeddings are precomputed"), keyed by a fingerprint of the weights and the preprocessing.


def fingerprint(module_or_state_dict, *extra) -> str:
    """sha256 over every tensor's name, shape, dtype and bytes, plus `extra` strings (e.g. image size)."""
    state = (module_or_state_dict.state_dict() if isinstance(module_or_state_dict, torch.nn.Module)
             else module_or_state_dict)
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.numel():  # hash the raw memory in place (bytes(storage) copies one element at a time)
            h.update((ctypes.c_ubyte * (t.numel() * t.element_size())).from_address(t.data_ptr()))
    for e in extra:
        h.update(f"|{e}".encode())
    return h.hexdigest()


def cached_embeddings(cache_dir, name: str, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Load `cache_dir/{name}.{key[:16]}.safetensors` if it was written for this exact `key`, else call
    `compute()` and store its result atomically (an interrupted run never leaves a half-written cache).
    Under DDP let rank 0 fill the cache before the others read it (barrier)."""
    path = Path(cache_dir) / f"{name}.{key[:16]}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    return f.get_tensor("embeddings")
        except Exception:  # unreadable (e.g. written by something else): recompute and replace it
            pass
    embeddings = compute()
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"compute() for {name} returned {type(embeddings).__name__}, expected a tensor")
    embeddings = embeddings.detach().cpu().contiguous()
    try:
        atomic_write(path, lambda tmp: save_file({"embeddings": embeddings}, tmp, metadata={"key": key, "name": name}))
    except OSError as e:  # a read-only dataset folder, say
        raise DataError(f"cannot write the feature cache {path} ({e}): make {path.parent} writable, or cache the "
                        f"features in another folder (train.py --features DIR)") from None
    return embeddings


def _chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def embed_images(encode_image, files, size: int, batch_size: int, device) -> torch.Tensor:
    """(N, D) features of N image files; encode_image takes pixel_values (B, 3, size, size)."""
    out = []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, \
            tqdm(total=len(files), desc="embed images", unit="img") as bar:
        for chunk in _chunks(list(files), batch_size):  # PIL decodes and resizes outside the GIL: threads help
            pixels = torch.stack(list(pool.map(lambda f: load_image(f, size), chunk)))
            out.append(encode_image(pixels.to(device)).float().cpu())
            bar.update(len(chunk))
    return torch.cat(out)


@torch.no_grad()
def embed_texts(encode_text, tokenizer, sentences, batch_size: int, device, max_len: int = 512) -> torch.Tensor:
    """(N, D) features of N sentences, each cut to max_len tokens (the text tower's positions); encode_text takes
    (input_ids, attention_mask), both (B, T)."""
    out = []
    for chunk in tqdm(_chunks(list(sentences), batch_size), desc="embed texts", unit="batch"):
        input_ids, attention_mask = tokenizer.encode(chunk, max_len)
        out.append(encode_text(input_ids.to(device), attention_mask.to(device)).float().cpu())
    return torch.cat(out)


# -----------------------------------------------------------------------------
# Batching: examples of similar length share a batch, so little of each batch is padding.


class LengthBucketSampler(torch.utils.data.Sampler):
    """Yields batches (lists of dataset indices) for `DataLoader(dataset, batch_sampler=...)`.

    Each epoch: shuffle (generator seeded with seed + epoch), cut into buckets, sort each bucket by length,
    cut it into steps of batch_size * world_size examples, shuffle the order of the steps. Rank r takes
    every world_size-th example of each step, so the ranks of one step get examples of similar length and
    equal work, and every example is seen exactly once per epoch across all ranks, without duplicates.
    All ranks have the same number of batches (len(sampler)); only the last step of an epoch can be short:
    its ranks get batches that differ by at most one example, and a rank gets an EMPTY batch when fewer
    examples than ranks remain. drop_last=True drops that short step instead.

    shuffle=False (evaluation): one bucket, longest first, steps in order. Batches hold original indices:
    `hyps[i] = out` for i, out in zip(batch, outputs) restores the dataset's order.
    """

    def __init__(self, lengths, batch_size: int, seed: int = 0, bucket_size: int | None = None, shuffle=True,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.lengths, self.batch_size, self.seed = [int(n) for n in lengths], batch_size, seed
        self.shuffle, self.rank, self.world_size, self.drop_last = shuffle, rank, world_size, drop_last
        self.step = batch_size * world_size
        bucket_size = bucket_size or 100 * batch_size
        self.bucket_size = math.ceil(bucket_size / self.step) * self.step  # whole steps: only the last is short
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def steps(self) -> list[list[int]]:
        """This epoch's steps, each a list of batch_size * world_size indices (the last may be short)."""
        n, g = len(self.lengths), torch.Generator().manual_seed(self.seed + self.epoch)
        if self.shuffle:
            order = torch.randperm(n, generator=g).tolist()
            buckets = _chunks(order, self.bucket_size)
        else:
            buckets = [list(range(n))]
        steps = []
        for bucket in buckets:
            bucket.sort(key=lambda i: -self.lengths[i])  # stable: equal lengths keep the shuffled order
            steps += _chunks(bucket, self.step)
        if self.drop_last:
            steps = [s for s in steps if len(s) == self.step]
        if self.shuffle:
            steps = [steps[i] for i in torch.randperm(len(steps), generator=g).tolist()]
        return steps

    def __iter__(self):
        for step in self.steps():
            yield step[self.rank::self.world_size]

    def __len__(self):
        n = len(self.lengths)
        return n // self.step if self.drop_last else math.ceil(n / self.step)


# -----------------------------------------------------------------------------
# The tiny world: a synthetic multimodal translation task that trains in minutes on a CPU.
#
# Each scene shows one to three coloured shapes on a grey background, placed in a 3x3 grid, and is
# described in English, German and French by a small grammar with correct agreement:
#   A small red circle is to the left of a large blue star and a small green square is below the star.
#   Ein kleiner roter Kreis ist links von einem großen blauen Stern und ein kleines grünes Quadrat ist
#   unter dem Stern.
#   Un petit cercle rouge est à gauche d'une grande étoile bleue et un petit carré vert est au-dessous de l'étoile.
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
           "star": ("Stern", "m"), "diamond": ("Raute", "f"), "cross": ("Kreuz", "n"), "ellipse": ("Ellipse", "f")}
DE_ADJECTIVE = {"small": "klein", "large": "groß", "red": "rot", "blue": "blau", "green": "grün",
                "yellow": "gelb", "black": "schwarz", "white": "weiß"}
DE_INDEFINITE = {  # (case, gender) -> (article, adjective ending): mixed declension after "ein"
    ("nom", "m"): ("ein", "er"), ("nom", "n"): ("ein", "es"), ("nom", "f"): ("eine", "e"),
    ("dat", "m"): ("einem", "en"), ("dat", "n"): ("einem", "en"), ("dat", "f"): ("einer", "en")}
DE_DEFINITE_DATIVE = {"m": "dem", "n": "dem", "f": "der"}
DE_RELATION = {"left": "links von", "right": "rechts von", "above": "über", "below": "unter"}  # + dative
FR_NOUN = {"circle": ("cercle", "m"), "square": ("carré", "m"), "triangle": ("triangle", "m"),
           "star": ("étoile", "f"), "diamond": ("losange", "m"), "cross": ("croix", "f"), "ellipse": ("ellipse", "f")}
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


# per language: subject (nominative), landmark (after a relation), "the" landmark, relation + phrase, verb, "and"
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
        out += f" {conjunction} {subject(rest[1])} {verb} {relate(scene.relation(rest[1], rest[0]), the(rest[0]))}"
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
        scenes.append(Scene(tuple(Thing(s, c, z, r, q) for s, c, z, (r, q) in zip(shapes, colours, sizes, place))))
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
            (out / "raw" / f"{split}.{lang}").write_text("".join(describe(s, lang) + "\n" for s in scenes), "utf-8")
    # the tokenizer sees the training text only; every word form is in it (see HELD_OUT above)
    train_text = [line for lang in GRAMMAR for line in (out / "raw" / f"train.{lang}").read_text("utf-8").splitlines()]
    (out / "tokenizer.json").write_text(build_tokenizer(_word_pieces(train_text)).to_str(pretty=True), "utf-8")
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    multi30k = sub.add_parser("multi30k", help="download Multi30k task-1 text and image lists")
    multi30k.add_argument("--out", required=True)
    tiny = sub.add_parser("tiny", help="write the tiny world")
    tiny.add_argument("--out", required=True)
    for name, default in (("n_train", 10000), ("n_val", 500), ("n_test", 500), ("seed", 0), ("image_size", 64)):
        tiny.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    args = p.parse_args(argv)
    if args.command == "multi30k":
        try:
            print(f"Multi30k text in {download_multi30k(args.out)}")
        except DataError as e:
            p.exit(1, f"error: {e}\n")
    else:
        t0 = time.time()
        out = make_tiny_world(args.out, args.n_train, args.n_val, args.n_test, args.seed, args.image_size)
        print(f"tiny world in {out} ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
