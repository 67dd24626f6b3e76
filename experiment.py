"""
The paper's comparisons, in miniature: does the prefix from M-CLIP help translation, and does captioning first
(stage 1) help more, when parallel data is scarce?

    python experiment.py                                  # 5 seeds x 3 data sizes x 4 arms (about an hour)
    python experiment.py --seeds 1 2 3 --pairs 50 200     # a smaller one

Four arms, each trained on the first `--pairs` sentence pairs of the tiny world (en -> de) and scored on the
same test split (held-out colour-shape pairs) from the source sentence alone, as at the paper's test time:

    text-only          mBART fine-tuned on the text alone (`--prefix_len 0`): the paper's baseline
    stage 2 only       CLIPTrans without captioning first (`--from_scratch_stage2`)
    stage 1 (en) + 2   CLIPTrans, captioning in the source language first: the official default
    stage 1 (de) + 2   ... captioning in the target language first

The pretrained models are the same for every run, as M-CLIP and mBART-50 are in the paper: one stage 0
(OUT/stage0, or `--stage0` an existing one). A seed fixes a run's initialisation of what it adds (the mapping
network), its data order and its dropout; each seed has its own two stage 1 runs (`--stage1_steps`, on all the
world's training images). Stage 2 validates `--evals` times and keeps its checkpoint best on val, as the
paper's recipe does: the test score is not that of a late loss spike. `--jobs` runs train.py that many times
at once, each on its share of the cores. Ablations: `--arms` picks arms, `--stage1_extra` / `--stage2_extra`
add train.py flags to a stage's runs.

Prints the test BLEU, mean ± standard deviation over seeds, and, for each pair of arms at each size, the mean
of the paired differences (the same seed, the same data) with a 95% bootstrap interval over seeds and how many
seeds went which way. Writes every figure to OUT/results.json. Run again with the same arguments after an
interruption, it continues: a finished run is read back from its summary.json, an interrupted one is resumed
from its `last` checkpoint.
"""

import argparse
import contextlib
import itertools
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from folders import find_checkpoint

ARMS = ("text-only", "stage 2 only", "stage 1 (en) + 2", "stage 1 (de) + 2")


