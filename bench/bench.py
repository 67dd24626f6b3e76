"""
Speed of this implementation against Hugging Face transformers, side by side in one process, on the
same random weights (converted from the Hugging Face models with weights.py's rules).

    python bench/bench.py                            # paper sizes on CUDA, bf16 autocast: bench/README.md
    python bench/bench.py --device cpu --preset tiny # a smoke run in seconds

Three measurements:
1. stage 2 training step: 64 precomputed 512-d text embeddings -> mapping network -> 10-vector prefix +
   mBART-50, source 32 tokens, target 32 tokens, fused AdamW step included. Hugging Face's side is
   MBartForConditionalGeneration (sdpa) fed the same prefix through `decoder_inputs_embeds` (timed with its
   own causal mask: the same work up to the prefix mask). The first loss of both sides is compared in fp32 with
   our prefix mask given to Hugging Face's decoder as a 4D `decoder_attention_mask`: the same computation.
2. beam search, 5 beams, 128 sources of 20 tokens, exactly 32 new tokens (min = max = 32).
3. the frozen towers: XLM-R large + mean pooling on 256 sentences of 32 tokens; ViT-B/32 on 256 images.
Prints one table (ratios: Hugging Face time / our time, higher is better) and writes the figures to JSON.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's files: bench/ sits beside them
import runs  # noqa: E402
import train as recipe  # noqa: E402  (train.py: the training step a user's run takes)
import weights  # noqa: E402
from cliptrans import CLIPTrans, CLIPTransConfig, prefix_mask  # noqa: E402

CPU_VARIANTS = ("matmul attention", "torch.topk", "eager scores", "compiled scores")  # they need no GPU
# --profile: these variants' kernels too, next to the default's (3 new tokens with plain launches: what a search
# costs besides its decoding steps)
PROFILED_VARIANTS = ("eager scores", "3 new tokens, no CUDA graph")
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core FLOP/s


def hf_models(cfg: CLIPTransConfig):
    """Hugging Face models with the sizes of `cfg`, randomly initialised (transformers' own init)."""
    import transformers as tf
    m, t, v = cfg.mbart, cfg.text, cfg.vision
    mbart = tf.MBartForConditionalGeneration(tf.MBartConfig(
        vocab_size=m.vocab_size, d_model=m.d_model, encoder_layers=m.encoder_layers, decoder_layers=m.decoder_layers,
        encoder_attention_heads=m.heads, decoder_attention_heads=m.heads, encoder_ffn_dim=m.ffn,
        decoder_ffn_dim=m.ffn, max_position_embeddings=m.max_positions, dropout=m.dropout, attention_dropout=0.0,
        activation_dropout=0.0, activation_function="gelu", scale_embedding=m.scale_embedding, pad_token_id=m.pad_id,
        bos_token_id=m.bos_id, eos_token_id=m.eos_id, decoder_start_token_id=m.decoder_start_id,
        forced_eos_token_id=m.eos_id, attn_implementation="sdpa"))
    xlmr = tf.XLMRobertaModel(tf.XLMRobertaConfig(
        vocab_size=t.vocab_size, hidden_size=t.width, num_hidden_layers=t.layers, num_attention_heads=t.heads,
        intermediate_size=t.mlp, max_position_embeddings=t.max_positions, type_vocab_size=t.type_vocab_size,
        pad_token_id=t.pad_id, layer_norm_eps=t.eps, attn_implementation="sdpa"), add_pooling_layer=False)
    head = torch.nn.Linear(t.width, t.embed_dim)  # M-CLIP's LinearTransformation
    vision = tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(
        hidden_size=v.width, num_hidden_layers=v.layers, num_attention_heads=v.heads, intermediate_size=v.mlp,
        image_size=v.image_size, patch_size=v.patch_size, projection_dim=v.embed_dim, hidden_act="quick_gelu",
        layer_norm_eps=v.eps, attn_implementation="sdpa"))
    return mbart, xlmr, head, vision


def convert_from_hf(model, mbart, xlmr, head, vision):
    """Copy the Hugging Face weights into our model with the converter's own rules."""
    state = {}
    state.update(weights.convert(mbart.state_dict(), weights.MBART_RULES, _shapes(model, "mbart."), "hf mbart"))
    mclip = {f"transformer.{k}": v for k, v in xlmr.state_dict().items()}
    mclip.update({f"LinearTransformation.{k}": v for k, v in head.state_dict().items()})
    state.update(weights.convert(mclip, weights.MCLIP_RULES, _shapes(model, "text."), "hf xlmr"))
    state.update(weights.convert(vision.state_dict(), weights.CLIP_RULES, _shapes(model, "vision."), "hf clip"))
    state.update({f"mapping.{k}": v for k, v in model.mapping.state_dict().items()})
    model.load_state_dict(state)


