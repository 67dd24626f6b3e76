"""
The machinery of a training run, apart from the recipe, as minGPT keeps its trainer apart from GPT: a first reading
of train.py can take it on trust. It knows CLIPTrans only through the settings and the folders weights.py writes.
"""

import contextlib
import ctypes
import dataclasses
import enum
import functools
import hashlib
import json
import os
import random
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import data
import decoding
import folders
import tiny_world
import weights
from cliptrans import Attention, CLIPTransConfig, MappingConfig

# -----------------------------------------------------------------------------
# Processes, devices and precision; the training step, DDP-wrapped and compiled, its batches padded to few shapes.


class Env(NamedTuple):
    rank: int  # this process among `world`: DDP from torchrun's environment; 0 of 1 without it
    world: int
    device: torch.device
    dtype: str  # bf16 | fp16 | fp32
    autocast: object  # torch.autocast in bf16 or fp16, nullcontext() in fp32


def setup(device: str = "auto", dtype: str = "auto", allow_large_images=False, data_folder=None) -> Env:
    """DDP from torchrun's environment (NCCL on GPUs, gloo on CPUs), the device and autocast (dtype auto: bf16 on
    GPUs that have it, else fp16; fp32 on a CPU); the default tiny world written on first use (by rank 0)."""
    rank, world = 0, 1
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() and device != "cpu" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SystemExit(f"error: --device {device}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device}, but PyTorch sees no GPU here: use --device cpu or auto")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if dtype == "auto":
        dtype = "fp32" if dev.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if dev.type != "cuda" and dtype != "fp32":
        raise SystemExit(f"error: --dtype {dtype} needs a GPU; on {dev} training runs in fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[dtype]
    autocast = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    if allow_large_images:
        data.allow_large_images()
    if data_folder and Path(data_folder) == tiny_world.default_path():
        if rank == 0:
            tiny_world.tiny_world()
        if dist.is_initialized():
            dist.barrier()
    return Env(rank, world, dev, dtype, autocast)


def log0(rank, *args):
    if rank == 0:
        tqdm.write(" ".join(str(a) for a in args))


def end(env: Env):
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank0s(value, env: Env):  # rank 0's value, in every process
    box = [value]
    if env.world > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def merged(part: dict, env: Env):  # every process's dict, merged
    parts = [part]
    if env.world > 1:
        parts = [None] * env.world
        dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def summed(n: int, env: Env):  # the sum of every process's n
    if env.world > 1:
        counted = torch.tensor(n, device=env.device)
        dist.all_reduce(counted)
        n = int(counted)
    return n


def refused(main):
    """`main`, with a user's input refused in one line (`error: ...`, exit 1): the project's refusals are ValueErrors
    (weights' ConversionError, data's DataError, folders' FolderError, a language or a search that cannot be)."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    return run


def compile_mode(mode, env: Env):
    """--compile's mode, "auto" resolved: reduce-overhead on one GPU (CUDA graphs: the fastest bench.py measured);
    default with DDP (its graph split at DDP's buckets, which overlap); none on a CPU (compiling costs more there)."""
    if mode != "auto":
        return mode
    return "none" if env.device.type != "cuda" else "default" if env.world > 1 else "reduce-overhead"


def compiled(model, mode, env: Env, shapes=64):  # DDP-wrapped, compiled in a resolved `mode`: up to `shapes` graphs
    if env.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device] if env.device.type == "cuda" else None)
    if mode == "none":
        return model
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes)
    return torch.compile(model, mode=mode, dynamic=False)


def pad_multiple(mode):  # lengths round up to 8 compiled (an epoch of a few shapes, not hundreds), 1 eager
    return 1 if mode == "none" else 8


def sampler(c, lengths, env: Env):
    """The training split's batches (data.LengthBucketSampler; with DDP no short last step, so that no process gets
    an empty share), and the optimizer steps of an epoch."""
    batches = data.LengthBucketSampler(lengths, c.batch_size, seed=c.seed, rank=env.rank, world_size=env.world,
                                       drop_last=env.world > 1)
    if len(batches) < c.grad_accum:
        raise SystemExit(f"error: {len(lengths)} training examples make no optimizer step of batch {c.batch_size} x "
                         f"grad_accum {c.grad_accum} x {env.world} process(es): lower --batch_size or --grad_accum")
    return batches, len(batches) // c.grad_accum