def train(*args, out=None, log=None, threads=None):
    """Run train.py and return the JSON line it ends with. A training run (`out`: its --out folder) that
    finished before is read back from OUT/summary.json; one interrupted after a checkpoint continues with
    --resume.
    `log`: a file for its stderr (progress bars, messages; default: the terminal); `threads`: its intra-op
    threads (default: PyTorch's choice)."""
    if out is not None and (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    if out is not None and find_checkpoint(out / "last").exists():  # (or the copy a crash left aside)
        args = (*args, "--resume")
    elif out is not None and out.exists():  # interrupted before its first checkpoint: nothing to resume
        shutil.rmtree(out)
    cmd = [sys.executable, "train.py", *map(str, args)]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with open(log, "a") if log else contextlib.nullcontext() as err:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}; its messages: {log or 'above'}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_all(runs, jobs, desc):
    """{name: (train.py arguments, out folder)} -> {name: summary}: `jobs` runs at a time, each on
    cpu_count / jobs threads, its messages in OUT.log; a progress bar, and a line per finished run."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    done = {}
    with ThreadPoolExecutor(jobs) as pool, tqdm(total=len(runs), desc=desc) as bar:
        futures = {pool.submit(train, *cli, out=out, log=out.with_name(out.name + ".log"), threads=threads):
                   name for name, (cli, out) in runs.items()}
        for future in as_completed(futures):
            name = futures[future]
            done[name] = future.result()
            bar.update(1)
            bar.write(f"{name}: test BLEU {done[name]['test_bleu']}")
    return done


def paired(a, b, rounds=10000, seed=0):
    """a - b over seeds (paired): the mean, a 95% percentile bootstrap interval of the mean (seeds resampled
    with replacement), and the number of seeds where a is higher / lower."""
    d = [x - y for x, y in zip(a, b)]
    rng = random.Random(seed)
    means = sorted(statistics.mean(rng.choices(d, k=len(d))) for _ in range(rounds))
    return {"mean": statistics.mean(d), "ci95": [means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]],
            "higher": sum(x > 0 for x in d), "lower": sum(x < 0 for x in d), "differences": d}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--pairs", type=int, nargs="+", default=[50, 200, 1000], help="stage 2's parallel pairs")
    p.add_argument("--steps", type=int, default=200, help="stage 2's optimizer steps, at every size")
    p.add_argument("--evals", type=int, default=4, help="stage 2's validations, evenly spaced: each run keeps "
                                                        "its checkpoint best on val, as train.py does")
    p.add_argument("--stage1_steps", type=int, default=250, help="stage 1's optimizer steps")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, metavar="ARM",
                   help=f"the arms to run (default: all four: {', '.join(ARMS)})")
    p.add_argument("--stage1_extra", default="", help='further train.py flags for stage 1, for an ablation '
                                                      '(one string: --stage1_extra="--lr 1e-4")')
    p.add_argument("--stage2_extra", default="", help="further train.py flags for stage 2 (the same way)")
    p.add_argument("--stage0", default=None, help="an existing stage 0 run folder to start from (default: "
                                                   "OUT/stage0, made first)")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                   help="training runs at a time, each on cpu_count / jobs threads (default: the CPU cores, "
                        "at most 8)")
    p.add_argument("--out", default="runs/experiment")
    a = p.parse_args(argv)
    out = Path(a.out)
    if not 1 <= a.evals <= a.steps:
        raise SystemExit(f"error: --evals {a.evals}: expected 1 to --steps ({a.steps}) validations")
    settings = {"steps": a.steps, "evals": a.evals, "stage1_steps": a.stage1_steps,
                "stage1_extra": a.stage1_extra, "stage2_extra": a.stage2_extra}
    saved = out / "settings.json"  # continuing in OUT: only with the settings its runs were made with
    if saved.is_file() and json.loads(saved.read_text()) != settings:
        raise SystemExit(f"error: {out} holds runs made with {json.loads(saved.read_text())}, not "
                         f"{settings}: give another --out, or the same settings to continue them")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(settings))
    t0 = time.time()
    results = run_experiment(a, out, settings)
    results["minutes"] = round((time.time() - t0) / 60, 1)
    report(a, results)
    (out / "results.json").write_text(json.dumps(results, indent=2))


def run_experiment(a, out, settings):
    """The pretrained models once (all threads); then each seed's stage 1 runs, then every stage 2 run. Returns
    the results: every run's test BLEU."""
    print(f"stage 0 into {out / 'stage0'}", flush=True)
    stage0 = Path(a.stage0) if a.stage0 else out / "stage0"
    s0 = train("--stage", 0, "--out", stage0, out=stage0)
    weights = stage0 / "last"
    results = {"settings": settings, "seeds": a.seeds, "pairs": a.pairs, "stage0": s0, "bleu": {}}
    for seed in a.seeds:
        (out / f"seed{seed}").mkdir(exist_ok=True)
    stage1 = {f"seed {seed}, stage 1 ({lang})": (["--stage", 1, "--caption_lang", lang, "--weights", weights,
                                                   "--seed", seed, "--max_steps", a.stage1_steps,
                                                   "--out", out / f"seed{seed}" / f"stage1_{lang}",
                                                   *shlex.split(a.stage1_extra)],
                                                  out / f"seed{seed}" / f"stage1_{lang}")
              for seed in a.seeds for lang in ("en", "de") if f"stage 1 ({lang}) + 2" in a.arms}
    results["stage1"] = {name: r["test_bleu"] for name, r in run_all(stage1, a.jobs, "stage 1 runs").items()}
    stage2 = {}
    for seed, pairs, arm in itertools.product(a.seeds, a.pairs, a.arms):
        d = out / f"seed{seed}"
        start = {"text-only": ["--prefix_len", 0, "--weights", weights],
                 "stage 2 only": ["--from_scratch_stage2", "--weights", weights],
                 "stage 1 (en) + 2": ["--init", d / "stage1_en" / "last"],
                 "stage 1 (de) + 2": ["--init", d / "stage1_de" / "last"]}[arm]
        o = d / f"{pairs}_{arm.replace(' ', '').replace('(', '_').replace(')', '')}"
        stage2[(arm, pairs, seed)] = (["--stage", 2, *start, "--seed", seed, "--n_pairs", pairs,
                                       "--max_steps", a.steps, "--eval_every", a.steps // a.evals, "--out", o,
                                       *shlex.split(a.stage2_extra)], o)
    named = {f"seed {seed}, {pairs} pairs, {arm}": run for (arm, pairs, seed), run in stage2.items()}
    done = run_all(named, a.jobs, "stage 2 runs")
    for (arm, pairs, seed), name in zip(stage2, named):
        results["bleu"].setdefault(arm, {}).setdefault(str(pairs), {})[str(seed)] = done[name]["test_bleu"]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def report(a, results):
    """The table, mean ± std over seeds; then every pair of arms, paired by seed (into results["paired"])."""
    def scores(arm, pairs):
        return [results["bleu"][arm][str(pairs)][str(s)] for s in a.seeds]
    std = statistics.stdev if len(a.seeds) > 1 else (lambda xs: 0.0)
    print(f"\ntest BLEU, tiny world en -> de (held-out colour-shape pairs), mean ± std over seeds "
          f"{a.seeds}; stage 2: {a.steps} steps; stage 1: {a.stage1_steps} steps ({results['minutes']:.0f} min)")
    print(f"{'':18s}" + "".join(f"{f'{n} pairs':>18s}" for n in a.pairs))
    for arm in a.arms:
        cells = [f"{statistics.mean(scores(arm, n)):.1f} ± {std(scores(arm, n)):.1f}" for n in a.pairs]
        print(f"{arm:18s}" + "".join(f"{c:>18s}" for c in cells))
    print("\npaired differences, first arm minus second: mean [95% bootstrap interval over seeds] (seeds "
          "higher/lower)")
    results["paired"] = {}
    for x, y in itertools.combinations(a.arms, 2):
        row = []
        for n in a.pairs:
            r = paired(scores(y, n), scores(x, n))
            results["paired"][f"{y} - {x}, {n} pairs"] = r
            low, high = r["ci95"]
            row.append(f"{r['mean']:+.1f} [{low:+.1f}, {high:+.1f}] ({r['higher']}/{r['lower']})")
        print(f"{y + ' - ' + x:38s}" + "  ".join(f"{c:>26s}" for c in row))


if __name__ == "__main__":
    main()