def _shapes(model, prefix):
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(prefix)}


def timed(fn, device, iters, warmup=2):
    """Median wall time of fn() in seconds, synchronising the GPU around each call."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernel_profile(fn, device, top=15):
    """Where one call of fn() spends its time: the busiest GPU kernels (CPU operators on the CPU), and how much
    of the wall time the device was busy at all (well under 100%: the launches, not the GPU, set the pace)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - t0
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)  # microseconds
    events = sorted((e for e in prof.key_averages() if own(e) > 0), key=own, reverse=True)
    busy = sum(own(e) for e in events) / 1e6
    return {"wall_ms": wall * 1e3, "busy_ms": busy * 1e3, "busy_fraction": busy / wall,
            "top": [{"name": e.key[:100], "ms": own(e) / 1e3, "calls": e.count} for e in events[:top]]}


def peak_memory(device, fn):
    if device != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def train_flops(cfg, B, S, T, n_labels):
    """Model FLOPs of one training step (forward + backward = 3 x forward), matmuls and attention only."""
    m, P = cfg.mbart, cfg.mapping.prefix_len
    d, f = m.d_model, m.ffn
    enc = B * S * m.encoder_layers * 2 * (4 * d * d + 2 * d * f) + B * m.encoder_layers * 4 * S * S * d
    dec = B * T * m.decoder_layers * 2 * (6 * d * d + 2 * d * f)  # self q,k,v,out + cross q,out + MLP
    dec += B * S * m.decoder_layers * 2 * 2 * d * d  # cross-attention keys and values of the source
    dec += B * m.decoder_layers * 4 * (T * T + T * S) * d
    head = 2 * n_labels * d * m.vocab_size + 2 * B * cfg.vision.embed_dim * P * d
    return 3 * (enc + dec + head)


# -----------------------------------------------------------------------------
# The run: its options, both sides' models on the same weights, and the figures it keeps.

