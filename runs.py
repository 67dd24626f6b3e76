"""
The bookkeeping of a training run, apart from the recipe, as minGPT keeps its trainer apart from GPT. It knows
CLIPTrans only through the checkpoint folders weights.py writes (the frozen towers shared between them, the
tokenizers carried along) and train.py's settings; a first reading of train.py can take it on trust.

- `setup`: where a process runs: DDP from torchrun's environment, the device, the precision (autocast).
- `compiled`: how the training step runs: DDP-wrapped, and torch.compile'd on CUDA (the speed machinery).
- `hold`, `check_free`, `plan_disk`: one run at a time in a folder, never a new run over an earlier one's
  files (folders.py), and not a run whose checkpoints cannot fit on its disk.
- `Run`: what a run keeps in its folder and what `--resume` restores exactly: the position in the data, the
  optimizer, the gradient scaler and the RNG states of every process (`state.pt`, written with the model into
  each checkpoint folder by weights.save_checkpoint, atomically), and the metrics log (`metrics.jsonl`).
"""

import atexit
import contextlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

import folders
import weights

# -----------------------------------------------------------------------------
# Processes, devices and precision.


class Env(NamedTuple):
    rank: int  # this process among `world`: DDP from torchrun's environment; 0 of 1 without it
    world: int
    device: torch.device
    dtype: str  # bf16 | fp16 | fp32
    autocast: object  # torch.autocast in bf16 or fp16, nullcontext() in fp32


def setup(device: str = "auto", dtype: str = "auto") -> Env:
    """DDP from torchrun's environment (NCCL on GPUs, gloo on CPUs), the device, and autocast.
    device: auto, cpu, cuda or cuda:N; dtype: auto (bf16 on GPUs that have it, else fp16; fp32 on a CPU)."""
    rank, world = 0, 1
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() and device != "cpu" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    name = device
    if device == "auto":
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
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
    return Env(rank, world, dev, dtype, autocast)


def log0(rank, *args):
    if rank == 0:
        tqdm.write(" ".join(str(a) for a in args))


def compile_mode(mode, env: Env):
    """--compile's mode. "auto": on CUDA reduce-overhead, CUDA graphs recorded once per shape, the fastest mode
    bench.py measured at the paper's sizes; with DDP the default mode, whose graph the compiler splits at DDP's
    gradient buckets so that they overlap; on a CPU "none" (eager), where compiling the tiny preset costs
    minutes and saves seconds."""
    if mode != "auto":
        return mode
    return "none" if env.device.type != "cuda" else "default" if env.world > 1 else "reduce-overhead"


def compiled(model, mode, env: Env, shapes=64):
    """The model the training step runs: DDP-wrapped with several processes, then compiled in `mode` (see
    compile_mode). One compilation per input shape, at most `shapes` of them: past that the compiler falls
    back to eager."""
    if env.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device] if env.device.type == "cuda" else None)
    mode = compile_mode(mode, env)
    if mode == "none":
        return model
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes)
    return torch.compile(model, mode=mode, dynamic=False)


# -----------------------------------------------------------------------------
# A run's folder: held by one run at a time, never reused by a new run.

def plan_disk(out, model, params, keeps_best, ignore, rank=0, own_towers=False):
    """What the run writes: the size of a checkpoint and of its folder at the end (`last`, and `best` when
    `keeps_best`; the frozen towers shared with the starting folder, see weights.TOWERS_FILE, unless
    `own_towers`: a tower trains), checked against the free space of `out` before the first step: a run that
    cannot save should not train for hours first (`ignore`: --ignore_disk_space)."""
    model_bytes = sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
                      if own_towers or not k.startswith(weights.TOWERS))
    state_bytes = 2 * sum(p.numel() * 4 for p in params)  # AdamW's two fp32 moments, in `last` only
    end = model_bytes + state_bytes + (model_bytes if keeps_best else 0)
    peak = end + model_bytes + state_bytes  # a new `last` is written before the old one is removed
    folder = next(p for p in [Path(out), *Path(out).absolute().parents] if p.exists())
    free = shutil.disk_usage(folder).free
    gb = lambda n: f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"  # noqa: E731
    towers = "each with its own towers" if own_towers else "the towers linked, not copied"
    log0(rank, f"checkpoints: {gb(model_bytes)} of weights each ({towers}), "
               f"{gb(state_bytes)} of optimizer state in `last`; {out} will hold {gb(end)} at the end, "
               f"{gb(peak)} while a checkpoint is replaced; {gb(free)} free")
    if peak > free and not ignore:
        raise SystemExit(f"error: {out} needs up to {gb(peak)} for its checkpoints and its disk has "
                         f"{gb(free)} free: free some space, choose another --out, or pass --ignore_disk_space "
                         f"to start anyway (a save that fails keeps the previous checkpoint)")


