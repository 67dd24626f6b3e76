"""
The paper's claim, in miniature: does captioning first (stage 1) help translation when parallel data is
scarce, and does the text embedding stand in for the image at test time?

    python experiment.py                      # 3 seeds, 500 parallel pairs, the tiny world, en -> de
    python experiment.py --seeds 1 2 3 4 5 --pairs 1000

For each seed: stage 1 (captioning in the target language on all the world's training images; it first runs
its own stage 0, with the same seed, into OUT/seedN/stage0), then stage 2
on only `--pairs` sentence pairs, once from the stage 1 checkpoint and once without it
(`--from_scratch_stage2`: from the stage 0 weights, the ablation). Each stage 2 model is scored on the
test split (held-out colour-shape pairs) from the source sentence's text embedding (the paper's test-time
setting) and from the image's embedding (`--test_with_image`), and with one of its two inputs taken away
(`--ablate`): each sentence with the previous sentence's prefix, and the encoder without the source words.
Prints BLEU mean and standard deviation over the seeds and writes every figure to OUT/results.json.
Run again with the same arguments after an interruption, it continues: a finished training run is read back
from its summary.json, an interrupted one is resumed from its `last` checkpoint.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from weights import find_checkpoint


def train(*args, out=None):
    """Run train.py and return the JSON line it ends with. A training run (`out`: its --out folder) that finished
    before is read back from OUT/summary.json; one interrupted after a checkpoint continues with --resume."""
    if out is not None and (out / "summary.json").is_file():
        print(f"done before: {out}", flush=True)
        return json.loads((out / "summary.json").read_text())
    if out is not None and find_checkpoint(out / "last").exists():  # (or the copy a crash left aside)
        args = (*args, "--resume")
    elif out is not None and out.exists():  # interrupted before its first checkpoint: nothing to resume
        print(f"starting over: {out} (interrupted before its first checkpoint)", flush=True)
        shutil.rmtree(out)
    cmd = [sys.executable, "train.py", *map(str, args)]
    print("$", " ".join(cmd), flush=True)
    # stderr (the progress bars and, on failure, train.py's message) goes to the terminal; stdout ends with the JSON
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--pairs", type=int, default=500)
    p.add_argument("--stage2_steps", type=int, default=400)
    p.add_argument("--out", default="runs/experiment")
    a = p.parse_args()
    out = Path(a.out)
    settings = {"pairs": a.pairs, "stage2_steps": a.stage2_steps}
    saved = out / "settings.json"  # continuing in OUT: only with the settings its runs were made with
    if saved.is_file() and json.loads(saved.read_text()) != settings:
        raise SystemExit(f"error: {out} holds runs made with {json.loads(saved.read_text())}, not {settings}: "
                         f"give another --out, or the same settings to continue them")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(settings))
    t0 = time.time()
    results = {"pairs": a.pairs, "seeds": a.seeds, "runs": {}}
    for seed in a.seeds:
        d = out / f"seed{seed}"
        s1 = train("--stage", 1, "--caption_lang", "de", "--seed", seed, "--out", d / "stage1", out=d / "stage1")
        row = {"stage1_caption_bleu": s1["test_bleu"]}
        for name, extra in (("with stage 1", ["--init", d / "stage1" / "last"]),
                            ("without stage 1", ["--from_scratch_stage2"])):
            o = d / ("stage2" if name == "with stage 1" else "stage2_scratch")
            common = ["--stage", 2, "--seed", seed, "--out", o]
            s2 = train(*common, "--n_pairs", a.pairs, "--max_steps", a.stage2_steps, "--eval_every", 100, *extra,
                       out=o)
            image = train(*common, "--eval_only", "--test_with_image")
            other_prefix = train(*common, "--eval_only", "--ablate", "prefix")
            no_source = train(*common, "--eval_only", "--ablate", "source")
            row[name] = {"text": s2["test_bleu"], "image": image["bleu"], "val": s2["best_val_bleu"],
                         "other prefix": other_prefix["bleu"], "no source": no_source["bleu"]}
        results["runs"][seed] = row
        (out / "results.json").write_text(json.dumps(results, indent=2))

    def stat(name, kind):
        xs = [results["runs"][s][name][kind] for s in a.seeds]
        return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, xs

    print(f"\nstage 2 on {a.pairs} parallel pairs, tiny world en -> de, test BLEU over seeds {a.seeds} "
          f"({(time.time() - t0) / 60:.1f} min)")
    kinds = {"text": "text embedding (paper)", "image": "image embedding", "other prefix": "previous one's prefix",
             "no source": "no source words"}
    print(f"{'':18s} " + " ".join(f"{title:>28s}" for title in kinds.values()))
    for name in ("with stage 1", "without stage 1"):
        cells = []
        for kind in kinds:
            m, sd, xs = stat(name, kind)
            cells.append(f"{m:6.2f} ± {sd:5.2f} {xs}")
            results.setdefault("summary", {})[f"{name}, {kind}"] = {"mean": m, "std": sd, "values": xs}
        print(f"{name:18s} " + " ".join(f"{cell:>28s}" for cell in cells))
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