def parse_args():
    """The command line (the module's docstring says what it measures)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="paper", choices=["paper", "tiny"])
    p.add_argument("--iters", type=int, default=None, help="timed repetitions (default: 10 on CUDA, 2 on CPU)")
    p.add_argument("--only", default="towers,generate,train", help="comma-separated subset")
    p.add_argument("--compile", action="store_true", help="also time our training step under torch.compile")
    p.add_argument("--profile", action="store_true", help="also record the busiest kernels of our generation and "
                                                           "training step (and Hugging Face's) in the JSON")
    p.add_argument("--out", default="bench.json")
    return p.parse_args()


@dataclass
class Bench:
    """What every measurement shares: the options, the device, both sides' models, the shapes of the inputs and
    their random generator, and the figures so far: `rows` for the printed table, `results` for the JSON."""
    opts: argparse.Namespace
    dev: str
    iters: int  # timed repetitions
    amp: object  # bf16 autocast on CUDA, nullcontext() on a CPU
    cfg: CLIPTransConfig
    ours: CLIPTrans
    mbart_hf: torch.nn.Module
    xlmr_hf: torch.nn.Module
    head_hf: torch.nn.Module  # M-CLIP's LinearTransformation
    vision_hf: torch.nn.Module
    train_shape: tuple  # training batch, source and target lengths
    gen_shape: tuple  # generation batch, source length, new tokens
    tower_batch: int
    lang: int  # the target language's code
    results: dict
    g: torch.Generator = field(default_factory=lambda: torch.Generator(device="cpu").manual_seed(0))
    rows: list = field(default_factory=list)
    # --profile: (JSON key, side, setup() -> the call to profile), run after every timing
    profile_jobs: list = field(default_factory=list)

    def rand_ids(self, B, T):
        """(B, T) random token ids, clear of the special tokens and of the language codes."""
        return torch.randint(4, self.cfg.mbart.vocab_size - 60, (B, T), generator=self.g)

    def row(self, name, hf_s, ours_s, unit_count, unit, **extra):
        """One row of the table (Hugging Face's time against ours, in seconds), into the JSON too."""
        self.rows.append((name, hf_s * 1e3, ours_s * 1e3, unit_count / hf_s, unit_count / ours_s, hf_s / ours_s,
                          unit))
        self.results[name] = {"hf_ms": hf_s * 1e3, "ours_ms": ours_s * 1e3, f"hf_{unit}_per_s": unit_count / hf_s,
                              f"ours_{unit}_per_s": unit_count / ours_s, "speedup": hf_s / ours_s, **extra}
        print(f"{name}: {self.results[name]}", flush=True)

    def save(self):
        """The figures so far, written to --out (after each section: a run that fails later keeps them)."""
        save(self.results, self.opts.out)


def setup_bench(a):
    """Both sides' models with the sizes of --preset, on the same random weights, on the device, in eval mode; the
    inputs' shapes; and the record of the run, empty but for its versions."""
    dev = a.device
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else nullcontext()
    torch.manual_seed(0)
    cfg = CLIPTransConfig.preset(a.preset)
    # Small shapes on CPU keep the smoke run to seconds; the paper's shapes on CUDA.
    small = dev == "cpu"
    TB, TS, TT = (4, 12, 12) if small else (64, 32, 32)  # training batch, source and target lengths
    GB, GS, GN = (4, 10, 8) if small else (128, 20, 32)  # generation batch, source length, new tokens
    XB = 8 if small else 256  # tower batch

    mbart_hf, xlmr_hf, head_hf, vision_hf = hf_models(cfg)
    ours = CLIPTrans(cfg)
    convert_from_hf(ours, mbart_hf, xlmr_hf, head_hf, vision_hf)
    for module in (mbart_hf, xlmr_hf, head_hf, vision_hf, ours):
        module.to(dev).eval()
    import transformers
    results = {"device": torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "preset": a.preset, "transformers": transformers.__version__}
    return Bench(a, dev, a.iters or (10 if dev == "cuda" else 2), amp, cfg, ours, mbart_hf, xlmr_hf, head_hf,
                 vision_hf, (TB, TS, TT), (GB, GS, GN), XB, cfg.mbart.vocab_size - 48, results)


# ---------------------------------------------------------------- 3. towers (inference)

def towers(b):
    """Our text tower (XLM-R + mean pooling + M-CLIP's head) and image tower (ViT) against Hugging Face's, on the
    same sentences and images, with the largest difference of their embeddings."""
    dev, iters, ours, XB = b.dev, b.iters, b.ours, b.tower_batch
    ids = b.rand_ids(XB, 32)
    ids[:, 0], ids[:, -1] = 0, 2
    mask = torch.ones_like(ids)
    ids, mask = ids.to(dev), mask.to(dev)
    size = b.cfg.vision.image_size
    pixels = torch.randn(XB, 3, size, size, generator=b.g).to(dev)
    with torch.no_grad(), b.amp:
        def hf_text():
            h = b.xlmr_hf(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(h.dtype)
            return b.head_hf((h * m).sum(1) / m.sum(1))
        diff = (hf_text().float() - ours.encode_text(ids, mask).float()).abs().max().item()
        b.row("text tower (XLM-R + pooling)", timed(hf_text, dev, iters), timed(lambda: ours.encode_text(ids, mask),
              dev, iters), XB, "sentences", max_abs_diff=diff)
        hf_img = lambda: b.vision_hf(pixel_values=pixels).image_embeds  # noqa: E731
        diff = (hf_img().float() - ours.encode_image(pixels).float()).abs().max().item()
        b.row("image tower (ViT)", timed(hf_img, dev, iters), timed(lambda: ours.encode_image(pixels), dev, iters),
              XB, "images", max_abs_diff=diff)


def towers_off_gpu(b):
    """Both sides' towers back to the CPU, whether measured or not: the rest measures mBART and the mapping."""
    for module in (b.xlmr_hf, b.head_hf, b.vision_hf):
        module.cpu()
    b.ours.text, b.ours.vision = b.ours.text.cpu(), b.ours.vision.cpu()  # frozen towers: features are precomputed
    if b.dev == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- 2. beam search

def generation(b):
    """Beam search, 5 beams, exactly GN new tokens: our mBART against Hugging Face's generate (the same tokens?),
    our CLIPTrans with its prefix, and our search with each of its speed-ups changed."""
    dev, iters, ours, lang = b.dev, b.iters, b.ours, b.lang
    GB, GS, GN = b.gen_shape
    src = b.rand_ids(GB, GS)
    src[:, 0], src[:, -1] = b.cfg.mbart.vocab_size - 51, 2
    src, src_mask = src.to(dev), torch.ones(GB, GS, dtype=torch.long, device=dev)
    b.mbart_hf.eval(), ours.eval()
    args = dict(num_beams=5, max_new_tokens=GN, min_new_tokens=GN, length_penalty=1.0, early_stopping=True)
    with torch.no_grad(), b.amp:
        hf_gen = lambda: b.mbart_hf.generate(input_ids=src, attention_mask=src_mask, do_sample=False,  # noqa: E731
                                             forced_bos_token_id=lang, **args)
        ours_gen = lambda: ours.mbart.generate(src, src_mask, lang, **args)  # noqa: E731
        a_hf, a_ours = hf_gen()[:, 1:], ours_gen()  # Hugging Face's output starts with the decoder start token
        same = (a_hf == a_ours).float().mean().item() if a_hf.shape == a_ours.shape else 0.0
        assert a_ours.shape == (GB, GN), a_ours.shape
        b.row("beam-5 generation (mBART)", timed(hf_gen, dev, iters),
              timed(ours_gen, dev, iters), GB, "sentences", same_tokens=same)
        clip = torch.randn(GB, b.cfg.text.embed_dim, generator=b.g).to(dev)
        t = timed(lambda: ours.generate(clip, src, src_mask, lang, num_beams=5, max_new_tokens=GN,
                                        min_new_tokens=GN), dev, iters)
        b.results["beam-5 generation (CLIPTrans, prefix)"] = {"ours_ms": t * 1e3, "ours_sentences_per_s": GB / t}
        generation_variants(b, src, src_mask, args, a_hf)
        if b.opts.profile:
            b.profile_jobs.append(("profile: beam-5 generation (mBART)", "ours", on_gpu(b, ours.mbart, ours_gen)))
            b.profile_jobs.append(("profile: beam-5 generation (mBART)", "hf", on_gpu(b, b.mbart_hf, hf_gen)))
    b.save()


def generation_variants(b, src, src_mask, args, a_hf):
    """Our mBART's search (`args`) with one speed-up changed at a time: its time, and the share of its tokens that
    are Hugging Face's (`a_hf`). Called under no_grad and autocast."""
    # What the CUDA graph, the attention kernel, the chunked top-k and compiled scores buy (3 new tokens,
    # with and without the graph: the step that records the graph and one replay against two steps of
    # plain launches). A smoke run on the CPU runs the variants that do not need a GPU. A variant that
    # fails is reported in the JSON, not fatal.
    variants = {"no CUDA graph": dict(use_cuda_graph=False),
                "memory-efficient attention": dict(attention=[SDPBackend.EFFICIENT_ATTENTION]),
                "math attention": dict(attention=[SDPBackend.MATH]),
                "matmul attention": dict(attention="matmul"),
                "torch.topk": dict(topk_chunk=0),
                "eager scores": dict(compile_scores=False),  # (default on CUDA: compiled)
                "compiled scores": dict(compile_scores=True),  # (default on a CPU: eager)
                "3 new tokens": dict(max_new_tokens=3, min_new_tokens=3),
                "3 new tokens, no CUDA graph": dict(max_new_tokens=3, min_new_tokens=3, use_cuda_graph=False)}
    if b.dev != "cuda":
        variants = {k: v for k, v in variants.items() if k in CPU_VARIANTS}
    GB = b.gen_shape[0]
    for name, extra in variants.items():
        def gen(extra=extra):
            return b.ours.mbart.generate(src, src_mask, b.lang, **{**args, **extra})
        try:
            out = gen()
            t = timed(gen, b.dev, b.iters)
            b.results[f"beam-5 generation (mBART, {name})"] = {
                "ours_ms": t * 1e3, "ours_sentences_per_s": GB / t,
                "same_tokens": (a_hf == out).float().mean().item() if a_hf.shape == out.shape else None}
        except Exception as e:  # noqa: BLE001  (reported, and the other figures still measured)
            b.results[f"beam-5 generation (mBART, {name})"] = {"error": repr(e)}
            print(f"beam-5 generation (mBART, {name}): failed: {e!r}", flush=True)
            continue
        if b.opts.profile and name in PROFILED_VARIANTS:
            b.profile_jobs.append((f"profile: beam-5 generation (mBART, {name})", "ours",
                                   on_gpu(b, b.ours.mbart, gen)))


def on_gpu(b, model, fn):
    """--profile: the same call, later, with the model back in place, in eval mode."""
    def setup():
        model.to(b.dev).eval()

        def call():
            with torch.no_grad(), b.amp:
                return fn()
        return call
    return setup


# ---------------------------------------------------------------- 1. stage 2 training step

def training(b):
    """The stage 2 training step on the same inputs and weights: the first losses of both sides compared, Hugging
    Face's step against train.py's (and against Hugging Face's compiled, with --compile), then our variants."""
    inputs, labels, mapping_hf = train_inputs(b)
    ours, dev, P = b.ours, b.dev, b.cfg.mapping.prefix_len

    # Hugging Face's loss, timed with its own causal mask (its fast path): the same work up to the mask
    def hf_loss(mbart_hf=b.mbart_hf):  # (mbart_hf: its model, or the model compiled)
        return hf_forward(mbart_hf, mapping_hf, *inputs, labels, P, "causal").loss

    ours_loss = lambda: ours(*inputs)  # noqa: E731
    agreement = first_loss_agreement(ours, b.mbart_hf, mapping_hf, *inputs)
    TB, TS, TT = b.train_shape
    n_labels = TB * TT  # <lang> y1 .. </s>: every target token is predicted once
    flops = train_flops(b.cfg, TB, TS, 1 + P + TT - 1, n_labels)
    peak = next((v for k, v in PEAK_BF16.items() if k in b.results["device"]), None)
    hf_t, hf_mem, hf_compiled = hf_training(b, mapping_hf, hf_loss)
    params = list(ours.mbart.parameters()) + list(ours.mapping.parameters())
    # Ours: train.py's own step (train_step) as train.py runs it on this device: its --compile default
    # (runs.compiled: CUDA graphs on one GPU, eager on a CPU), its AdamW, GradScaler and autocast.
    env = runs.setup(dev, "auto")
    micro = [(inputs, TB * TT)]  # one micro-batch of TB x TT target tokens, no padding
    make_train_py = lambda mode: train_py_step(b, params, env, micro, mode)  # noqa: E731
    ours_t, ours_mem, setup_s = first_and_timed(b, lambda: make_train_py("auto"))
    if b.opts.profile:  # new optimizers, made when the job runs
        b.profile_jobs.append(("profile: stage 2 training step", "ours", lambda: trainer(
            b, list(ours.mbart.parameters()) + list(ours.mapping.parameters()), ours_loss, [ours])[0]))
        b.profile_jobs.append(("profile: stage 2 training step", "hf", lambda: (
            b.mbart_hf.to(dev), mapping_hf.to(dev), trainer(b, list(b.mbart_hf.parameters()) +
                                                            list(mapping_hf.parameters()), hf_loss,
                                                            [b.mbart_hf, mapping_hf])[0])[-1]))
    mfu = (lambda t: None if peak is None else flops / t / peak)  # noqa: E731
    auto = runs.compile_mode("auto", env)  # what train.py's --compile auto chooses here
    b.row("stage 2 training step (train.py default)", hf_t, ours_t, TB, "sentences", hf_peak_gib=hf_mem,
          ours_peak_gib=ours_mem, hf_mfu=mfu(hf_t), ours_mfu=mfu(ours_t), model_tflop_per_step=flops / 1e12,
          compile=auto, setup_s=setup_s, **agreement)
    for hf_mode, (t, mem, setup) in hf_compiled.items():  # the same step of ours, against HF compiled
        b.row(f"stage 2 training step (train.py default; HF torch.compile {hf_mode})", t, ours_t, TB,
              "sentences", hf_peak_gib=mem, ours_peak_gib=ours_mem, hf_setup_s=setup)
    b.save()
    train_variants(b, inputs, params, make_train_py, auto, hf_t, mfu)


def train_inputs(b):
    """The training step's inputs (clip, src, src_mask, tgt): TB pairs of sentences `<lang> x </s>` and their
    precomputed text embeddings; our labels for them; and a copy of our mapping network for Hugging Face's side."""
    dev, ours, cfg = b.dev, b.ours, b.cfg
    TB, TS, TT = b.train_shape
    src = b.rand_ids(TB, TS)
    src[:, 0], src[:, -1] = cfg.mbart.vocab_size - 51, 2
    tgt = b.rand_ids(TB, TT)
    tgt[:, 0], tgt[:, -1] = b.lang, 2
    src, tgt = src.to(dev), tgt.to(dev)
    src_mask = torch.ones_like(src)
    clip = torch.randn(TB, cfg.text.embed_dim, generator=b.g).to(dev)
    mapping_hf = type(ours.mapping)(cfg.mapping, cfg.text.embed_dim, cfg.mbart.d_model).to(dev)
    mapping_hf.load_state_dict(ours.mapping.state_dict())

    _, labels = ours.decoder_inputs(clip, tgt)  # the same layout for both
    return (clip, src, src_mask, tgt), labels, mapping_hf


def trainer(b, params, loss_fn, modules, attention=None):  # attention: the SDPA kernels allowed (None: all)
    """A plain training step of loss_fn() under autocast, with a new fused AdamW over `params`, `modules` in training
    mode. Returns the step and its optimizer."""
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0,
                            fused=b.dev == "cuda")
    for mod in modules:
        mod.train()

    def step():
        with b.amp, sdpa_kernel(attention) if attention else nullcontext():
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, opt


def hf_training(b, mapping_hf, hf_loss):
    """Hugging Face's training step, alone on the GPU, eager and (--compile) compiled. Returns its time, its peak
    memory, and {mode: (time, peak memory, setup time)} of the compiled ones. Ours back on the GPU after it."""
    ours = b.ours
    ours.mbart.cpu(), ours.mapping.cpu()  # one model on the GPU at a time: peak memory is its own
    hf_step, hf_opt = trainer(b, list(b.mbart_hf.parameters()) + list(mapping_hf.parameters()), hf_loss,
                              [b.mbart_hf, mapping_hf])
    hf_mem = peak_memory(b.dev, lambda: [hf_step() for _ in range(2)])
    hf_t = timed(hf_step, b.dev, b.iters)
    del hf_opt, hf_step
    hf_compiled = hf_compiled_training(b, mapping_hf, hf_loss) if b.opts.compile else {}
    b.mbart_hf.cpu(), mapping_hf.cpu()
    ours.mbart.to(b.dev), ours.mapping.to(b.dev)
    return hf_t, hf_mem, hf_compiled


def hf_compiled_training(b, mapping_hf, hf_loss):
    """What a user of Hugging Face could do: torch.compile its model (--compile), in each mode the device has.
    Returns {mode: (time, peak memory, setup time)}; a mode that fails is reported in the JSON."""
    hf_compiled = {}
    for hf_mode in ("default", "reduce-overhead") if b.dev == "cuda" else ("default",):
        torch._dynamo.reset()
        compiled_hf = torch.compile(b.mbart_hf, mode=hf_mode)
        try:
            t0 = time.perf_counter()
            step = trainer(b, list(b.mbart_hf.parameters()) + list(mapping_hf.parameters()),
                           lambda: hf_loss(compiled_hf), [b.mbart_hf, mapping_hf])[0]
            step()
            setup = time.perf_counter() - t0
            hf_compiled[hf_mode] = (timed(step, b.dev, b.iters),
                                    peak_memory(b.dev, lambda: [step() for _ in range(2)]), setup)
        except Exception as e:  # noqa: BLE001  (reported; the other figures stand)
            b.results[f"Hugging Face training step (torch.compile {hf_mode})"] = {"error": repr(e)}
            print(f"Hugging Face torch.compile {hf_mode}: failed: {e!r}", flush=True)
    return hf_compiled


def train_py_step(b, params, env, micro, mode):
    """train.py's step (train.train_step) over `micro`, with its AdamW and GradScaler, and our model as train.py's
    --compile `mode` runs it (runs.compiled takes the mode resolved: "auto" becomes this device's choice)."""
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0,
                            fused=b.dev == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=env.dtype == "fp16")
    model = runs.compiled(b.ours, runs.compile_mode(mode, env), env)
    b.ours.train()
    return lambda: recipe.train_step(model, opt, scaler, micro, env)


