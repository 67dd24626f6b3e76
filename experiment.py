"""
The paper's comparisons, in miniature: does the prefix from M-CLIP help translation, and does captioning first
(stage 1) help more, when parallel data is scarce? Prints the test BLEU over seeds and the arms' differences
paired by seed, with 95% bootstrap intervals, into OUT/results.json too; run again with the same arguments, it
continues where it stopped. The results: EXPERIMENTS.md.

    python experiment.py                                  # 5 seeds x 3 data sizes x 4 arms (about an hour)
    python experiment.py --seeds 1 2 3 --pairs 50 200     # a smaller one

Each arm is trained on the first `--pairs` sentence pairs of the tiny world (en -> de), from one stage 0 and each
seed's own stage 1 runs, and scored on its test split (held-out colour-shape pairs) from the source sentence
alone. An arm is a row of ARMS: its stage 1 run (or none) and its stage 2 flags (text-only: `--prefix_len 0`,
the paper's baseline; stage 2 only: `--from_scratch_stage2`; stage 1 (en) + 2: captioning in the source first).
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

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import tiny_world
import weights
from folders import find_checkpoint

MAPPINGS = [(kind, P) for kind in ("mlp", "hidden_mlp", "transformer") for P in (1, 10) if (kind, P) != ("mlp", 10)]
STAGE1 = {"en": ["--caption_lang", "en"], "de": ["--caption_lang", "de"],
          "text_recon": ["--task", "text_recon", "--caption_lang", "en"],
          **{f"{kind}{P}": ["--caption_lang", "en", "--mapping", kind, "--prefix_len", P] for kind, P in MAPPINGS}}
# An arm: a stage 1 run (a key of STAGE1, shared by the arms that name it; None: none) and its stage 2 flags.
ARMS = {"text-only": (None, ["--prefix_len", 0]),
        "stage 2 only": (None, ["--from_scratch_stage2"]),
        "stage 1 (en) + 2": ("en", []),
        "stage 1 (de) + 2": ("de", []),
        "text_recon + 2": ("text_recon", []),
        "triplet": (None, ["--task", "triplet", "--from_scratch_stage2"]),
        "stage 1 (en) + triplet": ("en", ["--task", "triplet"]),
        "stage 1 (en) + 2, unfreeze_clip": ("en", ["--unfreeze_clip"]),
        "stage 1 (en) + 2, noise_train": ("en", ["--noise_train", "--mask_prob", 0.5]),  # half the source dropped
        "text-only, noise_train": (None, ["--prefix_len", 0, "--noise_train", "--mask_prob", 0.5]),
        **{f"{kind} x{P}": (f"{kind}{P}", []) for kind, P in MAPPINGS}}  # (mlp x10 is stage 1 (en) + 2)
DEFAULT_ARMS = ("text-only", "stage 2 only", "stage 1 (en) + 2", "stage 1 (de) + 2")


def train(*args, out=None, log=None, threads=None):
    """Run train.py (its stderr into the file `log`, on `threads` intra-op threads) and return the JSON line it
    ends with; a run into `out` that finished is read back from its summary.json, an interrupted one resumed."""
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
    """{name: (train.py arguments, out folder)} -> {name: summary}: `jobs` at a time, cpu_count / jobs threads each."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    done = {}
    with ThreadPoolExecutor(jobs) as pool, tqdm(total=len(runs), desc=desc) as bar:
        futures = {pool.submit(train, *cli, out=out, log=out.with_name(out.name + ".log"), threads=threads):
                   name for name, (cli, out) in runs.items()}
        for future in as_completed(futures):
            name = futures[future]
            done[name] = future.result()
            bar.update(1)
            bar.write(f"{name}: test BLEU {done[name].get('test_bleu', done[name].get('bleu'))}")
    return done


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--pairs", type=int, nargs="+", default=[50, 200, 1000], help="stage 2's parallel pairs")
    p.add_argument("--steps", type=int, default=200, help="stage 2's optimizer steps, at every size")
    p.add_argument("--evals", type=int, default=4, help="stage 2's validations, evenly spaced: each run keeps "
                                                        "its checkpoint best on val, as train.py does")
    p.add_argument("--stage1_steps", type=int, default=250, help="stage 1's optimizer steps")
    p.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=ARMS, metavar="ARM",
                   help=f"the arms to run, of {', '.join(ARMS)} (default: {', '.join(DEFAULT_ARMS)})")
    p.add_argument("--stage1_extra", default="", help='further train.py flags for stage 1, for an ablation '
                                                      '(one string: --stage1_extra="--lr 1e-4")')
    p.add_argument("--stage2_extra", default="", help="further train.py flags for stage 2 (the same way)")
    p.add_argument("--rescore", nargs="+", default=[], metavar="FLAGS",
                   help="sets of train.py flags (one string each) to score every stage 2 run's kept checkpoint "
                        "with once more (--eval_only), ablations at test time: --rescore=\"--prompt official\"")
    p.add_argument("--stage0", help="an existing stage 0 run folder to start from (default: OUT/stage0, made first)")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                   help="training runs at a time, each on cpu_count / jobs threads (default: the CPU cores, at most 8)")
    p.add_argument("--out", default="runs/experiment")
    a = p.parse_args(argv)
    if not 1 <= a.evals <= a.steps:
        raise SystemExit(f"error: --evals {a.evals}: expected 1 to --steps ({a.steps}) validations")
    return a


