"""
The public checkpoints converted by rule tables into one folder of this project's names; every weights or
checkpoint folder saved and loaded. (The authors' trained models: official.py.)

    python weights.py --mbart mbart-large-50 --mclip XLM-Roberta-Large-Vit-B-32 --xlmr xlm-roberta-large \\
                      --clip clip-vit-base-patch32 --out weights/paper      # local Hugging Face folders
    model = weights.load("weights/paper")

Each argument a folder as `save_pretrained` or a hub download writes it (safetensors, sharded or not, or
pytorch_model.bin, read with weights_only=True: nothing in it runs; reading one: hub.py). --clip: a CLIPModel or a
vision-only one; --xlmr: M-CLIP's base model, for the text tower's sizes and tokenizer. Strict: every key used or
dropped by name, every shape and both tokenizers checked, or a message names the problem.

A folder holds `towers.safetensors` (the frozen towers, shared as a hard link by every checkpoint trained from it),
`cliptrans.safetensors` (mBART, its tied weights once, the mapping network), `config.json` (the sizes; a
checkpoint's training settings), `tokenizer_mbart.json`, `tokenizer_text.json`; a run's `last`, `state.pt`.
"""

import argparse
import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cliptrans import (MAPPINGS, CLIPTrans, CLIPTransConfig, MappingConfig, MappingNetwork, MBartConfig, TextConfig,
                       VisionConfig, init_weights)
from folders import check_new_folder, written_aside
from hub import ConversionError, HFCheckpoint, read_json, tokenizer_json

WEIGHTS_FILE, CONFIG_FILE, TOWERS_FILE = "cliptrans.safetensors", "config.json", "towers.safetensors"
TOWERS = ("vision.", "text.")  # the keys of the frozen towers, in TOWERS_FILE: the 2.6 GB of the paper's, stored once
MBART_TOKENIZER, TEXT_TOKENIZER = "tokenizer_mbart.json", "tokenizer_text.json"


# -----------------------------------------------------------------------------
# Sizes from the Hugging Face configs.


def _require(cfg, key, where):  # cfg[key], or a message
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
        raise ConversionError(f"{where}: activation {vc['hidden_act']!r} is not supported (OpenAI CLIP: quick_gelu)")
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
# Key renaming: source pattern -> our name; q, k and v fused into one `qkv`, in that order; DROP: no place here.

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
    """Every tensor of `ckpt` (an HFCheckpoint or a state dict) renamed (and fused) by `rules`, strictly: a key no
    rule knows is an error, and the result must be `expected` ({name: shape}; `hint`: said of missing keys)."""
    where, out, parts = where or str(ckpt.folder), {}, {}
    for key in ckpt.keys():
        for pattern, target in rules:
            m = re.fullmatch(pattern, key)
            if m:
                break
        else:
            unknown = [k for k in ckpt.keys() if not any(re.fullmatch(p, k) for p, _ in rules)]
            raise ConversionError(f"{where}: {len(unknown)} unexpected keys, first: {unknown[:5]}. Is this the right "
                                  f"kind of model?")
        if target is DROP:
            continue
        name = m.expand(target)
        qkv = next((g for g in m.groups() if g in QKV_ORDER), None) if ".qkv." in name else None
        tensor = ckpt[key]
        check_shape(key, tensor, name, expected, qkv is not None, where)
        if qkv is not None:
            parts.setdefault(name, [None, None, None])[QKV_ORDER[qkv]] = tensor
        elif name in out:  # a tied copy (lm_head, embed_tokens): must equal what is already there
            if not torch.equal(out[name], tensor):
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


def check_keys(tensors, expected, where, hint=""):  # the names of `tensors` against `expected` both ways, and shapes
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


def convert_all(mbart, mclip, xlmr, clip, out, mapping=MappingConfig(), seed=0, overwrite=False):
    """The four Hugging Face folders as one weights folder `out`, with a new mapping network (`mapping`, seeded)."""
    try:  # a used --out and a tokenizer that does not fit its model fail in seconds, before any weight is read
        check_new_folder(out, overwrite)
        mbart_ck, mclip_ck, clip_ck = HFCheckpoint(mbart), HFCheckpoint(mclip), HFCheckpoint(clip)
        xlmr_cfg = read_json(Path(xlmr) / "config.json")
        tokenizer_files = {MBART_TOKENIZER: tokenizer_json(mbart, "mbart", mbart_ck.config, f"{mbart}/config.json"),
                           TEXT_TOKENIZER: tokenizer_json(xlmr, "text", xlmr_cfg, f"{xlmr}/config.json")}
    except ValueError as e:  # (a FolderError, or the tokenizers')
        raise ConversionError(str(e)) from None
    config = CLIPTransConfig(
        vision=vision_config(clip_ck.config, f"{clip}/config.json"),
        text=text_config(mclip_ck.config, xlmr_cfg, f"{mclip}/config.json", f"{xlmr}/config.json"),
        mbart=mbart_config(mbart_ck.config, f"{mbart}/config.json"), mapping=mapping)
    state = {**convert(mbart_ck, MBART_RULES, expected_shapes(config, "mbart.")),
             **convert(mclip_ck, MCLIP_RULES, expected_shapes(config, "text.")),
             **convert(clip_ck, CLIP_RULES, expected_shapes(config, "vision."))}
    # The mapping network is CLIPTrans's own: no checkpoint has it, it starts from a seeded initialisation.
    torch.manual_seed(seed)
    mapping_net = MappingNetwork(config.mapping, config.vision.embed_dim, config.mbart.d_model).apply(init_weights)
    state.update({f"mapping.{k}": v for k, v in mapping_net.state_dict().items()})
    check_keys(state, expected_shapes(config, ""), "the converted model")

    with written_aside(out) as tmp:  # all or nothing: a kill leaves --out as it was
        for name, text in tokenizer_files.items():
            (tmp / name).write_bytes(text)
        write_folder(tmp, state, {"cliptrans": config.to_dict(), "sources": {
            "mbart": str(mbart), "mclip": str(mclip), "xlmr": str(xlmr), "clip": str(clip)}})
    return Path(out)