def first_and_timed(b, make):
    """The step that make() builds, measured: its first call (which compiles, and on CUDA records the graph: the
    setup time), its peak memory over two more calls, then its time. Returns (time, peak memory, setup time)."""
    torch._dynamo.reset()  # each step compiles afresh, with its own mode
    t0 = time.perf_counter()
    step = make()
    step()  # the first call compiles (and on CUDA records the graph)
    setup_s = time.perf_counter() - t0
    mem = peak_memory(b.dev, lambda: [step() for _ in range(2)])
    return timed(step, b.dev, b.iters), mem, setup_s


def train_variants(b, inputs, params, make_train_py, auto, hf_t, mfu):
    """Our training step with one thing changed at a time, each against Hugging Face's eager step (`hf_t`):
    train.py's other --compile modes, and on CUDA the attention kernels and the casts of the weights. A variant
    that fails is reported in the JSON, not fatal."""
    ours, dev, TB = b.ours, b.dev, b.train_shape[0]
    forward = lambda m: (lambda: m(*inputs))  # noqa: E731
    modes = [m for m in ("none", "default", "reduce-overhead") if m != auto and (m == "none" or b.opts.compile)
             and (m != "reduce-overhead" or dev == "cuda")]
    variants = [(f"train.py --compile {m}", lambda m=m: make_train_py(m)) for m in modes]
    if dev == "cuda":  # PyTorch may choose cuDNN's attention kernels on recent GPUs: are they the fastest here?
        variants.append(("no cuDNN attention", lambda: trainer(b, params, forward(ours), [ours], attention=[
            SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])[0]))
        variants.append(("Linear weights cast once per step", lambda: trainer(b, params, cast_once_forward(
            ours, ("mbart", "mapping"), inputs, torch.bfloat16), [ours])[0]))
    if b.opts.compile:  # each layer compiled on its own (last: it compiles in place)
        variants.append(("torch.compile per layer", lambda: trainer(b, params, forward(compile_layers(ours)),
                                                                    [ours])[0]))
    for name, make in variants:
        for p_ in params:
            p_.grad = None
        name = f"stage 2 training step ({name})"
        try:
            t, mem, setup_s = first_and_timed(b, make)
            b.row(name, hf_t, t, TB, "sentences", ours_peak_gib=mem, ours_mfu=mfu(t), setup_s=setup_s)
        except Exception as e:  # report and go on: the other figures stand
            b.results[name] = {"error": repr(e)}
            print(f"{name}: failed: {e!r}", flush=True)
        b.save()


