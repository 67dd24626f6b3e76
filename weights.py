"""
Convert the public checkpoints to one safetensors file in this project's names, and load it.

    python weights.py --mbart  path/to/mbart-large-50 \\
                      --mclip  path/to/XLM-Roberta-Large-Vit-B-32 --xlmr path/to/xlm-roberta-large \\
                      --clip   path/to/clip-vit-base-patch32 \\
                      --out    weights/paper

Each input is a local Hugging Face model folder as `save_pretrained` or a hub download writes it:
`config.json` plus `model.safetensors`, sharded safetensors with an index, or `pytorch_model.bin`
(read with `torch.load(weights_only=True)`: nothing is unpickled). `--clip` takes a full `CLIPModel`
folder (its text tower is dropped) or a vision-only one. M-CLIP's folder holds only its own head and
the name of its base model: `--xlmr` is that base model's folder (xlm-roberta-large), which gives the
text tower's sizes and its tokenizer.

Output: `OUT/towers.safetensors` (the image and text towers, which stay frozen: every checkpoint trained
from here shares this file), `OUT/cliptrans.safetensors` (mBART, tied weights stored once, and the mapping
network freshly initialised), `OUT/config.json` (sizes read from the Hugging Face configs), `OUT/tokenizer_mbart.json`,
`OUT/tokenizer_text.json` (each folder's tokenizer.json, or its sentencepiece.bpe.model converted; both checked
against the model's vocab_size). Then `model = weights.load("weights/paper")`.

The authors' trained models (the official code's .pth files, e.g. a released stage 2 model in two shards) become
a checkpoint folder that translate.py and `train.py --eval_only` read, with the towers of a converted folder:

    python weights.py --official models/multi30k-en-de/model_best_test.pth --towers weights/paper \\
                      --src en --tgt de --out weights/official-en-de
"""

import argparse
import json
import os
import pickle
import re
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

from cliptrans import (CLIPTrans, CLIPTransConfig, MappingConfig, MappingNetwork, MBartConfig, TextConfig,
                       VisionConfig, init_weights)
from data import MBART50_LANGS, SPECIALS, lang_code
from folders import FolderError, check_new_folder, written_aside

WEIGHTS_FILE, CONFIG_FILE = "cliptrans.safetensors", "config.json"
# The frozen towers, in a file of their own: a checkpoint shares its starting folder's (a hard link), so the
# 2.6 GB of the paper's towers are stored once however many checkpoints there are. Older folders hold
# everything in WEIGHTS_FILE; they load all the same.
TOWERS_FILE = "towers.safetensors"
TOWERS = ("vision.", "text.")
MBART_TOKENIZER, TEXT_TOKENIZER = "tokenizer_mbart.json", "tokenizer_text.json"


class ConversionError(ValueError):
    pass


# -----------------------------------------------------------------------------
# Reading a Hugging Face folder, one tensor at a time (so memory holds the output, not two copies of the input).


class HFCheckpoint:
    """The tensors of a Hugging Face model folder, read lazily by name."""

    def __init__(self, folder):
        self.folder, self._handles = Path(folder), {}
        if not self.folder.is_dir():
            raise ConversionError(f"{self.folder} is not a folder: expected a Hugging Face model folder "
                                  f"(config.json + model.safetensors or pytorch_model.bin)")
        self.config = read_json(self.folder / "config.json")
        self.files = {}  # key -> file holding it
        index = next((self.folder / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                      if (self.folder / n).exists()), None)
        if index is not None:
            for key, name in read_json(index)["weight_map"].items():
                self.files[key] = self.folder / name
        else:
            single = next((self.folder / n for n in ("model.safetensors", "pytorch_model.bin")
                           if (self.folder / n).exists()), None)
            if single is None:
                raise ConversionError(f"no weights in {self.folder}: expected model.safetensors, sharded "
                                      f"model-*.safetensors with model.safetensors.index.json, or pytorch_model.bin")
            for key in self._open(single).keys():
                self.files[key] = single

    def _open(self, path):
        if path in self._handles:
            return self._handles[path]
        if not path.exists():
            raise ConversionError(f"{path} is listed in the index of {self.folder} but does not exist: "
                                  f"download the missing shard")
        if path.suffix != ".safetensors":
            handle = read_pth(path, mmap=True)
        else:
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise ConversionError(f"cannot read {path}: {e}. The file is damaged or incomplete: download it again")
        self._handles[path] = handle
        return handle

    def keys(self):
        return self.files.keys()

    def __getitem__(self, key):
        handle = self._open(self.files[key])
        try:
            return handle.get_tensor(key) if hasattr(handle, "get_tensor") else handle[key]
        except (SafetensorError, RuntimeError) as e:
            raise ConversionError(f"cannot read {key} from {self.files[key]}: {e}. "
                                  f"The file is damaged or incomplete: download it again")


LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def read_pth(path, mmap=False):
    """A file written by torch.save, read with weights_only=True: tensors come back, nothing in it runs. Any other
    file is a ConversionError that says what it is: a Git LFS pointer, a pickle of more than tensors (which only
    weights_only=False would load, running its code: never done here), or a damaged file."""
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
    """A JSON object (a dict) from `path`; anything else (no file, a folder, not UTF-8, not JSON, a list) is a
    ConversionError that names the file."""
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
# Sizes from the Hugging Face configs.


def _require(cfg, key, where):
    if key not in cfg:
        raise ConversionError(f"{where} has no {key!r}: is this the right model folder?")
    return cfg[key]


