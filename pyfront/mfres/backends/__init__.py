"""Backends: one narrow interface, implemented by NumPy (reference) and Julia.

A backend evaluates E and ∇E and advances θ by GD steps; everything above it
(the training loop, snapshots, files) is written once in ``mfres.train``.

``Backend.advance(theta, problem, ds, n)`` updates ``theta`` in place by n GD
steps ``θ ← θ − Δs L M ∇E`` and returns a ``Trajectory`` of the n + 1 values of
E (before each step and after the last) and the RMS particle velocity at the same
points. It stops early at the first non-finite E: the trajectory then ends with
that value and ``theta`` is the state that produced it. It also returns the net's
output at the last iterate (``Trajectory.prediction``), which the snapshots record.
A batch of nets (particles
with a leading axis B) advances every net by n steps (E and velocities of shape
(n + 1, B)) and never stops early.

Backends: ``numpy_backend.NumpyBackend`` (the reference), ``julia_backend.JuliaBackend``
(juliacall, in-process) and ``julia_exe.JuliaExeBackend`` (a Julia executable in a child
process, arrays in shared memory). Every backend has ``startup_seconds``: the seconds it
has spent starting and compiling so far (Julia's start and each first compilation; NumPy's
helper processes), which the training loop keeps apart from the steps. Julia backends also have
``transport``, ``threads``, ``describe()`` and ``close()``.

``begin_advance(theta, problem, ds, n)`` is ``advance`` in two halves: it returns a function
that finishes the chunk and returns its ``Trajectory``. Between the two, ``theta`` must not
be written and no other call made to the backend. A backend with ``overlaps`` (the
executable transport) returns while the chunk runs in its child process, so that the
caller's own work (the run file's durable points) runs meanwhile; until the finishing call,
``theta`` keeps the chunk's start state and may be read. It then reports the chunk's
duration in the child as ``kernel_seconds``. The others run the chunk at once.

"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..activations import Activation
from ..data import TrainingData
from ..errors import BackendError
from ..model import Particles


@dataclass(frozen=True)
class Problem:
    """What a backend trains on: data in the run's dtype, activation, weight decay λ."""

    x: np.ndarray
    y: np.ndarray
    a: np.ndarray
    activation: Activation
    weight_decay: float = 0.0

    @classmethod
    def from_data(cls, data: TrainingData, activation: Activation, weight_decay: float,
                  dtype: np.dtype | type) -> Problem:
        cast = [np.ascontiguousarray(v, dtype=dtype) for v in (data.x, data.y, data.readout)]
        return cls(*cast, activation=activation, weight_decay=weight_decay)


@dataclass(frozen=True)
class Trajectory:
    """E and the RMS particle velocity |dθ/ds| at n + 1 consecutive GD iterates (float64).

    ``prediction``: the net's output a·z_L(x_i) at the last iterate, (N,) or (B, N) in θ's
    dtype, from the forward pass that gave the last E (``None`` where a backend does not
    return it; the caller then runs a forward pass of its own).
    """

    loss: np.ndarray
    grad_norm: np.ndarray
    prediction: np.ndarray | None = None

    @property
    def finite(self) -> bool:
        return bool(np.all(np.isfinite(self.loss[-1])))


def kernel_memory(memory: str, theta: Particles, problem: Problem) -> str:
    """The Julia kernels' memory mode for ``--memory`` (store | recompute | auto), as ``NumpyBackend`` decides it.

    ``store`` keeps every layer's activations (O(L·N·M)), ``recompute`` only the states
    z_l (O(L·N·d)); ``auto`` stores them when they fit in a quarter of RAM. A batch's nets
    share one workspace in Julia, so the rule is applied to one net.
    """
    from .numpy_backend import choose_recompute

    L, M, _ = theta.shape
    return "recompute" if choose_recompute(memory, L, M, problem.x.shape[0], theta.U.dtype) else "store"


class Backend(Protocol):
    """The interface every backend implements."""

    name: str
    overlaps: bool  # begin_advance returns while the chunk runs elsewhere
    kernel_seconds: float  # the last chunk's own time where it ran (s; 0 where not measured)

    @property
    def startup_seconds(self) -> float:
        """Start-up and compilation so far, accumulated (s)."""
        ...

    def loss_and_grad(self, theta: Particles, problem: Problem) -> tuple[float, Particles]:
        """E(θ) and ∇_θ E (exact for the finite net)."""
        ...

    def advance(self, theta: Particles, problem: Problem, ds: float, n: int) -> Trajectory:
        """n GD steps in place; see the module docstring."""
        ...

    def begin_advance(self, theta: Particles, problem: Problem, ds: float,
                      n: int) -> Callable[[], Trajectory]:
        """``advance`` in two halves; see the module docstring."""
        ...


def run_at_once(backend: Backend, theta: Particles, problem: Problem, ds: float,
                n: int) -> Callable[[], Trajectory]:
    """``begin_advance`` of a backend that runs in the calling thread: the whole chunk, now."""
    traj = backend.advance(theta, problem, ds, n)
    return lambda: traj


TRANSPORT_VARIABLE = "MFRES_JULIA_TRANSPORT"


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (Linux; empty where unknown)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


SKYLAKEX_FLAGS = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})
"""The AVX-512 subsets of Intel Skylake-X, which OpenBLAS's "SkylakeX" kernels may use."""