# ---------------------------------------------------------------- the profiles and the table

def profiles(b):
    """--profile: the calls the measurements queued, one kernel profile each, into the JSON."""
    for key, side, setup in b.profile_jobs:
        b.results.setdefault(key, {})[side] = kernel_profile(setup(), b.dev)
        b.save()


def print_table(b):
    """The table (Hugging Face's time against ours, the speed-up), each profile's busiest kernel, and the other
    figures of each row (differences between the two sides, memory, MFU, setup times)."""
    results, dev = b.results, b.dev
    print(f"\n{results['device']}, torch {results['torch']}, transformers {results['transformers']}, "
          f"preset {b.opts.preset}, {'bf16 autocast' if dev == 'cuda' else 'fp32'}")
    print(f"{'':50s} {'HF ms':>9s} {'ours ms':>9s} {'HF /s':>9s} {'ours /s':>9s} {'speed-up':>9s}")
    for name, hf_ms, ours_ms, hf_rate, ours_rate, ratio, unit in b.rows:
        print(f"{name:50s} {hf_ms:9.1f} {ours_ms:9.1f} {hf_rate:9.0f} {ours_rate:9.0f} {ratio:8.2f}x  ({unit})")
    for name, r in results.items():
        if name.startswith("profile: "):
            print(f"  {name}: " + ", ".join(f"{who} busy {p['busy_ms']:.1f} of {p['wall_ms']:.1f} ms, top: "
                                            f"{p['top'][0]['name'][:40]} {p['top'][0]['ms']:.1f} ms"
                                            for who, p in r.items()))
        elif isinstance(r, dict):
            in_table = ("hf_ms", "ours_ms", "speedup") if "hf_ms" in r else ()  # rows without HF: their own time
            extra = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                     if not k.startswith(in_table) and "per_s" not in k}
            if extra:
                print(f"  {name}: {extra}")