def mbart_config(cfg, where):
    if cfg.get("model_type") not in ("mbart", None):
        raise ConversionError(f"{where} is a {cfg.get('model_type')!r} model, expected mbart (facebook/mbart-large-50)")
    g = lambda k: _require(cfg, k, where)  # noqa: E731
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if g(a) != g(b):
            raise ConversionError(f"{where}: {a}={g(a)} differs from {b}={g(b)}; this implementation needs them equal")
    if cfg.get("activation_function", "gelu") != "gelu":
        raise ConversionError(f"{where}: activation {cfg['activation_function']!r} is not supported (expected gelu)")
    # transformers 5 writes an unset field as null: absent or null, a field takes its default
    opt = lambda k, default: default if cfg.get(k) is None else cfg[k]  # noqa: E731
    bos_id = opt("bos_token_id", 0)
    return MBartConfig(vocab_size=g("vocab_size"), d_model=g("d_model"), encoder_layers=g("encoder_layers"),
                       decoder_layers=g("decoder_layers"), heads=g("encoder_attention_heads"), ffn=g("encoder_ffn_dim"),
                       max_positions=g("max_position_embeddings"), dropout=opt("dropout", 0.1),
                       scale_embedding=opt("scale_embedding", False), pad_id=opt("pad_token_id", 1),
                       bos_id=bos_id, eos_id=opt("eos_token_id", 2),
                       decoder_start_id=opt("decoder_start_token_id", bos_id))  # unset: <s>, as transformers' generate


def vision_config(cfg, where):
    vc = cfg.get("vision_config", cfg)  # a full CLIPModel config, or a vision-only one
    if vc.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise ConversionError(f"{where}: activation {vc['hidden_act']!r} is not supported (OpenAI CLIP uses quick_gelu)")
    g = lambda k: _require(vc, k, where)  # noqa: E731
    return VisionConfig(image_size=g("image_size"), patch_size=g("patch_size"), width=g("hidden_size"),
                        layers=g("num_hidden_layers"), heads=g("num_attention_heads"), mlp=g("intermediate_size"),
                        embed_dim=_require(cfg, "projection_dim", where), eps=vc.get("layer_norm_eps", 1e-5))


def text_config(mclip_cfg, xlmr_cfg, mclip_where, xlmr_where):
    g = lambda k: _require(xlmr_cfg, k, xlmr_where)  # noqa: E731
    width = _require(mclip_cfg, "transformerDimensions", mclip_where)
    if width != g("hidden_size"):
        raise ConversionError(f"M-CLIP ({mclip_where}) expects a {width}-d base model, but {xlmr_where} describes "
                              f"a {g('hidden_size')}-d one: --xlmr must be the folder of M-CLIP's modelBase "
                              f"({mclip_cfg.get('modelBase')})")
    if xlmr_cfg.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"{xlmr_where}: activation {xlmr_cfg['hidden_act']!r} is not supported (expected gelu)")
    return TextConfig(vocab_size=g("vocab_size"), width=width, layers=g("num_hidden_layers"),
                      heads=g("num_attention_heads"), mlp=g("intermediate_size"),
                      max_positions=g("max_position_embeddings"), type_vocab_size=xlmr_cfg.get("type_vocab_size", 1),
                      pad_id=xlmr_cfg.get("pad_token_id", 1), embed_dim=_require(mclip_cfg, "numDims", mclip_where),
                      dropout=xlmr_cfg.get("hidden_dropout_prob", 0.1), eps=xlmr_cfg.get("layer_norm_eps", 1e-12))


# -----------------------------------------------------------------------------
# Key renaming. Each rule: source pattern -> target name; q, k and v land in one fused `qkv` tensor,
# in that order. DROP marks keys that exist in the source but have no place here.

DROP = None
LAYER = r"(encoder|decoder)\.layers\.(\d+)\."
MBART_RULES = [
    (r"model\.(shared|encoder\.embed_tokens|decoder\.embed_tokens)\.weight", "mbart.shared.weight"),
    (r"lm_head\.weight", "mbart.shared.weight"),  # tied to the shared embedding
    (r"final_logits_bias", "mbart.final_logits_bias"),
    (r"model\.(encoder|decoder)\.embed_positions\.weight", r"mbart.\1.embed.pos_embed.weight"),
    (r"model\.(encoder|decoder)\.layernorm_embedding\.(weight|bias)", r"mbart.\1.embed.ln_embed.\2"),
    (r"model\.(encoder|decoder)\.layer_norm\.(weight|bias)", r"mbart.\1.ln_final.\2"),
    (r"model\." + LAYER + r"self_attn\.([qkv])_proj\.(weight|bias)", r"mbart.\1.layers.\2.attn.qkv.\4"),
    (r"model\." + LAYER + r"self_attn\.out_proj\.(weight|bias)", r"mbart.\1.layers.\2.attn.out.\3"),
    (r"model\." + LAYER + r"self_attn_layer_norm\.(weight|bias)", r"mbart.\1.layers.\2.ln_attn.\3"),
    (r"model\." + LAYER + r"encoder_attn\.([qkv])_proj\.(weight|bias)", r"mbart.\1.layers.\2.cross.qkv.\4"),
    (r"model\." + LAYER + r"encoder_attn\.out_proj\.(weight|bias)", r"mbart.\1.layers.\2.cross.out.\3"),
    (r"model\." + LAYER + r"encoder_attn_layer_norm\.(weight|bias)", r"mbart.\1.layers.\2.ln_cross.\3"),
    (r"model\." + LAYER + r"(fc1|fc2)\.(weight|bias)", r"mbart.\1.layers.\2.mlp.\3.\4"),
    (r"model\." + LAYER + r"final_layer_norm\.(weight|bias)", r"mbart.\1.layers.\2.ln_mlp.\3"),
]
CLIP_LAYER = r"vision_model\.encoder\.layers\.(\d+)\."
CLIP_RULES = [
    (r"vision_model\.embeddings\.patch_embedding\.weight", "vision.patch_embed.weight"),
    (r"vision_model\.embeddings\.class_embedding", "vision.cls"),
    (r"vision_model\.embeddings\.position_embedding\.weight", "vision.pos"),
    (r"vision_model\.embeddings\.position_ids", DROP),  # a stale buffer of old checkpoints
    (r"vision_model\.pre_layrnorm\.(weight|bias)", r"vision.ln_pre.\1"),
    (CLIP_LAYER + r"self_attn\.([qkv])_proj\.(weight|bias)", r"vision.blocks.\1.attn.qkv.\3"),
    (CLIP_LAYER + r"self_attn\.out_proj\.(weight|bias)", r"vision.blocks.\1.attn.out.\2"),
    (CLIP_LAYER + r"layer_norm1\.(weight|bias)", r"vision.blocks.\1.ln_attn.\2"),
    (CLIP_LAYER + r"mlp\.(fc1|fc2)\.(weight|bias)", r"vision.blocks.\1.mlp.\2.\3"),
    (CLIP_LAYER + r"layer_norm2\.(weight|bias)", r"vision.blocks.\1.ln_mlp.\2"),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"vision.ln_post.\1"),
    (r"visual_projection\.weight", "vision.proj.weight"),
    (r"text_model\..*|text_projection\.weight|logit_scale", DROP),  # CLIP's English text tower: M-CLIP replaces it
]
XLMR_LAYER = r"transformer\.encoder\.layer\.(\d+)\."
MCLIP_RULES = [
    (r"transformer\.embeddings\.word_embeddings\.weight", "text.tok_embed.weight"),
    (r"transformer\.embeddings\.position_embeddings\.weight", "text.pos_embed.weight"),
    (r"transformer\.embeddings\.token_type_embeddings\.weight", "text.type_embed.weight"),
    (r"transformer\.embeddings\.LayerNorm\.(weight|bias)", r"text.ln_embed.\1"),
    (r"transformer\.embeddings\.(position_ids|token_type_ids)", DROP),
    (XLMR_LAYER + r"attention\.self\.(query|key|value)\.(weight|bias)", r"text.blocks.\1.attn.qkv.\3"),
    (XLMR_LAYER + r"attention\.output\.dense\.(weight|bias)", r"text.blocks.\1.attn.out.\2"),
    (XLMR_LAYER + r"attention\.output\.LayerNorm\.(weight|bias)", r"text.blocks.\1.ln_attn.\2"),
    (XLMR_LAYER + r"intermediate\.dense\.(weight|bias)", r"text.blocks.\1.mlp.fc1.\2"),
    (XLMR_LAYER + r"output\.dense\.(weight|bias)", r"text.blocks.\1.mlp.fc2.\2"),
    (XLMR_LAYER + r"output\.LayerNorm\.(weight|bias)", r"text.blocks.\1.ln_mlp.\2"),
    (r"transformer\.pooler\..*", DROP),  # M-CLIP pools by the mean, not by XLM-R's pooler
    (r"LinearTransformation\.(weight|bias)", r"text.proj.\1"),
]
QKV_ORDER = {"q": 0, "k": 1, "v": 2, "query": 0, "key": 1, "value": 2}