def blas_environment(flags: set[str] | None = None) -> dict[str, str]:
    """``OPENBLAS_CORETYPE`` for a Julia about to start, so that its OpenBLAS never falls back.

    OpenBLAS picks its kernels from the CPU model, and an OpenBLAS older than the CPU
    falls back to SSE3 ("Prescott") kernels, 3-6x slower than its AVX2 ones: Julia 1.5's
    0.3.9 does so on AMD Zen 3 (AVX2) and on AMD Zen 4 (AVX-512). So mfres names the
    kernels that any OpenBLAS knowing the CPU would choose for float64: "SkylakeX" where
    the CPU has Skylake-X's AVX-512 subsets, else "Haswell" where it has AVX2 and FMA
    (an OpenBLAS built without AVX-512 maps "SkylakeX" to "Haswell"). Empty when the user
    has set ``OPENBLAS_CORETYPE`` or the CPU has neither. Like any change of BLAS, it can
    change the last bits of E.
    """
    if os.environ.get("OPENBLAS_CORETYPE"):
        return {}
    flags = cpu_flags() if flags is None else flags
    if SKYLAKEX_FLAGS <= flags:
        return {"OPENBLAS_CORETYPE": "SkylakeX"}
    if {"avx2", "fma"} <= flags:
        return {"OPENBLAS_CORETYPE": "Haswell"}
    return {}


def julia_transport() -> str | None:
    """How ``--backend julia`` reaches Julia here, without starting it or downloading anything:
    ``"juliacall"`` where juliacall can start without downloads, else ``"executable"`` where a
    Julia ≥ 1.5 is found ($MFRES_JULIA, $JULIA, ``julia`` on PATH), else None.
    ``MFRES_JULIA_TRANSPORT=juliacall|executable`` restricts the choice to one of the two,
    ``none`` hides Julia (``auto`` then means NumPy)."""
    from . import julia_backend, julia_exe

    only = os.environ.get(TRANSPORT_VARIABLE, "").strip().lower()
    if only not in ("", "juliacall", "executable", "none"):
        raise BackendError(f"{TRANSPORT_VARIABLE} must be juliacall, executable or none, not {only!r}")
    if only in ("", "juliacall") and julia_backend.usable_without_download():
        return "juliacall"
    if only in ("", "executable") and julia_exe.find_executable() is not None:
        return "executable"
    return None


def _no_julia(why: str) -> BackendError:
    return BackendError(f"{why}: no usable Julia here. Set MFRES_JULIA (or JULIA) to a Julia >= 1.5 executable "
                        "or put julia on PATH; juliacall needs Julia >= 1.10.3 resolved by juliapkg beforehand. "
                        "Or use --backend numpy")


def select(name: str = "auto", threads: int | None = None, device: str = "cpu", memory: str = "auto") -> Backend:
    """The backend called ``name``: ``numpy``, ``julia`` (juliacall if it can start without
    downloads, else a Julia executable) or ``auto`` (Julia whenever one of the two is usable,
    else NumPy; never downloads). ``device="cuda"`` needs a CUDA-capable Julia: without one it
    is a ``BackendError`` saying why, never a CPU run."""
    if name not in ("auto", "numpy", "julia"):
        raise BackendError(f"unknown backend {name!r}; choose auto, numpy or julia")
    if device not in ("cpu", "cuda"):
        raise BackendError(f"unknown device {device!r}; choose cpu or cuda")
    if name == "numpy":
        if device != "cpu":
            raise BackendError("--device cuda needs the Julia backend; the NumPy backend runs on the CPU only")
        from .numpy_backend import NumpyBackend

        return NumpyBackend(memory, threads)
    transport = julia_transport()
    if transport == "juliacall":
        from .julia_backend import JuliaBackend

        return JuliaBackend(threads=threads, device=device, memory=memory)
    if transport == "executable":
        from .julia_exe import JuliaExeBackend

        return JuliaExeBackend(threads=threads, device=device, memory=memory)
    if name == "julia":
        raise _no_julia("--backend julia")
    if device != "cpu":
        raise _no_julia("--device cuda needs the Julia backend with CUDA.jl")
    from .numpy_backend import NumpyBackend

    return NumpyBackend(memory, threads)


def describe(threads: int | None = None) -> str:
    """What ``mfres info`` shows about the Julia backend: which transport ``--backend julia``
    and ``auto`` would use, which Julia (path, version), how many threads. Starts no Julia
    (runs ``julia --version``)."""
    from . import julia_backend, julia_exe

    try:
        transport = julia_transport()
    except BackendError as e:
        return f"julia backend: {e}"
    if transport == "juliacall":
        found = julia_backend.find_julia()
        where = f"Julia {'.'.join(map(str, found[1]))} at {found[0]}" if found else "juliapkg's Julia"
        n = julia_backend.expected_threads(threads)
        return (f"julia backend: juliacall (in-process), {where}, {n} thread(s); --backend auto picks it")
    if transport == "executable":
        located = julia_exe.locate()
        assert located is not None
        path, version, origin = located
        opts, source = julia_exe.thread_option(threads)
        if opts:
            count = opts[1] if opts[1] != "auto" else f"{os.cpu_count()} (auto)"
        else:
            count = os.environ.get("JULIA_NUM_THREADS", "1")
        return (f"julia backend: executable transport (a child process, shared memory), "
                f"Julia {'.'.join(map(str, version))} at {path} (from {origin}), {count} thread(s) "
                f"(from {source}); --backend auto picks it")
    return ("julia backend: not usable here (no juliacall environment resolved, no Julia >= 1.5 in "
            "$MFRES_JULIA, $JULIA or on PATH); --backend auto picks numpy")
