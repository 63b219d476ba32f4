"""The NumPy reference backend: ``mfres.model`` on preallocated buffers."""

from __future__ import annotations

import os

import numpy as np

from .. import model
from ..model import Particles
from . import Problem, Trajectory


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


class NumpyBackend:
    """Runs docs/model.md's kernels with NumPy (BLAS for the per-layer products).

    ``memory``: ``store`` keeps every layer's σ(q), σ'(q) (fastest); ``recompute``
    keeps only the states z_l and recomputes one layer's activations in the adjoint;
    ``auto`` stores them when they fit in a quarter of RAM.

    ``advance`` also takes a batch of nets (particles with a leading axis B): all
    advance together, with E and velocities of shape (n + 1, B), and never stop early.
    """

    name = "numpy"

    def __init__(self, memory: str = "auto") -> None:
        self.memory = memory
        self._work: model.Workspace | None = None
        self._grad: Particles | None = None

    def _buffers(self, theta: Particles, problem: Problem) -> tuple[model.Workspace, Particles]:
        tb = theta.batched()
        if self._work is None or not self._work.fits(tb, problem.x):
            L, M, _ = theta.shape
            B = tb.batch[0]
            recompute = choose_recompute(self.memory, L, M, problem.x.shape[0], theta.U.dtype, B)
            self._work = model.Workspace.for_problem(tb, problem.x, recompute)
            self._grad = Particles(np.empty_like(theta.U), np.empty_like(theta.W), np.empty_like(theta.b))
        assert self._grad is not None
        return self._work, self._grad

    def loss_and_grad(self, theta: Particles, problem: Problem) -> tuple[float, Particles]:
        E, g = model.loss_and_grad(theta, problem.x, problem.y, problem.a, problem.activation,
                                   problem.weight_decay)
        return E, g

    def advance(self, theta: Particles, problem: Problem, ds: float, n: int) -> Trajectory:
        work, grad = self._buffers(theta, problem)
        losses = np.empty((n + 1, *theta.batch))
        norms = np.empty((n + 1, *theta.batch))
        with np.errstate(over="ignore", invalid="ignore"):
            for k in range(n + 1):
                E, _ = model.loss_and_grad(theta, problem.x, problem.y, problem.a, problem.activation,
                                           problem.weight_decay, work, grad)
                losses[k] = E
                norms[k] = model.velocity_rms(grad)
                if k == n or (not theta.batch and not np.isfinite(E)):
                    return Trajectory(losses[: k + 1], norms[: k + 1])
                model.gd_step(theta, grad, ds)
        raise AssertionError("unreachable")
