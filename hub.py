"""
What a Hugging Face folder holds, read as weights.py's converter needs it: its config.json, its tensors one at a
time (safetensors, sharded or not, or pytorch_model.bin), and its tokenizer as a tokenizer.json: the folder's own,
or one made from the sentencepiece model that some repositories ship alone, read without sentencepiece or
protobuf. A tokenizer is checked against its model, so that another model's cannot make a silently wrong one.
"""

import json
import pickle
import struct
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

from data import MBART50_LANGS, SPECIALS

LFS_POINTER = b"version https://git-lfs.github.com/spec/"  # what a clone made without `git lfs` has for a file


class ConversionError(ValueError):
    """A folder or file that is not what it should be. The message says what to do."""


class HFCheckpoint:
    """The tensors of a Hugging Face model folder, read one by one: memory holds the output, not two copies."""

    def __init__(self, folder):
        self.folder, self._handles = Path(folder), {}
        if not self.folder.is_dir():
            raise ConversionError(f"{self.folder} is not a folder: expected a Hugging Face model folder "
                                  f"(config.json + model.safetensors or pytorch_model.bin)")
        self.config = read_json(self.folder / "config.json")
        found = [self.folder / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json",
                                           "model.safetensors", "pytorch_model.bin") if (self.folder / n).exists()]
        if not found:
            raise ConversionError(f"no weights in {self.folder}: expected model.safetensors, sharded "
                                  f"model-*.safetensors with model.safetensors.index.json, or pytorch_model.bin")
        first = found[0]  # an index before a single file
        self.files = ({key: self.folder / name for key, name in read_json(first)["weight_map"].items()}
                      if first.suffix == ".json" else dict.fromkeys(self._open(first).keys(), first))  # key -> file

    def _open(self, path):
        if path not in self._handles:
            if not path.exists():
                raise ConversionError(f"{path} is listed in the index of {self.folder} but does not exist: "
                                      f"download the missing shard")
            try:  # (read_pth raises its own ConversionErrors)
                self._handles[path] = (safe_open(str(path), framework="pt") if path.suffix == ".safetensors"
                                       else read_pth(path, mmap=True))
            except (SafetensorError, OSError) as e:
                raise ConversionError(f"cannot read {path}: {e}. The file is damaged or incomplete: download it again")
        return self._handles[path]

    def keys(self):
        return self.files.keys()

    def __getitem__(self, key):
        handle = self._open(self.files[key])
        try:
            return handle.get_tensor(key) if hasattr(handle, "get_tensor") else handle[key]
        except (SafetensorError, RuntimeError) as e:
            raise ConversionError(f"cannot read {key} from {self.files[key]}: {e}. "
                                  f"The file is damaged or incomplete: download it again")


def read_pth(path, mmap=False):
    """A file of torch.save, read with weights_only=True (nothing in it runs); any other named for what it is."""
    try:
        with open(path, "rb") as f:
            pointer = f.read(len(LFS_POINTER)) == LFS_POINTER
        obj = None if pointer else torch.load(path, map_location="cpu", weights_only=True,
                                              mmap=mmap and zipfile.is_zipfile(path))  # (not the legacy format)
    except pickle.UnpicklingError:
        raise ConversionError(f"cannot read {path}: it holds more than tensors, and loading it would run code. It "
                              f"is not a file of weights, or it was altered or damaged: download it again") from None
    except Exception as e:  # noqa: BLE001  (a damaged file raises several kinds; weights_only runs no code)
        raise ConversionError(f"cannot read {path} ({type(e).__name__}: {str(e).split('. ')[0][:160]}): the file "
                              f"is damaged or incomplete: download it again") from None
    if pointer:
        raise ConversionError(f"{path} is a Git LFS pointer, not the weights (a clone made without `git lfs`): "
                              f"fetch the file itself (`git lfs pull`) or download it again")
    return obj