def main():
    """The measurements in the order they must run: the towers first, then off the GPU; beam search; the training
    step (one model on the GPU at a time); the profiles last; then the table."""
    b = setup_bench(parse_args())
    only = set(b.opts.only.split(","))
    if "towers" in only:
        towers(b)
    towers_off_gpu(b)
    if "generate" in only:
        generation(b)
    if "train" in only:
        training(b)
    # The profiles come last: once used, the profiler may stay attached to the GPU (pytorch/pytorch#144455)
    # and slow every kernel launch after it, which would bias the timings of a launch-bound step.
    profiles(b)
    print_table(b)
    b.save()
    print(f"wrote {b.opts.out}")


def hf_decoder_mask(prefix_len, length, batch, dtype, attn_implementation):
    """Our decoder's self-attention mask (`prefix_mask`: the prefix bidirectional, the rest causal) as the 4D mask
    Hugging Face's MBart decoder takes as it is, `decoder_attention_mask` (B, 1, T, T): bool (True = may attend)
    for SDPA, additive (0 or the dtype's minimum) for eager attention, which adds it to the scores."""
    allowed = prefix_mask(prefix_len, length)[None, None].expand(batch, 1, length, length)
    if attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def hf_forward(mbart_hf, mapping_hf, clip, src, src_mask, tgt, labels, prefix_len, hf_mask="prefix"):
    """Hugging Face's side of the stage 2 step: MBartForConditionalGeneration fed our decoder input layout
    (`</s> P1..Pp <lang> y1..`, its own scaled token embeddings and its copy of the mapping network) through
    `decoder_inputs_embeds`, with our labels (CLIPTrans.decoder_inputs'); hf_mask "prefix": our prefix mask as its
    4D `decoder_attention_mask`, "causal": its own causal mask (no mask given). Returns its output (.loss,
    .logits)."""
    P = prefix_len
    tok = mbart_hf.model.shared(torch.cat([torch.full_like(tgt[:, :1], 2), tgt[:, :-1]], 1))  # scaled
    embeds = torch.cat([tok[:, :1], mapping_hf(clip).to(tok.dtype), tok[:, 1:]], 1)
    mask = None if hf_mask == "causal" else hf_decoder_mask(P, embeds.shape[1], len(embeds), embeds.dtype,
                                                            mbart_hf.config._attn_implementation).to(embeds.device)
    return mbart_hf(input_ids=src, attention_mask=src_mask, decoder_inputs_embeds=embeds,
                    decoder_attention_mask=mask, labels=labels)