def main(argv=None):
    a = parse_args(argv)
    out = Path(a.out)
    settings = {k: getattr(a, k) for k in ("steps", "evals", "stage1_steps", "stage1_extra", "stage2_extra")}
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
    plot_bleu(results, out)
    plot_world(tiny_world.default_path(), out / "tiny_world.png")  # the world every run here trained on
    print(f"figures: {', '.join(str(p) for p in sorted(out.glob('*.png')))}")


def run_experiment(a, out, settings):
    """Stage 0 once (on all threads), each seed's stage 1 runs, every stage 2 run: the results, every test BLEU."""
    print(f"stage 0 into {out / 'stage0'}", flush=True)
    stage0 = Path(a.stage0) if a.stage0 else out / "stage0"
    s0 = train("--stage", 0, "--out", stage0, out=stage0)
    weights = stage0 / "last"
    results = {"settings": settings, "seeds": a.seeds, "pairs": a.pairs, "stage0": s0, "bleu": {}, "rescored": {}}
    for seed in a.seeds:
        (out / f"seed{seed}").mkdir(exist_ok=True)
    firsts = dict.fromkeys(ARMS[arm][0] for arm in a.arms if ARMS[arm][0])  # the stage 1 runs the arms need
    stage1 = {}
    for seed, key in itertools.product(a.seeds, firsts):
        o = out / f"seed{seed}" / f"stage1_{key}"
        stage1[f"seed {seed}, stage 1 ({key})"] = (["--stage", 1, *STAGE1[key], "--weights", weights, "--seed", seed,
                                                    "--max_steps", a.stage1_steps, "--out", o,
                                                    *shlex.split(a.stage1_extra)], o)
    results["stage1"] = {name: r["test_bleu"] for name, r in run_all(stage1, a.jobs, "stage 1 runs").items()}
    stage2 = {}
    for seed, pairs, arm in itertools.product(a.seeds, a.pairs, a.arms):
        d, (first, flags) = out / f"seed{seed}", ARMS[arm]
        start = ["--init", d / f"stage1_{first}" / "last"] if first else ["--weights", weights]
        o = d / f"{pairs}_{arm.replace(' ', '').replace('(', '_').replace(')', '').replace(',', '_')}"
        stage2[(arm, pairs, seed)] = (["--stage", 2, *start, *flags, "--seed", seed, "--n_pairs", pairs,
                                       "--max_steps", a.steps, "--eval_every", a.steps // a.evals, "--out", o,
                                       *shlex.split(a.stage2_extra)], o)
    named = {f"seed {seed}, {pairs} pairs, {arm}": run for (arm, pairs, seed), run in stage2.items()}
    done = run_all(named, a.jobs, "stage 2 runs")
    for (arm, pairs, seed), name in zip(stage2, named):
        results["bleu"].setdefault(arm, {}).setdefault(str(pairs), {})[str(seed)] = done[name]["test_bleu"]
    for i, flags in enumerate(a.rescore):  # each kept checkpoint scored again, on the same test split
        runs = {key: (["--stage", 2, "--eval_only", "--checkpoint", o / "best", "--out", o / f"rescore{i}",
                       *shlex.split(flags)], o / f"rescore{i}") for key, (cli, o) in stage2.items()
                if not ("--test_prefix" in flags and "--prefix_len" in cli)}  # (text-only: no prefix)
        names = {key: f"seed {key[2]}, {key[1]} pairs, {key[0]}, {flags}" for key in runs}
        done = run_all({names[key]: run for key, run in runs.items()}, a.jobs, f"rescoring with {flags}")
        for (arm, pairs, seed), name in names.items():
            results["rescored"].setdefault(flags, {}).setdefault(arm, {}).setdefault(str(pairs), {})[str(seed)] = \
                done[name]["bleu"]
    if "stage 1 (en) + 2" in a.arms:  # the shared space: stage 0's towers, then each seed's stage 1 and stage 2
        world, space = tiny_world.default_path(), {}
        space["stage 0"] = shared_space(stage0 / "last", world)
        for seed in a.seeds:
            space[f"stage 1, seed {seed}"] = shared_space(out / f"seed{seed}" / "stage1_en" / "last", world)
            for pairs in a.pairs:
                best = find_checkpoint(stage2[("stage 1 (en) + 2", pairs, seed)][1] / "best")
                space[f"stage 2 ({pairs} pairs), seed {seed}"] = shared_space(best, world)
        results["shared_space"] = space
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def paired(a, b, rounds=10000, seed=0):
    """a - b over seeds (paired): the mean, its 95% bootstrap interval, the seeds where a is higher / lower."""
    d = [x - y for x, y in zip(a, b)]
    return {"mean": statistics.mean(d), "ci95": list(interval(d, rounds, seed)),
            "higher": sum(x > 0 for x in d), "lower": sum(x < 0 for x in d), "differences": d}