def read_json(path):
    """A JSON object (a dict) from `path`; anything else (no file, not UTF-8, not JSON, a list) named as such."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path} not found: expected a Hugging Face model folder with its config.json")
    try:
        value = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read {path} ({e}): expected a JSON file, UTF-8; it is damaged or not the "
                              f"file it should be") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path} holds a JSON {type(value).__name__}, expected an object {{...}}: it is "
                              f"damaged or not the file it should be")
    return value


# -----------------------------------------------------------------------------
# The tokenizer.
SENTENCEPIECE_MODEL = "sentencepiece.bpe.model"  # its name in facebook/mbart-large-50 and xlm-roberta-large
TOKENIZERS = {"mbart": ("mBART-50", "facebook/mbart-large-50"),  # kind -> (name in messages, hub repository)
              "text": ("XLM-R (M-CLIP's text tower)", "xlm-roberta-large")}


def tokenizer_json(folder, kind, model_cfg, config_where):
    """The tokenizer.json (bytes) of `kind` ("mbart" or "text"): the folder's own, else one made from its
    sentencepiece model; checked against the model's config `model_cfg`: vocab_size, <s> <pad> </s>, the codes."""
    folder, (name, repo) = Path(folder), TOKENIZERS[kind]
    source = folder / "tokenizer.json"
    if source.exists():
        text = source.read_bytes()
        try:
            tok = Tokenizer.from_str(text.decode("utf-8"))
        except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception on a bad file)
            raise ConversionError(f"cannot read {source} ({e}): it is damaged or not a tokenizer.json; download it "
                                  f"again") from None
    elif (folder / SENTENCEPIECE_MODEL).exists():
        source = folder / SENTENCEPIECE_MODEL
        tok = sentencepiece_tokenizer(source, kind)
        text = tok.to_str().encode("utf-8")
    else:
        raise ConversionError(f"{folder} has no {name} tokenizer: expected tokenizer.json or {SENTENCEPIECE_MODEL}, "
                              f"as in the hub repository {repo}: download them into it")
    put = f"Put the tokenizer files of the repository the weights come from ({repo}) in {folder}"
    n, vocab_size = tok.get_vocab_size(with_added_tokens=True), model_cfg["vocab_size"]
    if n != vocab_size:
        raise ConversionError(
            f"{source} has {n} ids but the {name} model has {vocab_size} (vocab_size in {config_where}): the "
            f"tokenizer belongs to another model (mBART-50's has 250054 ids, mBART-25's 250027, XLM-R's 250002). {put}")
    specials = {"<s>": model_cfg.get("bos_token_id", 0), "<pad>": model_cfg.get("pad_token_id", 1),
                "</s>": model_cfg.get("eos_token_id", 2)}
    wrong = [f"{t} is {tok.token_to_id(t)}, the model's is {i}" for t, i in specials.items() if tok.token_to_id(t) != i]
    if wrong:
        raise ConversionError(f"{source} does not fit {config_where}: {'; '.join(wrong)}. {put}")
    missing = [c for c in MBART50_LANGS if tok.token_to_id(c) is None] if kind == "mbart" else []
    if missing:
        raise ConversionError(f"{source} has no language codes {missing[:5]} ({len(missing)} of mBART-50's 52 "
                              f"missing): it is not an mBART-50 tokenizer. Put the tokenizer files of {repo} "
                              f"in {folder}")
    return text