def check_free(out):
    """A new run never replaces what an earlier one left (folders.check_free), as a message."""
    try:
        folders.check_free(out)
    except folders.FolderError as e:
        raise SystemExit(f"error: {e}") from None


def hold(out, new=False):
    """Hold the folder `out` for this process: OUT/.lock holds its process id, and another run into `out` is
    refused while that process lives (two runs would overwrite each other's checkpoints and log). A lock whose
    process has ended (killed, or the machine restarted) is taken over, with a message. Released at exit.
    new: a new run, which then refuses a folder an earlier run left files in (check_free), letting go of it."""
    lock = take(out)
    if new:
        try:
            check_free(out)
        except SystemExit:
            release(out)
            raise
    return lock


def take(out):
    """The lock of `hold`: OUT/.lock with this process's id, taken over from a process that has ended."""
    lock = Path(out) / ".lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(50):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = read_pid(lock)
            if pid is None:  # just made by another process, its id not written yet: look again
                time.sleep(0.1)
                if read_pid(lock) is not None:
                    continue
            elif pid != os.getpid():
                if alive(pid):
                    raise SystemExit(f"error: {out} is in use by another run (process {pid}): wait for it to "
                                     f"end, or give another --out")
                log0(0, f"{lock}: process {pid}, which held it, has ended: taking it over")
            lock.unlink(missing_ok=True)  # stale, empty for good, or this process's own
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(release, out)
        return lock
    raise SystemExit(f"error: cannot take {lock}: another run keeps taking it; give another --out")


def read_pid(lock):
    """The process id in a lock file, or None (no file, or none written yet)."""
    with contextlib.suppress(OSError):
        text = lock.read_text().strip()
        return int(text) if text.isdigit() else None
    return None


def release(out):
    """Let go of `out`, if this process holds it (at the end of the run, or at exit)."""
    lock = Path(out) / ".lock"
    if read_pid(lock) == os.getpid():
        lock.unlink(missing_ok=True)


def alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, the process is only looked up
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


# -----------------------------------------------------------------------------
# Exact resume: the training state of a checkpoint.


def read_state(folder):
    """The training state of a checkpoint (state.pt: optimizer, step, RNG states, settings), or {}."""
    path = Path(folder) / "state.pt"
    try:
        return torch.load(path, weights_only=True) if path.exists() else {}
    except Exception as e:  # noqa: BLE001  (a damaged file raises several kinds; weights_only runs no code)
        raise SystemExit(f"error: cannot read {path} ({type(e).__name__}): the file is damaged or not a "
                         f"training state written by train.py; resume from another checkpoint") from None


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_resumable(state, settings: dict, same, folder, world):
    """--resume continues a run exactly: its checkpoint must hold a training state, made with the same values
    of the settings named in `same` (those that change what the run learns) and as many processes."""
    saved = state.get("config")
    if "optimizer" not in state or saved is None:
        what = (f"a stage {state['stage']} checkpoint" if "stage" in state else
                "converted weights, or a run's `best`, which keeps the model only")
        raise SystemExit(f"error: {folder} holds no training state to resume ({what}): --resume continues a "
                         f"stage 1 or 2 run from its `last`; to start stage 2 from a stage 1 checkpoint, "
                         f"give it as --init without --resume")
    diff = [k for k in same if saved.get(k) != settings[k]]
    if diff:
        was = ", ".join(f"--{k} {saved.get(k)}" for k in diff)
        raise SystemExit(f"error: {folder} was trained with {was}; this run has "
                         + ", ".join(f"--{k} {settings[k]}" for k in diff) + ": resume with the same "
                         "settings (they fix the data order and what trains), or start a new run")
    ranks = len(state["rng"]) if isinstance(state["rng"], list) else 1
    if ranks != world:
        raise SystemExit(f"error: {folder} was trained by {ranks} process(es), this run has {world}: resume "
                         f"with {ranks} (each process continues its own share of the data)")


