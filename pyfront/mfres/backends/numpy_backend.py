"""The NumPy reference backend: ``mfres.model`` on preallocated buffers."""

from __future__ import annotations

import numpy as np

from .. import model
from ..model import Particles
from . import Problem, Trajectory


class NumpyBackend:
    """Runs MODEL.md's kernels with NumPy (BLAS for the per-layer products)."""

    name = "numpy"

    def __init__(self) -> None:
        self._work: model.Workspace | None = None
        self._grad: Particles | None = None

    def _buffers(self, theta: Particles, problem: Problem) -> tuple[model.Workspace, Particles]:
        if self._work is None or not self._work.fits(theta, problem.x):
            self._work = model.Workspace.for_problem(theta, problem.x)
            self._grad = Particles(np.empty_like(theta.U), np.empty_like(theta.W), np.empty_like(theta.b))
        assert self._grad is not None
        return self._work, self._grad

    def loss_and_grad(self, theta: Particles, problem: Problem) -> tuple[float, Particles]:
        E, g = model.loss_and_grad(theta, problem.x, problem.y, problem.a, problem.activation,
                                   problem.weight_decay)
        return E, g

    def advance(self, theta: Particles, problem: Problem, ds: float, n: int) -> Trajectory:
        work, grad = self._buffers(theta, problem)
        losses = np.empty(n + 1)
        norms = np.empty(n + 1)
        with np.errstate(over="ignore", invalid="ignore"):
            for k in range(n + 1):
                E, _ = model.loss_and_grad(theta, problem.x, problem.y, problem.a, problem.activation,
                                           problem.weight_decay, work, grad)
                losses[k] = E
                norms[k] = model.velocity_rms(grad)
                if not np.isfinite(E) or k == n:
                    return Trajectory(losses[: k + 1], norms[: k + 1])
                model.gd_step(theta, grad, ds)
        raise AssertionError("unreachable")