def convert(ckpt, rules, expected, where=None, hint=""):
    """Rename (and fuse) every tensor of `ckpt` (an HFCheckpoint or a state dict) by `rules`. Strict: a key no
    rule knows is an error; the result is checked against `expected` ({name: shape}) for missing keys and shapes
    (`hint`: what a message on missing keys adds)."""
    where = where or str(ckpt.folder)
    files = getattr(ckpt, "files", {})  # {key: file} of an HFCheckpoint; a plain state dict has none
    out, parts = {}, {}
    for key in ckpt.keys():
        for pattern, target in rules:
            m = re.fullmatch(pattern, key)
            if m:
                break
        else:
            unknown = [k for k in ckpt.keys() if not any(re.fullmatch(p, k) for p, _ in rules)]
            source = f" (in {files[unknown[0]].name})" if unknown[0] in files else ""
            raise ConversionError(f"{where}: {len(unknown)} unexpected keys, first: {unknown[:5]}{source}. Is this "
                                  f"the right kind of model?")
        if target is DROP:
            continue
        name = m.expand(target)
        qkv = next((g for g in m.groups() if g in QKV_ORDER), None) if ".qkv." in name else None
        tensor = ckpt[key]
        check_shape(key, tensor, name, expected, qkv is not None, where)
        if qkv is not None:
            parts.setdefault(name, [None, None, None])[QKV_ORDER[qkv]] = tensor
        elif name in out:  # a tied copy (lm_head, embed_tokens): must equal what is already there
            if out[name].shape != tensor.shape or not torch.equal(out[name], tensor):
                raise ConversionError(f"{where}: {key} should be tied to {name} but differs from it")
        else:
            out[name] = tensor
    for name, (q, k, v) in parts.items():
        if q is None or k is None or v is None:
            raise ConversionError(f"{where}: {name} needs q, k and v projections, some are missing")
        out[name] = torch.cat([q, k, v], dim=0)  # (3C, C): one matmul for all three
    if "mbart.final_logits_bias" in out:
        out["mbart.final_logits_bias"] = out["mbart.final_logits_bias"].reshape(-1)  # stored as (1, V)
    elif "mbart.final_logits_bias" in expected:
        out["mbart.final_logits_bias"] = torch.zeros(expected["mbart.final_logits_bias"])  # absent = zeros
    check_keys(out, expected, where, hint)
    return out


def check_shape(key, tensor, name, expected, part, where):
    """The shape of `key`, renamed `name`, against `expected` before anything uses it (a name not there is one
    check_keys reports): a third of the rows of a fused qkv for a `part`; (1, V) or (V,) for final_logits_bias."""
    if name not in expected:
        return
    shape = (expected[name][0] // 3, *expected[name][1:]) if part else tuple(expected[name])
    found = tuple(tensor.shape)
    if found != shape and not (name == "mbart.final_logits_bias" and found == (1, *shape)):
        raise ConversionError(f"{where}: {key} has shape {found}, expected {shape}: does config.json match the "
                              f"weights?")


def check_keys(tensors, expected, where, hint=""):
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [f"{k}: {tuple(tensors[k].shape)} in the file, {tuple(expected[k])} expected"
             for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k])]
    if missing:
        raise ConversionError(f"{where}: {len(missing)} missing keys, first: {missing[:5]}" + (hint and f"; {hint}"))
    if unexpected:
        raise ConversionError(f"{where}: {len(unexpected)} unexpected keys, first: {unexpected[:5]}")
    if wrong:
        raise ConversionError(f"{where}: {len(wrong)} tensors of the wrong shape (does config.json match the "
                              f"weights?), first: {wrong[:3]}")


