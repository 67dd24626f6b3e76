"""
Data for CLIPTrans: language codes, tokenizers, batching, CLIP's image preprocessing, the reader of the Multi30k
layout, the frozen towers' embeddings of a split. Nothing here knows the model or the tiny world, which is written
in the Multi30k layout and read back by the same reader.

    train = read_split("multi30k", "train", ["en", "de"], images="flickr30k-images")
    tok = MBartTokenizer("weights/paper/tokenizer_mbart.json")
    input_ids, attention_mask = tok.encode(train.sentences["en"][:32], "en")   # (B, T) each

Multi30k: `git clone https://github.com/multi30k/dataset`; `dataset/data/task1` is a folder in this layout (the
Flickr30k images are obtained separately). Each part matches transformers number for number (tests/test_data.py):
MBartTokenizer its MBart50Tokenizer (`[lang_code] x </s>`), TextTowerTokenizer its XLMRobertaTokenizer
(`<s> x </s>`), clip_preprocess its CLIPImageProcessor (OpenAI CLIP's resize, crop and normalisation).
"""

import gzip
import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer
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
    if code := name if name in MBART50_LANGS else _SHORT_NAMES.get(name):
        return code
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
            raise DataError(f"tokenizer file {self.path} not found: expected a tokenizer.json (weights.py writes one "
                            f"next to the converted weights; the tiny world has one)")
        try:
            self.tok = Tokenizer.from_file(str(self.path))
        except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception for a damaged file)
            raise DataError(f"cannot read the tokenizer {self.path} ({e}): the file is damaged or not a "
                            f"tokenizer.json; copy it again from the checkpoint or weights folder it came from")
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

    def _rows(self, texts, first_id, max_len=None) -> list[list[int]]:
        """The ids `first x </s>` of each text, at most max_len of them (cut)."""
        if isinstance(texts, str) or not texts:
            raise ValueError(f"expected a non-empty list of strings, got {texts!r:.80}")
        if max_len is not None and max_len < 3:
            raise ValueError(f"max_len={max_len} leaves no room for text between the two special tokens")
        encoded = self.tok.encode_batch(list(texts), add_special_tokens=False)
        rows = [[first_id] + e.ids + [self.eos_id] for e in encoded]
        return rows if max_len is None else cut(rows, max_len)

    def decode(self, ids) -> list[str]:
        """(B, T) ids (tensor or lists) -> B strings, special tokens dropped, spacing restored."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if ids and isinstance(ids[0], int):
            ids = [ids]
        return self.tok.decode_batch([[i for i in row if i not in self.special_ids] for row in ids],
                                     skip_special_tokens=True)


class MBartTokenizer(_SentencePieceTokenizer):
    """mBART-50: `[lang_code] x </s>` for the encoder and the target alike (the decoder reads `</s> [lang_code] x`)."""

    def lang_id(self, name: str) -> int:
        code = lang_code(name)
        i = self.tok.token_to_id(code)  # by string: a tokenizer.json with another layout still works
        if i is None:
            raise ValueError(f"{self.path} has no language token {code!r}: use mBART-50's tokenizer.json "
                             f"(facebook/mbart-large-50), or one in its layout (the tiny world's)")
        return i

    def rows(self, texts: list[str], lang: str, max_len: int | None = None) -> list[list[int]]:
        return self._rows(texts, self.lang_id(lang), max_len)  # `[lang_code] x </s>` of each text, unpadded

    def encode(self, texts: list[str], lang: str, max_len: int | None = None):
        """(B, T) ids `[lang_code] x </s>` right-padded with pad_id, and the (B, T) attention mask (1 = token)."""
        return pad(self.rows(texts, lang, max_len), self.pad_id)


class TextTowerTokenizer(_SentencePieceTokenizer):
    """XLM-R (M-CLIP's text tower): `<s> x </s>`, at most 512 tokens (514 positions minus the 2 skipped)."""

    def rows(self, texts: list[str], max_len: int | None = 512) -> list[list[int]]:
        return self._rows(texts, self.bos_id, max_len)  # `<s> x </s>`, cut to max_len as XLM-R's tokenizer cuts

    def encode(self, texts: list[str], max_len: int | None = 512):
        """(B, T) ids `<s> x </s>` right-padded with pad_id, and the (B, T) attention mask (1 = token)."""
        return pad(self.rows(texts, max_len), self.pad_id)


def cut(rows, limit):
    """Rows of ids `first x </s>` cut to `limit` ids each, the last one (`</s>`) kept."""
    return [row if len(row) <= limit else row[:limit - 1] + row[-1:] for row in rows]


def drop_tokens(rows, p, seed=0):
    """The official code's noise (its --mask_prob): each token of `[lang] x </s>` dropped with probability p (seeded),
    the language code and `</s>` kept. p = 1 leaves `[lang] </s>`, the "trivial" encoder input of stage 1."""
    if p <= 0:
        return rows
    if p >= 1:
        return [[row[0], row[-1]] for row in rows]
    g = torch.Generator().manual_seed(seed)
    out = []
    for row in rows:
        keep = torch.rand(len(row), generator=g) > p  # (len(row),) True = kept, as theirs: rand > mask_prob
        keep[0] = keep[-1] = True
        out.append([t for t, k in zip(row, keep.tolist()) if k])
    return out


# -----------------------------------------------------------------------------
# Batching: rows of ids padded on the right into a tensor; a sampler that batches examples of similar length.


def padded_len(longest, multiple=1, limit=None):
    """`longest` rounded up to a multiple of `multiple`, but not past `limit` (nor below `longest`)."""
    T = -(-longest // multiple) * multiple
    return max(longest, min(T, limit)) if limit else T


def pad(rows, pad_id, multiple=1, limit=None):
    """Rows of token ids -> (B, T) ids right-padded with pad_id, and the (B, T) attention mask (1 = token). T: the
    longest row rounded up to a multiple of `multiple` (at most `limit`): batches share a few shapes, compiled once."""
    T = padded_len(max(len(r) for r in rows), multiple, limit)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        mask[b, :len(r)] = 1
    return ids, mask


def _chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


class LengthBucketSampler(torch.utils.data.Sampler):
    """Yields batches: lists of dataset indices, this rank's share of each step. Each epoch: shuffle (seeded with
    seed + epoch), cut into buckets (default: 100 steps' worth), sort each by length, cut it into steps of
    batch_size * world_size, shuffle the steps. Rank r takes every world_size-th example of a step: the ranks get
    examples of similar length, and every example is seen once per epoch. All ranks have len(sampler) batches;
    only an epoch's last step can be short (a rank's batch EMPTY when fewer examples than ranks remain), or dropped
    (drop_last). shuffle=False (evaluation): longest first, in order; indices restore the dataset's order."""

    def __init__(self, lengths, batch_size: int, seed: int = 0, bucket_size: int | None = None, shuffle=True,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.lengths, self.batch_size, self.seed = [int(n) for n in lengths], batch_size, seed
        self.shuffle, self.rank, self.world_size, self.drop_last = shuffle, rank, world_size, drop_last
        self.step = batch_size * world_size
        bucket_size = bucket_size or 100 * self.step
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
# Images: exactly what transformers' CLIPImageProcessor (PIL backend) does for OpenAI CLIP.
# (F.interpolate's bicubic is not PIL's, so the resize must go through PIL.)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(image):
    # transparency composited onto white, as transformers' convert_to_rgb (.convert("RGB") keeps hidden colours)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _to_8_bits(image):
    # pillow's convert("RGB") clips a 16-bit or float grey image at 255 (so does transformers): nearly all white.
    # Scaled instead: 16 bits (I;16*, and I, as some formats open them) by 1/257, 65535 -> 255 and an 8-bit value's
    # 16-bit copy b * 257 -> b; floats in [0, 1] by 255, larger ones as 16 bits; +0.5 rounds (pillow truncates).
    if image.mode.startswith("I;16"):
        image = image.convert("I")  # pillow computes on I and F images only
    if image.mode == "F" and image.getextrema()[1] <= 1:
        return image.point(lambda v: v * 255 + 0.5).convert("L")
    if image.mode in ("I", "F"):
        return image.point(lambda v: v / 257 + 0.5).convert("L")
    return image


def clip_preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> (3, size, size) float32: shortest side to `size` (bicubic), centre crop, normalise."""
    image = _to_rgb(_to_8_bits(image))
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


def too_large(path, error):
    return (f"image {path} is too large for pillow's guard against decompression bombs ({error}): if you trust "
            f"it, pass --allow_large_images (train.py, translate.py), or make it smaller")


def allow_large_images():  # lift pillow's limit on an image's pixels (a decompression-bomb guard): trusted data
    Image.MAX_IMAGE_PIXELS = None


def load_image(path, size: int) -> torch.Tensor:
    """Open an image file and preprocess it: (3, size, size)."""
    try:
        with Image.open(path) as image:
            image.load()
            return clip_preprocess(image, size)
    except FileNotFoundError:
        raise DataError(f"image {path} not found: check its path (for a split, the images folder)") from None
    except Image.DecompressionBombError as e:
        raise DataError(too_large(path, e)) from None
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
    skipped: list[str] = field(default_factory=list)  # the images missing, when skip_missing_images

    def __len__(self):
        return len(next(iter(self.sentences.values())))


LAYOUT = ("expected root/raw/{split}.{lang}[.gz] and root/image_splits/{split}.txt (Multi30k task 1: "
          "git clone https://github.com/multi30k/dataset, and root is dataset/data/task1), or the text files directly "
          "under root (WIT MMT: root/{src}_{tgt}/{split}.{lang})")


def _find(candidates, what):
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(f"no {what}. Tried: {', '.join(map(str, candidates))}. " + LAYOUT)


def _read_lines(path) -> list[str]:
    try:
        # utf-8-sig: a byte-order mark (Notepad's UTF-8) is no part of the first sentence
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8-sig") as f:
            lines = [line.strip() for line in f]  # strip: newline and stray spaces around the sentence
    except (OSError, UnicodeDecodeError, EOFError, zlib.error) as e:  # zlib.error: damaged deflate data
        raise DataError(f"cannot read {path} ({e}): expected UTF-8 text, one sentence per line (gzipped "
                        f"or not); the file is damaged or in another encoding: download it again, or "
                        f"convert it") from None
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
                        f"sub-folder per split), or drop their pairs with --skip_missing_images")
    unreadable = []
    for name, f in zip(names, files):
        try:
            with Image.open(f):  # reads the header only: cheap enough for 29k files
                pass
        except Image.DecompressionBombError as e:
            raise DataError(too_large(f, e)) from None
        except (OSError, SyntaxError, ValueError):
            unreadable.append(name)
    if unreadable:
        raise DataError(f"{len(unreadable)} of {len(files)} images in {folder} cannot be read as images, e.g. "
                        f"{', '.join(unreadable[:5])}: download them again")


def languages(root, split: str) -> list[str]:
    """The languages that `split` has text for in `root` (the suffixes of its files), for messages."""
    return sorted({f.name[len(split) + 1:].removesuffix(".gz") for folder in (Path(root) / "raw", Path(root))
                   for f in folder.glob(f"{split}.*") if f.is_file()})


def read_split(root, split: str, langs: list[str], images=None, limit: int = 0,
               skip_missing_images: bool = False) -> Split:
    """The sentences of `split` in each language, aligned, and the image files when `images` is given; the first
    `limit` examples only, if not 0 (all checked all the same). skip_missing_images drops the examples whose image
    is missing (named in `skipped`), as the official WIT loader does; otherwise they are an error."""
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
    image_files, skipped = None, []
    if images is not None:
        image_list = _find([root / "image_splits" / f"{split}.txt"],
                           f"image list for split {split!r} in {root}")
        # MSCOCO lists 'COCO_...jpg#2': the file is 'COCO_...jpg'
        names = [line.split("#")[0] for line in _read_lines(image_list)]
        if len(names) != len(sentences[first]):
            raise DataError(f"{image_list} lists {len(names)} images but {files[first]} has "
                            f"{len(sentences[first])} lines: they must be aligned line by line")
        folder = Path(images) / split if (Path(images) / split).is_dir() else Path(images)
        image_files = [folder / n for n in names]
        if skip_missing_images:
            keep = [i for i, f in enumerate(image_files) if f.is_file()]
            skipped = [n for i, n in enumerate(names) if not image_files[i].is_file()]
            if not keep:
                raise DataError(f"none of the {len(names)} images of split {split!r} is in {folder}: point "
                                f"`images` at the folder holding them")
            sentences = {lang: [lines[i] for i in keep] for lang, lines in sentences.items()}
            image_files, names = [image_files[i] for i in keep], [names[i] for i in keep]
        _check_images(image_files, names, folder)
    if limit:
        sentences = {lang: lines[:limit] for lang, lines in sentences.items()}
        image_files = image_files and image_files[:limit]
    return Split(split, sentences, image_files, skipped)


# -----------------------------------------------------------------------------
# The frozen towers' embeddings of a split, in batches (runs.features caches them: the towers never change).


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
    """(N, D) features of N sentences cut to max_len tokens; encode_text takes (input_ids, attention_mask) (B, T)."""
    out = []
    for chunk in tqdm(_chunks(list(sentences), batch_size), desc="embed texts", unit="batch"):
        input_ids, attention_mask = tokenizer.encode(chunk, max_len)
        out.append(encode_text(input_ids.to(device), attention_mask.to(device)).float().cpu())
    return torch.cat(out)
