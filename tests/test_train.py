"""Tests of train.py: overfitting, the stage 1 -> stage 2 handoff, what trains in each stage, exact resume,
2-process DDP, the default commands end to end, bad input, and scoring a checkpoint; and of translate.py and
experiment.py, which use its checkpoints and runs.

Everything runs on a CPU, in tmp folders only: a small tiny world (256 training scenes, 32-pixel images), a
stage 0 of a few seconds on it, and stage 1 / stage 2 runs of a few steps from there. Runs whose exit code,
stderr, SIGKILL or torchrun matter are subprocesses (`python train.py ...` in the repository root); the
rest call `train.main([...])` in this process, which is faster.

Every process here uses one intra-op thread: the tiny models gain nothing from more, a CPU shared with
another job makes two threads spin-wait (measured 20x slower), and the same thread count everywhere keeps
the runs we compare bit for bit reproducible.
"""

import dataclasses
import gc
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import experiment
import runs as runs_module
import settings
import folders
import official
import their_code  # tests/their_code.py: the official code's files, re-typed
import stage0 as stage0_module
import tiny_world
import train
import translate
import weights
from cliptrans import CLIPTrans, CLIPTransConfig, MappingConfig
from conftest import ROOT
from runs import read_state
from bench.disk import folder_size  # bench/disk.py, its only user

# Small evaluation settings for every run that does not test the defaults: greedy, short, 8 sentences.
FAST = ["--beam", "1", "--max_new_tokens", "20", "--max_eval", "8", "--log_every", "1"]


# ----------------------------------------------------------------------------- helpers


def args(*items):
    return [str(a) for a in items]


def run_train(*cli, cache, timeout=300, launcher=("train.py",)):
    """`python train.py ...` (or another launcher, e.g. torchrun) in the repo root; returns CompletedProcess."""
    return subprocess.run([sys.executable, *launcher, *args(*cli)], cwd=ROOT, env=subprocess_env(cache),
                          capture_output=True, text=True, timeout=timeout)


def subprocess_env(cache):
    # CLIPTRANS_CACHE: never the user's ~/.cache/cliptrans, even for a run that forgets --data
    return dict(os.environ, OMP_NUM_THREADS="1", CLIPTRANS_CACHE=str(cache), PYTHONUNBUFFERED="1")