def expected_shapes(config, prefix):
    with torch.device("meta"):  # shapes only: no memory
        model = CLIPTrans(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(prefix)}


# -----------------------------------------------------------------------------
# Tokenizers: the folder's tokenizer.json, else its sentencepiece model converted; either way checked against the
# model, so that a tokenizer of another model cannot make a silently wrong one.

SENTENCEPIECE_MODEL = "sentencepiece.bpe.model"  # its name in facebook/mbart-large-50 and xlm-roberta-large
TOKENIZERS = {"mbart": ("mBART-50", "facebook/mbart-large-50"),  # kind -> (name in messages, hub repository)
              "text": ("XLM-R (M-CLIP's text tower)", "xlm-roberta-large")}


def read_tokenizer(folder, kind, model_cfg, config_where):
    """The tokenizer.json (bytes) of `kind` ("mbart" or "text") for the model whose Hugging Face config is
    `model_cfg`: the folder's tokenizer.json as it is, else one converted from its sentencepiece model (some hub
    repositories ship only that). Checked: as many ids as the model's vocab_size, <s> <pad> </s> where the config
    puts them, and for mBART-50 its 52 language codes."""
    folder, (name, repo) = Path(folder), TOKENIZERS[kind]
    if (folder / "tokenizer.json").exists():
        source = folder / "tokenizer.json"
        text = source.read_bytes()
        try:
            tok = Tokenizer.from_str(text.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise ConversionError(f"cannot read {source} ({e}): it is damaged or not a tokenizer.json; "
                                  f"download it again")
    elif (folder / SENTENCEPIECE_MODEL).exists():
        source = folder / SENTENCEPIECE_MODEL
        tok = sentencepiece_tokenizer(source, kind)
        text = tok.to_str().encode("utf-8")
    else:
        raise ConversionError(f"{folder} has no {name} tokenizer: expected tokenizer.json or {SENTENCEPIECE_MODEL}, "
                              f"as in the hub repository {repo}: download them into it")

    n, vocab_size = tok.get_vocab_size(with_added_tokens=True), model_cfg["vocab_size"]
    if n != vocab_size:
        raise ConversionError(
            f"{source} has {n} ids but the {name} model has {vocab_size} (vocab_size in {config_where}): the "
            f"tokenizer belongs to another model (mBART-50's has 250054 ids, mBART-25's 250027, XLM-R's 250002). "
            f"Put the tokenizer files of the repository the weights come from ({repo}) in {folder}")
    specials = {"<s>": model_cfg.get("bos_token_id", 0), "<pad>": model_cfg.get("pad_token_id", 1),
                "</s>": model_cfg.get("eos_token_id", 2)}
    wrong = [f"{t} is {tok.token_to_id(t)}, the model's is {i}"
             for t, i in specials.items() if tok.token_to_id(t) != i]
    if wrong:
        raise ConversionError(f"{source} does not fit {config_where}: {'; '.join(wrong)}. Put the tokenizer files of "
                              f"the repository the weights come from ({repo}) in {folder}")
    missing = [c for c in MBART50_LANGS if tok.token_to_id(c) is None] if kind == "mbart" else []
    if missing:
        raise ConversionError(f"{source} has no language codes {missing[:5]} ({len(missing)} of mBART-50's 52 "
                              f"missing): it is not an mBART-50 tokenizer. Put the tokenizer files of {repo} "
                              f"in {folder}")
    return text


def sentencepiece_tokenizer(path, kind):
    """mBART-50's or XLM-R's sentencepiece model as a `tokenizers` Tokenizer, built the way transformers 4's
    MBart50Converter / XLMRobertaConverter built the hub's tokenizer.json files: the same ids as sentencepiece
    with fairseq's dictionary (what the slow MBart50Tokenizer / XLMRobertaTokenizer return)."""
    pieces, trainer, norm = read_sentencepiece(path)
    name, repo = TOKENIZERS[kind]
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
        raise ConversionError(f"{path} is not a sentencepiece model like {repo}'s, which has {'; '.join(unlike)}. "
                              f"Put the tokenizer files of {repo} (tokenizer.json or {SENTENCEPIECE_MODEL}) there")

    # fairseq's dictionary: <s> <pad> </s> <unk>, then sentencepiece's pieces after its own <unk> <s> </s> (a
    # piece's id is its sentencepiece id + 1), then for mBART-50 the 52 language codes, then <mask>
    codes = MBART50_LANGS if kind == "mbart" else []
    vocab = ([(t, 0.0) for t in SPECIALS] + [(p, score) for p, score, _ in pieces[3:]] + [(c, 0.0) for c in codes]
             + [("<mask>", 0.0)])
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
    first = "en_XX" if kind == "mbart" else "<s>"  # as in the hub files; data.py adds its own special tokens
    pair = "$A $B </s>" if kind == "mbart" else "$A </s> </s> $B </s>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{first} $A </s>", pair=f"{first} {pair}",
        special_tokens=[(first, tok.token_to_id(first)), ("</s>", tok.token_to_id("</s>"))])
    return tok