def compiled_step(module, mode, env: Env, sampler, epoch, ex, config):
    """(`module` as --compile `mode` runs it, the multiple its batches' lengths round up to); compiled, it may
    record a graph for each shape (batch_shapes) of the epoch `epoch` of `sampler` over `ex` (.src_ids, .tgt_ids)."""
    mode, shapes = compile_mode(mode, env), 0
    multiple = pad_multiple(mode)
    if mode != "none":
        sampler.set_epoch(epoch)
        shapes = len(batch_shapes(ex.src_ids, ex.tgt_ids, list(sampler), config, multiple))
        log0(env.rank, f"an epoch pads its batches to {shapes} shapes (lengths in multiples of {multiple})")
    return compiled(module, mode, env, shapes=max(64, 2 * shapes)), multiple


def batch_shapes(src_ids, tgt_ids, batches, config, multiple):  # the shapes (B, S, T) of `batches` (index lists)
    positions, P = config.mbart.max_positions, config.mapping.prefix_len
    longest = lambda rows, batch: max(len(rows[i]) for i in batch)  # noqa: E731
    return {(len(b), data.padded_len(longest(src_ids, b), multiple, positions),
             data.padded_len(longest(tgt_ids, b), multiple, positions - P)) for b in batches}


# -----------------------------------------------------------------------------
# The frozen towers' features, computed once and cached.


def features(model, c, env: Env, name, images=None, texts=None, tok=None):
    """(N, D) frozen-tower embeddings of image files or sentences (`tok`: the text tower's tokenizer), cached in
    --features (default DATA/features) by rank 0 under `name`, keyed by the tower's weights and the input's bytes."""
    if images is not None:
        size = model.config.vision.image_size
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashlib runs outside the GIL
            digest = lambda f: hashlib.blake2b(Path(f).read_bytes(), digest_size=16).hexdigest()  # noqa: E731
            digests = list(pool.map(digest, images))
        key = fingerprint(model.vision, "clip_preprocess", size, *digests)  # bytes, not names: edits are seen
        compute = lambda: data.embed_images(model.encode_image, images, size, 64, env.device)  # noqa: E731
    else:
        key = fingerprint(model.text, "text", *texts)
        compute = lambda: data.embed_texts(model.encode_text, tok, texts, 64, env.device,  # noqa: E731
                                           max_len=model.text.max_tokens)
    if env.rank != 0 and dist.is_initialized():
        dist.barrier()
    feats = cached_embeddings(c.features or Path(c.data) / "features", name, key, compute)
    if env.rank == 0 and dist.is_initialized():
        dist.barrier()
    return feats


def fingerprint(module_or_state_dict, *extra) -> str:  # sha256 of its tensors (name, shape, dtype, bytes), `extra`
    state = (module_or_state_dict.state_dict() if isinstance(module_or_state_dict, torch.nn.Module)
             else module_or_state_dict)
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.numel():  # hash the raw memory in place (bytes(storage) copies one element at a time)
            h.update((ctypes.c_ubyte * (t.numel() * t.element_size())).from_address(t.data_ptr()))
    for e in extra:
        h.update(f"|{e}".encode())
    return h.hexdigest()


def cached_embeddings(cache_dir, name: str, key: str, compute) -> torch.Tensor:
    """`cache_dir/{name}.{key[:16]}.safetensors` if it was written for this exact `key`, else `compute()`'s tensor,
    stored atomically (an interrupted run never leaves a half-written cache)."""
    path = Path(cache_dir) / f"{name}.{key[:16]}.safetensors"
    if path.is_file():  # unreadable (e.g. written by something else): recomputed and replaced
        with contextlib.suppress(Exception), safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return f.get_tensor("embeddings")
    embeddings = compute()
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"compute() for {name} returned {type(embeddings).__name__}, expected a tensor")
    embeddings = embeddings.detach().cpu().contiguous()
    try:
        folders.atomic_write(path, lambda tmp: save_file({"embeddings": embeddings}, tmp,
                                                          metadata={"key": key, "name": name}))
    except OSError as e:  # a read-only dataset folder, say
        raise data.DataError(f"cannot write the feature cache {path} ({e}): make {path.parent} writable, or cache the "
                             f"features in another folder (train.py --features DIR)") from None
    return embeddings


# -----------------------------------------------------------------------------
# The starting point and its model, checked against the settings before any slow preparation.


