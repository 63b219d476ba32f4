"""Backends: one narrow interface, implemented by NumPy (reference) and Julia.

A backend evaluates E and ∇E and advances θ by GD steps; everything above it
(the training loop, snapshots, files) is written once in ``mfres.train``.

``Backend.advance(theta, problem, ds, n)`` updates ``theta`` in place by n GD
steps ``θ ← θ − Δs L M ∇E`` and returns a ``Trajectory`` of the n + 1 values of
E (before each step and after the last) and the RMS particle velocity at the same
points. It stops early at the first non-finite E: the trajectory then ends with
that value and ``theta`` is the state that produced it.
"""

from __future__ import annotations

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
    """E and the RMS particle velocity |dθ/ds| at n + 1 consecutive GD iterates (float64)."""

    loss: np.ndarray
    grad_norm: np.ndarray

    @property
    def finite(self) -> bool:
        return bool(np.all(np.isfinite(self.loss[-1])))


class Backend(Protocol):
    """The interface every backend implements."""

    name: str

    def loss_and_grad(self, theta: Particles, problem: Problem) -> tuple[float, Particles]:
        """E(θ) and ∇_θ E (exact for the finite net)."""
        ...

    def advance(self, theta: Particles, problem: Problem, ds: float, n: int) -> Trajectory:
        """n GD steps in place; see the module docstring."""
        ...


def select(name: str = "auto", threads: int | None = None, device: str = "cpu", memory: str = "auto") -> Backend:
    """The backend called ``name``; ``auto`` is Julia where it is usable without downloads, else NumPy."""
    from . import julia_backend
    from .numpy_backend import NumpyBackend

    if name == "numpy":
        return NumpyBackend(memory)
    if name == "julia":
        return julia_backend.JuliaBackend(threads=threads, device=device)
    if name == "auto":
        if julia_backend.usable_without_download():
            return julia_backend.JuliaBackend(threads=threads, device=device)
        return NumpyBackend(memory)
    raise BackendError(f"unknown backend {name!r}; choose auto, numpy or julia")
