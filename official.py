"""
The authors' trained models (devaansh100/CLIPTrans), as their code saves them, into a checkpoint folder that
translate.py and `train.py --eval_only` read, with the frozen towers of a folder converted by weights.py:

    python official.py models/multi30k-en-de/model_best_test.pth --towers weights/paper \\
                       --src en --tgt de --out weights/official-en-de

Each file is read with torch.load(weights_only=True) only. The languages and the stage, not in the files, come from
the command line. The converted model decodes as their code does (`--prompt official`: see cliptrans.PROMPTS).
"""

import argparse
import re
from pathlib import Path

import torch

from cliptrans import MappingConfig
from data import lang_code
from folders import check_new_folder, written_aside
from hub import ConversionError, read_pth
from weights import (CLIP_RULES, CONFIG_FILE, MBART_RULES, MBART_TOKENIZER, MCLIP_RULES, TEXT_TOKENIZER, TOWERS,
                     TOWERS_FILE, WEIGHTS_FILE, convert, expected_shapes, read_config, write_folder, written_or_said)

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
OFFICIAL_DROPPED = ("optimizer", "scaler", "epoch", "best_bleu_test")  # the rest of a training dict (save_model)
SHARDS_HINT = "their released models come as shards X_1.pth, X_2.pth: give every shard, or the name X.pth"


def files_of(paths):
    """The files of one official model, in order: each file that exists; for a name X.pth, its shards X_1.pth, ..."""
    files = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
            continue
        stem = path.name.removesuffix(".pth")
        names = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
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


def read_state(files):
    """One flat state dict: a training dict's 'model' taken, the shards merged, `module.` (DDP) taken out."""
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


def mapping_of(state, config, where):
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
    """The model of `files` (see files_of) as the checkpoint folder `out`, with the towers and tokenizers of towers."""
    try:
        check_new_folder(out, overwrite)
        langs = [lang_code(x) for x in (src, tgt)]
    except ValueError as e:  # a FolderError too
        raise ConversionError(str(e)) from None
    config, _ = read_config(towers)
    lost = [name for name in (MBART_TOKENIZER, TEXT_TOKENIZER) if not (Path(towers) / name).is_file()]
    if lost:
        raise ConversionError(f"{towers} has no {' or '.join(lost)}: expected a folder written by weights.py")
    paths = files_of(files)
    state, where = read_state(paths), ", ".join(map(str, paths))
    config.mapping, config.prompt = mapping_of(state, config, where), "official"
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
    train = {"stage": stage, "src": src, "tgt": tgt}
    if stage == 1:  # their captions: English when the pair has it, else Spanish
        train["caption_lang"] = "en" if "en_XX" in langs else "es"
    with written_aside(out) as tmp:
        for name in (MBART_TOKENIZER, TEXT_TOKENIZER):
            (tmp / name).write_bytes((Path(towers) / name).read_bytes())
        write_folder(tmp, converted, {"cliptrans": config.to_dict(), "train": train, "official": {
            "files": [str(p) for p in paths], "towers": str(towers), "unfreeze_clip": unfrozen}},
            towers_from=None if unfrozen else towers)
    return Path(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", metavar="FILE", help="a model of the official CLIPTrans code: its .pth, its "
                   "shards X_1.pth X_2.pth ..., or the name X.pth of a set of shards")
    p.add_argument("--towers", required=True, help="a folder written by weights.py, whose frozen towers and "
                                                   "tokenizers the model uses")
    p.add_argument("--src", required=True, help="the model's source language (e.g. en)")
    p.add_argument("--tgt", required=True, help="its target language (e.g. de)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--stage", type=int, default=2, choices=[1, 2],
                   help="2, a translation model (model_best_test.pth); 1, a captioning one (model_pretrained.pth), "
                        "from which train.py's stage 2 can start (--init)")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    with written_or_said(a.out):
        out = convert_official(a.files, a.towers, a.src, a.tgt, a.out, a.stage, overwrite=a.overwrite)
    print(f"wrote {out / TOWERS_FILE}, {out / WEIGHTS_FILE}, {out / CONFIG_FILE}, {out / MBART_TOKENIZER}, "
          f"{out / TEXT_TOKENIZER}")


if __name__ == "__main__":
    main()
