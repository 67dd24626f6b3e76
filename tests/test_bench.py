"""bench/bench.py runs end to end on the CPU with the tiny preset (the timings themselves are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import bench  # bench/bench.py
from cliptrans import CLIPTrans, CLIPTransConfig
from conftest import bench_models

ROOT = Path(__file__).resolve().parents[1]
# The first training step of both implementations on the same weights, fp32 on a CPU (bench.first_loss_agreement):
# with the prefix mask on both sides the logits agree within 5e-7 (0 with SDPA) and the mean losses exactly (measured);
# Hugging Face's decoder with its causal mask moves the logits by 4e-2 and the mean loss by 1e-5 (the tiny preset).
FIRST_LOGITS_ATOL, FIRST_LOSS_ATOL = 1e-4, 4e-6


def test_bench_smoke_run_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "bench/bench.py", "--device", "cpu", "--preset", "tiny", "--iters", "1",
                           "--profile", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    for name in ("text tower (XLM-R + pooling)", "image tower (ViT)", "beam-5 generation (mBART)",
                 "stage 2 training step (train.py default)"):
        assert figures[name]["hf_ms"] > 0 and figures[name]["ours_ms"] > 0, name
    # the two implementations run on the same converted weights: same embeddings, same tokens, same loss
    assert figures["text tower (XLM-R + pooling)"]["max_abs_diff"] < 1e-4
    assert figures["image tower (ViT)"]["max_abs_diff"] < 1e-4
    assert figures["beam-5 generation (mBART)"]["same_tokens"] == 1.0
    assert figures["stage 2 training step (train.py default)"]["compile"] == "none"  # train.py on a CPU: eager
    assert figures["stage 2 training step (train.py default)"]["first_logits_max_abs_diff"] < FIRST_LOGITS_ATOL
    assert figures["stage 2 training step (train.py default)"]["first_loss_abs_diff"] < FIRST_LOSS_ATOL
    for variant in bench.CPU_VARIANTS:  # the generation variants a CPU can run: their tokens are HF's too
        assert figures[f"beam-5 generation (mBART, {variant})"]["same_tokens"] == 1.0, variant
    assert "speed-up" in done.stdout
    # --profile: the busiest operators of each side, the first a part of the total busy time
    for name in ("profile: beam-5 generation (mBART)", "profile: stage 2 training step"):
        for side in ("hf", "ours"):
            prof = figures[name][side]
            assert prof["top"] and 0 < prof["top"][0]["ms"] <= prof["busy_ms"], (name, side)
    profiled = [v for v in bench.PROFILED_VARIANTS if v in bench.CPU_VARIANTS]
    assert profiled
    for variant in profiled:
        prof = figures[f"profile: beam-5 generation (mBART, {variant})"]["ours"]
        assert prof["top"] and 0 < prof["top"][0]["ms"] <= prof["busy_ms"], variant


def test_linear_weights_cast_once_give_the_same_numbers_as_autocast():
    """bench.py's variant "Linear weights cast once per step": the same loss and gradients, bit for bit, as
    autocast casting each weight at its use (CPU autocast to bf16 here)."""
    torch.manual_seed(0)
    model = CLIPTrans(CLIPTransConfig.preset("tiny"))
    clip, src, tgt = torch.randn(3, 64), torch.randint(4, 1000, (3, 7)), torch.randint(4, 1000, (3, 6))
    inputs = (clip, src, torch.ones_like(src), tgt)
    params = list(model.mbart.parameters()) + list(model.mapping.parameters())
    results = []
    for forward in (lambda: model(*inputs), bench.cast_once_forward(model, ("mbart", "mapping"), inputs,
                                                                    torch.bfloat16)):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = forward()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in params]))
    (plain, plain_grads), (once, once_grads) = results
    assert torch.equal(plain, once)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, once_grads))
    assert any(p.grad.abs().sum() > 0 for p in model.mbart.decoder.layers[0].mlp.fc1.parameters())


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_first_loss_agreement_tells_the_prefix_mask_from_a_causal_one(attn_implementation):
    """bench.py's check that the two implementations train alike (`first_loss_agreement`, as its main() calls it):
    within its tolerances when Hugging Face's decoder gets our prefix mask (a 4D mask: bool for SDPA, additive for
    eager attention), and far outside them when it reads the prefix causally, its own default: the check can
    fail."""
    torch.manual_seed(0)
    cfg = CLIPTransConfig.preset("tiny")
    ours, mbart_hf, mapping_hf = bench_models(cfg)
    mbart_hf.set_attn_implementation(attn_implementation)
    g = torch.Generator().manual_seed(0)
    V = cfg.mbart.vocab_size
    src, tgt = torch.randint(4, V - 60, (4, 12), generator=g), torch.randint(4, V - 60, (4, 12), generator=g)
    src[:, 0], src[:, -1], tgt[:, 0], tgt[:, -1] = V - 51, 2, V - 48, 2  # `<lang> x </s>`, as bench.py's
    clip = torch.randn(4, cfg.text.embed_dim, generator=g)
    inputs = (ours, mbart_hf, mapping_hf, clip, src, torch.ones_like(src), tgt)
    same = bench.first_loss_agreement(*inputs)  # bench.py's own call
    assert same["first_logits_max_abs_diff"] < FIRST_LOGITS_ATOL and same["first_loss_abs_diff"] < FIRST_LOSS_ATOL
    causal = bench.first_loss_agreement(*inputs, hf_mask="causal")
    assert causal["first_logits_max_abs_diff"] > 100 * FIRST_LOGITS_ATOL, causal
    assert causal["first_loss_abs_diff"] > FIRST_LOSS_ATOL, causal


def test_epoch_smoke_run_counts_the_batches_train_py_draws(tmp_path):
    """bench/epoch.py on a small tiny world: the batches are train.py's sampler's, grad_accum to a step, and the
    shapes those train.micro_batch pads them to (timings are the GPU run's business, not a test's)."""
    import tiny_world
    world = tiny_world.make_tiny_world(tmp_path / "world", n_train=300, n_val=4, n_test=4, image_size=16)
    out = tmp_path / "epoch.json"
    done = subprocess.run([sys.executable, "bench/epoch.py", "--data", str(world), "--preset", "tiny", "--steps", "2",
                           "--batch_size", "8", "--grad_accum", "2", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert (figures["steps"], figures["sentences"], figures["ours"]["compile"]) == (2, 2 * 2 * 8, "none")
    assert 1 <= figures["shapes"] <= 4  # 4 micro-batches of sentences of similar lengths