def interval(scores, rounds=10000, seed=0):
    """A 95% percentile bootstrap interval of the mean of `scores` (resampled with replacement)."""
    rng = random.Random(seed)
    means = sorted(statistics.mean(rng.choices(scores, k=len(scores))) for _ in range(rounds))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def report(a, results):
    """The table, mean ± std over seeds; then every pair of arms, paired by seed (into results["paired"])."""
    def scores(arm, pairs):
        return [results["bleu"][arm][str(pairs)][str(s)] for s in a.seeds]
    def row(label, width, cells, cell_width, sep="  "):
        print(f"{label:{width}s}" + sep.join(f"{c:>{cell_width}s}" for c in cells))
    def difference(x, y, key):  # x - y, paired by seed: into results["paired"], and as a cell of the table
        r = results["paired"][key] = paired(x, y)
        return f"{r['mean']:+.1f} [{r['ci95'][0]:+.1f}, {r['ci95'][1]:+.1f}] ({r['higher']}/{r['lower']})"
    std = statistics.stdev if len(a.seeds) > 1 else (lambda xs: 0.0)
    print(f"\ntest BLEU, tiny world en -> de (held-out colour-shape pairs), mean ± std over seeds "
          f"{a.seeds}; stage 2: {a.steps} steps; stage 1: {a.stage1_steps} steps ({results['minutes']:.0f} min)")
    row("", 18, [f"{n} pairs" for n in a.pairs], 18, "")
    for arm in a.arms:
        row(arm, 18, [f"{statistics.mean(scores(arm, n)):.1f} ± {std(scores(arm, n)):.1f}" for n in a.pairs], 18, "")
    print("\npaired differences, first arm minus second: mean [95% bootstrap interval over seeds] (seeds higher/lower)")
    results["paired"] = {}
    for x, y in itertools.combinations(a.arms, 2):
        row(f"{y} - {x}", 38, [difference(scores(y, n), scores(x, n), f"{y} - {x}, {n} pairs") for n in a.pairs], 26)
    for flags, arms in results["rescored"].items():  # --rescore: the same checkpoints, scored another way
        print(f"\nrescored with {flags}: test BLEU, and minus as trained (paired)")
        for arm, by_size in arms.items():
            again = {n: [by_size[str(n)][str(s)] for s in a.seeds] for n in a.pairs}
            row(arm, 38, [f"{statistics.mean(again[n]):.1f}, " + difference(
                again[n], scores(arm, n), f"{arm}, {flags} - as trained, {n} pairs") for n in a.pairs], 32)
    if results.get("shared_space"):
        print("\nthe shared space, test split: mean cosine of an image and its caption / of unmatched pairs "
              "(mean over seeds)")
        for stage in ["stage 0", "stage 1"] + [f"stage 2 ({n} pairs)" for n in a.pairs]:
            rows = [v for k, v in results["shared_space"].items() if k == stage or k.startswith(stage + ",")]
            cells = [f"{part} {statistics.mean(r[part][0] for r in rows):.3f} / "
                     f"{statistics.mean(r[part][1] for r in rows):.3f}" for part in ("towers", "prefix")
                     if part in rows[0]]
            row("  " + stage, 24, cells, 0, "   ")


