"""Activations σ of the residual map ``f(z, θ) = U σ(W·z + b)`` and their derivatives.

Each activation is evaluated together with its derivative, in place, because the
forward pass needs σ(q) and the adjoint needs σ'(q) at the same pre-activations.
The formulas are the ones every backend implements (``jl/activations.jl``):

- ``tanh``;  ``sigmoid(u) = (1 + tanh(u/2)) / 2`` (overflow-free form);
- ``softplus(u) = max(u, 0) + log1p(exp(-|u|))``;
- ``gelu(u) = u/2 (1 + tanh(√(2/π) (u + 0.044715 u³)))``, the tanh form of GELU
  (Julia's Base has no ``erf``, and both backends must agree to rounding);
- ``srelu`` / ``srelu:η``: regularised ReLU, ``(u+η)²/(4η)`` on [−η, η], ``u``
  above, 0 below (default η = 0.5);
- ``relu2(u) = max(u, 0)²``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GELU_C = float(np.sqrt(2.0 / np.pi))
GELU_A = 0.044715
SRELU_DEFAULT_ETA = 0.5

NAMES = ("tanh", "sigmoid", "softplus", "gelu", "srelu", "relu2")


@dataclass(frozen=True)
class Activation:
    """A parsed activation: its ``name`` and, for ``srelu``, the width ``eta``."""

    name: str
    eta: float = SRELU_DEFAULT_ETA

    @property
    def spec(self) -> str:
        """The canonical string, as stored in run files and accepted by ``parse``."""
        if self.name == "srelu":
            return f"srelu:{self.eta:g}"
        return self.name


def parse(spec: str) -> Activation:
    """Parse ``"tanh"``, ``"srelu"``, ``"srelu:0.1"``...; raise ``ValueError`` if unknown."""
    name, _, arg = str(spec).strip().lower().partition(":")
    if name not in NAMES:
        raise ValueError(f"unknown activation {spec!r}; choose one of {', '.join(NAMES)} (srelu:ETA sets η)")
    if name != "srelu":
        if arg:
            raise ValueError(f"activation {name!r} takes no parameter (got {spec!r})")
        return Activation(name)
    if not arg:
        return Activation(name)
    try:
        eta = float(arg)
    except ValueError:
        raise ValueError(f"srelu width η must be a number, got {arg!r}") from None
    if not (np.isfinite(eta) and eta > 0):
        raise ValueError(f"srelu width η must be positive and finite, got {arg!r}")
    return Activation(name, eta)


def value_and_derivative(act: Activation, q: np.ndarray, s: np.ndarray, ds: np.ndarray) -> None:
    """Write σ(q) into ``s`` and σ'(q) into ``ds`` (same shape and dtype as ``q``).

    ``q`` may be overwritten: callers pass pre-activations they no longer need.
    """
    name = act.name
    if name == "tanh":
        np.tanh(q, out=s)
        np.multiply(s, s, out=ds)
        np.subtract(1, ds, out=ds)
    elif name == "sigmoid":
        np.multiply(q, 0.5, out=s)
        np.tanh(s, out=s)
        np.add(s, 1, out=s)
        np.multiply(s, 0.5, out=s)
        np.subtract(1, s, out=ds)
        np.multiply(ds, s, out=ds)
    elif name == "softplus":
        # σ' = sigmoid(q); σ = max(q, 0) + log1p(exp(-|q|))
        np.multiply(q, 0.5, out=ds)
        np.tanh(ds, out=ds)
        np.add(ds, 1, out=ds)
        np.multiply(ds, 0.5, out=ds)
        np.abs(q, out=s)
        np.negative(s, out=s)
        np.exp(s, out=s)
        np.log1p(s, out=s)
        np.maximum(q, 0, out=q)
        np.add(s, q, out=s)
    elif name == "gelu":
        # k = c (q + a q³),  t = tanh(k)
        q2 = q * q
        np.multiply(q2, GELU_A, out=s)
        np.add(s, 1, out=s)
        np.multiply(s, q, out=s)
        np.multiply(s, GELU_C, out=s)
        np.tanh(s, out=s)  # s = t
        # σ' = (1 + t)/2 + q/2 (1 − t²) c (1 + 3 a q²)
        np.multiply(q2, 3 * GELU_A, out=q2)
        np.add(q2, 1, out=q2)
        np.multiply(q2, GELU_C, out=q2)
        np.multiply(s, s, out=ds)
        np.subtract(1, ds, out=ds)
        np.multiply(ds, q2, out=ds)
        np.multiply(ds, q, out=ds)
        np.add(ds, s, out=ds)
        np.add(ds, 1, out=ds)
        np.multiply(ds, 0.5, out=ds)
        np.add(s, 1, out=s)
        np.multiply(s, q, out=s)
        np.multiply(s, 0.5, out=s)
    elif name == "srelu":
        eta = act.eta
        np.clip(q, -eta, eta, out=ds)
        np.add(ds, eta, out=ds)  # ds = clip(q) + η ∈ [0, 2η]
        np.multiply(ds, ds, out=s)
        np.multiply(s, 1 / (4 * eta), out=s)
        np.multiply(ds, 1 / (2 * eta), out=ds)
        above = q > eta
        s[above] = q[above]
    elif name == "relu2":
        np.maximum(q, 0, out=ds)
        np.multiply(ds, ds, out=s)
        np.multiply(ds, 2, out=ds)
    else:  # pragma: no cover - parse() admits only NAMES
        raise ValueError(f"unknown activation {name!r}")


def sigma(act: Activation, q: np.ndarray) -> np.ndarray:
    """σ(q) in a new array (convenience for tests and analysis)."""
    q = np.array(q, copy=True)
    s, ds = np.empty_like(q), np.empty_like(q)
    value_and_derivative(act, q, s, ds)
    return s
