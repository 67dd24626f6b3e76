"""
Writing folders so that nothing is lost: every folder this project writes (a checkpoint, converted weights, the
tiny world) is written aside and renamed into place, so a reader, or a run killed at any moment,
sees the old folder or the complete new one, never a half-written one. A training run holds its folder
(OUT/.lock): one run at a time. Nothing here knows what the folders hold.
"""

import atexit
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


class FolderError(ValueError):
    """A folder that a command would write is not free. The message says what to do."""


def aside(folder):
    """(`.{name}.tmp`, `.{name}.old`) beside `folder`: the copy being written, the one being replaced."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")


def atomic_write(path, write):
    """Write `path` through `write(tmp_path)`: a temporary file in the same folder, fsynced, renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the file is as readable as any other
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def written_aside(folder):
    """Yields a temporary folder beside `folder` to write into; when the block ends without an error it
    becomes `folder` (an old one is moved aside first, removed last), on an error it is removed. A kill leaves
    `.{name}.tmp`, which the next call clears, or, between the two renames, `.{name}.old` (find_checkpoint)."""
    folder = Path(folder).resolve()  # resolved: "." has no name to put beside it
    tmp, old = aside(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:  # Ctrl-C included
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def check_new_folder(folder, overwrite: bool):
    """Refuse a `folder` that holds anything, unless `overwrite`: a command that writes a folder neither mixes
    its files with others' nor replaces them unasked."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FolderError(f"{folder} is a file: expected a folder to write into; choose another --out")
    held = sorted(p.name + "/" * p.is_dir() for p in folder.iterdir()) if folder.is_dir() else []
    if held and not overwrite:
        raise FolderError(f"{folder} is not empty (it holds {', '.join(held[:5])}{' ...' * (len(held) > 5)}): "
                          f"expected a new or empty folder. Choose another --out, or pass --overwrite to "
                          f"replace everything in it")


# -----------------------------------------------------------------------------
# Checkpoint folders, and the folder of a training run.
def find_checkpoint(folder):
    """`folder`, or the copy a crash between the two renames of written_aside left beside it."""
    folder, (_, old) = Path(folder), aside(folder)
    return folder if folder.exists() or not old.exists() else old


def recover_checkpoint(folder):
    """`folder`, the old copy that find_checkpoint would find renamed back into place first: a run continuing
    from it can then replace it like any checkpoint (its first save would delete a copy it reads tokenizers from)."""
    folder, found = Path(folder), find_checkpoint(folder)
    if found != folder:
        os.replace(found, folder)
        print(f"{folder}: restored from {found.name}, the copy an interrupted save left aside", file=sys.stderr)
    return folder


# What a training run leaves in its folder: its checkpoints (with the copies an interrupted save leaves) and its log.
CHECKPOINTS = ("last", "best")
RUN_FILES = (*CHECKPOINTS, *(p.name for name in CHECKPOINTS for p in aside(name)), "metrics.jsonl")


def check_free(out):
    """A new run never replaces what an earlier one left: a folder holding any of RUN_FILES is refused."""
    taken = [name for name in RUN_FILES if (Path(out) / name).exists()]
    if taken:
        raise FolderError(f"{out} already holds a checkpoint or a run's log ({', '.join(taken)}): --resume to "
                          f"continue it, or give another --out (or delete the folder) to start over")


def hold(out, new=False):
    """Hold the folder `out` for this process: OUT/.lock holds its process id, and another run into `out` is
    refused while that process lives (two runs would overwrite each other's checkpoints and log). A lock whose
    process has ended (killed, or the machine restarted) is taken over, with a message. Released at exit.
    new: a new run, which then refuses a folder an earlier run left files in (check_free), letting go of it."""
    lock = Path(out) / ".lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(50):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # one process makes it
        except FileExistsError:
            pid = read_pid(lock)
            if pid is None:  # just made by another process, its id not written yet: look again
                time.sleep(0.1)
                if read_pid(lock) is not None:
                    continue
            elif pid != os.getpid():
                if alive(pid):
                    raise FolderError(f"{out} is in use by another run (process {pid}): wait for it to end, or "
                                      f"give another --out")
                print(f"{lock}: process {pid}, which held it, has ended: taking it over", file=sys.stderr)
            lock.unlink(missing_ok=True)  # stale, empty for good, or this process's own
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(release, out)
        break
    else:
        raise FolderError(f"cannot take {lock}: another run keeps taking it; give another --out")
    if new:
        try:
            check_free(out)
        except FolderError:
            release(out)
            raise
    return lock


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
