"""bench/bench.py runs end to end on the CPU with the tiny preset (the timings themselves are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from bench import bench  # bench/bench.py
from cliptrans import CLIPTrans, CLIPTransConfig

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke_run_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "bench/bench.py", "--device", "cpu", "--preset", "tiny", "--iters", "1",
                           "--profile", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    for name in ("text tower (XLM-R + pooling)", "image tower (ViT)", "beam-5 generation (mBART)",
                 "stage 2 training step"):
        assert figures[name]["hf_ms"] > 0 and figures[name]["ours_ms"] > 0, name
    # the two implementations run on the same converted weights: same embeddings, same tokens, same loss
    assert figures["text tower (XLM-R + pooling)"]["max_abs_diff"] < 1e-4
    assert figures["image tower (ViT)"]["max_abs_diff"] < 1e-4
    assert figures["beam-5 generation (mBART)"]["same_tokens"] == 1.0
    assert figures["stage 2 training step"]["first_loss_abs_diff"] < 1e-4
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
