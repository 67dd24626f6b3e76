"""
Writing folders so that nothing is lost: every folder this project writes (a checkpoint, converted weights, the
tiny world, Multi30k's text) is written aside and renamed into place, so a reader, or a run killed at any
moment, sees the old folder or the complete new one, never a half-written one. Nothing here knows what the
folders hold.

- `atomic_write`: one file, through a temporary file and a rename.
- `written_aside`: a whole folder, through `.{name}.tmp` beside it; the folder it replaces goes to `.{name}.old`
  until the new one is in place.
- `check_new_folder`: a command that writes a folder refuses one that already holds something.
- `find_checkpoint`, `recover_checkpoint`: a checkpoint folder, or the `.old` copy that a crash between the two
  renames of `written_aside` left; `RUN_FILES` and `check_free`: what a training run leaves in its folder, and
  the refusal to start a new run over it.
"""

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path


class FolderError(ValueError):
    """A folder that a command would write is not free. The message says what to do."""


def aside(folder):
    """The two names beside `folder`: the copy being written (`.{name}.tmp`) and the one being replaced
    (`.{name}.old`)."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")


def atomic_write(path, write):
    """Write `path` through `write(tmp_path)` into a temporary file in the same folder, fsync, rename: readers see
    the old file or the new one, never a half-written one."""
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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
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
    """`folder`, renamed back into place first when a crash between the two renames of written_aside left only
    its old copy: a run that continues from it can then replace it like any checkpoint (reading the old copy
    where it lies, the run's first save would delete the folder it reads its tokenizers from)."""
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