def ours_first_loss(ours, clip, src, src_mask, tgt):
    """Our side: CLIPTrans.forward's loss, and the logits (B, T, V) and labels (B, T) of the same pieces forward
    uses (decoder_inputs, prefix_mask, the decoder, the output projection), at every position (forward projects
    only the labelled ones)."""
    P = ours.config.mapping.prefix_len
    embeds, labels = ours.decoder_inputs(clip, tgt)
    h = ours.mbart.decoder(embeds, ours.mbart.encode(src, src_mask), src_mask,
                           mask=prefix_mask(P, embeds.shape[1], embeds.device))
    return ours(clip, src, src_mask, tgt), ours.mbart.logits(h), labels


def first_loss_agreement(ours, mbart_hf, mapping_hf, clip, src, src_mask, tgt, hf_mask="prefix"):
    """The two implementations' first training step on the same weights, without dropout, in fp32 (TF32 off): the
    difference of the mean losses, and the largest difference of the decoder's logits (every position, the whole
    vocabulary). On the tiny preset (CPU, fp32), Hugging Face's decoder reading the prefix causally moves the mean
    loss by 1e-5 only (random weights predict nearly uniformly, and the changes cancel), the logits of the labelled
    positions by 5e-4, those of the prefix positions by 4e-2; with the prefix mask on both sides the logits agree
    within 5e-7. So the logits tell the prefix mask from a causal one, which the mean loss alone hardly can
    (tests/test_bench.py tries both)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    modes = [m.training for m in (ours, mbart_hf, mapping_hf)]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for m in (ours, mbart_hf, mapping_hf):
            m.eval()
        with torch.no_grad():
            ours_loss, ours_logits, labels = ours_first_loss(ours, clip, src, src_mask, tgt)
            hf = hf_forward(mbart_hf, mapping_hf, clip, src, src_mask, tgt, labels, ours.config.mapping.prefix_len,
                            hf_mask)
            diff = hf.logits.float() - ours_logits.float()  # (B, T, V)
            return {"first_loss_abs_diff": abs(hf.loss.item() - ours_loss.item()),
                    "first_logits_max_abs_diff": diff.abs().max().item()}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        for m, mode in zip((ours, mbart_hf, mapping_hf), modes):
            m.train(mode)


class CastOnce(torch.autograd.Function):
    """fp32 parameters -> copies in `dtype` with one multi-tensor copy; their gradients back to fp32 the same way.
    Under autocast each Linear casts its weight and bias at every call, and autograd casts each gradient back:
    four small kernels per Linear and step, which this does in a few for all of them. The numbers are the same."""

    @staticmethod
    def forward(ctx, dtype, *params):
        copies = [torch.empty_like(p, dtype=dtype) for p in params]
        torch._foreach_copy_(copies, list(params))
        return tuple(copies)

    @staticmethod
    def backward(ctx, *grads):
        fp32 = [torch.empty_like(g, dtype=torch.float32) for g in grads]
        torch._foreach_copy_(fp32, list(grads))
        return (None, *fp32)


def cast_once_forward(model, parts, inputs, dtype):
    """A function that runs model(*inputs), to be called under autocast to `dtype`, with the weights and biases
    of the Linear layers in model.<part> for each of `parts` cast once, up front."""
    names = [f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and name.split(".")[0] in parts for p, _ in m.named_parameters(recurse=False)]
    params = [model.get_parameter(n) for n in names]

    def forward():
        copies = CastOnce.apply(dtype, *params)
        return torch.func.functional_call(model, dict(zip(names, copies)), inputs)
    return forward


def compile_layers(model):
    """`model` with each mBART layer compiled in place: two graphs (encoder and decoder layer) serve all 24."""
    for layer in [*model.mbart.encoder.layers, *model.mbart.decoder.layers]:
        layer.compile()
    return model


def save(results, path):
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