# -----------------------------------------------------------------------------
# Weights and checkpoint folders: written aside and renamed into place, read back checked.


def write_folder(folder, state, config, towers_from=None):
    """The files of a weights folder into `folder` (being written aside: see `save`). towers_from: a folder whose
    towers file holds these very towers, shared instead: a hard link, or a copy where the filesystem has none.
    Returns how the towers got there: "written", "linked" or "copied"."""
    state = {k: v.detach().contiguous() for k, v in state.items()}
    save_file({k: v for k, v in state.items() if not k.startswith(TOWERS)}, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    if not towers_from:
        save_file({k: v for k, v in state.items() if k.startswith(TOWERS)}, folder / TOWERS_FILE)
        return "written"
    try:
        os.link(Path(towers_from) / TOWERS_FILE, folder / TOWERS_FILE)
        return "linked"
    except OSError:  # another filesystem, or one without hard links
        shutil.copyfile(Path(towers_from) / TOWERS_FILE, folder / TOWERS_FILE)
        return "copied"


def save(model, folder, extra_config=None, towers_from=None, files=None, state=None):
    """`model` as a weights folder, `extra_config` merged into config.json, `files` ({name: source}: the tokenizers)
    copied in, `state` (a training state) as state.pt: written aside and renamed into place, so that a kill or a
    full disk leaves the previous folder. Returns how the towers got there (see write_folder)."""
    with written_aside(folder) as tmp:
        how = write_folder(tmp, model.state_dict(), {"cliptrans": model.config.to_dict(), **(extra_config or {})},
                           towers_from)
        for name, source in (files or {}).items():
            shutil.copyfile(source, tmp / name)
        if state is not None:
            torch.save(state, tmp / "state.pt")
    return how


def read_config(folder):  # a weights folder's CLIPTransConfig, and its whole config.json
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
    for name in (WEIGHTS_FILE, TOWERS_FILE):
        try:
            state.update(load_file(folder / name, device=str(device)))
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"cannot read {folder / name}: {e}. The file is damaged or incomplete")
    check_keys(state, {k: tuple(v.shape) for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    model.load_state_dict(state, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mbart", required=True, help="facebook/mbart-large-50 folder")
    p.add_argument("--mclip", required=True, help="M-CLIP/XLM-Roberta-Large-Vit-B-32 folder")
    p.add_argument("--xlmr", required=True, help="xlm-roberta-large folder (M-CLIP's modelBase: sizes + tokenizer)")
    p.add_argument("--clip", required=True, help="openai/clip-vit-base-patch32 folder (full or vision-only)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mapping", default="mlp", choices=MAPPINGS, help="the new mapping network's kind")
    p.add_argument("--prefix_len", type=int, default=10, help="its prefix vectors")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    a = p.parse_args(argv)
    if a.prefix_len < 0:
        p.error(f"--prefix_len {a.prefix_len}: expected 0 or more prefix vectors")
    return a


def main(argv=None):
    a = parse_args(argv)
    with written_or_said(a.out):
        out = convert_all(a.mbart, a.mclip, a.xlmr, a.clip, a.out, MappingConfig(a.mapping, a.prefix_len),
                          overwrite=a.overwrite)
    print(f"wrote {out / TOWERS_FILE}, {out / WEIGHTS_FILE}, {out / CONFIG_FILE}, {out / MBART_TOKENIZER}, "
          f"{out / TEXT_TOKENIZER}")


@contextlib.contextmanager
def written_or_said(out):
    """A conversion into `out` whose failure leaves in one line (a full disk leaves `out` as it was)."""
    try:
        yield
    except ConversionError as e:
        raise SystemExit(f"error: {e}")
    except OSError as e:  # a full or read-only disk
        raise SystemExit(f"error: cannot write {out} ({e.strerror or e}): free some space or make its folder "
                         f"writable; {out} is as it was")


if __name__ == "__main__":
    main()