class Start(enum.Enum):  # what a run starts from, named as messages name it
    WEIGHTS = "starting weights"
    STAGE1 = "stage 1 checkpoint"
    CHECKPOINT = "checkpoint"


def starting_point(c, keeps):  # the folder the run `c` starts from, and its Start; keeps: --eval_only's checkpoint
    out = Path(c.out)
    if c.resume or c.eval_only:
        find = folders.find_checkpoint if c.eval_only else folders.recover_checkpoint  # recovers an interrupted save
        start = find(c.checkpoint or out / (keeps if c.eval_only else "last"))
        if not start.exists():
            raise SystemExit(f"error: no checkpoint in {start} to {'score' if c.eval_only else 'resume'}: "
                             f"train first (python train.py --stage {c.stage})")
        return start, Start.CHECKPOINT
    folders.check_free(out)  # (again once the run holds the folder: see Run)
    if c.stage == 2 and not c.from_scratch_stage2:
        if not folders.find_checkpoint(c.init).exists():
            raise SystemExit(f"error: stage 2 starts from a stage 1 checkpoint, and {c.init} does not exist. Run "
                             f"`python train.py --stage 1` first (or give --init), or pass --from_scratch_stage2 "
                             f"for the ablation without stage 1")
        return Path(c.init), Start.STAGE1
    start = Path(c.weights)
    if c.preset == "tiny" and not folders.find_checkpoint(start).exists() and start.name != "last":
        raise SystemExit(f"error: {start} does not exist: give --weights a stage 0 `last` folder "
                         f"(stage 0 writes OUT/last), or leave it out to use runs/tiny/stage0/last")
    return start, Start.WEIGHTS


def load_model(folder, c, device, kind: Start):
    """The model of a folder of `kind` and the folder it was found in: checked against the preset (and its stage),
    with the new mapping network --mapping or --prefix_len ask for, --dropout and --prompt applied."""
    folder = folders.find_checkpoint(folder)
    try:
        model = weights.load(folder, device=device)
    except weights.ConversionError as e:
        raise SystemExit(f"error: {kind.value}: {e}")
    trained = weights.read_config(folder)[1].get("train", {})  # the settings a checkpoint was trained with
    expected = CLIPTransConfig.preset(c.preset)
    for part in ("vision", "text", "mbart"):  # all from the preset but the vocabulary (the tokenizer's)
        a, b = dataclasses.asdict(getattr(expected, part)), dataclasses.asdict(getattr(model.config, part))
        diff = [k for k in a if k not in ("vocab_size", "dropout") and a[k] != b[k]]
        if diff:
            raise SystemExit(f"error: {kind.value} {folder} is not a {c.preset} model: its {part} differs in "
                             f"{diff} (found {[b[k] for k in diff]}, the {c.preset} preset has "
                             f"{[a[k] for k in diff]}). Use --preset to match it, or another checkpoint")
    if kind is Start.STAGE1 and trained.get("stage") != 1:
        raise SystemExit(f"error: {folder} is not a stage 1 checkpoint (its config.json says stage "
                         f"{trained.get('stage')}): give --init a stage 1 `last` folder")
    has = model.config.mapping
    wanted = MappingConfig(c.mapping or has.kind, has.prefix_len if c.prefix_len < 0 else c.prefix_len)
    if wanted != has:  # a new mapping network: only where one starts untrained anyway
        if kind is not Start.WEIGHTS:
            raise SystemExit(f"error: --mapping {wanted.kind} --prefix_len {wanted.prefix_len}: {kind.value} "
                             f"{folder} has a trained mapping network ({has.kind}, {has.prefix_len} prefix "
                             f"vectors). Leave --mapping and --prefix_len out, or start from --weights (stage 1, "
                             f"or stage 2 with --from_scratch_stage2)")
        model.new_mapping(wanted)
    P = model.config.mapping.prefix_len
    if P == 0 and (c.test_prefix or c.ablate == "prefix"):
        raise SystemExit(f"error: no prefix to {'take away' if c.ablate else 'embed'}: {folder} is, or makes, the "
                         f"text-only baseline (prefix length 0): drop "
                         f"{'--ablate prefix' if c.ablate else '--test_prefix'}")
    try:  # the evaluation's search, checked before any step: its prompt is `</s> P1..Pp`
        decoding.check_search(model.config.mbart, 1 + P, c.beam, c.max_new_tokens)
    except ValueError as e:
        raise SystemExit(f"error: --beam {c.beam}, --max_new_tokens {c.max_new_tokens}: {e}")
    model.config.prompt = c.prompt or model.config.prompt  # how `score` generates; the checkpoints record it
    if c.dropout >= 0:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = c.dropout
            elif isinstance(m, Attention) and m.dropout:  # mBART's attention has none: keep it so
                m.dropout = c.dropout
    return model, folder