# -----------------------------------------------------------------------------
# A run: its position, its metrics log and its checkpoints.


class Run:
    """A training run's bookkeeping in its folder `out`: where it is (what every checkpoint's state.pt saves
    and --resume restores exactly), its metrics log (OUT/metrics.jsonl, rank 0) and its checkpoints. The time
    spent evaluating and writing checkpoints adds up in pause_s: tokens/s count the time spent training.
    settings: the run's settings (saved into every checkpoint); resume_same: those a resume must keep;
    share_towers: False when a tower trains, and every checkpoint holds its own."""

    def __init__(self, settings: dict, resume_same, env: Env, model, opt, scaler, start, resume=False,
                 share_towers=True):
        self.settings, self.env, self.out = settings, env, Path(settings["out"])
        self.model, self.opt, self.scaler = model, opt, scaler
        self.tokenizers_from = start  # every checkpoint carries the tokenizers of the one it started from
        self.towers_from = start if share_towers else None  # ... shares its towers' file (weights.TOWERS_FILE)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0  # optimizer steps; the position in the data
        self.best, self.pause_s = -1.0, 0.0  # best: the best validation score so far
        if env.rank == 0:  # the folder is this run's from now on; checked again: another run may have ended
            hold(self.out, new=not resume)  # there since this one started
        if resume:
            self.resume(start, resume_same)
        self.metrics = self.open_log(self.out / "metrics.jsonl", resume) if env.rank == 0 else None

    def resume(self, start, same):
        """The optimizer, the scaler, the position in the data and the RNG states of `start`, exactly."""
        state = read_state(start)
        check_resumable(state, self.settings, same, start, self.env.world)
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best = state["best"]
        if start.parent.resolve() != self.out.resolve():  # continued in a new folder: its own `best`
            self.best = -1.0
        set_rng_state(state["rng"][self.env.rank] if isinstance(state["rng"], list) else state["rng"])
        log0(self.env.rank, f"resuming {start} at step {self.step} (epoch {self.epoch}, batch "
                            f"{self.batch_in_epoch})")

    def open_log(self, path, resume):
        """metrics.jsonl, new; with --resume, without the records after the checkpoint (those steps run
        again)."""
        if resume and path.exists():
            kept = []
            for n, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the last line of a run killed while writing it
                    log0(0, f"{path}: line {n} is not a complete record (cut short by the interruption?): "
                            f"dropped")
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
        """OUT/{name}: the model; `last` also the training state with every process's RNG states, which only
        --resume reads (rank 0 writes)."""
        t, rngs = time.time(), [None] * self.env.world
        if self.env.world > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = rng_state()
        if self.env.rank == 0:
            state = {"optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                     "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                     "best": self.best, "rng": rngs, "config": self.settings} if name == "last" else None
            folder = self.out / name
            try:
                how = weights.save_checkpoint(folder, self.model, self.settings, state, self.tokenizers_from,
                                              self.towers_from)
                if self.towers_from not in (None, folder) and how != "linked":  # a start of the older layout, or afar
                    why = "no hard link reaches it" if how == "copied" else f"it has no {weights.TOWERS_FILE}"
                    log0(0, f"{folder}: the frozen towers {how}, not linked to {self.towers_from}'s ({why}); "
                            f"the next checkpoints link to these")
                    self.towers_from = folder
            except OSError as e:  # a full or read-only disk: the previous checkpoint is intact
                raise SystemExit(f"error: cannot write the checkpoint {folder} ({e.strerror or e}): free "
                                 f"some space or make {self.out} writable, then --resume from the previous "
                                 f"checkpoint, which is intact") from None
        self.pause_s += time.time() - t

    def finish(self, summary):
        """The run's summary (rank 0 only): logged, written to OUT/summary.json and printed."""
        self.log(dict(summary=summary))
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary))
        self.metrics.close()
        release(self.out)
