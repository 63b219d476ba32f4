"""The NumPy reference backend: ``mfres.model`` on preallocated buffers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

from .. import model
from ..model import Particles
from . import Problem, Trajectory, run_at_once


def memory_budget() -> int:
    """A quarter of the machine's RAM: above it, the activations are recomputed, not stored."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def choose_recompute(memory: str, L: int, M: int, N: int, dtype: np.dtype, B: int = 1) -> bool:
    """``memory`` = store | recompute | auto; auto stores the L·N·M activations if they fit the budget."""
    if memory == "auto":
        return 2 * L * B * N * M * np.dtype(dtype).itemsize > memory_budget()
    return memory == "recompute"


_BLAS: list = []


@contextlib.contextmanager
def one_blas_thread(work: model.Workspace | None = None) -> Iterator[None]:
    """BLAS on one thread inside: the backend's own processes split the work (an OpenBLAS that
    spins its own threads against ours, or against other processes on a busy machine, can
    be ten times slower), and a product's numbers never depend on how BLAS cut it.

    Not for problems below ``model.PARALLEL_MIN`` (a choice by size, never by thread
    count): BLAS does not split their small products, and finding the BLAS library
    (threadpoolctl) costs a run ~0.1–0.5 s once."""
    if work is not None and not work.parallel:
        yield
        return
    try:
        if not _BLAS:
            from threadpoolctl import ThreadpoolController

            _BLAS.append(ThreadpoolController())
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        yield
        return
    with _BLAS[0].limit(limits=1, user_api="blas"):
        yield


class _End(NamedTuple):
    """Where the last ``advance`` left one net: its problem, θ (a copy), E and RMS velocity there."""

    problem: Problem
    theta: Particles
    E: float
    velocity: float


class NumpyBackend:
    """Runs docs/model.md's kernels with NumPy (BLAS for the per-layer products).

    ``memory``: ``store`` keeps every layer's σ(q), σ'(q) (fastest); ``recompute``
    keeps only the states z_l and recomputes one layer's activations in the adjoint;
    ``auto`` stores them when they fit in a quarter of RAM.

    ``threads`` (default: all cores) split each step over sample blocks and layers, in
    helper processes (``model.Workspace``, ``mfres.parallel``) on problems of at least
    ``model.PARALLEL_MIN`` activations per step; results do not depend on it, bit for bit.
    ``startup_seconds``: the helpers' start (about 0.3 s each time a workspace is made).

    ``advance`` also takes a batch of nets (particles with a leading axis B): all
    advance together, with E and velocities of shape (n + 1, B), and never stop early.
    """

    name = "numpy"
    overlaps, kernel_seconds = False, 0.0

    def __init__(self, memory: str = "auto", threads: int | None = None) -> None:
        self.memory = memory
        self.threads = threads or model.default_threads()
        self._work: model.Workspace | None = None
        self._grad: Particles | None = None
        self._last: _End | None = None
        self.continued = False
        self.startup_seconds = 0.0

    def _buffers(self, theta: Particles, problem: Problem) -> tuple[model.Workspace, Particles]:
        tb = theta.batched()
        if self._work is None or not self._work.fits(tb, problem.x):
            L, M, _ = theta.shape
            B = tb.batch[0]
            recompute = choose_recompute(self.memory, L, M, problem.x.shape[0], theta.U.dtype, B)
            if self._work is not None:
                self._work.close()
            self._work = model.Workspace.for_problem(tb, problem.x, recompute, self.threads)
            self.startup_seconds += self._work.startup_seconds
            self._grad = Particles(np.empty_like(theta.U), np.empty_like(theta.W), np.empty_like(theta.b))
            self._last = None
        assert self._grad is not None
        return self._work, self._grad

    def loss_and_grad(self, theta: Particles, problem: Problem) -> tuple[float, Particles]:
        work, _ = self._buffers(theta, problem)
        with one_blas_thread(work):
            E, g = model.loss_and_grad(theta, problem.x, problem.y, problem.a, problem.activation,
                                       problem.weight_decay, work)
        return E, g

    def begin_advance(self, theta: Particles, problem: Problem, ds: float, n: int) -> Callable[[], Trajectory]:
        return run_at_once(self, theta, problem, ds, n)

    def advance(self, theta: Particles, problem: Problem, ds: float, n: int) -> Trajectory:
        """n GD steps in place. A chunk that starts where the previous one ended (same data, θ
        unchanged) reuses that chunk's last ∇E: n evaluations for n steps, the same numbers."""
        work, grad = self._buffers(theta, problem)
        losses = np.empty((n + 1, *theta.batch))
        norms = np.empty((n + 1, *theta.batch))
        last, self._last = self._last, None
        self.continued = (n > 0 and last is not None and last.problem is problem
                          and all(np.array_equal(getattr(last.theta, v), getattr(theta, v)) for v in "UWb"))
        with np.errstate(over="ignore", invalid="ignore"), one_blas_thread(work):
            for k in range(n + 1):
                if k == 0 and self.continued:
                    assert last is not None
                    E, norms[0] = last.E, last.velocity
                else:
                    E, _ = model.loss_and_grad(theta, problem.x, problem.y, problem.a, problem.activation,
                                               problem.weight_decay, work, grad)
                    norms[k] = model.velocity_rms(grad)
                losses[k] = E
                if k == n or (not theta.batch and not np.isfinite(E)):
                    zL = work.Z[theta.shape[0], ..., : theta.shape[2]]  # the last forward pass's z_L
                    pred = zL @ problem.a.astype(theta.U.dtype)
                    if not theta.batch and k == n:
                        self._last = _End(problem, theta.copy(), E, float(norms[k]))
                    return Trajectory(losses[: k + 1], norms[: k + 1], pred if theta.batch else pred[0])
                model.gd_step(theta, grad, ds)
        raise AssertionError("unreachable")