@torch.no_grad()
def shared_space(folder, world, split="test", lang="en"):
    """Does the shared space stay shared, as the paper assumes (stage 1 trains on image embeddings, stage 2 and
    the test read text embeddings in their place)? For the checkpoint `folder`, on a split of the tiny world: the
    mean cosine of an image's and its caption's embeddings, and of unmatched pairs', from the towers and from the
    mapping network, when it has one (its prefixes flattened, (P d)). {"towers": (matched, unmatched), "prefix": ...}"""
    model = weights.load(folder)
    s = data.read_split(world, split, [lang], Path(world) / "images")
    images = data.embed_images(model.encode_image, s.images, model.config.vision.image_size, 64, "cpu")
    tok = data.TextTowerTokenizer(Path(folder) / weights.TEXT_TOKENIZER)
    texts = data.embed_texts(model.encode_text, tok, s.sentences[lang], 64, "cpu", model.text.max_tokens)
    out = {"towers": cosines(images, texts)}
    if model.config.mapping.prefix_len:
        out["prefix"] = cosines(model.mapping(images).flatten(1), model.mapping(texts).flatten(1))
    return out


def cosines(a, b):
    """(mean cosine of the matched rows of a and b, mean over the unmatched pairs): a, b (N, D)."""
    sim = F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T  # (N, N)
    n = len(sim)
    return round(sim.diag().mean().item(), 4), round(((sim.sum() - sim.diag().sum()) / (n * n - n)).item(), 4)


@contextlib.contextmanager
def figure(path, *args, **kw):
    """plt.subplots(*args, **kw)'s axes, saved to `path` when the block ends (only figures import matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(*args, **kw)
    yield axes
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bleu(results, out):
    """The mean test BLEU over seeds with its 95% bootstrap band: against the stage 2 pairs, an arm a line
    (bleu_by_size.png); given --rescore sets "--noise_test --mask_prob p [--test_prefix text]", against the share of
    source tokens dropped at the largest size, per arm and prefix (image, text, none) (bleu_by_noise.png)."""
    seeds, n = len(results["seeds"]), str(max(results["pairs"]))
    by_size = {arm: {m: list(runs[str(m)].values()) for m in results["pairs"]} for arm, runs in results["bleu"].items()}
    figures = {"bleu_by_size.png": (by_size, "parallel sentence pairs in stage 2", f"tiny world, {seeds} seeds")}
    by_noise = {}
    for flags, arms in results.get("rescored", {}).items():
        words = flags.split()
        if "--noise_test" not in words or "--mask_prob" not in words:
            continue
        p = float(words[words.index("--mask_prob") + 1])
        prefix = words[words.index("--test_prefix") + 1] if "--test_prefix" in words else "image"
        for arm, runs in arms.items():
            source = "none" if arm.startswith("text-only") else prefix
            by_noise.setdefault(f"{arm}; prefix: {source}", {})[p] = list(runs[n].values())
    if by_noise:
        figures["bleu_by_noise.png"] = (by_noise, "share of the source's tokens dropped at test time (--mask_prob)",
                                        f"tiny world, {n} pairs, {seeds} seeds")
    for name, (lines, x_label, title) in figures.items():
        with figure(out / name, figsize=(6.4, 4.2)) as ax:
            for label, by_x in lines.items():  # {label: {x: [scores over seeds]}}
                xs = sorted(by_x)
                band = [interval(by_x[x]) for x in xs]
                line, = ax.plot(xs, [statistics.mean(by_x[x]) for x in xs], marker="o", label=label)
                ax.fill_between(xs, [b[0] for b in band], [b[1] for b in band], color=line.get_color(), alpha=0.15)
            if lines is by_size:
                ax.set_xscale("log")
                ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_xlabel(x_label)
            ax.set_ylabel("test BLEU (en -> de)")
            ax.set_title(f"{title}: the mean, and its 95% bootstrap band", fontsize=10)
            ax.legend(fontsize=7)


def plot_world(world, path, n=4):
    """A few scenes of the tiny world's test split, each with its descriptions in English, German and French."""
    from PIL import Image
    names = (world / "image_splits" / "test.txt").read_text().splitlines()[:n]
    text = {lang: (world / "raw" / f"test.{lang}").read_text("utf-8").splitlines()[:n] for lang in tiny_world.LANGS}
    with figure(path, n, 2, figsize=(9, 1.6 * n), gridspec_kw={"width_ratios": [1, 4.5]}) as axes:
        for i, name in enumerate(names):
            axes[i, 0].imshow(Image.open(world / "images" / name), interpolation="nearest")
            axes[i, 1].text(0, 0.5, "\n".join(f"{lang}: {text[lang][i]}" for lang in text), va="center", fontsize=9)
            for ax in axes[i]:
                ax.axis("off")


if __name__ == "__main__":
    main()
