"""
A real epoch, not one shape: `--steps` optimizer steps of train.py's own training step (train.train_step on
train.micro_batch's padded batches, compiled as train.py's --compile auto compiles it) at the paper's sizes with
random weights, on batches drawn by train.py's sampler from Multi30k's sentence lengths, and the same batches
through Hugging Face's MBartForConditionalGeneration (eager, fused AdamW, the same autocast). Each side runs the
steps twice: the first pass includes the compilations (one per batch shape), the second is the steady state.

    python bench/epoch.py --data ../shared/multi30k --out bench/results/gpu/epoch.json      # on a GPU
    python bench/epoch.py --data DIR --preset tiny --steps 3 --out epoch.json              # a CPU smoke run

Sentence lengths: the pieces of an mBART-50 tokenizer.json when `--tokenizer` gives one; otherwise words and
punctuation marks (a lower bound of SentencePiece's pieces), plus the language code and </s>.
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's files: bench/ sits beside them
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench.py, beside this file
import data  # noqa: E402
import runs  # noqa: E402
import settings  # noqa: E402
import train as recipe  # noqa: E402
from bench import hf_forward, hf_models  # noqa: E402  (bench/bench.py: Hugging Face's side)
from cliptrans import CLIPTrans, CLIPTransConfig  # noqa: E402


def lengths(sentences, lang, tokenizer):
    """Tokens of `[lang] x </s>` for each sentence."""
    if tokenizer:
        return [len(row) for row in tokenizer.rows(sentences, lang)]
    return [len(re.findall(r"\w+|[^\w\s]", s)) + 2 for s in sentences]


def epoch(a, cfg, env):
    """Random token rows with Multi30k's sentence lengths (cut as train.py cuts them), as train.Examples, and the
    first `--steps` optimizer steps (lists of batches) of train.py's sampler over them."""
    V, P = cfg.mbart.vocab_size, cfg.mapping.prefix_len
    split = data.read_split(a.data, "train", ["en", "de"])
    tok = data.MBartTokenizer(a.tokenizer) if a.tokenizer else None
    src_len, tgt_len = lengths(split.sentences["en"], "en", tok), lengths(split.sentences["de"], "de", tok)
    g = torch.Generator().manual_seed(0)
    ids = lambda n, lang: [lang] + torch.randint(4, V - 60, (max(0, n - 2),), generator=g).tolist() + [2]  # noqa
    ex = recipe.Examples({}, torch.randn(len(src_len), cfg.text.embed_dim, generator=g),
                         data.cut([ids(n, V - 51) for n in src_len], cfg.mbart.max_positions),
                         data.cut([ids(n, V - 48) for n in tgt_len], cfg.mbart.max_positions - P), "de", [])
    c = settings.Config(batch_size=a.batch_size, grad_accum=a.grad_accum)
    sampler, _ = runs.sampler(c, [len(t) for t in ex.tgt_ids], env)
    sampler.set_epoch(0)
    batches = list(sampler)[:a.steps * a.grad_accum]
    return ex, [batches[i:i + a.grad_accum] for i in range(0, len(batches), a.grad_accum)]


def two_passes(run_step, steps, device):
    """Every step of `steps` twice: the first pass with the compilations, the second the steady state."""
    sync, times = torch.cuda.synchronize if device.type == "cuda" else (lambda: None), []
    for _ in range(2):
        sync()
        t0 = time.perf_counter()
        for step in steps:
            run_step(step)
        sync()
        times.append(time.perf_counter() - t0)
    sentences = sum(len(b) for step in steps for b in step)
    return {"first_pass_s": times[0], "second_pass_s": times[1], "sentences_per_s": sentences / times[1],
            "compile_s": times[0] - times[1]}


def ours(cfg, ex, steps, env, mode, multiple, shapes):
    """train.py's step, model, optimizer and scaler as train.py makes them."""
    torch.manual_seed(0)
    model = CLIPTrans(cfg)
    model.vision = model.text = None  # the frozen towers: their features are computed before training
    model.to(env.device).train()
    params = [*model.mapping.parameters(), *model.mbart.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.98), eps=1e-6, fused=env.device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=env.dtype == "fp16")
    step_model = runs.compiled(model, mode, env, shapes=max(64, 2 * shapes))
    return two_passes(lambda step: recipe.train_step(
        step_model, opt, scaler, [recipe.micro_batch(ex, b, 1, cfg, env.device, multiple) for b in step], env),
        steps, env.device)