def records(out):
    """The complete records of OUT/metrics.jsonl, in order (a line still being written is left out)."""
    lines = (Path(out) / "metrics.jsonl").read_text().split("\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def step_losses(recs):
    """{step: loss} of the training-loss records (a step logged twice keeps its last value)."""
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def tensors(folder):
    """Every tensor of a checkpoint: its own file and the towers' file it shares."""
    return {**load_file(Path(folder) / weights.WEIGHTS_FILE), **load_file(Path(folder) / weights.TOWERS_FILE)}


def changed(before, after):
    """Names of the tensors that differ (anywhere) between two checkpoints of the same model."""
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def max_diff(a, b, keys=None):
    return max((a[k] - b[k]).abs().max().item() for k in (keys or a.keys()))


def snapshot(*folders):
    """sha256 of every file under the folders: to prove a failed run left them byte for byte intact."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for f in folders for p in sorted(Path(f).rglob("*")) if p.is_file()}


def summary_line(stdout):
    """The JSON summary train.py prints last."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON line in stdout:\n{stdout[-2000:]}"
    return json.loads(lines[-1])


def describe(proc):
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"


# ----------------------------------------------------------------------------- fixtures (module scope)


@pytest.fixture(scope="module", autouse=True)
def one_thread(tmp_path_factory):
    """One intra-op thread (see the module docstring) and a tmp CLIPTRANS_CACHE for in-process runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLIPTRANS_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("subprocess_cache")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # ~1 s; the frozen towers' features get cached in world/features by the runs
    return tiny_world.make_tiny_world(tmp_path_factory.mktemp("world"), n_train=256, n_val=24, n_test=24,
                                      seed=0, image_size=32)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def stage0(world, runs):
    """Stage 0 on the small world: steps = epochs * (n_train // batch) = 8 contrastive + 8 denoising steps."""
    train.main(args("--stage", 0, "--data", world, "--out", runs / "stage0", "--epochs", 1, "--batch_size", 32))
    return runs / "stage0" / "last"


@pytest.fixture(scope="module")
def stage1(world, runs, stage0):
    """A 4-step stage 1 run from stage 0; returns its --out folder."""
    out = runs / "stage1"
    train.main(args("--stage", 1, "--data", world, "--weights", stage0, "--out", out, "--max_steps", 4,
                    "--batch_size", 16, *FAST))
    return out


@pytest.fixture(scope="module")
def stage2(world, runs, stage1):
    """A 4-step stage 2 run from stage 1's `last`; returns its --out folder."""
    out = runs / "stage2"
    train.main(args("--stage", 2, "--data", world, "--init", stage1 / "last", "--out", out, "--max_steps", 4,
                    "--batch_size", 16, *FAST))
    return out


@pytest.fixture(scope="module")
def scrambled(world, tmp_path_factory):
    """A tiny CLIPTrans checkpoint whose output varies with its inputs: random, its Linear weights 20x their init
    scale. (Fresh from init, the tied-embedding mBART copies its input token, the language code, which decoding
    drops; and the few-step runs above write one line, empty or not, for every sentence alike.)"""
    cfg = CLIPTransConfig.preset("tiny")
    cfg.mbart.vocab_size = cfg.text.vocab_size = data.MBartTokenizer(world / "tokenizer.json").vocab_size
    torch.manual_seed(0)
    model = CLIPTrans(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(20)
    folder = tmp_path_factory.mktemp("scrambled") / "last"
    weights.save(model, folder, extra_config={"train": {"stage": 2, "src": "en", "tgt": "de", "caption_lang": "en"}})
    for name in (weights.MBART_TOKENIZER, weights.TEXT_TOKENIZER):
        shutil.copyfile(world / "tokenizer.json", folder / name)
    return folder


# ----------------------------------------------------------------------------- 1. overfitting one batch


def overfit(stage, steps=200):
    """Train a fresh tiny CLIPTrans (vocabulary 64, dropout off) on one fixed batch, freezing what train.py
    freezes in `stage`. Returns (model, its starting state dict, the losses, the batch)."""
    torch.manual_seed(0)
    cfg = CLIPTransConfig.preset("tiny")
    cfg.mbart.vocab_size = cfg.text.vocab_size = 64
    cfg.mbart.dropout = cfg.text.dropout = 0.0
    model = CLIPTrans(cfg)
    # The tied embedding is also the output layer, frozen in stage 1. At its fresh N(0, 0.02) it caps the
    # logits' scale, and stage 1 creeps down ~1e-3 per step (loss 1.1 after 300 steps, measured); a
    # pretrained mBART's embedding is larger. std 0.1 stands for that.
    torch.nn.init.normal_(model.mbart.shared.weight, std=0.1)
    B, lang = 8, 60
    clip = torch.randn(B, cfg.vision.embed_dim)
    targets = torch.randint(4, 60, (B, 12))  # `<lang> y1..y10 </s>`, some rows padded
    targets[:, 0] = lang
    for b in range(B):
        n = 6 + b % 6
        targets[b, n], targets[b, n + 1:] = cfg.mbart.eos_id, cfg.mbart.pad_id
    if stage == 1:  # "the encoder input is trivial": `<lang> </s>`, the same for every example
        ids = torch.tensor([[lang, cfg.mbart.eos_id]] * B)
    else:
        ids = torch.randint(4, 60, (B, 9))
        ids[:, 0], ids[:, -1] = 59, cfg.mbart.eos_id
    mask = torch.ones_like(ids)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    # as train.py: the mapping network trains in both stages; stage 1 the decoder, stage 2 all of mBART
    model.requires_grad_(False)
    model.mapping.requires_grad_(True)
    (model.mbart.decoder if stage == 1 else model.mbart).requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.98),
                            eps=1e-6, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(clip, ids, mask, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, start, losses, (clip, ids, mask, targets)


@pytest.mark.parametrize("stage", [1, 2])
def test_overfit_one_batch(stage):
    model, start, losses, (clip, ids, mask, targets) = overfit(stage)
    # measured after 200 steps: 12.68 -> 0.0026 (stage 1), 12.70 -> 0.0024 (stage 2); ln(64) = 4.2 is chance
    assert losses[0] > 4.0, losses[0]
    assert losses[-1] < 0.05, f"stage {stage}: loss {losses[0]:.3f} -> {losses[-1]:.4f} after {len(losses)} steps"
    if stage == 1:
        # the encoder input is the same for every row: only the prefix (the image embedding) tells the
        # captions apart, so the fit must break when the embeddings are shuffled
        model.eval()
        with torch.no_grad():
            shuffled = model(clip.roll(1, 0), ids, mask, targets).item()
        assert shuffled > 1.0, shuffled  # measured: 3.1
    moved = changed(start, model.state_dict())
    trains = ("mapping.", "mbart.decoder.") if stage == 1 else ("mapping.", "mbart.encoder.", "mbart.decoder.",
                                                                 "mbart.shared.")
    assert moved == {k for k in start if k.startswith(trains)}


# ----------------------------------------------------------------------------- 2-3. the handoff, what trains


def prefixed(keys, *prefixes):
    return {k for k in keys if k.startswith(prefixes)}


def test_stage1_trains_only_the_decoder_and_the_mapping_network(stage0, stage1):
    s0, s1 = tensors(stage0), tensors(stage1 / "last")
    moved = changed(s0, s1)
    # every tensor of the decoder and the mapping network moved in 4 steps; nothing else did: not the
    # encoder, not the shared embedding (= encoder input and output layer), not the buffer, not the towers
    assert moved == prefixed(s0, "mbart.decoder.", "mapping.")
    for key in ("mbart.shared.weight", "mbart.final_logits_bias"):
        assert key not in moved
    assert not prefixed(moved, "mbart.encoder.", "vision.", "text.")
    assert max_diff(s0, s1, prefixed(s0, "mapping.")) > 1e-4  # moved by real updates (lr 5e-4), not noise


def test_freeze_decoder_trains_the_mapping_network_alone(world, stage0, tmp_path):
    """--freeze_decoder, the stage 1 ablation: only the mapping network moves; refused outside stage 1."""
    out = tmp_path / "frozen"
    train.main(args("--stage", 1, "--data", world, "--weights", stage0, "--out", out, "--max_steps", 2,
                    "--batch_size", 16, "--freeze_decoder", *FAST))
    s0, s1 = tensors(stage0), tensors(out / "last")
    assert changed(s0, s1) == prefixed(s0, "mapping.")
    assert max_diff(s0, s1, prefixed(s0, "mapping.")) > 1e-4
    with pytest.raises(SystemExit, match="--freeze_decoder has no effect in stage 2: it is for stage 1"):
        train.main(args("--stage", 2, "--data", world, "--out", tmp_path / "s2", "--freeze_decoder"))


def test_stage2_trains_all_of_mbart_and_the_mapping_network(stage1, stage2):
    s1, s2 = tensors(stage1 / "last"), tensors(stage2 / "last")
    moved = changed(s1, s2)
    assert moved == prefixed(s1, "mbart.encoder.", "mbart.decoder.", "mbart.shared.", "mapping.")
    assert not prefixed(moved, "vision.", "text.")  # the towers are frozen: their features are cached
    assert "mbart.final_logits_bias" not in moved


def test_stage2_starts_from_the_stage1_checkpoint(world, stage0, stage1, tmp_path):
    s0, s1 = tensors(stage0), tensors(stage1 / "last")
    # Stage 1 froze the encoder: its `last` holds stage 0's encoder bit for bit, and a new decoder.
    encoder = prefixed(s0, "mbart.encoder.")
    assert all(torch.equal(s0[k], s1[k]) for k in encoder)
    assert max_diff(s0, s1, prefixed(s0, "mbart.decoder.", "mapping.")) > 1e-4
    # A stage 2 step at lr 1e-30 (no weight decay) changes no weight by more than 1e-30 (only weights at 0
    # move at all): its checkpoint is what it loaded, which must be stage 1's `last` (given as --init), not
    # stage 0's weights.
    out = tmp_path / "stage2"
    train.main(args("--stage", 2, "--data", world, "--init", stage1 / "last", "--out", out,
                    "--max_steps", 1, "--batch_size", 16, "--lr", 1e-30, *FAST))
    s2 = tensors(out / "last")
    assert max_diff(s1, s2) <= 1e-20
    assert max_diff(s0, s2, prefixed(s0, "mbart.decoder.", "mapping.")) > 1e-4
    saved = json.loads((out / "last" / weights.CONFIG_FILE).read_text())["train"]
    assert (saved["stage"], saved["init"]) == (2, str(stage1 / "last"))


def test_from_scratch_stage2_starts_from_the_weights(world, stage0, stage1, tmp_path):
    # the ablation: stage 2 from --weights (stage 0), ignoring the stage 1 checkpoint; the lr 1e-30 trick again
    out = tmp_path / "scratch"
    train.main(args("--stage", 2, "--data", world, "--weights", stage0, "--out", out, "--from_scratch_stage2", "--max_steps", 1, "--batch_size", 16, "--lr", 1e-30, *FAST))
    assert max_diff(tensors(stage0), tensors(out / "last")) <= 1e-20  # 1e-30 where a weight was 0


def test_text_only_baseline_trains_mbart_alone(world, stage0, tmp_path, capsys, monkeypatch):
    """--prefix_len 0: stage 2 from --weights with no mapping network and no M-CLIP features; it trains all of
    mBART, leaves the towers, and scores with `</s> <lang>` as its only decoder prompt."""
    out = tmp_path / "text_only"
    monkeypatch.setattr(runs_module, "features", lambda *a: pytest.fail("the baseline computes no M-CLIP features"))
    train.main(args("--stage", 2, "--data", world, "--weights", stage0, "--prefix_len", 0, "--out", out,
                    "--max_steps", 4, "--batch_size", 16, *FAST))
    s0, s2 = tensors(stage0), tensors(out / "best")
    assert not prefixed(s2, "mapping."), "no mapping network is saved"
    assert changed({k: s0[k] for k in s2}, s2) == prefixed(s2, "mbart.") - {"mbart.final_logits_bias"}
    assert json.loads((out / "best" / weights.CONFIG_FILE).read_text())["cliptrans"]["mapping"]["prefix_len"] == 0
    summary = json.loads((out / "summary.json").read_text())
    hyps = (out / "hyps" / "test.final.txt").read_text().splitlines()
    assert summary["test_bleu"] == eval_only(capsys, "--stage", 2, "--data", world, "--out", out)["bleu"]
    assert len(hyps) == 8


def test_skip_missing_images_drops_their_examples_and_logs_them(world, stage0, tmp_path, capsys):
    """Stage 1 on images with some missing: an error by default; with --skip_missing_images their examples are
    dropped, counted and named on stdout and in metrics.jsonl."""
    images = tmp_path / "images"
    shutil.copytree(world / "images", images)
    for name in ("train_00003.png", "train_00100.png", "val_00002.png"):
        (images / name).unlink()
    common = ["--stage", 1, "--data", world, "--images", images, "--weights", stage0, "--max_steps", 1,
              "--batch_size", 16, "--features", tmp_path / "features", *FAST]
    with pytest.raises(SystemExit, match="2 of 256 images are missing .*train_00003.png, train_00100.png"):
        train.main(args(*common, "--out", tmp_path / "strict"))
    capsys.readouterr()
    train.main(args(*common, "--out", tmp_path / "skip", "--skip_missing_images"))
    out = capsys.readouterr().out
    assert "train: 2 example(s) dropped, their image missing (--skip_missing_images): train_00003.png, " \
           "train_00100.png" in out and "254 examples" in out
    logged = [r for r in records(tmp_path / "skip") if "missing_images" in r]
    assert logged == [{"split": "train", "missing_images": 2, "first_missing": ["train_00003.png", "train_00100.png"]},
                      {"split": "val", "missing_images": 1, "first_missing": ["val_00002.png"]}]


def test_stage2_changes_the_encoder_that_stage1_froze(stage0, stage2):
    s0, s2 = tensors(stage0), tensors(stage2 / "last")
    assert max_diff(s0, s2, prefixed(s0, "mbart.encoder.")) > 1e-4


# ----------------------------------------------------------------------------- 4. resume


RESUME = ["--max_steps", 12, "--save_every", 4, "--batch_size", 8, "--eval_every", 1000, *FAST]


def resume_args(world, stage1, out, *extra):
    """Stage 2 from stage 1, dropout at the model's 0.1: a resume must restore the RNG states exactly."""
    return args("--stage", 2, "--data", world, "--init", stage1 / "last", "--out", out, *RESUME, *extra)


@pytest.fixture(scope="module")
def uninterrupted(world, stage1, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    train.main(resume_args(world, stage1, out))
    return out


@pytest.fixture(scope="module")
def killed_and_resumed(world, stage1, cache, tmp_path_factory):
    """A run killed with SIGKILL after >= 6 logged steps, then resumed with --resume to step 12.

    The killed run has --max_steps 1000 so that it is always still running when we kill it (the schedule is
    constant: max_steps changes nothing else). Returns a dict: out, killed_at (the last step logged before
    the kill), resumed_from (the checkpoint's step), before / after (the records written before the kill /
    by the resumed run)."""
    out = tmp_path_factory.mktemp("killed") / "run"
    cli = resume_args(world, stage1, out) + ["--max_steps", "1000"]  # argparse: the last one wins
    proc = subprocess.Popen([sys.executable, "train.py", *cli], cwd=ROOT, env=subprocess_env(cache),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").exists() and len(step_losses(records(out))) >= 6:
                break
            time.sleep(0.005)
        else:
            pytest.fail(f"the run to kill ended (exit {proc.returncode}) or logged < 6 steps in 120 s")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = records(out)
    resumed = run_train(*resume_args(world, stage1, out, "--resume"), cache=cache)
    assert resumed.returncode == 0, describe(resumed)
    line = next(s for s in resumed.stdout.splitlines() if s.startswith("resuming"))
    resumed_from = int(line.split(" at step ")[1].split()[0])
    return dict(out=out, killed_at=max(step_losses(before)), resumed_from=resumed_from, before=before,
                after=[r for r in records(out) if r.get("step", 0) > resumed_from])  # the file keeps steps <= it


def test_resume_after_sigkill_equals_an_uninterrupted_run(uninterrupted, killed_and_resumed):
    run = killed_and_resumed
    out, killed_at, resumed_from = run["out"], run["killed_at"], run["resumed_from"]
    want = step_losses(records(uninterrupted))
    assert sorted(want) == list(range(1, 13))
    # `last` is written every 4 steps: the kill (at step >= 6) left step 4 or 8 (or 12 if it came very late)
    assert resumed_from in (4, 8) and resumed_from <= killed_at, (resumed_from, killed_at)
    got = step_losses(run["after"])
    assert sorted(got) == list(range(resumed_from + 1, 13))
    for step in got:  # same batches, same dropout masks, same optimizer state: the same numbers
        assert got[step] == pytest.approx(want[step], abs=1e-6, rel=0), step
    # the steps logged before the kill were the same run too
    before = step_losses(run["before"])
    assert sorted(before) == list(range(1, killed_at + 1))
    assert all(before[s] == pytest.approx(want[s], abs=1e-6, rel=0) for s in before)
    # and the end state: the same weights, a loadable checkpoint at step 12
    assert max_diff(tensors(uninterrupted / "last"), tensors(out / "last")) <= 1e-6
    state = torch.load(out / "last" / "state.pt", weights_only=True)
    assert (state["step"], state["config"]["stage"]) == (12, 2)
    model = weights.load(out / "last")
    assert model.config.mbart.dropout == 0.1  # dropout was on: the RNG states had to be restored


def test_resumed_metrics_log_each_step_once(killed_and_resumed):
    """metrics.jsonl of a resumed run reads like the uninterrupted run's: one record per step, 1..12.
    (The steps between the checkpoint and the kill were logged before the kill and run again after it.)"""
    out, killed_at, resumed_from = (killed_and_resumed[k] for k in ("out", "killed_at", "resumed_from"))
    steps = [r["step"] for r in records(out) if "loss" in r]
    twice = sorted({s for s in steps if steps.count(s) > 1})
    assert not twice, f"steps {twice} logged twice (checkpoint at {resumed_from}, killed at {killed_at})"
    assert steps == list(range(1, 13))


def test_resume_after_max_steps_equals_an_uninterrupted_run(world, stage1, uninterrupted, tmp_path):
    # 6 steps, then --resume to 12, in this process: the same batches and losses as 12 steps in one go,
    # although the first run ended with an evaluation and a checkpoint at step 6 (eval draws no randomness)
    out = tmp_path / "run"
    train.main(resume_args(world, stage1, out, "--max_steps", 6))
    train.main(resume_args(world, stage1, out, "--resume"))
    want, got = step_losses(records(uninterrupted)), step_losses(records(out))
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step] == pytest.approx(want[step], abs=1e-6, rel=0), step
    assert max_diff(tensors(uninterrupted / "last"), tensors(out / "last")) <= 1e-6


def test_resume_drops_a_record_cut_short_by_the_interruption(world, stage1, uninterrupted, tmp_path, capsys):
    """A run killed while writing metrics.jsonl leaves half a line: --resume says so, drops it, and goes on."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "epo')
    lines = len((out / "metrics.jsonl").read_text().splitlines())
    train.main(resume_args(world, stage1, out, "--resume", "--max_steps", 13))
    assert f"line {lines} is not a complete record" in capsys.readouterr().out
    assert sorted(step_losses(records(out))) == list(range(1, 14))


def test_resume_into_a_new_folder_keeps_its_own_best(world, stage1, uninterrupted, tmp_path, monkeypatch):
    """--resume --checkpoint A/last --out B: B gets its own `best`, and the summary scores it (the best BLEU of
    A is not B's to beat). The last step is logged even when --log_every does not divide it. tokens/s counts the
    target tokens of the steps this run trained (two batches here), over the time it trained."""
    out = tmp_path / "continued"
    counted = {}
    real_train = train.train

    def spy(c, run, *rest):  # the tokens train() counts, and its time without the pauses (checkpoints, BLEU)
        tokens, elapsed = real_train(c, run, *rest)
        counted.update(tokens=tokens, seconds=elapsed - run.pause_s)
        return tokens, elapsed

    monkeypatch.setattr(train, "train", spy)
    train.main(resume_args(world, stage1, out, "--resume", "--checkpoint", uninterrupted / "last",
                           "--max_steps", 14, "--log_every", 5))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 14 and summary["checkpoint"] == str(out / "best")
    assert (out / "best" / weights.WEIGHTS_FILE).exists() and (out / "last" / weights.WEIGHTS_FILE).exists()
    assert sorted(step_losses(records(out))) == [14]  # 13 is not a multiple of 5; 14 is the last step
    # steps 13 and 14 train the batches from the checkpoint's position in the data: their target tokens, counted
    # from the sampler train.py uses
    from runs import read_state  # (`runs` is a fixture here)
    state = read_state(uninterrupted / "last")
    assert (state["step"], state["epoch"]) == (12, 0)
    tok = data.MBartTokenizer(stage1 / "last" / weights.MBART_TOKENIZER)
    lengths = [int(n) for n in tok.encode(data.read_split(world, "train", ["de"]).sentences["de"], "de")[1].sum(1)]
    sampler = data.LengthBucketSampler(lengths, 8, seed=settings.Config().seed, bucket_size=100 * 8)  # train.py's
    sampler.set_epoch(state["epoch"])
    batches = list(sampler)[state["batch_in_epoch"]:state["batch_in_epoch"] + 2]
    assert counted["tokens"] == sum(lengths[i] for batch in batches for i in batch)
    assert summary["tokens_per_s"] == round(counted["tokens"] / counted["seconds"])


# ----------------------------------------------------------------------------- 5. DDP


def test_ddp_two_processes_match_one_on_the_same_global_batch(world, stage1, cache, tmp_path):
    """2 gloo processes x 8 examples vs 1 process x 16: the same first step (same 16 examples, the loss a
    mean over all their target tokens, the gradients averaged) -> the same loss and the same weights.
    n_pairs 32: a multiple of the global batch, as the DDP sampler drops a short last step."""
    common = ["--stage", 2, "--data", world, "--init", stage1 / "last", "--max_steps", 1, "--dropout", 0,
              "--n_pairs", 32, *FAST]
    ddp = run_train(*common, "--out", tmp_path / "ddp", "--batch_size", 8, cache=cache,
                    launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py"))
    one = run_train(*common, "--out", tmp_path / "one", "--batch_size", 16, cache=cache)
    assert one.returncode == 0, describe(one)
    assert "2 process(es)" in ddp.stdout, describe(ddp)
    loss_ddp, loss_one = records(tmp_path / "ddp")[0]["loss"], records(tmp_path / "one")[0]["loss"]
    assert loss_ddp == pytest.approx(loss_one, abs=1e-5, rel=0)
    assert 3.0 < loss_one < 10.0, loss_one  # a real cross-entropy (vocabulary ~220)
    # measured: 1.5e-7 apart after the step
    assert max_diff(tensors(tmp_path / "ddp" / "last"), tensors(tmp_path / "one" / "last")) <= 1e-5
    state = torch.load(tmp_path / "ddp" / "last" / "state.pt", weights_only=True)
    assert isinstance(state["rng"], list) and len(state["rng"]) == 2  # one RNG state per rank, for --resume
    assert ddp.returncode == 0, describe(ddp)


def test_compile_trains_like_eager(world, stage1, tmp_path, capsys):
    """--compile default: the same optimizer steps as eager mode over batches of several shapes (one compilation
    each, lengths in multiples of 8 where eager pads to the longest row), the same losses and weights up to float
    rounding; the compiled run says how many shapes an epoch has."""
    common = args("--stage", 2, "--data", world, "--init", stage1 / "last", "--max_steps", 3, "--dropout", 0,
                  "--n_pairs", 24, "--batch_size", 8, *FAST)
    train.main(common + args("--out", tmp_path / "eager", "--compile", "none"))
    eager_shapes = [line for line in capsys.readouterr().out.splitlines() if "shapes" in line]
    train.main(common + args("--out", tmp_path / "compiled", "--compile", "default"))
    shapes = [line for line in capsys.readouterr().out.splitlines() if "shapes" in line]
    eager, compiled = step_losses(records(tmp_path / "eager")), step_losses(records(tmp_path / "compiled"))
    # eager pads each batch to its longest row; the compiled step to multiples of 8: the same losses
    assert eager_shapes == [] and shapes == ["an epoch pads its batches to 2 shapes (lengths in multiples of 8)"]
    assert compiled == pytest.approx(eager, abs=1e-4, rel=0)
    assert sorted(eager) == [1, 2, 3] and len(set(eager.values())) == 3
    assert max_diff(tensors(tmp_path / "eager" / "last"), tensors(tmp_path / "compiled" / "last")) <= 1e-4


def test_resume_under_compile_equals_an_uninterrupted_run(world, stage1, tmp_path):
    """--compile default, dropout on: 2 steps, then --resume to 4, equal 4 steps in one go (the compiled step
    draws its dropout masks from the RNG states the checkpoint restores)."""
    common = args("--stage", 2, "--data", world, "--init", stage1 / "last", "--n_pairs", 32, "--batch_size", 8,
                  "--compile", "default", "--save_every", 2, *FAST)
    train.main(common + args("--out", tmp_path / "whole", "--max_steps", 4))
    train.main(common + args("--out", tmp_path / "split", "--max_steps", 2))
    train.main(common + args("--out", tmp_path / "split", "--max_steps", 4, "--resume"))
    whole, split = step_losses(records(tmp_path / "whole")), step_losses(records(tmp_path / "split"))
    assert sorted(split) == [1, 2, 3, 4]
    assert split == pytest.approx(whole, abs=1e-6, rel=0)
    assert max_diff(tensors(tmp_path / "whole" / "last"), tensors(tmp_path / "split" / "last")) <= 1e-6


def test_padding_to_a_multiple_changes_no_loss_and_no_gradient():
    """micro_batch pads source and target to multiples of 8 for a compiled step: the loss and every gradient
    equal those of the batch padded only to its longest row, as an eager step pads it (CPU, fp32, dropout off)."""
    torch.manual_seed(0)
    cfg = CLIPTransConfig.preset("tiny")
    cfg.mbart.vocab_size = cfg.text.vocab_size = 64
    cfg.mbart.dropout = 0.0
    model = CLIPTrans(cfg)
    ex = train.Examples({}, torch.randn(3, cfg.vision.embed_dim), [[59, 5, 6, 7, 2], [59, 8, 2], [59] + [9] * 8 + [2]],
                        [[60, 4, 5, 2], [60, 6, 7, 8, 9, 2], [60, 2]], "de", [])
    (feats, ids, mask, tgt), n_tok = train.micro_batch(ex, [0, 1, 2], 1, cfg, "cpu", runs_module.pad_multiple("default"))
    assert (ids.shape[1], tgt.shape[1], n_tok) == (16, 8, 12)
    (_, tight_ids, tight_mask, tight_tgt), _ = train.micro_batch(ex, [0, 1, 2], 1, cfg, "cpu")
    assert (tight_ids.shape[1], tight_tgt.shape[1]) == (10, 6)
    assert torch.equal(tight_ids, ids[:, :10]) and (ids[:, 10:] == 1).all() and not mask[:, 10:].any()

    def loss_and_grads(*inputs):
        model.zero_grad()
        loss = model(*inputs)
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    padded, tight = loss_and_grads(feats, ids, mask, tgt), loss_and_grads(feats, tight_ids, tight_mask, tight_tgt)
    assert abs(padded[0] - tight[0]) < 1e-6 and padded[1].keys() == tight[1].keys()
    assert max((padded[1][k] - tight[1][k]).abs().max().item() for k in tight[1]) < 1e-6
    # the cap: a target never padded past mBART's positions (minus the prefix)
    long = train.Examples({}, feats, [[59, 2]], [[60] + [4] * 115 + [2]], "de", [])
    assert train.micro_batch(long, [0], 1, cfg, "cpu", 8)[0][3].shape[1] == cfg.mbart.max_positions - 10


def test_batch_shapes_of_an_epoch():
    ex = train.Examples({}, torch.zeros(5, 4), [[1] * 3, [1] * 9, [1] * 4, [1] * 17, [1] * 5],
                        [[1] * 8, [1] * 2, [1] * 7, [1] * 3, [1] * 9], "de", [])
    cfg = CLIPTransConfig.preset("tiny")
    batches = [[0, 2], [1, 3], [4], [0, 1], [2, 0]]
    # (B, S, T) in multiples of 8: [0, 2] -> (2, 8, 8); [1, 3] -> (2, 24, 8); [4] -> (1, 8, 16); [0, 1] -> (2, 16, 8)
    shapes = lambda multiple: runs_module.batch_shapes(ex.src_ids, ex.tgt_ids, batches, cfg, multiple)  # noqa: E731
    assert shapes(8) == {(2, 8, 8), (2, 24, 8), (1, 8, 16), (2, 16, 8)}
    # unrounded: [0, 2] -> (2, 4, 8); [1, 3] -> (2, 17, 3); [4] -> (1, 5, 9); [0, 1] -> (2, 9, 8)
    assert shapes(1) == {(2, 4, 8), (2, 17, 3), (1, 5, 9), (2, 9, 8)}
    # and they are the shapes micro_batch gives
    for multiple in (1, 8):
        made = [train.micro_batch(ex, b, 0, cfg, "cpu", multiple)[0] for b in batches]
        assert {(len(ids), ids.shape[1], tgt.shape[1]) for _, ids, _, tgt in made} == shapes(multiple)


# ----------------------------------------------------------------------------- 6. the default commands


def test_default_commands_end_to_end(world, cache, tmp_path):
    """`python train.py --stage 1` then `--stage 2`, with the defaults but for a small world (the default one
    has 10,000 scenes), an --out and 3 steps. Stage 1 finds no stage 0 output beside its --out and runs
    stage 0 first (defaults: batch 128, 4 epochs = 8 steps per objective on 256 scenes)."""
    import sacrebleu
    s1 = run_train("--stage", 1, "--data", world, "--out", tmp_path / "stage1", "--max_steps", 3, cache=cache)
    assert s1.returncode == 0, describe(s1)
    assert f"stage 0 output {tmp_path / 'stage0' / 'last'} is missing: running stage 0 first" in s1.stdout
    assert (tmp_path / "stage0" / "last" / weights.WEIGHTS_FILE).is_file()
    # the same stage 1 as when stage 0 was already there (stage 0 running first changes nothing downstream)
    again = run_train("--stage", 1, "--data", world, "--weights", tmp_path / "stage0" / "last", "--out",
                      tmp_path / "stage1_again", "--max_steps", 3, cache=cache)
    assert again.returncode == 0, describe(again)
    assert max_diff(tensors(tmp_path / "stage1" / "last"), tensors(tmp_path / "stage1_again" / "last")) == 0
    s2 = run_train("--stage", 2, "--data", world, "--out", tmp_path / "stage2", "--max_steps", 3, cache=cache)
    assert s2.returncode == 0, describe(s2)
    assert "running stage 0" not in s2.stdout

    for stage, proc, kept in ((1, s1, "last"), (2, s2, "best")):
        out = tmp_path / f"stage{stage}"
        summary = summary_line(proc.stdout)
        assert summary == json.loads((out / "summary.json").read_text())
        assert (summary["stage"], summary["steps"], summary["test_split"]) == (stage, 3, "test")
        assert summary["checkpoint"] == str(out / kept)
        refs = (world / "raw" / f"test.{'en' if stage == 1 else 'de'}").read_text().splitlines()  # 24 lines
        hyps = (out / "hyps" / "test.final.txt").read_text().splitlines()
        assert summary["test_bleu"] == round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2)
        assert (summary["best_val_bleu"] is None) == (stage == 1)
        recs = records(out)
        assert [r["step"] for r in recs if "loss" in r] == [1, 3]  # --log_every 10: the first and the last step
        assert [(r["step"], r["split"]) for r in recs if "bleu" in r] == [(3, "val")]
        assert recs[-1] == {"summary": summary}
        for name in ("val.step3.txt", "test.final.txt"):  # the full 24-sentence splits, one line each
            assert len((out / "hyps" / name).read_text().splitlines()) == 24
        for name in (weights.WEIGHTS_FILE, weights.TOWERS_FILE, weights.CONFIG_FILE, weights.MBART_TOKENIZER):
            assert (out / kept / name).is_file()
        assert (out / kept / "state.pt").is_file() == (kept == "last"), "the optimizer state in `last` only"
    # stage 2 found stage 1's `last` by itself
    saved = json.loads((tmp_path / "stage2" / "last" / weights.CONFIG_FILE).read_text())["train"]
    assert saved["init"] == str(tmp_path / "stage1" / "last")


# ----------------------------------------------------------------------------- what a run keeps on disk


def test_checkpoints_share_the_frozen_towers_and_only_last_keeps_the_optimizer(stage0, stage1, stage2, tmp_path):
    """One towers file for stage 0's output and every checkpoint trained from it (hard links: one inode); the
    optimizer state in `last` only; a checkpoint copied elsewhere still loads, with the same tensors."""
    towers = [stage0 / weights.TOWERS_FILE] + [run / kept / weights.TOWERS_FILE for run, kept in
                                               ((stage1, "last"), (stage2, "last"), (stage2, "best"))]
    assert len({f.stat().st_ino for f in towers}) == 1 and towers[0].stat().st_nlink >= 4
    assert not (stage2 / "best" / "state.pt").exists() and (stage2 / "last" / "state.pt").exists()
    assert not set(load_file(stage2 / "best" / weights.WEIGHTS_FILE)) & set(load_file(towers[0])), "each once"
    moved = tmp_path / "moved"
    shutil.copytree(stage2 / "best", moved)
    a, b = weights.load(moved).state_dict(), weights.load(stage2 / "best").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # folder_size counts the towers once: two links in stage2 (best, last), none new after stage 0's
    every, tw = sum(f.stat().st_size for f in stage2.rglob("*") if f.is_file()), towers[0].stat().st_size
    assert folder_size(stage2) == every - tw
    seen = set()
    assert folder_size(stage0, seen) >= tw and folder_size(stage2, seen) == every - 2 * tw


def test_a_run_says_what_it_will_write_and_refuses_a_disk_too_small(world, stage1, tmp_path, capsys, monkeypatch):
    common = args("--stage", 2, "--data", world, "--init", stage1 / "last", "--max_steps", 1, "--batch_size", 16,
                  *FAST)
    free = shutil.disk_usage(tmp_path).free
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(free, free - 1000, 1000))
    with pytest.raises(SystemExit, match=r"needs up to \d+\.\d MB for its checkpoints and its disk has 0\.0 MB free"):
        train.main(common + args("--out", tmp_path / "refused"))
    assert not (tmp_path / "refused" / "last").exists()
    capsys.readouterr()
    train.main(common + args("--out", tmp_path / "anyway", "--ignore_disk_space"))
    plan = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("checkpoints: "))
    # the sizes it announced: `best` is the weights alone, `last` the weights and the optimizer state
    best = (tmp_path / "anyway" / "best" / weights.WEIGHTS_FILE).stat().st_size
    state = (tmp_path / "anyway" / "last" / "state.pt").stat().st_size
    assert f"checkpoints: {best / 1e6:.1f} MB of weights each" in plan and best > 1e6
    assert f"{state / 1e6:.1f} MB of optimizer state in `last`" in plan and state > 1e6


# ----------------------------------------------------------------------------- 7. bad input


@pytest.fixture
def checkpoints(stage0, stage1, stage2):
    """The earlier runs' folders, which no failed run may touch."""
    return [stage0.parent, stage1, stage2]


def fails_cleanly(proc, *fragments, code=1):
    assert proc.returncode == code, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    for fragment in fragments:
        assert fragment in proc.stderr, f"{fragment!r} not in the message\n{describe(proc)}"


def test_stage2_without_a_stage1_checkpoint(world, checkpoints, cache, tmp_path):
    before = snapshot(*checkpoints)
    proc = run_train("--stage", 2, "--data", world, "--init", tmp_path / "nothing" / "last",
                     "--out", tmp_path / "out", cache=cache)
    fails_cleanly(proc, f"{tmp_path / 'nothing' / 'last'} does not exist", "python train.py --stage 1",
                  "--from_scratch_stage2")
    assert snapshot(*checkpoints) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["empty", "no_images"])
def test_wrong_data_folder(layout, world, stage0, checkpoints, cache, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    if layout == "no_images":  # the text and image lists, but not the images
        for sub in ("raw", "image_splits"):
            shutil.copytree(world / sub, folder / sub)
        expected = ["256 of 256 images are missing", "train_00000.png"]
    else:
        expected = ["no en text for split 'train'", str(folder / "raw" / "train.en")]
    before = snapshot(*checkpoints)
    proc = run_train("--stage", 1, "--data", folder, "--weights", stage0, "--out", tmp_path / "out", cache=cache)
    fails_cleanly(proc, "error: ", *expected)
    assert snapshot(*checkpoints) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage", [1, 2])
def test_checkpoint_of_another_preset(stage, world, stage0, stage1, checkpoints, cache, tmp_path):
    # a tiny checkpoint given to --preset paper: stage 1 loads --weights, stage 2 loads --init
    before = snapshot(*checkpoints)
    start = ["--weights", stage0] if stage == 1 else ["--init", stage1 / "last"]
    proc = run_train("--stage", stage, "--preset", "paper", "--data", world, *start, "--out", tmp_path / "out",
                     cache=cache)
    what = str(stage0) if stage == 1 else str(stage1 / "last")
    fails_cleanly(proc, f"{what} is not a paper model", "--preset")
    assert snapshot(*checkpoints) == before and not (tmp_path / "out").exists()


def test_second_run_into_a_checkpoint_folder_refuses(world, stage0, stage1, checkpoints, cache, tmp_path):
    out = tmp_path / "stage1"
    shutil.copytree(stage1, out)
    before = snapshot(out, *checkpoints)
    proc = run_train("--stage", 1, "--data", world, "--weights", stage0, "--out", out, "--max_steps", 2,
                     cache=cache)
    fails_cleanly(proc, f"{out} already holds a checkpoint", "--resume")
    assert snapshot(out, *checkpoints) == before  # metrics.jsonl, hyps and `last` byte for byte


def test_unknown_flag_is_an_argparse_error(cache):
    proc = run_train("--stage", 1, "--no_such_flag", 3, cache=cache)
    fails_cleanly(proc, "unrecognized arguments: --no_such_flag 3", code=2)


@pytest.mark.parametrize("flag, value", [("stage", 3), ("preset", "base"), ("schedule", "linear"), ("dtype", "bf17"),
                                         ("mapping", "mlp2")])
def test_flags_with_fixed_choices(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        settings.parse_args(args(f"--{flag}", value))
    assert e.value.code == 2
    assert f"argument --{flag}: invalid choice: " in capsys.readouterr().err


def test_every_flag_is_honoured_or_refused_in_every_stage(tmp_path, monkeypatch):
    """Each flag of settings.Config given in each stage: parsed for the run where its row names the stage, refused
    with a message that names the flag and the stage everywhere else, never dropped. Stage 0 reads exactly the
    flags that name it (the settings stage0.py reads, `c.name`), and parsing writes nothing (not the default tiny
    world)."""
    monkeypatch.setenv("CLIPTRANS_CACHE", str(tmp_path))
    for f in settings.FLAGS:
        value = settings.CHOICES.get(f.name, [{bool: True, int: 3, float: 0.5, str: "x"}[type(f.default)]])[-1]
        for stage in (0, 1, 2):
            cli = ["--stage", stage] + ([f"--{f.name}"] if value is True else [f"--{f.name}", value])
            try:
                c = settings.parse_args(args(*cli))
            except SystemExit as e:  # refused: for this flag's stages, or for another reason
                refused = f"--{f.name} has no effect in stage {stage}" in str(e.code)
                assert refused == (stage not in f.metadata["stages"]), (f.name, stage, e.code)
                continue
            assert stage in f.metadata["stages"] and getattr(c, f.name) == value, (f.name, stage)
    stage0_flags = {f.name for f in settings.FLAGS if 0 in f.metadata["stages"]}
    read = set(re.findall(r"\bc\.(\w+)", (ROOT / "stage0.py").read_text()))
    assert stage0_flags - {"stage", "preset", "device", "allow_large_images"} == read
    assert list(tmp_path.iterdir()) == []


def test_stage0_refuses_a_folder_that_holds_a_checkpoint(world, stage0):
    """`train.py --stage 0` into a folder holding stage 0's output is refused before it trains, the folder left
    byte for byte as it was, as every run's folder is (see test_second_run_into_a_checkpoint_folder_refuses)."""
    before = snapshot(stage0.parent)
    with pytest.raises(SystemExit) as e:
        train.main(args("--stage", 0, "--data", world, "--out", stage0.parent, "--epochs", 1, "--batch_size", 32))
    assert "already holds a checkpoint or a run's log (last)" in str(e.value.code)
    assert snapshot(stage0.parent) == before


@pytest.mark.parametrize("stage", [1, 2])
def test_mapping_flag_gives_a_new_mapping_network_where_one_starts_untrained(stage, world, stage0, tmp_path):
    """--mapping in stage 1 (from the weights) and in stage 2 from the weights (--from_scratch_stage2): the run
    trains a new mapping network of that kind, not the weights' (mlp); from a trained one it is refused (see
    test_more_bad_input_in_process)."""
    out = tmp_path / "run"
    start = ["--from_scratch_stage2"] if stage == 2 else []
    train.main(args("--stage", stage, "--data", world, "--weights", stage0, *start, "--out", out, "--mapping",
                    "transformer", "--max_steps", 1, "--batch_size", 16, *FAST))
    saved = json.loads((out / "last" / weights.CONFIG_FILE).read_text())["cliptrans"]["mapping"]
    assert saved == {"kind": "transformer", "prefix_len": 10}
    assert any(k.startswith("mapping.block.") for k in tensors(out / "last"))


@pytest.mark.parametrize("case", ["stage0_as_init", "resume_nothing", "score_nothing", "stage0_paper",
                                  "paper_no_data", "paper_no_weights", "fp16_on_cpu", "save_every_0", "batch_negative",
                                  "n_pairs_negative", "dropout_1", "bad_device", "stage0_not_a_tiny_world",
                                  "resume_stage0", "resume_other_batch", "resume_stage1_as_stage2",
                                  "features_unwritable", "prefix0_stage1", "prefix0_with_image",
                                  "prefix_len_of_a_trained_mapping", "pair_without_english",
                                  "mapping_of_a_trained_mapping", "weights_in_stage2", "init_from_scratch",
                                  "weights_with_eval_only", "resume_from_other_weights", "resume_eval_only",
                                  "max_new_tokens_too_long"])
def test_more_bad_input_in_process(case, world, stage0, stage1, tmp_path):
    """Cheap checks of further messages, in this process (SystemExit carries the message)."""
    out = tmp_path / "out"
    (tmp_path / "a_file").write_text("")
    cli, message = {
        "stage0_as_init": (["--stage", 2, "--init", stage0], f"{stage0} is not a stage 1 checkpoint (its config.json "
                                                             f"says stage 0)"),
        "resume_nothing": (["--stage", 1, "--resume"], f"no checkpoint in {out / 'last'} to resume"),
        "score_nothing": (["--stage", 2, "--eval_only"], f"no checkpoint in {out / 'best'} to score"),
        "stage0_paper": (["--stage", 0, "--preset", "paper"], "stage 0 exists for the tiny preset only"),
        "paper_no_data": (["--stage", 1, "--preset", "paper", "--data", ""], "--data is required"),
        "paper_no_weights": (["--stage", 1, "--preset", "paper"], "--weights is required"),
        "fp16_on_cpu": (["--stage", 1, "--weights", stage0, "--dtype", "fp16", "--device", "cpu"],
                        "--dtype fp16 needs a GPU"),
        "save_every_0": (["--stage", 1, "--weights", stage0, "--save_every", 0],
                         "--save_every 0: expected a positive number"),
        "batch_negative": (["--stage", 1, "--weights", stage0, "--batch_size", -4],
                           "--batch_size -4: expected a positive number"),
        "n_pairs_negative": (["--stage", 2, "--n_pairs", -5], "--n_pairs -5: expected a non-negative number"),
        "dropout_1": (["--stage", 2, "--dropout", 1.0], "--dropout 1.0: expected a rate in [0, 1)"),
        "bad_device": (["--stage", 1, "--weights", stage0, "--device", "foo"],
                       "--device foo: expected auto, cpu, cuda or cuda:N"),
        "stage0_not_a_tiny_world": (["--stage", 0, "--data", tmp_path], f"{tmp_path} has no tokenizer.json"),
        "resume_stage0": (["--stage", 1, "--resume", "--checkpoint", stage0],
                          f"{stage0} holds no training state to resume (a stage 0 checkpoint"),
        "resume_other_batch": (["--stage", 1, "--resume", "--checkpoint", stage1 / "last", "--batch_size", 8],
                               "was trained with --batch_size 16; this run has --batch_size 8: resume with the same"),
        "resume_stage1_as_stage2": (["--stage", 2, "--resume", "--checkpoint", stage1 / "last"],
                                    "was trained with --stage 1, --task caption, --batch_size 16; this run has "
                                    "--stage 2, --task translate, --batch_size 64"),
        "features_unwritable": (["--stage", 1, "--weights", stage0, "--features", tmp_path / "a_file" / "cache"],
                                "cannot write the feature cache"),
        "prefix0_stage1": (["--stage", 1, "--weights", stage0, "--prefix_len", 0],
                           "--prefix_len 0 with --task caption: the task learns through the prefix"),
        "prefix0_with_image": (["--stage", 2, "--weights", stage0, "--prefix_len", 0, "--test_prefix", "image"],
                               "no prefix to embed: "),
        "prefix_len_of_a_trained_mapping": (["--stage", 2, "--init", stage1 / "last", "--prefix_len", 4],
                                            "has a trained mapping network (mlp, 10 prefix vectors)"),
        "mapping_of_a_trained_mapping": (["--stage", 2, "--init", stage1 / "last", "--mapping", "transformer"],
                                         "has a trained mapping network (mlp, 10 prefix vectors)"),
        "weights_in_stage2": (["--stage", 2, "--weights", stage0], "--weights has no effect here: stage 1 starts"),
        "init_from_scratch": (["--stage", 2, "--init", stage1 / "last", "--from_scratch_stage2"],
                              "--init has no effect here"),
        "weights_with_eval_only": (["--stage", 2, "--weights", stage0, "--eval_only"], "--weights has no effect here"),
        "resume_from_other_weights": (["--stage", 1, "--resume", "--checkpoint", stage1 / "last", "--batch_size", 16,
                                       "--weights", tmp_path], f"was trained with --weights {stage0}; this run has "
                                                               f"--weights {tmp_path}: resume with the same"),
        "resume_eval_only": (["--stage", 2, "--resume", "--eval_only"], "--eval_only trains nothing to --resume"),
        "max_new_tokens_too_long": (["--stage", 1, "--weights", stage0, "--max_new_tokens", 200],
                                    "11 prompt positions + max_new_tokens=200 exceed mBART's 128: max_new_tokens "
                                    "can be at most 117"),
        "pair_without_english": (["--stage", 1, "--weights", stage0, "--src", "de", "--tgt", "fr"],
                                 "de-fr has no English (the official code then captions in Spanish): give "
                                 "--caption_lang, one of the languages of the training split (de, en, fr)"),
    }[case]
    data_arg = [] if case == "paper_no_data" or "--data" in cli else ["--data", world]
    with pytest.raises(SystemExit) as e:
        train.main(args(*cli, *data_arg, "--out", out))
    assert message in str(e.value.code), e.value.code
    assert not (out / "last").exists()


# ----------------------------------------------------------------------------- 8. scoring a checkpoint


def eval_only(capsys, *cli):
    """train.main(--eval_only ...) in this process; returns the JSON line it printed."""
    capsys.readouterr()
    train.main(args(*cli, "--eval_only", *FAST))
    return summary_line(capsys.readouterr().out)


def test_eval_only_scores_the_best_stage2_checkpoint(world, stage2, scrambled, tmp_path, capsys):
    import sacrebleu
    # by default --eval_only scores OUT/best of stage 2 on the test split: here the run's own folder,
    # copied, so that this test writes nothing into the shared one
    out = tmp_path / "stage2"
    shutil.copytree(stage2, out)
    result = eval_only(capsys, "--stage", 2, "--data", world, "--out", out)
    assert result["split"] == "test" and result["checkpoint"] == str(out / "best")
    # the same checkpoint and settings as the training run's final test score: the same hypotheses and BLEU
    hyps = Path(result["hypotheses"]).read_text()
    assert hyps == (stage2 / "hyps" / "test.final.txt").read_text()
    assert result["bleu"] == json.loads((stage2 / "summary.json").read_text())["test_bleu"]
    refs = (world / "raw" / "test.de").read_text().splitlines()[:8]
    assert result["bleu"] == round(sacrebleu.corpus_bleu(hyps.splitlines(), [refs]).score, 2)
    # The few-step run writes the same line for every sentence, from `best` and `last` alike. With `best` replaced
    # by a checkpoint whose eight lines all differ, so do the hypotheses: --eval_only read `best`.
    shutil.rmtree(out / "best")
    shutil.copytree(scrambled, out / "best")
    result = eval_only(capsys, "--stage", 2, "--data", world, "--out", out)
    assert len(set(Path(result["hypotheses"]).read_text().splitlines())) == 8


def test_eval_only_and_translate_read_an_authors_model(world, scrambled, tmp_path, capsys):
    """`scrambled` as the official code would have saved it (tests/their_code.py: DDP shards), converted with
    official.py and its towers: train.py --eval_only and translate.py read it, and decode as the
    official code does (--prompt official, the converted folder's default); with --prompt train, exactly as
    `scrambled` itself (the conversion loses nothing). A converted stage 1 model starts a stage 2 run, whose
    checkpoints record the prompt they were scored with."""
    their_code.save_shards(their_code.from_ours(weights.load(scrambled), "mlp"), tmp_path)
    converted = {}
    for stage in (1, 2):
        converted[stage] = tmp_path / f"official{stage}"
        official.main(args(tmp_path / "model_best_test.pth", "--towers", scrambled, "--src", "en",
                          "--tgt", "de", "--out", converted[stage], "--stage", stage))

    def hyps(checkpoint, *more):
        result = eval_only(capsys, "--stage", 2, "--data", world, "--checkpoint", checkpoint, "--out",
                           tmp_path / "eval", *more)
        return Path(result["hypotheses"]).read_text().splitlines()

    theirs = hyps(converted[2])
    assert theirs == hyps(scrambled, "--prompt", "official")
    assert hyps(converted[2], "--prompt", "train") == hyps(scrambled) != theirs
    sentences = (world / "raw" / "test.en").read_text().splitlines()[:3]
    capsys.readouterr()
    for checkpoint, more in ((converted[2], []), (scrambled, ["--prompt", "official"])):
        translate.main(args("--checkpoint", checkpoint, "--beam", 1, "--max_new_tokens", 20, *more, *sentences))
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == lines[3:] == theirs[:3]

    for prompt in ("official", "train"):
        out = tmp_path / f"stage2 {prompt}"
        more = ["--prompt", "train"] if prompt == "train" else []
        train.main(args("--stage", 2, "--data", world, "--init", converted[1], "--out", out, "--max_steps", 1,
                        "--batch_size", 16, *more, *FAST))
        assert json.loads((out / "last" / weights.CONFIG_FILE).read_text())["cliptrans"]["prompt"] == prompt


def test_eval_only_stage1_any_split(world, stage1, tmp_path, capsys):
    result = eval_only(capsys, "--stage", 1, "--data", world, "--checkpoint", stage1 / "last", "--test_split", "val",
                       "--out", tmp_path)
    assert result["checkpoint"] == str(stage1 / "last")
    # the training run scored the same checkpoint on val at its last step (4), with the same settings
    assert Path(result["hypotheses"]).read_text() == (stage1 / "hyps" / "val.step4.txt").read_text()
    val = [r for r in records(stage1) if r.get("split") == "val"]
    assert result["bleu"] == val[-1]["bleu"]


def spy_features(monkeypatch):
    """runs.features, recording what each call asks a frozen tower to embed: [("image" or "text", the texts)]."""
    asked, features = [], runs_module.features

    def spy(model, c, env, name, images=None, texts=None, tok=None):
        asked.append(("image" if images is not None else "text", texts))
        return features(model, c, env, name, images, texts, tok)
    monkeypatch.setattr(runs_module, "features", spy)
    return asked


def test_eval_only_test_prefix_image(world, stage2, tmp_path, capsys, monkeypatch):
    asked = spy_features(monkeypatch)
    result = eval_only(capsys, "--stage", 2, "--data", world, "--checkpoint", stage2 / "best", "--out", tmp_path,
                       "--test_prefix", "image")
    assert [kind for kind, _ in asked] == ["image"]  # the image embedding, not the source sentence's
    import sacrebleu
    hyps = Path(result["hypotheses"]).read_text().splitlines()
    refs = (world / "raw" / "test.de").read_text().splitlines()[:8]  # --max_eval 8
    assert len(hyps) == 8 and result["bleu"] == round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2)
    asked.clear()
    eval_only(capsys, "--stage", 2, "--data", world, "--checkpoint", stage2 / "best", "--out", tmp_path)
    assert asked == [("text", (world / "raw" / "test.en").read_text().splitlines()[:8])]


def test_eval_only_ablate_takes_away_one_input(world, stage2, tmp_path, capsys, monkeypatch):
    """--ablate prefix: each sentence is scored with the previous sentence's embedding; --ablate source: the
    encoder gets only `<src_lang> </s>`. Everything else is the normal evaluation."""
    seen, score = {}, train.score

    def spy(model, c, ex, tok, *rest):  # what train.score generates from
        seen[c.ablate] = (ex.feats.clone(), [list(ids) for ids in ex.src_ids], tok)
        return score(model, c, ex, tok, *rest)

    monkeypatch.setattr(train, "score", spy)
    results = {ablate: eval_only(capsys, "--stage", 2, "--data", world, "--checkpoint", stage2 / "best",
                                 "--out", tmp_path, *(["--ablate", ablate] if ablate else []))
               for ablate in ("", "prefix", "source")}
    clip, src_ids, tok = seen[""]
    assert torch.equal(seen["prefix"][0], torch.cat([clip[-1:], clip[:-1]])) and seen["prefix"][1] == src_ids
    assert torch.equal(seen["source"][0], clip)
    assert seen["source"][1] == [[tok.lang_id("en"), tok.eos_id]] * len(src_ids) != src_ids
    assert results["prefix"]["ablate"] == "prefix" and "ablate" not in results[""]
    paths = {ablate: r["hypotheses"] for ablate, r in results.items()}
    assert len(set(paths.values())) == 3  # each its own hypotheses file: none overwrites the normal one
    assert results[""]["bleu"] == json.loads((stage2 / "summary.json").read_text())["test_bleu"]


@pytest.mark.parametrize("cli, message", [
    (["--stage", 2, "--ablate", "prefix"], "--ablate is for --eval_only"),  # not with training
    (["--stage", 1, "--eval_only", "--ablate", "prefix"], "--ablate has no effect in stage 1"),  # no source
    (["--stage", 2, "--eval_only", "--ablate", "image"], "argument --ablate: invalid choice: 'image'")])
def test_ablate_needs_stage2_eval_only_and_a_known_input(cli, message, world, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(args(*cli, "--data", world, "--out", tmp_path / "out"))
    assert message in str(e.value.code) + capsys.readouterr().err


# ----------------------------------------------------------------------------- 9. translate.py, experiment.py


def translate_lines(capsys, *cli):
    capsys.readouterr()
    translate.main(args(*cli))
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("stage, split, inputs", [(2, "test", "sentences"), (1, "val", "images")])
def test_translate_gives_the_hypotheses_of_eval_only(stage, split, inputs, world, scrambled, tmp_path, capsys):
    """translate.py, in batches of 3, from sentences alone (the M-CLIP text embedding as the prefix) or from
    images (captions): the lines `train.py --eval_only` writes for the same checkpoint, split and settings."""
    result = eval_only(capsys, "--stage", stage, "--data", world, "--checkpoint", scrambled, "--test_split", split,
                       "--out", tmp_path)
    want = Path(result["hypotheses"]).read_text().splitlines()
    if inputs == "sentences":
        cli = (world / "raw" / f"{split}.en").read_text().splitlines()[:8]
    else:
        cli = ["--tgt", "en", "--image",
               *[world / "images" / n for n in (world / "image_splits" / f"{split}.txt").read_text().split()[:8]]]
    got = translate_lines(capsys, "--checkpoint", scrambled, "--beam", 1, "--max_new_tokens", 20, "--batch_size", 3,
                          *cli)
    assert len(set(want)) == 8, want  # eight different lines: the comparison can tell the inputs apart
    assert got == want


def test_translate_a_sentence_longer_than_the_text_tower(world, stage2, capsys):
    """The text tower reads at most max_tokens ids (64 for the tiny one): a longer source is cut there for its
    embedding, as XLM-R's tokenizer cuts at 512, while mBART's encoder reads all of it."""
    model = weights.load(stage2 / "best")
    tok = data.TextTowerTokenizer(stage2 / "best" / weights.TEXT_TOKENIZER)
    long = " ".join(["a small red circle is above a large blue star ."] * 8)
    ids, mask = tok.encode([long])
    assert ids.shape[1] > model.text.max_tokens == 64
    with pytest.raises(ValueError, match="tokens exceed the text tower's 64: truncate them"):
        model.encode_text(ids, mask)
    assert len(translate_lines(capsys, "--checkpoint", stage2 / "best", "--beam", 2, long)) == 1


@pytest.mark.parametrize("cli, message", [
    (["--beam", 0, "x"], "argument --beam: expected a positive integer, got 0"),
    (["--batch_size", 0, "x"], "argument --batch_size: expected a positive integer, got 0"),
    (["--device", "foo", "x"], "--device foo: "),
    (["--device", "cpu", "--dtype", "fp16", "x"], "--dtype fp16 needs a GPU"),  # train.py's rule (runs.setup)
    (["--max_new_tokens", 500, "x"], "max_new_tokens can be at most 117"),
    (["--src", "xx", "x"], "unknown language 'xx': expected an mBART-50 code"),
    (["a sentence", " ", "another"], "expected non-empty sentences, as arguments or one per line on stdin; "
                                     "sentence 2 is empty"),
])
def test_translate_bad_input(cli, message, stage2, capsys):
    with pytest.raises(SystemExit) as e:
        translate.main(args("--checkpoint", stage2 / "best", *cli))
    said = capsys.readouterr().err if e.value.code == 2 else str(e.value.code)  # argparse's own errors: code 2
    assert message in said, said


def test_experiment_continues_an_interrupted_experiment(tmp_path, monkeypatch):
    """experiment.train reads a finished run back from its summary.json and resumes an interrupted one."""
    calls = []

    def run(cmd, **kw):
        calls.append(cmd[2:])
        return subprocess.CompletedProcess(cmd, 0, stdout='log\n{"test_bleu": 12.5}\n')
    monkeypatch.setattr(experiment.subprocess, "run", run)
    done, killed, new = tmp_path / "done", tmp_path / "killed", tmp_path / "new"
    done.mkdir()
    (done / "summary.json").write_text('{"test_bleu": 40.0}')
    (killed / "last").mkdir(parents=True)
    assert experiment.train("--stage", 1, "--out", done, out=done) == {"test_bleu": 40.0}
    assert experiment.train("--stage", 1, "--out", killed, out=killed) == {"test_bleu": 12.5}
    assert experiment.train("--stage", 1, "--out", new, out=new) == {"test_bleu": 12.5}
    assert calls == [["--stage", "1", "--out", str(killed), "--resume"], ["--stage", "1", "--out", str(new)]]
    # a crash between the two renames of weights.save leaves only OUT/.last.old: resumed too
    (tmp_path / "crashed" / ".last.old").mkdir(parents=True)
    crashed = tmp_path / "crashed"
    assert folders.find_checkpoint(crashed / "last") == crashed / ".last.old"
    assert experiment.train("--stage", 1, "--out", crashed, out=crashed) == {"test_bleu": 12.5}
    assert calls[-1] == ["--stage", "1", "--out", str(crashed), "--resume"]


def test_experiment_pairs_arms_by_seed(tmp_path, monkeypatch, capsys):
    """experiment.main: one stage 0, two stage 1 runs a seed, every arm at every size, and the paired
    differences of each pair of arms computed seed by seed (here from made-up BLEU scores)."""
    calls = []
    bleu = {"--prefix_len": 50.0, "--from_scratch_stage2": 60.0, "stage1_en": 70.0, "stage1_de": 55.0}

    def train_stub(*cli, out=None, log=None, threads=None):
        cli = [str(x) for x in cli]
        calls.append(cli)
        seed = int(cli[cli.index("--seed") + 1]) if "--seed" in cli else 0
        arm = next((k for k in bleu if any(k in x for x in cli)), None)
        return {"test_bleu": (bleu[arm] + seed) if "--n_pairs" in cli else 20.0}
    monkeypatch.setattr(experiment, "train", train_stub)
    monkeypatch.setenv("CLIPTRANS_CACHE", str(tmp_path / "cache"))  # the world the figure shows
    tiny_world.make_tiny_world(tmp_path / "cache" / "tiny_world", n_train=4, n_val=4, n_test=4, image_size=32)
    space = []
    monkeypatch.setattr(experiment, "shared_space", lambda folder, world: space.append(folder) or
                        {"towers": (0.5, 0.1), "prefix": (0.8, 0.2)})
    experiment.main(["--seeds", "1", "2", "3", "--pairs", "50", "200", "--jobs", "2", "--out", str(tmp_path)])
    assert space[:2] == [tmp_path / "stage0" / "last", tmp_path / "seed1" / "stage1_en" / "last"] and len(space) == 10
    stages = [c[c.index("--stage") + 1] for c in calls]
    assert stages.count("0") == 1 and stages.count("1") == 3 * 2 and stages.count("2") == 3 * 2 * 4
    # stage 2: 200 steps, validated 4 times, the best checkpoint kept
    assert all(c[c.index("--eval_every") + 1] == "50" for c in calls if "--n_pairs" in c)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["bleu"]["stage 1 (en) + 2"]["200"] == {"1": 71.0, "2": 72.0, "3": 73.0}
    r = results["paired"]["stage 1 (en) + 2 - text-only, 50 pairs"]
    assert r["differences"] == [20.0] * 3 and r["ci95"] == [20.0, 20.0] and (r["higher"], r["lower"]) == (3, 0)
    assert results["stage1"]["seed 2, stage 1 (de)"] == 20.0
    assert "stage 1 (de) + 2 - stage 2 only" in capsys.readouterr().out
    for figure in ("bleu_by_size.png", "tiny_world.png"):  # written by matplotlib: PNG files
        assert (tmp_path / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_experiment_arms_are_rows_and_rescore_scores_again(tmp_path, monkeypatch, capsys):
    """Arms of other tasks run with their rows' flags, each stage 1 kind once a seed; --rescore scores every
    stage 2 checkpoint once more with its flags and pairs the two scores seed by seed."""
    calls = []

    def train_stub(*cli, out=None, log=None, threads=None):
        cli = [str(x) for x in cli]
        calls.append(cli)
        if "--eval_only" in cli:
            return {"bleu": 30.0 + int(Path(cli[cli.index("--checkpoint") + 1]).parent.parent.name[-1])}
        return {"test_bleu": 25.0}
    monkeypatch.setattr(experiment, "train", train_stub)
    monkeypatch.setattr(experiment, "plot_world", lambda world, path: None)
    experiment.main(["--seeds", "1", "2", "--pairs", "50", "--arms", "text_recon + 2", "triplet",
                     "stage 1 (en) + triplet", "--rescore=--prompt official", "--out", str(tmp_path)])
    stage1 = [c for c in calls if c[1] == "1"]
    assert sorted(c[2:4] for c in stage1) == [["--caption_lang", "en"]] * 2 + [["--task", "text_recon"]] * 2
    stage2 = {tuple(c[2:c.index("--seed")]) for c in calls if c[1] == "2" and "--eval_only" not in c}
    assert ("--weights", str(tmp_path / "stage0" / "last"), "--task", "triplet", "--from_scratch_stage2") in stage2
    assert ("--init", str(tmp_path / "seed1" / "stage1_text_recon" / "last")) in stage2
    assert ("--init", str(tmp_path / "seed2" / "stage1_en" / "last"), "--task", "triplet") in stage2
    again = [c for c in calls if "--eval_only" in c]
    assert len(again) == 2 * 3 and all(c[-2:] == ["--prompt", "official"] for c in again)
    results = json.loads((tmp_path / "results.json").read_text())
    r = results["paired"]["triplet, --prompt official - as trained, 50 pairs"]
    assert r["differences"] == [6.0, 7.0]


def test_experiment_rescores_at_each_noise_and_draws_it(tmp_path, monkeypatch):
    """Several --rescore sets: each is its own scoring of every checkpoint; a text-only arm (no prefix) is not
    given a set naming --test_prefix; the figure of BLEU against the share of tokens dropped is drawn."""
    calls = []

    def train_stub(*cli, out=None, log=None, threads=None):
        cli = [str(x) for x in cli]
        calls.append(cli)
        return {"bleu": 50.0 - 20 * float(cli[cli.index("--mask_prob") + 1])} if "--eval_only" in cli else \
            {"test_bleu": 50.0}
    monkeypatch.setattr(experiment, "train", train_stub)
    monkeypatch.setattr(experiment, "plot_world", lambda world, path: None)
    monkeypatch.setattr(experiment, "shared_space", lambda folder, world: {"towers": (0.5, 0.1)})
    sets = ["--noise_test --mask_prob 0", "--noise_test --mask_prob 0.5",
            "--noise_test --mask_prob 0.5 --test_prefix text"]
    experiment.main(["--seeds", "1", "2", "--pairs", "50", "--arms", "text-only", "stage 1 (en) + 2, noise_train",
                     "--rescore", *sets, "--out", str(tmp_path)])
    again = [c for c in calls if "--eval_only" in c]
    assert len(again) == 2 * 2 + 2 * 2 + 2  # the last set: not for text-only
    assert all("--prefix_len" not in c for c in again)
    trained = [c for c in calls if c[1] == "2" and "--eval_only" not in c and "--prefix_len" not in c]
    assert all(c[c.index("--mask_prob") + 1] == "0.5" and "--noise_train" in c for c in trained)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["rescored"][sets[2]]) == {"stage 1 (en) + 2, noise_train"}
    assert results["rescored"][sets[1]]["text-only"]["50"] == {"1": 40.0, "2": 40.0}
    assert (tmp_path / "bleu_by_noise.png").read_bytes()[:4] == b"\x89PNG"


def test_shared_space_cosines(world, stage1):
    """The cosines of matched and unmatched rows, on vectors whose answer is known; and on a checkpoint, the
    image-caption cosines of its towers and of its prefixes, from the same embeddings as train.py's."""
    a = torch.eye(4) * 3
    assert experiment.cosines(a, a) == (1.0, 0.0) and experiment.cosines(a, -a) == (-1.0, 0.0)
    space = experiment.shared_space(stage1 / "last", world)
    model = weights.load(stage1 / "last")
    s = data.read_split(world, "test", ["en"], world / "images")
    tok = data.TextTowerTokenizer(stage1 / "last" / weights.TEXT_TOKENIZER)
    ids, mask = tok.encode(s.sentences["en"])
    with torch.no_grad():
        texts = model.encode_text(ids, mask)
        images = torch.stack([model.encode_image(data.load_image(f, 32)[None])[0] for f in s.images])
        prefixes = model.mapping(images).flatten(1), model.mapping(texts).flatten(1)
    assert space["towers"] == pytest.approx(experiment.cosines(images, texts), abs=2e-4)
    assert space["prefix"] == pytest.approx(experiment.cosines(*prefixes), abs=2e-4)


def test_paired_bootstrap_interval():
    r = experiment.paired([3.0, 5.0, 1.0, 7.0], [1.0, 1.0, 1.0, 1.0])
    assert r["mean"] == 3.0 and (r["higher"], r["lower"]) == (3, 0)
    assert 0.5 <= r["ci95"][0] < 3.0 < r["ci95"][1] <= 5.5  # the mean of 4 draws from {2, 4, 0, 6}


# ----------------------------------------------------------------------------- smaller flag contracts


def test_dropout_flag_reaches_every_dropout(tmp_path):
    """--dropout overrides the dropout of what trains (mBART, the mapping network): all of it, the attention
    dropout of the transformer mapping network (`Attention.dropout`, a float, not an nn.Dropout) included.
    (The towers are frozen and only run in eval mode: their rates do not matter.)"""
    cfg = CLIPTransConfig.preset("tiny")
    cfg.mapping = MappingConfig(kind="transformer")
    weights.save(CLIPTrans(cfg), tmp_path / "w")
    model, _ = runs_module.load_model(tmp_path / "w", settings.Config(dropout=0.0), "cpu", runs_module.Start.WEIGHTS)
    trained = [(name, m) for name, m in model.named_modules() if name.startswith(("mapping", "mbart"))]
    rates = {name: m.p for name, m in trained if isinstance(m, torch.nn.Dropout)}
    rates.update({name: m.dropout for name, m in trained if hasattr(m, "qkv")})  # cliptrans.Attention
    assert {k: v for k, v in rates.items() if v != 0} == {}
    # and so the mapping network is deterministic in training mode
    model.train()
    x = torch.randn(4, cfg.vision.embed_dim)
    assert torch.equal(model.mapping(x), model.mapping(x))


def test_grad_accum_of_the_given_argv(tmp_path, monkeypatch):
    """The paper preset accumulates 4 micro-batches unless --grad_accum is given: in the argv given to
    main() / parse_args(), in whichever form argparse accepts."""
    base = ["--stage", "1", "--preset", "paper", "--weights", str(tmp_path), "--data", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["pytest"])
    assert settings.parse_args(base).grad_accum == 4
    assert settings.parse_args(base + ["--grad_accum", "2"]).grad_accum == 2
    assert settings.parse_args(base + ["--grad_accum", "1"]).grad_accum == 1  # asked for: no accumulation
    monkeypatch.setattr(sys, "argv", ["train.py", *base, "--grad_accum=1"])
    assert settings.parse_args().grad_accum == 1


def test_missing_weights_folder_not_named_last_fails_clearly(world, stage1, cache, tmp_path):
    """Stage 1 with --weights naming a missing folder that is not a stage 0 `last` stops with a message:
    stage 0 writes OUT/last, and must not overwrite a sibling `last` (here: a stage 1 checkpoint)."""
    shutil.copytree(stage1 / "last", tmp_path / "last")
    before = snapshot(tmp_path / "last")
    proc = run_train("--stage", 1, "--data", world, "--weights", tmp_path / "stage0_weights",
                     "--out", tmp_path / "out", "--max_steps", 1, *FAST, cache=cache)
    assert snapshot(tmp_path / "last") == before, "stage 0 overwrote the checkpoint beside --weights"
    fails_cleanly(proc, "stage0_weights does not exist: give --weights a stage 0 `last` folder")


def test_grad_accum_loss_is_the_token_mean_of_the_whole_step(world, stage1, tmp_path):
    """--grad_accum 2: "the loss is a mean over all target tokens of the global batch", as with DDP. The two
    micro-batches' own losses come from a run without accumulation at lr 1e-30 (its step 2 sees the weights
    of step 1), their token counts from the sampler train.py uses."""
    common = args("--stage", 2, "--data", world, "--init", stage1 / "last", "--batch_size", 8, "--dropout", 0,
                  *FAST)
    train.main(common + args("--out", tmp_path / "accum", "--grad_accum", 2, "--max_steps", 1))
    train.main(common + args("--out", tmp_path / "micro", "--max_steps", 2, "--lr", 1e-30))
    accumulated = step_losses(records(tmp_path / "accum"))[1]
    micro = step_losses(records(tmp_path / "micro"))
    tok = data.MBartTokenizer(stage1 / "last" / weights.MBART_TOKENIZER)
    lengths = [int(n) for n in tok.encode(data.read_split(world, "train", ["de"]).sentences["de"], "de")[1].sum(1)]
    sampler = data.LengthBucketSampler(lengths, 8, seed=settings.Config().seed, bucket_size=100 * 8)  # train.py's
    n = [sum(lengths[i] for i in batch) for batch in list(sampler)[:2]]
    assert n[0] != n[1], n  # else the two means agree and the test proves nothing
    token_mean = (micro[1] * n[0] + micro[2] * n[1]) / (n[0] + n[1])
    assert accumulated == pytest.approx(token_mean, abs=1e-5, rel=0), (
        f"logged {accumulated:.6f}; token mean {token_mean:.6f}, mean of the micro-batch means "
        f"{(micro[1] + micro[2]) / 2:.6f} (tokens {n})")


def test_too_few_examples_for_one_step_fails_instead_of_hanging(world, stage0, cache, tmp_path):
    """8 examples, batch 16, 2 micro-batches per step: not one optimizer step fits in an epoch. With
    --max_steps the run must say so and stop, not loop over empty epochs forever."""
    try:
        proc = run_train("--stage", 1, "--data", world, "--weights", stage0, "--out", tmp_path / "out",
                         "--n_pairs", 8, "--batch_size", 16, "--grad_accum", 2, "--max_steps", 3,
                         "--eval_every", 1000, *FAST, cache=cache, timeout=120)
    except subprocess.TimeoutExpired:  # the run fails in seconds; the margin is for a loaded CI machine
        pytest.fail("train.py hangs: 0 optimizer steps per epoch and --max_steps 3 (still running after 120 s)")
    fails_cleanly(proc, "error: 8 training examples make no optimizer step of batch 16 x grad_accum 2 x 1 "
                        "process(es): lower --batch_size or --grad_accum")


def test_main_in_process_closes_its_files(world, stage1, tmp_path):
    """train.main() is callable in-process (tests, notebooks): it must not leave metrics.jsonl open."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        train.main(args("--stage", 2, "--data", world, "--init", stage1 / "last", "--out", tmp_path / "out",
                        "--max_steps", 1, "--batch_size", 8, *FAST))
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not unclosed, unclosed


# ----------------------------------------------------------------------------- nothing lost


def refused(cli, *fragments):
    """train.main(cli) in this process stops with a message holding every fragment; returns the message."""
    with pytest.raises(SystemExit) as stop:
        train.main(args(*cli))
    message = str(stop.value.code)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


@pytest.mark.parametrize("left", ["best", ".last.old", "metrics.jsonl"])
def test_a_new_run_never_replaces_what_an_earlier_run_left(left, world, stage1, stage2, tmp_path):
    """A folder holding a checkpoint of any name (here `best` without `last`, or the copy an interrupted save left
    aside) or a run's log is taken: a new run into it is refused before anything in it changes."""
    out = tmp_path / "run"
    shutil.copytree(stage2, out)
    shutil.rmtree(out / "last")
    if left == ".last.old":
        shutil.copytree(stage2 / "last", out / ".last.old")
    for name in ("best", "metrics.jsonl"):
        if name != left and (out / name).exists():
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    before = snapshot(out)
    refused(["--stage", 2, "--data", world, "--init", stage1 / "last", "--out", out, "--max_steps", 1, *FAST],
            f"{out} already holds", left, "--resume")
    assert snapshot(out) == before


def test_resume_from_the_copy_an_interrupted_save_left_aside(world, stage1, tmp_path, capsys):
    """A crash between the two renames of a checkpoint save leaves only `.last.old`: --resume puts it back as
    `last` and continues through several saves (reading it where it lay, the first save deleted it)."""
    out = tmp_path / "run"
    train.main(resume_args(world, stage1, out, "--max_steps", 2, "--save_every", 1))
    os.replace(out / "last", out / ".last.old")  # the state between the two renames of the next save
    train.main(resume_args(world, stage1, out, "--resume", "--max_steps", 5, "--save_every", 1))
    assert "restored from .last.old" in "".join(capsys.readouterr())
    assert not (out / ".last.old").exists()
    assert read_state(out / "last")["step"] == 5


def test_a_run_holds_its_folder(world, stage1, tmp_path, capsys):
    """OUT/.lock: a second run into a folder that a live process holds is refused; a lock left by a process that
    has ended is taken over, with a message."""
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(str(other.pid))
        cli = resume_args(world, stage1, out, "--max_steps", 1)
        refused(cli, f"{out} is in use by another run (process {other.pid})")
        assert not (out / "metrics.jsonl").exists()
    finally:
        other.kill()
        other.wait()
    train.main(cli)  # the holder has ended: its lock is stale
    assert f"process {other.pid}, which held it, has ended" in "".join(capsys.readouterr())
    assert (out / "last").exists() and not (out / ".lock").exists()  # let go at the end of the run


def test_the_image_features_follow_the_images_not_their_names(world, stage0, tmp_path):
    """Images replaced in place (the same file names) are embedded again: the cache is keyed on their bytes."""
    data_dir = tmp_path / "world"
    shutil.copytree(world, data_dir, ignore=shutil.ignore_patterns("features"))
    c = settings.parse_args(args("--stage", 1, "--data", data_dir, "--weights", stage0, "--out", tmp_path / "o"))
    env = runs_module.setup("cpu", "fp32")
    model = weights.load(stage0)
    split = data.read_split(data_dir, "val", ["en"], images=data_dir / "images")
    first = runs_module.features(model, c, env, "val.image", images=split.images)
    a, b = split.images[0], split.images[1]
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes), b.write_bytes(a_bytes)  # the two images swapped, the names kept
    second = runs_module.features(model, c, env, "val.image", images=split.images)
    assert torch.equal(second[0], first[1]) and torch.equal(second[1], first[0])
    assert torch.equal(second[2:], first[2:])


def test_an_over_long_sentence_is_cut_when_the_data_is_prepared(world, stage1, tmp_path, capsys):
    """A training pair whose target and source exceed mBART's positions (128 in the tiny preset) is cut, with a
    count and its line, when the data is prepared: the run trains through it (it used to stop at its step)."""
    data_dir = tmp_path / "world"
    shutil.copytree(world, data_dir, ignore=shutil.ignore_patterns("features"))
    for lang in ("en", "de"):
        path = data_dir / "raw" / f"train.{lang}"
        lines = path.read_text("utf-8").splitlines()
        lines[2] = " ".join([lines[2].rstrip(".")] * 30) + "."  # some 400 tokens
        path.write_text("\n".join(lines) + "\n", "utf-8")
    train.main(args("--stage", 2, "--data", data_dir, "--init", stage1 / "last", "--out", tmp_path / "out",
                    "--n_pairs", 16, "--batch_size", 16, "--max_steps", 2, *FAST))
    said = "".join(capsys.readouterr())
    assert "train: 1 target sentence(s) cut to mBART's 118 tokens (line 3)" in said
    assert "train: 1 source sentence(s) cut to mBART's 128 tokens (line 3)" in said
    assert read_state(tmp_path / "out" / "last")["step"] == 2


def test_a_broken_test_split_is_found_before_the_first_step(world, stage1, tmp_path):
    """Every split the run scores is read and checked before training: a test split with a missing line stops
    the run before any step, not after the last one."""
    data_dir = tmp_path / "world"
    shutil.copytree(world, data_dir, ignore=shutil.ignore_patterns("features"))
    path = data_dir / "raw" / "test.de"
    path.write_text("".join(path.read_text("utf-8").splitlines(True)[:-1]), "utf-8")  # one line short
    refused(["--stage", 2, "--data", data_dir, "--init", stage1 / "last", "--out", tmp_path / "out",
             "--max_steps", 2, *FAST], "test.de", "lines")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(world, stage1, tmp_path, monkeypatch):
    """A save that fails (here the disk full at state.pt of the second save) stops the run with a message naming
    the folder; the previous checkpoint stays intact and the half-written copy is removed."""
    out = tmp_path / "run"
    real_save, saves = torch.save, []

    def save(obj, path, *a, **kw):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **kw)
    monkeypatch.setattr(torch, "save", save)
    message = refused(resume_args(world, stage1, out, "--max_steps", 3, "--save_every", 1),
                      f"cannot write the checkpoint {out / 'last'} (No space left on device)", "intact")
    assert "--resume" in message
    assert read_state(out / "last")["step"] == 1 and not (out / ".last.tmp").exists()


def test_a_damaged_training_state_fails_clearly(world, stage1, stage2, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stage2, out)
    state = out / "last" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # cut short
    refused(resume_args(world, stage1, out, "--resume", "--max_steps", 5), f"cannot read {state}", "damaged")


def test_a_damaged_tokenizer_in_the_starting_checkpoint_fails_clearly(world, stage1, tmp_path):
    init = tmp_path / "init"
    shutil.copytree(stage1 / "last", init)
    (init / weights.MBART_TOKENIZER).write_text('{"version": "1.0", "model": {')  # cut short
    refused(["--stage", 2, "--data", world, "--init", init, "--out", tmp_path / "out", *FAST],
            f"cannot read the tokenizer {init / weights.MBART_TOKENIZER}", "damaged")


def test_more_beams_than_the_vocabulary_allows_are_refused_before_training(world, stage1, tmp_path):
    refused(["--stage", 2, "--data", world, "--init", stage1 / "last", "--out", tmp_path / "out", *FAST,
             "--beam", 500], "--beam 500, --max_new_tokens 20: num_beams=500 needs a vocabulary of at least 1001 "
                             "tokens", "use at most")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 9. the tasks and the switches


def prepared(world, stage0, *cli):
    """train.prepare for the training and test splits under the flags `cli`, and what each asked the frozen
    towers: {split: (Examples, [(kind, the language of the sentences embedded; None: images)], [the sentences
    embedded])}. Trains nothing."""
    c = settings.parse_args(args("--data", world, "--out", "unused", *cli))
    model, stage0 = weights.load(stage0), Path(stage0)
    toks = data.MBartTokenizer(stage0 / weights.MBART_TOKENIZER), data.TextTowerTokenizer(stage0 / weights.TEXT_TOKENIZER)
    env, out = runs_module.setup("cpu", "fp32"), {}
    for split in (c.train_split, c.test_split):
        with pytest.MonkeyPatch.context() as mp:
            asked = spy_features(mp)
            ex = train.prepare(c, split, model, toks, env)
        lines = {lang: (world / "raw" / f"{split}.{lang}").read_text().splitlines() for lang in tiny_world.LANGS}
        language = lambda texts: next((lang for lang in lines if lines[lang][:len(texts)] == texts), "?")  # noqa: E731
        out[split] = (ex, [(kind, texts and language(texts)) for kind, texts in asked],
                      [texts for kind, texts in asked if texts])
    return out


def rows(world, tok, split, lang, n=None):
    lines = (world / "raw" / f"{split}.{lang}").read_text().splitlines()
    return tok.rows(lines[:n] if n else lines, lang)


@pytest.mark.parametrize("task, prefix, test_prefix, trivial, target", [
    ("caption", "image", "image", True, "en"),  # the caption, from the image, the encoder given `<en> </s>`
    ("text_recon", "text", "text", True, "en"),  # the sentence itself, from its own text embedding
    ("translate", "text", "text", False, "de"),  # the target, from the source's embedding and the source
    ("triplet", "image", "text", False, "de"),  # ... from the image in training, from the source at test
])
def test_each_task_reads_what_its_row_says(task, prefix, test_prefix, trivial, target, world, stage0):
    """The official README's table, column by column: what the tower embeds (training and test), what mBART's
    encoder reads, what the decoder writes; and the stage each task belongs to."""
    (train_set, train_asked, _), (test_set, test_asked, _) = prepared(world, stage0, "--task", task).values()
    tok = data.MBartTokenizer(Path(stage0) / weights.MBART_TOKENIZER)
    said = lambda kind: (kind, "en" if kind == "text" else None)  # noqa: E731  (images have no language)
    assert train_asked == [said(prefix)] and test_asked == [said(test_prefix)]
    for split, ex in (("train", train_set), ("test", test_set)):
        source, seen = rows(world, tok, split, "en"), train.noised_for(ex, 29, 0).src_ids  # (epoch 0's)
        assert seen == ([[r[0], r[-1]] for r in source] if trivial else source), (task, split)
        assert ex.tgt_ids == rows(world, tok, split, target) and ex.tgt_lang == target
        assert ex.noise == (1.0 if trivial and split == "train" else 0.0)
    c = settings.parse_args(args("--task", task, "--data", world))
    assert task in settings.TASKS[c.stage] and c.task == task


def test_use_all_langs_trains_on_each_language_of_the_pair(world, stage0):
    """--use_all_langs: the training split once in English and once in German (its captions from the same
    images; text_recon: each sentence from its own embedding); validation and test stay in --caption_lang."""
    tok = data.MBartTokenizer(Path(stage0) / weights.MBART_TOKENIZER)
    for task, asked in (("caption", [("image", None), ("image", None)]), ("text_recon", [("text", "en"),
                                                                                          ("text", "de")])):
        (ex, train_asked, _), (test, _, _) = prepared(world, stage0, "--task", task, "--use_all_langs").values()
        assert train_asked == asked
        assert ex.tgt_ids == rows(world, tok, "train", "en") + rows(world, tok, "train", "de")
        assert [r[0] for r in ex.src_ids] == [tok.lang_id("en")] * 256 + [tok.lang_id("de")] * 256
        assert len(ex.feats) == 512 and test.tgt_lang == "en" and len(test.tgt_ids) == 24
        if task == "caption":
            assert torch.equal(ex.feats[:256], ex.feats[256:])  # the same image under both captions


def test_the_noise_drops_source_tokens_but_never_the_language_code_or_the_end():
    rows_ = [[250004] + list(range(10, 40)) + [2] for _ in range(200)]
    half = data.drop_tokens(rows_, 0.5, seed=3)
    assert all(r[0] == 250004 and r[-1] == 2 for r in half)
    assert all(r == sorted(r, key=rows_[0].index) for r in half)  # tokens dropped, none added, the order kept
    kept = sum(len(r) - 2 for r in half) / (30 * 200)
    assert 0.45 < kept < 0.55
    assert half == data.drop_tokens(rows_, 0.5, seed=3) != data.drop_tokens(rows_, 0.5, seed=4)
    assert data.drop_tokens(rows_, 1.0) == [[250004, 2]] * 200 and data.drop_tokens(rows_, 0.0) is rows_


def test_noise_train_and_noise_test_mask_the_source(world, stage0):
    """--noise_train: the training source drawn anew each epoch at --mask_prob; --noise_test: the test source
    masked once (seeded) and the prefix from the image (the official --noise_test). --mask_prob in stage 1 lets
    the encoder see part of the caption (the official default, 1, leaves `<lang> </s>`)."""
    tok = data.MBartTokenizer(Path(stage0) / weights.MBART_TOKENIZER)
    (ex, _, _), (test, test_asked, _) = prepared(world, stage0, "--stage", 2, "--noise_train", "--noise_test",
                                                 "--mask_prob", 0.5).values()
    source = rows(world, tok, "train", "en")
    assert ex.src_ids == source and ex.noise == 0.5
    epochs = [train.noised_for(ex, 29, e).src_ids for e in (0, 1)]
    assert epochs[0] != epochs[1] and all(len(a) < len(b) for a, b in zip(epochs[0][:50], source) if len(b) > 8)
    assert test_asked == [("image", None)]
    assert test.src_ids == data.drop_tokens(rows(world, tok, "test", "en"), 0.5, 29)
    (stage1_ex, _, _), _ = prepared(world, stage0, "--stage", 1, "--mask_prob", 0.5).values()
    seen = train.noised_for(stage1_ex, 29, 0).src_ids
    assert seen == data.drop_tokens(rows(world, tok, "train", "en"), 0.5, 29 * 1000)
    assert any(len(r) > 2 for r in seen)
    # --test_prefix text: the prefix from the source as the encoder reads it, its dropped tokens dropped there too
    _, (test, asked, texts) = prepared(world, stage0, "--stage", 2, "--noise_test", "--mask_prob", 0.5,
                                       "--test_prefix", "text").values()
    assert [kind for kind, _ in asked] == ["text"] and texts == [tok.decode(test.src_ids)]
    assert texts[0] != (world / "raw" / "test.en").read_text().splitlines() and all(texts[0])


@pytest.mark.parametrize("cli, message", [
    (["--stage", 2, "--task", "caption"], "--task caption is a stage 1 task, not a stage 2 one"),
    (["--stage", 2, "--mask_prob", 0.3], "--mask_prob has an effect in stage 2 only with --noise_train"),
    (["--stage", 2, "--noise_train", "--mask_prob", 1.5], "--mask_prob 1.5: expected a share"),
    (["--task", "triplet", "--unfreeze_clip"], "--unfreeze_clip fine-tunes the text tower"),
    (["--stage", 2, "--prefix_len", 0, "--unfreeze_clip"], "--unfreeze_clip fine-tunes the text tower"),
    (["--task", "triplet", "--prefix_len", 0], "--prefix_len 0 with --task triplet"),
    (["--stage", 2, "--eval_only", "--noise_train"], "--noise_train change how a model trains"),
    (["--stage", 1, "--noise_test"], "--noise_test has no effect in stage 1"),
    (["--stage", 2, "--use_all_langs"], "--use_all_langs has no effect in stage 2"),
    (["--stage", 1, "--use_all_langs", "--src", "en", "--tgt", "en"], "--use_all_langs trains on each language of "
                                                                       "the pair, and --src en --tgt en is one"),
    (["--stage", 2, "--tgt", "xx"], "--tgt: unknown language 'xx'"),
    (["--stage", 1, "--task", "triplet"], "--task triplet is a stage 2 task, not a stage 1 one"),
    (["--stage", 2, "--mask_prob", 1.0], "--mask_prob has an effect in stage 2 only with --noise_train"),
])
def test_task_flags_refused_where_they_mean_nothing(cli, message, world):
    with pytest.raises(SystemExit) as e:
        settings.parse_args(args("--data", world, *cli))
    assert message in str(e.value.code), e.value.code


@pytest.mark.parametrize("task", ["text_recon", "triplet"])
def test_the_other_tasks_train_and_keep_their_checkpoint(task, world, stage0, stage1, tmp_path):
    """text_recon trains what caption trains (the decoder and the mapping network), keeps `last`, and starts a
    translate run; triplet trains what translate trains and keeps `best`."""
    out = tmp_path / task
    start = ["--weights", stage0] if task == "text_recon" else ["--init", stage1 / "last"]
    train.main(args("--task", task, "--data", world, *start, "--out", out, "--max_steps", 2, "--batch_size", 16,
                    *FAST))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == task and summary["checkpoint"] == str(out / train.TASKS[task].keeps)
    before = tensors(stage0 if task == "text_recon" else stage1 / "last")
    moved = changed(before, tensors(out / "last"))
    trains = ("mbart.decoder.", "mapping.") if task == "text_recon" else ("mbart.encoder.", "mbart.decoder.",
                                                                           "mbart.shared.", "mapping.")
    assert moved == prefixed(before, *trains)
    if task == "text_recon":
        train.main(args("--stage", 2, "--data", world, "--init", out / "last", "--out", tmp_path / "then",
                        "--max_steps", 1, "--batch_size", 16, *FAST))


UNFROZEN = ["--stage", 2, "--unfreeze_clip", "--batch_size", 8, "--save_every", 2, "--eval_every", 1000, *FAST]


def test_unfreeze_clip_trains_the_text_tower_and_resumes_exactly(world, stage1, tmp_path, capsys):
    """--unfreeze_clip: after a step the text tower has moved and the image tower has not; every checkpoint
    holds its own towers (not linked to stage 1's); a run stopped at step 2 and resumed to 4 equals 4 steps in
    one go; translate.py and --eval_only read its checkpoints, with their own towers."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train.main(args(*UNFROZEN, "--data", world, "--init", stage1 / "last", "--out", whole, "--max_steps", 4))
    before, after = tensors(stage1 / "last"), tensors(whole / "last")
    moved = changed(before, after)
    assert prefixed(before, "text.") <= moved and not prefixed(moved, "vision.")
    assert max_diff(before, after, prefixed(before, "text.")) > 1e-4
    assert not os.path.samefile(whole / "last" / weights.TOWERS_FILE, stage1 / "last" / weights.TOWERS_FILE)
    train.main(args(*UNFROZEN, "--data", world, "--init", stage1 / "last", "--out", parts, "--max_steps", 2))
    train.main(args(*UNFROZEN, "--data", world, "--init", stage1 / "last", "--out", parts, "--max_steps", 4,
                    "--resume"))
    want, got = step_losses(records(whole)), step_losses(records(parts))
    assert sorted(got) == [1, 2, 3, 4] and all(got[s] == pytest.approx(want[s], abs=1e-6, rel=0) for s in got)
    assert max_diff(tensors(whole / "last"), tensors(parts / "last")) <= 1e-6
    hyps = eval_only(capsys, "--stage", 2, "--data", world, "--checkpoint", whole / "best", "--out", tmp_path / "e")
    assert Path(hyps["hypotheses"]).read_text() == (whole / "hyps" / "test.final.txt").read_text()


def test_stage0_learns_only_the_languages_it_is_given(world, tmp_path, monkeypatch):
    """--langs "en de": the towers align and the denoiser reconstructs English and German only, never French
    (the French sentences are never encoded for training; only the retrieval report reads them); an unknown
    language is refused."""
    french = set((world / "raw" / "train.fr").read_text().splitlines())
    trained_on = []
    encode, rows = data.TextTowerTokenizer.encode, data.MBartTokenizer.rows
    monkeypatch.setattr(data.TextTowerTokenizer, "encode", lambda self, texts, *a: trained_on.extend(texts) or
                        encode(self, texts, *a))
    monkeypatch.setattr(data.MBartTokenizer, "rows", lambda self, texts, lang: trained_on.extend(texts) or
                        rows(self, texts, lang))
    monkeypatch.setattr(stage0_module, "retrieval", lambda *a, **k: {})
    train.main(args("--stage", 0, "--data", world, "--out", tmp_path / "s0", "--epochs", 1, "--batch_size", 32,
                    "--langs", "en de"))
    assert trained_on and not french & set(trained_on)
    assert set((world / "raw" / "train.de").read_text().splitlines()) & set(trained_on)
    with pytest.raises(SystemExit, match="--langs 'en xx': expected some of the tiny world's languages"):
        train.main(args("--stage", 0, "--data", world, "--out", tmp_path / "s0b", "--langs", "en xx"))


# ----------------------------------------------------------------------------- 10. what a hostile user broke


def test_stage1_task_triplet_is_refused_in_one_line(cache):
    """`python train.py --stage 1 --task triplet`: a flag given on the command line is given, whatever its value
    (it trained stage 2 into runs/tiny/stage2, --stage 1 unseen because 1 is the default): one line, exit 1."""
    proc = run_train("--stage", 1, "--task", "triplet", cache=cache)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: --task triplet is a stage 2 task, not a stage 1 one: give --stage 2, or leave --stage out"], \
        describe(proc)


def test_an_unknown_prompt_in_config_json_is_one_message_for_both_tools(world, scrambled, tmp_path):
    """`train.py --eval_only --checkpoint X` and `translate.py --checkpoint X` for a config.json whose prompt is
    unknown: the same clean message (train.py ended in a traceback)."""
    folder = tmp_path / "edited"
    shutil.copytree(scrambled, folder)
    config = json.loads((folder / weights.CONFIG_FILE).read_text())
    config["cliptrans"]["prompt"] = "reversed"
    (folder / weights.CONFIG_FILE).write_text(json.dumps(config))
    messages = []
    for main, cli in ((train.main, ["--stage", 2, "--eval_only", "--data", world, "--checkpoint", folder, "--out",
                                    tmp_path / "out"]), (translate.main, ["--checkpoint", folder, "A star."])):
        with pytest.raises(SystemExit) as e:
            main(args(*cli))
        messages.append(str(e.value.code))
    said = f"{folder / weights.CONFIG_FILE}: unknown prompt layout 'reversed': expected one of ['train', 'official']"
    assert all(m.startswith("error: ") and m.endswith(said) for m in messages), messages


def test_eval_only_warns_on_another_stage_and_refuses_stage0(world, stage0, stage1, stage2, tmp_path, capsys):
    """`train.py --stage 2 --eval_only --checkpoint STAGE1/last` (and a stage 2 checkpoint scored as stage 1): a
    warning that names what it was trained for, as translate.py gives; a stage 0 checkpoint, whose mapping network
    never trained, is refused (all were scored silently)."""
    for stage, checkpoint, trained in ((2, stage1 / "last", "stage 1 (captioning in en)"),
                                       (1, stage2 / "best", "stage 2 (translation, en -> de)")):
        eval_only(capsys, "--stage", stage, "--data", world, "--checkpoint", checkpoint, "--out", tmp_path)
        capsys.readouterr()
        train.main(args("--stage", stage, "--data", world, "--checkpoint", checkpoint, "--out", tmp_path,
                        "--eval_only", *FAST))
        assert f"warning: {checkpoint} was trained for {trained}" in capsys.readouterr().err
    eval_only(capsys, "--stage", 2, "--data", world, "--checkpoint", stage2 / "best", "--out", tmp_path)
    assert "warning" not in capsys.readouterr().err
    refused(["--stage", 2, "--data", world, "--checkpoint", stage0, "--out", tmp_path, "--eval_only", *FAST],
            f"{stage0} is a stage 0 checkpoint: its mapping network was never trained")


def test_scoring_with_other_settings_writes_other_files(world, stage2, tmp_path, capsys):
    """`--eval_only --test_prefix image`, then `--test_prefix text`, then `--noise_test --mask_prob 0.75`: three
    files of hypotheses, each named by the settings that made it (each replaced the last)."""
    base = ["--stage", 2, "--data", world, "--checkpoint", stage2 / "best", "--out", tmp_path]
    paths = [Path(eval_only(capsys, *base, *more)["hypotheses"])
             for more in (["--test_prefix", "image"], ["--test_prefix", "text"], ["--noise_test", "--mask_prob", 0.75])]
    assert len(set(paths)) == 3 and all(p.parent == tmp_path / "hyps" for p in paths)
    assert "test_prefix_image" in paths[0].name and "noise_test" in paths[2].name and "mask_prob_0.75" in paths[2].name
    first = paths[0].read_text()
    assert Path(eval_only(capsys, *base, "--test_prefix", "image")["hypotheses"]) == paths[0]
    assert paths[0].read_text() == first and all(p.exists() for p in paths)


# ----------------------------------------------------------------------------- 11. properties a user relies on


def test_drop_tokens_drops_the_share_asked_at_an_uneven_rate():
    """--mask_prob 0.2 drops about a fifth of the tokens, 0.8 four fifths (at 0.5 keeping and dropping look
    alike)."""
    rows_ = [[250004] + list(range(10, 40)) + [2] for _ in range(200)]
    for p in (0.2, 0.8):
        dropped = 1 - sum(len(r) - 2 for r in data.drop_tokens(rows_, p, seed=1)) / (30 * 200)
        assert abs(dropped - p) < 0.03, (p, dropped)


def test_noise_train_draws_new_masks_every_epoch_in_the_loop(world, stage1, tmp_path, monkeypatch):
    """`train.py --stage 2 --noise_train --mask_prob 0.5` over two epochs: the training loop feeds each epoch the
    sources masked anew (seeded by the epoch), not the same draw twice."""
    seen = []
    micro_batch = train.micro_batch

    def spy(ex, *a, **k):  # (the training split's batches: it alone carries the noise; scoring reads the others)
        if ex.noise and (not seen or seen[-1] is not ex.src_ids):
            seen.append(ex.src_ids)
        return micro_batch(ex, *a, **k)
    monkeypatch.setattr(train, "micro_batch", spy)
    train.main(args("--stage", 2, "--data", world, "--init", stage1 / "last", "--out", tmp_path / "out",
                    "--noise_train", "--mask_prob", 0.5, "--n_pairs", 32, "--batch_size", 16, "--epochs", 2, *FAST))
    tok = data.MBartTokenizer(stage1 / "last" / weights.MBART_TOKENIZER)
    source = rows(world, tok, "train", "en", 32)
    assert seen == [data.drop_tokens(source, 0.5, 29 * 1000 + epoch) for epoch in (0, 1)]
    assert seen[0] != seen[1]


def test_each_noise_switch_alone_leaves_the_other_side_whole(world, stage0):
    """--noise_train alone scores whole sources, from their text embedding; --noise_test alone trains on whole
    sources (the tests above always gave both)."""
    tok = data.MBartTokenizer(Path(stage0) / weights.MBART_TOKENIZER)
    (ex, _, _), (test, asked, _) = prepared(world, stage0, "--stage", 2, "--noise_train", "--mask_prob", 0.5).values()
    assert ex.noise == 0.5 and test.src_ids == rows(world, tok, "test", "en") and asked == [("text", "en")]
    (ex, _, _), (test, asked, _) = prepared(world, stage0, "--stage", 2, "--noise_test", "--mask_prob", 0.5).values()
    assert ex.noise == 0.0 and train.noised_for(ex, 29, 0).src_ids == rows(world, tok, "train", "en")
    assert test.src_ids != rows(world, tok, "test", "en") and asked == [("image", None)]


def test_use_all_langs_with_the_target_as_caption_language_trains_on_both(world, stage0):
    """`--stage 1 --use_all_langs --caption_lang de`: the training split in English and in German, validation and
    test in German."""
    tok = data.MBartTokenizer(Path(stage0) / weights.MBART_TOKENIZER)
    (ex, _, _), (test, _, _) = prepared(world, stage0, "--stage", 1, "--use_all_langs", "--caption_lang",
                                        "de").values()
    assert ex.tgt_ids == rows(world, tok, "train", "en") + rows(world, tok, "train", "de")
    assert test.tgt_lang == "de" and test.tgt_ids == rows(world, tok, "test", "de")


def test_unfreeze_clip_scores_with_the_text_tower_as_trained(world, scrambled, tmp_path, capsys):
    """`train.py --stage 2 --unfreeze_clip`: validation and test embed the sources with the text tower as it has
    trained, not with features cached before training. From a model whose words follow small changes of its prefix
    (`scrambled`), the run's final hypotheses are those of its `best` scored afresh."""
    init = tmp_path / "init"
    shutil.copytree(scrambled, init)
    config = json.loads((init / weights.CONFIG_FILE).read_text())
    config["train"]["stage"] = 1
    (init / weights.CONFIG_FILE).write_text(json.dumps(config))
    out = tmp_path / "out"
    train.main(args("--stage", 2, "--unfreeze_clip", "--data", world, "--init", init, "--out", out, "--lr", 1e-2,
                    "--max_steps", 2, "--batch_size", 16, "--eval_every", 1000, *FAST))
    result = eval_only(capsys, "--stage", 2, "--data", world, "--checkpoint", out / "best", "--out", tmp_path / "e")
    assert Path(result["hypotheses"]).read_text() == (out / "hyps" / "test.final.txt").read_text()
    start = eval_only(capsys, "--stage", 2, "--data", world, "--checkpoint", init, "--out", tmp_path / "s")
    assert Path(start["hypotheses"]).read_text() != Path(result["hypotheses"]).read_text()


# Each flag that changes what a run learns, with another value: --resume refuses each (stage 1's `last`, or stage
# 2's for the stage 2 switches).
CHANGED = {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 3, "weight_decay": 0.1, "dropout": 0.2, "seed": 30,
           "n_pairs": 100, "train_split": "val", "caption_lang": "de", "freeze_decoder": True, "mask_prob": 0.5,
           "skip_missing_images": True, "noise_train": True, "unfreeze_clip": True}


@pytest.mark.parametrize("name", list(CHANGED))
def test_resume_refuses_every_flag_that_changes_training(name, world, stage1, stage2, tmp_path):
    """`train.py --resume --noise_train` (and each flag of CHANGED) where the run trained without it: refused, by
    one list derived from the flag table (a hand-kept subset let these through)."""
    stage, run = (2, stage2) if name in ("noise_train", "unfreeze_clip") else (1, stage1)
    value = CHANGED[name]
    flag = [f"--{name}"] if value is True else [f"--{name}", value]
    extra = ["--noise_train"] if name == "mask_prob" and stage == 2 else []
    out = tmp_path / "run"
    shutil.copytree(run, out)
    refused(["--stage", stage, "--data", world, "--out", out, "--resume", "--batch_size", 16, *flag, *extra, *FAST],
            f"was trained with --{name} ")


def test_a_row_cut_to_fit_still_ends_in_its_end_token(world, stage0, tmp_path):
    """A training pair longer than mBART's positions, cut when the data is prepared: source and target still end
    in `</s>`, at the longest length each may have."""
    data_dir = tmp_path / "world"
    shutil.copytree(world, data_dir, ignore=shutil.ignore_patterns("features"))
    for lang in ("en", "de"):
        path = data_dir / "raw" / f"train.{lang}"
        lines = path.read_text("utf-8").splitlines()
        lines[2] = " ".join([lines[2].rstrip(".")] * 30) + "."
        path.write_text("\n".join(lines) + "\n", "utf-8")
    (ex, _, _), _ = prepared(data_dir, stage0, "--stage", 2, "--n_pairs", 8).values()
    eos = data.MBartTokenizer(Path(stage0) / weights.MBART_TOKENIZER).eos_id
    assert len(ex.src_ids[2]) == 128 and len(ex.tgt_ids[2]) == 118
    assert ex.src_ids[2][-1] == ex.tgt_ids[2][-1] == eos
