"""Child processes that die with their parent, and the files of arrays they share.

Used by the Julia executable transport (``backends.julia_exe``) and the NumPy backend's
helper processes (``parallel``).
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Any

import numpy as np

ALIGN = 64
"""Byte alignment of each array in a shared file."""

Spec = dict[str, tuple[tuple[int, ...], Any]]  # name -> (shape, dtype or its name), in file order


def pdeathsig() -> Any:
    """A preexec_fn that asks Linux to SIGKILL the child when its parent dies (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    PR_SET_PDEATHSIG = 1

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class _Spawner:
    """Starts children from one thread that lives as long as the process.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child ends; a Dask task
    thread or any short-lived thread would take the child with it, so children are
    forked here instead, unless the caller is the main thread."""

    def __init__(self) -> None:
        self.requests: queue.Queue[tuple[dict[str, Any], queue.Queue[Any]]] = queue.Queue()
        threading.Thread(target=self._serve, name="mfres-spawner", daemon=True).start()

    def _serve(self) -> None:
        while True:
            kwargs, reply = self.requests.get()
            try:
                reply.put(subprocess.Popen(**kwargs))
            except BaseException as e:  # handed back to the caller
                reply.put(e)

    def popen(self, **kwargs: Any) -> subprocess.Popen:
        reply: queue.Queue[Any] = queue.Queue()
        self.requests.put((kwargs, reply))
        out = reply.get()
        if isinstance(out, BaseException):
            raise out
        return out


_SPAWNER: _Spawner | None = None
_SPAWN_LOCK = threading.Lock()


def popen(**kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen(**kwargs)``, from a thread that outlives the child (see ``_Spawner``)."""
    global _SPAWNER
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(**kwargs)
    with _SPAWN_LOCK:
        if _SPAWNER is None:
            _SPAWNER = _Spawner()
    return _SPAWNER.popen(**kwargs)


def shm_dir() -> str:
    """Where a shared file goes: /dev/shm when writable (RAM), else the temp dir."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


def array_offsets(spec: Spec) -> tuple[dict[str, int], int]:
    """Each array's byte offset in a shared file of ``spec``, 64-byte aligned, in order, and the file's size."""
    offsets, size = {}, 0
    for name, (shape, dt) in spec.items():
        offsets[name] = size
        size += -(-int(np.prod(shape)) * np.dtype(dt).itemsize // ALIGN) * ALIGN
    return offsets, max(size, 1)


def map_arrays(source: int | str, spec: Spec) -> dict[str, np.ndarray]:
    """The arrays of ``spec`` over one existing file of at least its size (a descriptor or a path)."""
    offsets, size = array_offsets(spec)
    if isinstance(source, int):
        with open(source, "r+b", closefd=False) as f:  # the mapping keeps a descriptor of its own
            mm = np.memmap(f, dtype=np.uint8, mode="r+", shape=(size,))
    else:
        mm = np.memmap(source, dtype=np.uint8, mode="r+", shape=(size,))
    return {name: np.ndarray(shape, np.dtype(dt), buffer=mm, offset=offsets[name])
            for name, (shape, dt) in spec.items()}
