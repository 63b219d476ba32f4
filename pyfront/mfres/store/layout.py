"""Where a run lives on disk, shared by the writer and the reader.

``run.nc`` is the published file: complete, never modified in place (each new version
is written beside it and renamed over it). Beside it, the hidden folder ``.run.nc.mfres/``
holds the lock file ``lock`` (``fcntl.flock``: one writer at a time) and the immutable
segments ``seg-<seq>.npz``: the steps, snapshots and full state since the last
published version, each written to a temporary name, fsync'ed and renamed into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

SEGMENT_RE = re.compile(r"^seg-(\d{8})\.npz$")
LOCK_NAME = "lock"


def sidecar(path: str) -> str:
    """The folder of ``path``'s lock and pending segments."""
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{tail}.mfres")


def segment_name(seq: int) -> str:
    return f"seg-{seq:08d}.npz"


@contextlib.contextmanager
def hdf5_name(path: str) -> Iterator[str]:
    """A name under which HDF5 can open the existing file ``path``: ``path`` itself when it is
    valid UTF-8 (HDF5 takes nothing else), else ``/proc/self/fd/N`` of the file, open meanwhile."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        fd = os.open(path, os.O_RDONLY)
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    yield path


def hdf5_dir_name(directory: str, dirfd: int, name: str) -> str:
    """A UTF-8 path HDF5 can create ``name`` under in the open directory ``dirfd``."""
    try:
        directory.encode("utf-8")
        return os.path.join(directory, name)
    except UnicodeEncodeError:
        return f"/proc/self/fd/{dirfd}/{name}"


def file_identity(path: str) -> tuple[int, int, int] | None:
    """(inode, mtime in ns, size) of ``path``, None if it is missing: a publication replaces
    the file (``os.replace``), so a reader that sees this change knows its view is mixed."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def segments(side: str) -> list[tuple[int, str]]:
    """(seq, file name) of the segment files in ``side``, in order."""
    try:
        names = os.listdir(side)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for n in names:
        m = SEGMENT_RE.match(n)
        if m:
            out.append((int(m.group(1)), n))
    return sorted(out)


def read_segment(side: str, name: str, state: bool = True) -> dict[str, Any]:
    """A segment's arrays (without the full state ``state_*`` unless ``state``: only the newest one
    is ever used, and at the large size it is a third of a segment) and its ``meta`` (a dict); raises
    FileNotFoundError if it vanished."""
    with np.load(os.path.join(side, name), allow_pickle=False) as f:
        out: dict[str, Any] = {k: f[k] for k in f.files if k != "meta" and (state or not k.startswith("state_"))}
        out["meta"] = json.loads(str(f["meta"]))
    return out


def read_segment_meta(side: str, name: str) -> dict[str, Any]:
    with np.load(os.path.join(side, name), allow_pickle=False) as f:
        return json.loads(str(f["meta"]))


def lock_holder(path: str) -> int | None:
    """The pid written by the process that holds ``path``'s writer lock, 0 if unknown, None if no one holds it."""
    lock = os.path.join(sidecar(path), LOCK_NAME)
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            with contextlib.suppress(OSError, ValueError):
                return int(os.pread(fd, 32, 0).decode().strip() or 0)
            return 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