def read_sentencepiece(path):
    """(pieces, trainer spec, normalizer spec) of a sentencepiece model file, a protobuf ModelProto, read from
    the protobuf wire format here: neither `sentencepiece` nor `protobuf` is needed (sentencepiece's generated
    code refuses a protobuf runtime older than the one it was generated with). pieces: [(piece, score, type)],
    type 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte. Absent fields take the defaults of
    sentencepiece_model.proto."""
    try:
        model = _protobuf_fields(Path(path).read_bytes())
        pieces = []
        for piece in (value for field, value in model if field == 1):
            f = dict(_protobuf_fields(piece))
            score = struct.unpack("<f", f[2])[0] if 2 in f else 0.0  # a float32
            pieces.append((f.get(1, b"").decode("utf-8"), score, f.get(3, 1)))
        trainer = dict(_protobuf_fields(next((v for k, v in reversed(model) if k == 2), b"")))
        norm = dict(_protobuf_fields(next((v for k, v in reversed(model) if k == 3), b"")))
    except (ValueError, IndexError, struct.error, OSError) as e:
        raise ConversionError(f"cannot read {path} ({e}): it is damaged or not a sentencepiece model; "
                              f"download it again")
    if not pieces:
        raise ConversionError(f"{path} holds no pieces: it is damaged or not a sentencepiece model; download it again")
    trainer = {"model_type": trainer.get(3, 1), "split_by_whitespace": trainer.get(22, 1),
               "treat_whitespace_as_suffix": trainer.get(24, 0), "byte_fallback": trainer.get(35, 0)}
    norm = {"precompiled_charsmap": norm.get(2, b""), "add_dummy_prefix": norm.get(3, 1),
            "remove_extra_whitespaces": norm.get(4, 1), "escape_whitespaces": norm.get(5, 1)}
    return pieces, trainer, norm


