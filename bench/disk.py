"""
What a paper-size run keeps on disk: the folders train.py writes (weights.save, as runs.Run calls
it), at the paper's sizes with random weights and a real AdamW state, in two layouts:

- before: every checkpoint holds the whole model in one file and the optimizer state, `best` as `last`;
- now: the frozen towers in a file of their own, hard-linked from the converted weights into every
  checkpoint; the optimizer state in `last` only.

    python bench/disk.py --out /tmp/disk     # ~13 GiB of memory, ~45 GB of free disk for a while, minutes

Prints, for the converted folder and the folders of stage 1's and stage 2's runs, the bytes each adds to the
disk (a file hard-linked to one counted before is counted once), then removes what it wrote.
"""

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's files: bench/ sits beside them
import weights  # noqa: E402
from cliptrans import CLIPTrans, CLIPTransConfig  # noqa: E402


def folder_size(folder, seen=None):
    """Bytes of the files under `folder`, each file once however many hard links it has there, and none whose
    inode is already in `seen` (a set of (device, inode), which the files counted then join)."""
    seen = set() if seen is None else seen
    total = 0
    for f in Path(folder).rglob("*"):
        st = f.stat()
        if f.is_file() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def adamw_state(params):
    """An AdamW state dict as train.py's optimizer holds it after a step: two fp32 moments per parameter."""
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in params:
        p.grad = None
    return {"optimizer": opt.state_dict(), "step": 1}


def checkpoint(folder, model, settings, state, tokenizers, towers_from=None):
    """A checkpoint folder as runs.Run.save writes one: the model, its settings, the tokenizers and a state."""
    files = {name: tokenizers / name for name in (weights.MBART_TOKENIZER, weights.TEXT_TOKENIZER)}
    weights.save(model, folder, {"train": settings}, towers_from, files, state)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="an empty folder for the measurement (removed at the end)")
    p.add_argument("--preset", default="paper", choices=["paper", "tiny"])
    p.add_argument("--tokenizers", default=None,
                   help="a folder holding tokenizer_mbart.json and tokenizer_text.json to copy (default: empty files)")
    a = p.parse_args()
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} is not empty: give a new folder (this script removes it at the end)")
    t0 = time.time()
    torch.manual_seed(0)
    model = CLIPTrans(CLIPTransConfig.preset(a.preset))  # random weights at the preset's sizes
    tok = out / "tokenizers"
    tok.mkdir(parents=True)
    for name in (weights.MBART_TOKENIZER, weights.TEXT_TOKENIZER):
        if a.tokenizers:
            shutil.copyfile(Path(a.tokenizers) / name, tok / name)
        else:
            (tok / name).write_text("{}")
    decoder = [*model.mapping.parameters(), *model.mbart.decoder.parameters()]  # stage 1 trains these
    everything = [*model.mapping.parameters(), *model.mbart.parameters()]  # stage 2 all of mBART
    state1, state2 = adamw_state(decoder), adamw_state(everything)
    rows = []
    try:
        for layout in ("before", "now"):
            root, seen = out / layout, set()
            # the converted folder
            conv = root / "weights"
            checkpoint(conv, model, {}, None, tok)
            if layout == "before":  # one file, the towers inside
                state = {**load_file(conv / weights.WEIGHTS_FILE),
                         **load_file(conv / weights.TOWERS_FILE)}
                save_file(state, conv / weights.WEIGHTS_FILE)
                (conv / weights.TOWERS_FILE).unlink()
                del state
            size = {"converted weights": folder_size(conv, seen)}
            link = conv if layout == "now" else None
            checkpoint(root / "stage1" / "last", model, {"stage": 1}, state1, tok, link)
            size["stage 1 run (last)"] = folder_size(root / "stage1", seen)
            checkpoint(root / "stage2" / "last", model, {"stage": 2}, state2, tok, link)
            checkpoint(root / "stage2" / "best", model, {"stage": 2}, state2 if layout == "before" else None, tok,
                       link)
            size["stage 2 run (best + last)"] = folder_size(root / "stage2", seen)
            rows.append(size)
            shutil.rmtree(root)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"\n{a.preset} preset, random weights; bytes each folder adds to the disk ({time.time() - t0:.0f} s)")
    print(f"{'':28s} {'before':>10s} {'now':>10s}")
    for name in rows[0]:
        print(f"{name:28s} {rows[0][name] / 1e9:9.2f}G {rows[1][name] / 1e9:9.2f}G")


if __name__ == "__main__":
    main()
