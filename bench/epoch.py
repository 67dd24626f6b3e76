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
import train as recipe  # noqa: E402
from bench import hf_forward, hf_models  # noqa: E402  (bench/bench.py: Hugging Face's side)
from cliptrans import CLIPTrans, CLIPTransConfig  # noqa: E402


def lengths(sentences, lang, tokenizer):
    """Tokens of `[lang] x </s>` for each sentence."""
    if tokenizer:
        return tokenizer.lengths(sentences)
    return [len(re.findall(r"\w+|[^\w\s]", s)) + 2 for s in sentences]


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
    dev = env.device
    cfg = CLIPTransConfig.preset(a.preset)
    V, P = cfg.mbart.vocab_size, cfg.mapping.prefix_len
    split = data.read_split(a.data, "train", ["en", "de"])
    tok = data.MBartTokenizer(a.tokenizer) if a.tokenizer else None
    src_len, tgt_len = lengths(split.sentences["en"], "en", tok), lengths(split.sentences["de"], "de", tok)
    g = torch.Generator().manual_seed(0)
    ids = lambda n, lang: [lang] + torch.randint(4, V - 60, (max(0, n - 2),), generator=g).tolist() + [2]  # noqa
    ex = recipe.Examples({}, torch.randn(len(src_len), cfg.text.embed_dim, generator=g),
                         [ids(n, V - 51) for n in src_len], [ids(n, V - 48) for n in tgt_len], "de", [])
    ex.src_ids = recipe.truncate(ex.src_ids, cfg.mbart.max_positions, "source", "train")
    ex.tgt_ids = recipe.truncate(ex.tgt_ids, cfg.mbart.max_positions - P, "target", "train")
    sampler, _ = recipe.make_sampler(recipe.Config(batch_size=a.batch_size, grad_accum=a.grad_accum), ex, env)
    sampler.set_epoch(0)
    batches = list(sampler)[:a.steps * a.grad_accum]
    steps = [batches[i:i + a.grad_accum] for i in range(0, len(batches), a.grad_accum)]
    sentences = sum(len(b) for b in batches)
    mode = recipe.compile_mode("auto", env)  # and the padding train.py gives its batches in that mode
    multiple = recipe.pad_multiple(mode)
    shapes = recipe.batch_shapes(ex, batches, cfg, multiple)
    results = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
               "preset": a.preset, "steps": len(steps), "sentences": sentences, "shapes": len(shapes),
               "lengths": "tokenizer" if tok else "words and punctuation + 2"}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def two_passes(run_step):
        times = []
        for _ in range(2):
            sync()
            t0 = time.perf_counter()
            for step in steps:
                run_step(step)
            sync()
            times.append(time.perf_counter() - t0)
        return {"first_pass_s": times[0], "second_pass_s": times[1], "sentences_per_s": sentences / times[1],
                "compile_s": times[0] - times[1]}

    # ours: train.py's step, model, optimizer and scaler as train.py makes them
    torch.manual_seed(0)
    ours = CLIPTrans(cfg)
    ours.vision = ours.text = None  # the frozen towers: their features are computed before training
    ours.to(dev).train()
    params = [*ours.mapping.parameters(), *ours.mbart.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.98), eps=1e-6, fused=dev.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=env.dtype == "fp16")
    model = recipe.compiled(ours, mode, env, shapes=max(64, 2 * len(shapes)))
    results["ours"] = two_passes(lambda step: recipe.train_step(
        model, opt, scaler, [recipe.micro_batch(ex, b, 1, cfg, dev, multiple) for b in step], env))
    results["ours"]["compile"] = mode
    print(f"ours: {results['ours']}", flush=True)
    ours = model = opt = params = None  # freed before Hugging Face's model comes
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # Hugging Face: the same batches, padded the same way, its own causal mask (the timing of bench.py)
    mbart_hf, *_ = hf_models(cfg)
    mapping_hf = type(CLIPTrans(cfg).mapping)(cfg.mapping, cfg.text.embed_dim, cfg.mbart.d_model)
    mbart_hf.to(dev).train(), mapping_hf.to(dev).train()
    opt = torch.optim.AdamW([*mbart_hf.parameters(), *mapping_hf.parameters()], lr=1e-5, betas=(0.9, 0.98),
                            eps=1e-6, fused=dev.type == "cuda")

    def hf_step(step):
        micro = [recipe.micro_batch(ex, b, 1, cfg, dev, multiple) for b in step]
        total = sum(n for _, n in micro)
        for (clip, src, mask, tgt), n in micro:  # labels as CLIPTrans.decoder_inputs lays them out
            labels = torch.cat([tgt[:, :1].masked_fill(tgt[:, :1] == 1, -100), tgt.new_full((len(tgt), P), -100),
                                tgt[:, 1:].masked_fill(tgt[:, 1:] == 1, -100)], 1)
            with env.autocast:
                loss = hf_forward(mbart_hf, mapping_hf, clip, src, mask, tgt, labels, P, "causal").loss
            (loss * n / total).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    results["hf"] = two_passes(hf_step)
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