def hugging_face(cfg, ex, steps, env, multiple):
    """The same batches, padded the same way, through Hugging Face's model with its own causal mask (bench.py's
    timing)."""
    P = cfg.mapping.prefix_len
    mbart_hf, *_ = hf_models(cfg)
    mapping_hf = type(CLIPTrans(cfg).mapping)(cfg.mapping, cfg.text.embed_dim, cfg.mbart.d_model)
    mbart_hf.to(env.device).train(), mapping_hf.to(env.device).train()
    opt = torch.optim.AdamW([*mbart_hf.parameters(), *mapping_hf.parameters()], lr=1e-5, betas=(0.9, 0.98),
                            eps=1e-6, fused=env.device.type == "cuda")

    def hf_step(step):
        micro = [recipe.micro_batch(ex, b, 1, cfg, env.device, multiple) for b in step]
        total = sum(n for _, n in micro)
        for (clip, src, mask, tgt), n in micro:  # labels as CLIPTrans.decoder_inputs lays them out
            labels = torch.cat([tgt[:, :1].masked_fill(tgt[:, :1] == 1, -100), tgt.new_full((len(tgt), P), -100),
                                tgt[:, 1:].masked_fill(tgt[:, 1:] == 1, -100)], 1)
            with env.autocast:
                loss = hf_forward(mbart_hf, mapping_hf, clip, src, mask, tgt, labels, P, "causal").loss
            (loss * n / total).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return two_passes(hf_step, steps, env.device)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a folder in the Multi30k layout (raw/train.en, raw/train.de)")
    p.add_argument("--tokenizer", default=None, help="an mBART-50 tokenizer.json, for the real lengths")
    p.add_argument("--preset", default="paper", choices=["paper", "tiny"])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=32, help="train.py's paper default")
    p.add_argument("--grad_accum", type=int, default=4, help="train.py's paper default")
    p.add_argument("--out", default="epoch.json")
    a = p.parse_args()
    env = runs.setup("auto", "auto")  # train.py's device and precision
    cfg = CLIPTransConfig.preset(a.preset)
    ex, steps = epoch(a, cfg, env)
    mode = runs.compile_mode("auto", env)  # and the padding train.py gives its batches in that mode
    multiple = runs.pad_multiple(mode)
    shapes = runs.batch_shapes(ex.src_ids, ex.tgt_ids, [b for step in steps for b in step], cfg, multiple)
    results = {"device": torch.cuda.get_device_name() if env.device.type == "cuda" else "cpu",
               "torch": torch.__version__, "preset": a.preset, "steps": len(steps),
               "sentences": sum(len(b) for step in steps for b in step), "shapes": len(shapes),
               "lengths": "tokenizer" if a.tokenizer else "words and punctuation + 2"}
    results["ours"] = {**ours(cfg, ex, steps, env, mode, multiple, len(shapes)), "compile": mode}
    print(f"ours: {results['ours']}", flush=True)
    if env.device.type == "cuda":  # ours freed before Hugging Face's model comes
        torch.cuda.empty_cache()
    results["hf"] = hugging_face(cfg, ex, steps, env, multiple)
    print(f"hf: {results['hf']}", flush=True)
    results["speedup"] = results["ours"]["sentences_per_s"] / results["hf"]["sentences_per_s"]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(f"{results['device']}: {len(steps)} steps of {a.batch_size} x {a.grad_accum} sentences, {len(shapes)} "
          f"shapes; sentences/s (second pass) ours {results['ours']['sentences_per_s']:.0f}, Hugging Face "
          f"{results['hf']['sentences_per_s']:.0f}: {results['speedup']:.2f}x; compilation "
          f"{results['ours']['compile_s']:.0f} s. Wrote {a.out}")


if __name__ == "__main__":
    main()