def check_trained(checkpoint, trained, task, langs):
    """Refuse a checkpoint whose mapping network never trained (`trained`: its config.json's "train"); warn when it
    is asked for `task` ("translation" from langs [src, tgt], "captioning" in [lang]) and was trained for another."""
    stage = trained.get("stage")
    if stage not in (1, 2):  # stage 0 and the converted weights: the tiny and the paper's starting points
        what = (f"a stage {stage} checkpoint" if trained else
                "converted weights (its config.json has no 'train' section)")
        raise ValueError(f"{checkpoint} is {what}: its mapping network was never trained, so it neither translates "
                         f"nor captions (its output would be noise); expected a stage 1 or stage 2 checkpoint: train "
                         f"stage 1 from it (python train.py --stage 1 --weights {checkpoint}, with --preset paper for "
                         f"converted weights), then stage 2")
    job = {"translation": "translation, {} -> {}", "captioning": "captioning in {}"}
    done, done_langs = (("captioning", [trained.get("caption_lang") or "en"]) if stage == 1 else
                        ("translation", [trained.get("src", "en"), trained.get("tgt", "de")]))
    if (task, [data.lang_code(x) for x in langs]) != (done, [data.lang_code(x) for x in done_langs]):
        hint = ("ask it in the languages it was trained on" if task == done else
                "captions come from a stage 1 checkpoint" if task == "captioning" else
                "translations come from a stage 2 checkpoint")
        print(f"warning: {checkpoint} was trained for stage {stage} ({job[done].format(*done_langs)}), not "
              f"{job[task].format(*langs)}: its output may be in another language, or make no sense; {hint}",
              file=sys.stderr)


# -----------------------------------------------------------------------------
# A run: its checkpoints (they must fit on its disk), its metrics log, and exact resume.


def plan_disk(out, model, params, keeps_best, ignore, rank=0, own_towers=False):
    """The checkpoints' size (`best` too if `keeps_best`; own towers if `own_towers`) against the free space of `out`,
    before the first step: a run that cannot save should not train for hours (`ignore`: --ignore_disk_space)."""
    model_bytes = sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
                      if own_towers or not k.startswith(weights.TOWERS))
    state_bytes = 2 * sum(p.numel() * 4 for p in params)  # AdamW's two fp32 moments, in `last` only
    end = model_bytes + state_bytes + (model_bytes if keeps_best else 0)
    peak = end + model_bytes + state_bytes  # a new `last` is written before the old one is removed
    free = shutil.disk_usage(next(p for p in [Path(out), *Path(out).absolute().parents] if p.exists())).free
    gb = lambda n: f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"  # noqa: E731
    towers = "each with its own towers" if own_towers else "the towers linked, not copied"
    log0(rank, f"checkpoints: {gb(model_bytes)} of weights each ({towers}), "
               f"{gb(state_bytes)} of optimizer state in `last`; {out} will hold {gb(end)} at the end, "
               f"{gb(peak)} while a checkpoint is replaced; {gb(free)} free")
    if peak > free and not ignore:
        raise SystemExit(f"error: {out} needs up to {gb(peak)} for its checkpoints and its disk has "
                         f"{gb(free)} free: free some space, choose another --out, or pass --ignore_disk_space "
                         f"to start anyway (a save that fails keeps the previous checkpoint)")


def read_state(folder):  # a checkpoint's training state (state.pt: optimizer, scaler, step, RNGs, settings), or {}
    path = Path(folder) / "state.pt"
    try:
        return torch.load(path, weights_only=True) if path.exists() else {}
    except Exception as e:  # noqa: BLE001  (a damaged file raises several kinds; weights_only runs no code)
        raise SystemExit(f"error: cannot read {path} ({type(e).__name__}): the file is damaged or not a "
                         f"training state written by train.py; resume from another checkpoint") from None