def _protobuf_fields(buf):
    """[(field number, value)] of one protobuf message: an int for a varint, bytes for the other wire types
    (a string, a nested message, a float). Repeated fields come once per value, in order."""
    fields, i = [], 0

    def varint():
        nonlocal i
        value, shift = 0, 0
        while True:
            byte = buf[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while i < len(buf):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire in (1, 2, 5):  # 64-bit, length-delimited, 32-bit
            n = 8 if wire == 1 else 4 if wire == 5 else varint()
            value, i = bytes(buf[i:i + n]), i + n
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {i}")
        if i > len(buf):
            raise ValueError("the file ends inside a field")
        fields.append((field, value))
    return fields


# -----------------------------------------------------------------------------
# The command, load and save; checkpoint folders (weights, config, tokenizers and a training state).


def write_folder(folder, state, config, towers_from=None):
    """The files of a weights folder, into `folder` (a folder being written aside: see `save`): the frozen towers
    in TOWERS_FILE, the rest in WEIGHTS_FILE, `config` in CONFIG_FILE. towers_from: a folder whose towers file
    holds these very towers, shared instead of written again: a hard link, or a copy where the filesystem has
    none. Returns how the towers got there: "written", "linked" or "copied"."""
    state = {k: v.detach().contiguous() for k, v in state.items()}
    save_file({k: v for k, v in state.items() if not k.startswith(TOWERS)}, folder / WEIGHTS_FILE)
    how = share_towers(Path(towers_from) / TOWERS_FILE, folder / TOWERS_FILE) if towers_from else None
    if how is None:
        save_file({k: v for k, v in state.items() if k.startswith(TOWERS)}, folder / TOWERS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return how or "written"


def save(model, folder, extra_config=None, towers_from=None, files=None, state=None):
    """`model` as a weights folder (see write_folder), with `extra_config` merged into config.json, `files`
    ({name: source path}) copied in and, unless None, `state` (a training state) as state.pt. The folder is
    written aside and renamed into place (folders.written_aside): an interruption never leaves a half-written
    folder, and a failed save (a full disk, say) leaves the previous one in place. Returns how the towers got
    there (see write_folder)."""
    with written_aside(folder) as tmp:
        how = write_folder(tmp, model.state_dict(), {"cliptrans": model.config.to_dict(), **(extra_config or {})},
                           towers_from)
        for name, source in (files or {}).items():
            shutil.copyfile(source, tmp / name)
        if state is not None:
            torch.save(state, tmp / "state.pt")
    return how


def share_towers(src: Path, dst: Path):
    """dst as a hard link to src ("linked"), else a copy ("copied"); None when src does not exist (a folder of
    the older single-file layout)."""
    if not src.is_file():
        return None
    try:
        os.link(src, dst)
        return "linked"
    except OSError:  # another filesystem, or one without hard links
        shutil.copyfile(src, dst)
        return "copied"


def read_config(folder):
    folder = Path(folder)
    if not (folder / CONFIG_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
        raise ConversionError(f"{folder} is not a CLIPTrans weights folder: expected {CONFIG_FILE} and {WEIGHTS_FILE} "
                              f"(write one with `python weights.py --help` or train.py)")
    config = read_json(folder / CONFIG_FILE)
    if "cliptrans" not in config:
        raise ConversionError(f"{folder / CONFIG_FILE} has no 'cliptrans' section: it is not a file this project wrote")
    try:
        return CLIPTransConfig.from_dict(config["cliptrans"]), config
    except (TypeError, KeyError) as e:  # a section missing, or a field this version does not know
        raise ConversionError(f"{folder / CONFIG_FILE}: its 'cliptrans' section does not describe a model ({e!r}): "
                              f"it is damaged, or written by another version of this project") from None


def load(folder, device="cpu", dtype=torch.float32):
    """A ready CLIPTrans in eval mode from a folder written by `weights.py` or `train.py`."""
    folder = Path(folder)
    config, _ = read_config(folder)
    try:
        with torch.device("meta"):
            model = CLIPTrans(config)
    except ValueError as e:  # a config.json edited by hand: an unknown prompt or mapping network, say
        raise ConversionError(f"{folder / CONFIG_FILE}: {e}") from None
    state = {}
    for name in (WEIGHTS_FILE, TOWERS_FILE):  # (folders written before the towers had their file: one file)
        if name == WEIGHTS_FILE or (folder / name).exists():
            try:
                state.update(load_file(folder / name, device=str(device)))
            except (SafetensorError, OSError) as e:
                raise ConversionError(f"cannot read {folder / name}: {e}. The file is damaged or incomplete")
    check_keys(state, {k: tuple(v.shape) for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    model.load_state_dict(state, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def check_trained(checkpoint, trained, task, langs):
    """Refuse a checkpoint whose mapping network never trained (a ConversionError); warn on stderr when it is asked
    for `task` ("translation" from langs [src, tgt], "captioning" in langs [lang]) and was trained for something
    else. `trained`: the "train" section of its config.json. translate.py and train.py --eval_only ask it."""
    stage = trained.get("stage")
    if stage not in (1, 2):  # stage 0 and the converted weights: the tiny and the paper's starting points
        what = (f"a stage {stage} checkpoint" if trained else
                "converted weights (its config.json has no 'train' section)")
        raise ConversionError(f"{checkpoint} is {what}: its mapping network was never trained, so it neither "
                              f"translates nor captions (its output would be noise); expected a stage 1 or stage 2 "
                              f"checkpoint: train stage 1 from it (python train.py --stage 1 --weights {checkpoint}, "
                              f"with --preset paper for converted weights), then stage 2")
    job = {"translation": "translation, {} -> {}", "captioning": "captioning in {}"}
    done, done_langs = (("captioning", [trained.get("caption_lang") or "en"]) if stage == 1 else
                        ("translation", [trained.get("src", "en"), trained.get("tgt", "de")]))
    if (task, [lang_code(x) for x in langs]) != (done, [lang_code(x) for x in done_langs]):
        hint = ("ask it in the languages it was trained on" if task == done else
                "captions come from a stage 1 checkpoint" if task == "captioning" else
                "translations come from a stage 2 checkpoint")
        print(f"warning: {checkpoint} was trained for stage {stage} ({job[done].format(*done_langs)}), not "
              f"{job[task].format(*langs)}: its output may be in another language, or make no sense; {hint}",
              file=sys.stderr)


def save_checkpoint(folder, model, settings: dict, state: dict | None, tokenizers_from, towers_from=None):
    """A checkpoint folder (see `save`): the model, the training `settings` in config.json (its "train"
    section), the two tokenizers copied from `tokenizers_from`, and `state` (optimizer, step, ...: only `last`
    keeps one) as state.pt. Returns how the towers got there (see write_folder)."""
    tokenizers = {name: Path(tokenizers_from) / name for name in (MBART_TOKENIZER, TEXT_TOKENIZER)}
    return save(model, folder, {"train": settings}, towers_from, tokenizers, state)


def convert_all(mbart, mclip, xlmr, clip, out, mapping=MappingConfig(), seed=0, overwrite=False):
    try:  # a used --out is refused before any weight is read
        check_new_folder(out, overwrite)
    except FolderError as e:
        raise ConversionError(str(e)) from None
    mbart_ck, mclip_ck, clip_ck = HFCheckpoint(mbart), HFCheckpoint(mclip), HFCheckpoint(clip)
    xlmr_cfg = read_json(Path(xlmr) / "config.json")
    config = CLIPTransConfig(
        vision=vision_config(clip_ck.config, f"{clip}/config.json"),
        text=text_config(mclip_ck.config, xlmr_cfg, f"{mclip}/config.json", f"{xlmr}/config.json"),
        mbart=mbart_config(mbart_ck.config, f"{mbart}/config.json"),
        mapping=mapping)
    # The tokenizers first: one that does not fit its model fails here, in seconds, before the weights are read
    tokenizer_files = {MBART_TOKENIZER: read_tokenizer(mbart, "mbart", mbart_ck.config, f"{mbart}/config.json"),
                       TEXT_TOKENIZER: read_tokenizer(xlmr, "text", xlmr_cfg, f"{xlmr}/config.json")}
    state = {}
    state.update(convert(mbart_ck, MBART_RULES, expected_shapes(config, "mbart.")))
    state.update(convert(mclip_ck, MCLIP_RULES, expected_shapes(config, "text.")))
    state.update(convert(clip_ck, CLIP_RULES, expected_shapes(config, "vision.")))
    # The mapping network is CLIPTrans's own: no checkpoint has it, it starts from a seeded initialisation.
    torch.manual_seed(seed)
    mapping_net = MappingNetwork(config.mapping, config.vision.embed_dim, config.mbart.d_model)
    mapping_net.apply(init_weights)
    state.update({f"mapping.{k}": v for k, v in mapping_net.state_dict().items()})
    check_keys(state, expected_shapes(config, ""), "the converted model")

    with written_aside(out) as tmp:  # all or nothing: a kill leaves --out as it was
        for name, text in tokenizer_files.items():
            (tmp / name).write_bytes(text)
        write_folder(tmp, state, {"cliptrans": config.to_dict(), "sources": {
            "mbart": str(mbart), "mclip": str(mclip), "xlmr": str(xlmr), "clip": str(clip)}})
    return Path(out)


# -----------------------------------------------------------------------------
# The authors' trained models (devaansh100/CLIPTrans), as their code saves them, into a checkpoint folder here.
#
# Their `CLIPTrans` module holds `adapter.*` (the mapping network), `mbart.*` (a stock
# MBartForConditionalGeneration, every tied copy of the embedding present) and, for a model trained with
# --unfreeze_clip only, `clip.text_encoder.*` (M-CLIP) and `clip.image_encoder.*` (a CLIPModel): otherwise the
# frozen M-CLIP is deleted before training, and the towers come from a folder of weights.py (`--towers`). A file
# is a training dict (`save_model`: {'model', 'optimizer', 'scaler', 'epoch', 'best_bleu_test'}) or a flat shard
# of a released model (X_1.pth, X_2.pth, ... merged in order, as their runner merges them); under DDP every key
# starts with `module.`. The languages and the stage are not in the files: the command line gives them.

OFFICIAL_ADAPTERS = {  # kind -> (the key of the Linear that makes the P prefix vectors, their names -> ours)
    "mlp": ("adapter.hidden.0.weight", [  # MLPAdapter: Linear(D, P d), PReLU
        (r"adapter\.hidden\.([01])\.(weight|bias)", r"mapping.net.\1.\2")]),
    "hidden_mlp": ("adapter.hidden.2.weight", [  # HiddenMLPAdapter: Linear(D, d), ReLU, Linear(d, P d), PReLU
        (r"adapter\.hidden\.([023])\.(weight|bias)", r"mapping.net.\1.\2")]),
    "transformer": ("adapter.projector.weight", [  # TransformerAdapter: Linear(D, P d), nn.TransformerEncoderLayer
        (r"adapter\.projector\.(weight|bias)", r"mapping.net.\1"),
        (r"adapter\.transformer\.layers\.0\.self_attn\.in_proj_(weight|bias)", r"mapping.block.attn.qkv.\1"),
        (r"adapter\.transformer\.layers\.0\.self_attn\.out_proj\.(weight|bias)", r"mapping.block.attn.out.\1"),
        (r"adapter\.transformer\.layers\.0\.linear([12])\.(weight|bias)", r"mapping.block.mlp.fc\1.\2"),
        (r"adapter\.transformer\.layers\.0\.norm1\.(weight|bias)", r"mapping.block.ln_attn.\1"),
        (r"adapter\.transformer\.layers\.0\.norm2\.(weight|bias)", r"mapping.block.ln_mlp.\1")]),
}


def under(module, rules):  # rules for the same keys inside a module: "mbart." + "model.shared.weight"
    return [(re.escape(module) + f"(?:{pattern})", target) for pattern, target in rules]


OFFICIAL_TOWERS = under("clip.text_encoder.", MCLIP_RULES) + under("clip.image_encoder.", CLIP_RULES)  # --unfreeze_clip
# the rest of a training dict: used by their training alone
OFFICIAL_DROPPED = ("optimizer", "scaler", "epoch", "best_bleu_test")
SHARDS_HINT = "their released models come as shards X_1.pth, X_2.pth: give every shard, or the name X.pth"


def official_files(paths):
    """The files of one official model, in their runner's order: a file that exists is itself (shards given one by
    one are merged in the order given); a name X.pth that does not exist is the set of its shards X_1.pth,
    X_2.pth, ... beside it, as their runner finds them (the names matched literally). A shard missing from a set
    is an error."""
    files = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
            continue
        stem = path.name.removesuffix(".pth")
        names = os.listdir(path.parent) if path.parent.is_dir() else []
        numbers = [n[len(stem) + 1:-len(".pth")] for n in names if n.startswith(stem + "_") and n.endswith(".pth")]
        shards = {int(n): path.parent / f"{stem}_{n}.pth" for n in numbers if re.fullmatch("[0-9]+", n)}
        if not shards:
            raise ConversionError(f"{path} not found, nor shards {stem}_1.pth, {stem}_2.pth, ... beside it: expected "
                                  f"a model file of the official CLIPTrans code; {SHARDS_HINT}")
        missing = [f"{stem}_{n}.pth" for n in range(1, max(shards) + 1) if n not in shards]
        if missing:
            raise ConversionError(f"{path.parent} holds {len(shards)} shards of {stem} (up to {stem}_{max(shards)}.pth)"
                                  f" but not {len(missing)}: {', '.join(missing[:3])}{' ...' * (len(missing) > 3)}: "
                                  f"download every shard of the model")
        files += [shards[n] for n in sorted(shards) if shards[n] not in files]
    return files


def read_official(files):
    """One flat state dict from the official files: each read with torch.load(weights_only=True), a training
    dict's model taken (the rest dropped by name), the shards merged, `module.` (DDP) taken out of every key."""
    state = {}
    for path in files:
        obj = read_pth(path)
        if isinstance(obj, dict) and "model" in obj:  # a training dict (their runner's save_model)
            unknown = [k for k in obj if k != "model" and k not in OFFICIAL_DROPPED]
            if unknown:
                raise ConversionError(f"{path}: a training dict with unexpected entries {unknown}: expected 'model' "
                                      f"and {', '.join(OFFICIAL_DROPPED)}")
            obj = obj["model"]
        if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ConversionError(f"{path} holds a {type(obj).__name__} that is not a state dict of tensors: expected "
                                  f"a model file of the official CLIPTrans code (a state dict, or a training dict "
                                  f"with one under 'model')")
        for key, tensor in obj.items():
            key = re.sub(r"(^|\.)module\.", r"\1", key)  # DDP's wrapper, wherever it stands
            if key in state and not torch.equal(state[key], tensor):
                raise ConversionError(f"{path}: {key} is in an earlier file too, with other values: these files "
                                      f"are not the shards of one model")
            state[key] = tensor
    return state


def official_mapping(state, config: CLIPTransConfig, where):
    """The mapping network's kind and prefix length, from their adapter's keys and shapes."""
    keys = [k for k in state if k.startswith("adapter.")]
    kinds = [kind for kind, (_, rules) in OFFICIAL_ADAPTERS.items()
             if all(any(re.fullmatch(p, k) for p, _ in rules) for k in keys)]
    if not keys:
        raise ConversionError(f"{where}: no mapping network (adapter.* keys): a model trained with --prefix_length "
                              f"0, or a shard missing ({SHARDS_HINT})")
    if len(kinds) != 1 or OFFICIAL_ADAPTERS[kinds[0]][0] not in state:
        raise ConversionError(f"{where}: the adapter's keys {keys[:6]} are not those of one of the official adapters "
                              f"(MLPAdapter, HiddenMLPAdapter, TransformerAdapter): keys are missing or unknown")
    out, d = state[OFFICIAL_ADAPTERS[kinds[0]][0]].shape[0], config.mbart.d_model
    if out % d:
        raise ConversionError(f"{where}: the adapter makes {out} numbers, not a whole number of {d}-d prefix vectors "
                              f"(mBART's width in the towers' folder): it belongs to an mBART of another size")
    return MappingConfig(kinds[0], out // d)


def convert_official(files, towers, src, tgt, out, stage=2, overwrite=False):
    """An official model (`files`: see official_files) as a checkpoint folder `out`, with the frozen towers and the
    tokenizers of `towers` (a folder written by weights.py), decoding as the official code does (prompt
    "official"). Strict, as convert: every key used or dropped by name, every shape checked."""
    try:
        check_new_folder(out, overwrite)
        langs = [lang_code(x) for x in (src, tgt)]
    except (FolderError, ValueError) as e:
        raise ConversionError(str(e)) from None
    config, _ = read_config(towers)
    lost = [name for name in (MBART_TOKENIZER, TEXT_TOKENIZER) if not (Path(towers) / name).is_file()]
    if lost:
        raise ConversionError(f"{towers} has no {' or '.join(lost)}: expected a folder written by weights.py")
    paths = official_files(files)
    state, where = read_official(paths), ", ".join(map(str, paths))
    config.mapping, config.prompt = official_mapping(state, config, where), "official"
    shared, c = state.get("mbart.model.shared.weight"), config.mbart
    if shared is not None and tuple(shared.shape) != (c.vocab_size, c.d_model):
        raise ConversionError(f"{where}: its mBART has {shared.shape[0]} ids of width {shared.shape[1]}, the one of "
                              f"{towers} {c.vocab_size} of width {c.d_model}: convert --towers from the mBART their "
                              f"model was fine-tuned from (facebook/mbart-large-50)")
    unfrozen = any(k.startswith("clip.") for k in state)  # --unfreeze_clip: the towers are in the file
    rules = (OFFICIAL_ADAPTERS[config.mapping.kind][1] + under("mbart.", MBART_RULES)
             + (OFFICIAL_TOWERS if unfrozen else []))
    expected = {k: v for k, v in expected_shapes(config, "").items() if unfrozen or not k.startswith(TOWERS)}
    converted = convert(state, rules, expected, where, hint=SHARDS_HINT)
    if not unfrozen and not (Path(towers) / TOWERS_FILE).exists():  # a folder of the older single-file layout
        converted.update({k: v for k, v in load_file(Path(towers) / WEIGHTS_FILE).items() if k.startswith(TOWERS)})
    train = {"stage": stage, "src": src, "tgt": tgt}
    if stage == 1:  # their captions: English when the pair has it, else Spanish
        train["caption_lang"] = "en" if "en_XX" in langs else "es"
    with written_aside(out) as tmp:
        for name in (MBART_TOKENIZER, TEXT_TOKENIZER):
            shutil.copyfile(Path(towers) / name, tmp / name)
        write_folder(tmp, converted, {"cliptrans": config.to_dict(), "train": train, "official": {
            "files": [str(p) for p in paths], "towers": str(towers), "unfreeze_clip": unfrozen}},
            towers_from=None if unfrozen else towers)
    return Path(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mbart", help="facebook/mbart-large-50 folder")
    p.add_argument("--mclip", help="M-CLIP/XLM-Roberta-Large-Vit-B-32 folder")
    p.add_argument("--xlmr", help="xlm-roberta-large folder (M-CLIP's modelBase: sizes + tokenizer)")
    p.add_argument("--clip", help="openai/clip-vit-base-patch32 folder (full or vision-only)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mapping", choices=["mlp", "hidden_mlp", "transformer"],
                   help="the new mapping network's kind (default: mlp)")
    p.add_argument("--prefix_len", type=int, help="its prefix vectors (default: 10)")
    p.add_argument("--official", nargs="+", metavar="FILE",
                   help="instead: a model of the official CLIPTrans code (its .pth, its shards X_1.pth X_2.pth "
                        "..., or the name X.pth of a set of shards) into a checkpoint folder, which decodes as "
                        "their code does (--prompt official)")
    p.add_argument("--towers", help="--official: a folder written by weights.py, whose frozen towers and "
                                    "tokenizers the model uses")
    p.add_argument("--src", help="--official: the model's source language (e.g. en)")
    p.add_argument("--tgt", help="--official: its target language (e.g. de)")
    p.add_argument("--stage", type=int, choices=[1, 2],
                   help="--official: 2, a translation model (model_best_test.pth); 1, a captioning one "
                        "(model_pretrained.pth), from which train.py's stage 2 can start (--init)")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    a = p.parse_args(argv)
    need, alien = ((("towers", "src", "tgt"), ("mbart", "mclip", "xlmr", "clip", "mapping", "prefix_len"))
                   if a.official else (("mbart", "mclip", "xlmr", "clip"), ("towers", "src", "tgt", "stage")))
    missing = [f"--{n}" for n in need if getattr(a, n) is None]
    if missing:
        p.error(f"{' '.join(missing)} {'is' if len(missing) == 1 else 'are'} required"
                + (" with --official" if a.official else " (or --official FILE ...)"))
    given = [f"--{n}" for n in alien if getattr(a, n) is not None]
    if given:
        p.error(f"{' '.join(given)}: not for {'--official' if a.official else 'a conversion of the public checkpoints'}"
                + (" (the file decides its mapping network)" if a.official else "") + f"; leave {'it' if len(given) == 1 else 'them'} out")
    if (a.prefix_len or 0) < 0:
        p.error(f"--prefix_len {a.prefix_len}: expected 0 or more prefix vectors")
    return a


def main(argv=None):
    a = parse_args(argv)
    try:
        if a.official:
            out = convert_official(a.official, a.towers, a.src, a.tgt, a.out, a.stage or 2, overwrite=a.overwrite)
        else:
            mapping = MappingConfig(a.mapping or "mlp", 10 if a.prefix_len is None else a.prefix_len)
            out = convert_all(a.mbart, a.mclip, a.xlmr, a.clip, a.out, mapping, overwrite=a.overwrite)
    except ConversionError as e:
        raise SystemExit(f"error: {e}")
    except OSError as e:  # a full or read-only disk: nothing of the new folder is left, --out is as it was
        raise SystemExit(f"error: cannot write {a.out} ({e.strerror or e}): free some space or make its folder "
                         f"writable; {a.out} is as it was")
    print(f"wrote {out / TOWERS_FILE}, {out / WEIGHTS_FILE}, {out / CONFIG_FILE}, {out / MBART_TOKENIZER}, "
          f"{out / TEXT_TOKENIZER}")


if __name__ == "__main__":
    main()