def sentencepiece_tokenizer(path, kind):
    """mBART-50's or XLM-R's sentencepiece model as a `tokenizers` Tokenizer, built as transformers 4's
    MBart50Converter / XLMRobertaConverter built the hub's tokenizer.json files (the slow tokenizers' ids)."""
    pieces, trainer, norm = read_sentencepiece(path)
    repo = TOKENIZERS[kind][1]
    needed = {  # what mBART-50's and XLM-R's models are; the pipeline below reproduces only that kind
        "the unigram algorithm (not BPE, word or char)": trainer["model_type"] == 1,
        "<unk> <s> </s> as its first pieces": [p for p, _, _ in pieces[:3]] == ["<unk>", "<s>", "</s>"],
        "only normal and user-defined pieces after them": all(t in (1, 4) for _, _, t in pieces[3:]),
        "no byte fallback": not trainer["byte_fallback"],
        "words split at spaces and marked by a leading '▁'": (
            trainer["split_by_whitespace"] and norm["add_dummy_prefix"] and norm["escape_whitespaces"]
            and not trainer["treat_whitespace_as_suffix"]),
        "runs of spaces removed": norm["remove_extra_whitespaces"],
    }
    unlike = [what for what, ok in needed.items() if not ok]
    if unlike:
        raise ConversionError(f"{path} is not a sentencepiece model like {repo}'s, which has {'; '.join(unlike)}. Put "
                              f"the tokenizer files of {repo} (tokenizer.json or sentencepiece.bpe.model) there")
    # fairseq's dictionary: <s> <pad> </s> <unk>, then sentencepiece's pieces after its own <unk> <s> </s> (a
    # piece's id is its sentencepiece id + 1), then for mBART-50 the 52 language codes, then <mask>
    codes = MBART50_LANGS if kind == "mbart" else []
    vocab = [(t, 0.0) for t in SPECIALS] + [(p, s) for p, s, _ in pieces[3:]] + [(c, 0.0) for c in [*codes, "<mask>"]]
    tok = Tokenizer(Unigram(vocab, unk_id=SPECIALS.index("<unk>"), byte_fallback=False))
    # sentencepiece's normalisation: its character map (NFKC and more), no trailing space, a run of spaces as one
    charsmap = [normalizers.Precompiled(norm["precompiled_charsmap"])] if norm["precompiled_charsmap"] else []
    tok.normalizer = normalizers.Sequence(charsmap + [normalizers.Strip(left=False, right=True),
                                                      normalizers.Replace(Regex(" {2,}"), "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    # special tokens are matched before anything else and never split; user-defined pieces too, but are text
    # (<mask> is matched in normalised text for mBART-50, in raw text for XLM-R, as transformers 4 converted them)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS + codes]
                           + [AddedToken("<mask>", special=True, normalized=kind == "mbart", lstrip=True)])
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for p, _, t in pieces if t == 4])
    first, pair = ("en_XX", "$A $B </s>") if kind == "mbart" else ("<s>", "$A </s> </s> $B </s>")
    tok.post_processor = processors.TemplateProcessing(  # as in the hub files; data.py adds its own special tokens
        single=f"{first} $A </s>", pair=f"{first} {pair}",
        special_tokens=[(first, tok.token_to_id(first)), ("</s>", tok.token_to_id("</s>"))])
    return tok


def read_sentencepiece(path):
    """(pieces, trainer spec, normalizer spec) of a sentencepiece model file (a protobuf ModelProto), read here, as
    sentencepiece's generated code refuses a protobuf runtime older than its own. pieces: [(piece, score, type)],
    type 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte. Absent fields take the proto's defaults."""
    try:
        model = _protobuf_fields(Path(path).read_bytes())
        pieces = []
        for f in (dict(_protobuf_fields(value)) for field, value in model if field == 1):
            score = struct.unpack("<f", f[2])[0] if 2 in f else 0.0  # a float32
            pieces.append((f.get(1, b"").decode("utf-8"), score, f.get(3, 1)))
        last = dict(model)  # a field given twice: its last value
        trainer, norm = dict(_protobuf_fields(last.get(2, b""))), dict(_protobuf_fields(last.get(3, b"")))
    except (ValueError, IndexError, struct.error, OSError) as e:
        raise ConversionError(f"cannot read {path} ({e}): it is damaged or not a sentencepiece model; download it "
                              f"again") from None
    if not pieces:
        raise ConversionError(f"{path} holds no pieces: it is damaged or not a sentencepiece model; download it again")
    trainer = {"model_type": trainer.get(3, 1), "split_by_whitespace": trainer.get(22, 1),
               "treat_whitespace_as_suffix": trainer.get(24, 0), "byte_fallback": trainer.get(35, 0)}
    norm = {"precompiled_charsmap": norm.get(2, b""), "add_dummy_prefix": norm.get(3, 1),
            "remove_extra_whitespaces": norm.get(4, 1), "escape_whitespaces": norm.get(5, 1)}
    return pieces, trainer, norm


def _protobuf_fields(buf):
    """[(field number, value)] of one protobuf message, in order: an int for a varint, else bytes (a string, ...)."""
    fields, i = [], 0

    def varint():  # 7 bits a byte, least significant first; a byte below 0x80 is the last
        nonlocal i
        start = i
        while buf[i] >= 0x80:
            i += 1
        i += 1
        return sum((byte & 0x7F) << 7 * k for k, byte in enumerate(buf[start:i]))

    while i < len(buf):
        field, wire = divmod(varint(), 8)
        if wire == 0:
            value = varint()
        elif wire in (1, 2, 5):  # 64-bit, length-delimited, 32-bit
            n = 8 if wire == 1 else 4 if wire == 5 else varint()
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {i}")
        if i > len(buf):
            raise ValueError("the file ends inside a field")
        fields.append((field, value))
    return fields