class Run:
    """A training run's bookkeeping in OUT: its position, metrics log and checkpoints (each with its `settings`)."""

    def __init__(self, settings: dict, resume_same, env: Env, model, opt, scaler, start, resume=False,
                 share_towers=True, skipped=None):
        self.settings, self.env, self.out = settings, env, Path(settings["out"])
        self.model, self.opt, self.scaler = model, opt, scaler
        self.tokenizers_from = start  # every checkpoint carries the tokenizers of the one it started from
        self.towers_from = start if share_towers else None  # ... shares its towers' file (weights.TOWERS_FILE)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0  # optimizer steps; the position in the data
        self.best, self.pause_s = -1.0, 0.0  # the best validation score; seconds not training (out of tokens/s)
        if env.rank == 0:  # the folder is this run's from now on; checked again: another run may have ended
            folders.hold(self.out, new=not resume)  # there since this one started
        if resume:
            self.resume(start, resume_same)
        self.metrics = self.open_log(self.out / "metrics.jsonl", resume) if env.rank == 0 else None
        for split, names in (skipped or {}).items():  # --skip_missing_images: what each split dropped
            if names and not resume:
                self.log(dict(split=split, missing_images=len(names), first_missing=names[:5]))

    def resume(self, start, same):
        """`start`'s training state, restored exactly if trained with the settings `same` and as many processes."""
        state, world = read_state(start), self.env.world
        saved = state.get("config")
        if "optimizer" not in state or saved is None:
            what = (f"a stage {state['stage']} checkpoint" if "stage" in state else
                    "converted weights, or a run's `best`, which keeps the model only")
            raise SystemExit(f"error: {start} holds no training state to resume ({what}): --resume continues a "
                             f"stage 1 or 2 run from its `last`; to start stage 2 from a stage 1 checkpoint, "
                             f"give it as --init without --resume")
        diff = [k for k in same if saved.get(k) != self.settings[k]]
        if diff:
            was = ", ".join(f"--{k} {saved.get(k)}" for k in diff)
            now = ", ".join(f"--{k} {self.settings[k]}" for k in diff)
            raise SystemExit(f"error: {start} was trained with {was}; this run has {now}: resume with the same "
                             f"settings (they fix the data order and what trains), or start a new run")
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rngs) != world:
            raise SystemExit(f"error: {start} was trained by {len(rngs)} process(es), this run has {world}: resume "
                             f"with {len(rngs)} (each process continues its own share of the data)")
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best = state["best"] if start.parent.resolve() == self.out.resolve() else -1.0  # a new folder: its own
        rng = rngs[self.env.rank]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        log0(self.env.rank, f"resuming {start} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")

    def open_log(self, path, resume):  # metrics.jsonl; with --resume, less the records of the steps to run again
        if resume and path.exists():
            kept = []
            for n, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the last line of a run killed while writing it
                    log0(0, f"{path}: line {n} is not a complete record (cut short by the interruption?): dropped")
                    continue
                if record.get("step", self.step + 1) <= self.step:
                    kept.append(line + "\n")
            folders.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))
        return open(path, "a" if resume else "w")

    def log(self, record):
        if self.env.rank == 0:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def save(self, name):
        """OUT/{name} (rank 0 writes): the model; `last` also the training state, every process's RNG states in it."""
        t, rng = time.time(), {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        rngs = rng
        if self.env.world > 1:
            rngs = [None] * self.env.world
            dist.all_gather_object(rngs, rng)
        if self.env.rank == 0:
            state = {"optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                     "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                     "best": self.best, "rng": rngs, "config": self.settings} if name == "last" else None
            folder = self.out / name
            try:
                tokenizers = {n: Path(self.tokenizers_from) / n
                              for n in (weights.MBART_TOKENIZER, weights.TEXT_TOKENIZER)}
                how = weights.save(self.model, folder, {"train": self.settings}, self.towers_from, tokenizers, state)
                if how == "copied" and self.towers_from != folder:  # on another filesystem than the start
                    log0(0, f"{folder}: the frozen towers copied, not linked to {self.towers_from}'s (no hard link "
                            f"reaches it); the next checkpoints link to these")
                    self.towers_from = folder
            except OSError as e:  # a full or read-only disk: the previous checkpoint is intact
                raise SystemExit(f"error: cannot write the checkpoint {folder} ({e.strerror or e}): free "
                                 f"some space or make {self.out} writable, then --resume from the previous "
                                 f"checkpoint, which is intact") from None
        self.pause_s += time.time() - t

    def finish(self, summary):  # rank 0: the run's summary, logged, written to OUT/summary.json and printed
        self.log(dict(summary=summary))
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary))
        self.metrics.close()
        folders.release(self.out)
