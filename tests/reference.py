"""Independent re-implementations of docs/model.md used as references by the tests.

Nothing here imports mfres's numerics: a plain per-sample forward pass, and a
small reverse-mode automatic differentiation (a tape over NumPy arrays) that
differentiates that forward pass. Activations are written from their textbook
definitions, not from mfres's formulas.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

GELU_C = np.sqrt(2 / np.pi)


class Var:
    """A node of the tape: a value and how to push its gradient to its parents."""

    def __init__(self, value: np.ndarray, parents: tuple = ()) -> None:
        self.value = np.asarray(value, dtype=float)
        self.parents = parents  # ((Var, fn: grad_out -> grad_parent), ...)
        self.grad = np.zeros_like(self.value)

    def __add__(self, other: Var | float) -> Var:
        other = _lift(other)
        return Var(self.value + other.value, ((self, _unbroadcast(self.value.shape)),
                                              (other, _unbroadcast(other.value.shape))))

    __radd__ = __add__

    def __sub__(self, other: Var | float) -> Var:
        return self + (-1.0) * _lift(other)

    def __mul__(self, other: Var | float) -> Var:
        other = _lift(other)
        a, b = self.value, other.value
        return Var(a * b, ((self, lambda g: _unbroadcast(a.shape)(g * b)),
                           (other, lambda g: _unbroadcast(b.shape)(g * a))))

    __rmul__ = __mul__

    def __matmul__(self, other: Var) -> Var:
        a, b = self.value, other.value
        return Var(a @ b, ((self, lambda g: g @ b.T), (other, lambda g: a.T @ g)))

    @property
    def T(self) -> Var:
        return Var(self.value.T, ((self, lambda g: g.T),))


def _lift(v: Var | float | np.ndarray) -> Var:
    return v if isinstance(v, Var) else Var(np.asarray(v, dtype=float))


def _unbroadcast(shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    def f(g: np.ndarray) -> np.ndarray:
        while g.ndim > len(shape):
            g = g.sum(axis=0)
        for i, n in enumerate(shape):
            if n == 1 and g.shape[i] != 1:
                g = g.sum(axis=i, keepdims=True)
        return g

    return f


def unary(x: Var, f: Callable, df: Callable) -> Var:
    v = x.value
    return Var(f(v), ((x, lambda g: g * df(v)),))


def vsum(x: Var) -> Var:
    return Var(x.value.sum(), ((x, lambda g: np.broadcast_to(g, x.value.shape).copy()),))


def tanh(x: Var) -> Var:
    return unary(x, np.tanh, lambda v: 1 / np.cosh(v) ** 2)


def exp(x: Var) -> Var:
    return unary(x, np.exp, np.exp)


def log(x: Var) -> Var:
    return unary(x, np.log, lambda v: 1 / v)


def reciprocal(x: Var) -> Var:
    return unary(x, lambda v: 1 / v, lambda v: -1 / v**2)


def where(mask: np.ndarray, a: Var, b: Var) -> Var:
    return Var(np.where(mask, a.value, b.value), ((a, lambda g: np.where(mask, g, 0.0)),
                                                  (b, lambda g: np.where(mask, 0.0, g))))


def backward(out: Var) -> None:
    """Accumulate d out / d node into every node's ``grad`` (reverse topological order)."""
    order, seen = [], set()

    def visit(v: Var) -> None:
        if id(v) in seen:
            return
        seen.add(id(v))
        for p, _ in v.parents:
            visit(p)
        order.append(v)

    visit(out)
    out.grad = np.ones_like(out.value)
    for v in reversed(order):
        for p, fn in v.parents:
            p.grad = p.grad + fn(v.grad)


def activation(name: str, q: Var, eta: float = 0.5) -> Var:
    """σ(q) from the textbook definitions (sigmoid = 1/(1+e^-u), softplus = log(1+e^u), ...)."""
    if name == "tanh":
        return tanh(q)
    if name == "sigmoid":
        return reciprocal(exp(q * -1.0) + 1.0)
    if name == "softplus":
        return log(exp(q) + 1.0)
    if name == "gelu":
        return 0.5 * q * (tanh(GELU_C * (q + 0.044715 * q * q * q)) + 1.0)
    if name == "srelu":
        middle = (q + eta) * (q + eta) * (1 / (4 * eta))
        zero = q * 0.0
        return where(q.value > eta, q, where(q.value < -eta, zero, middle))
    if name == "relu2":
        return where(q.value > 0, q * q, q * 0.0)
    raise ValueError(name)


def loss_var(U: Var, W: Var, b: Var, x: np.ndarray, y: np.ndarray, a: np.ndarray, act: str,
             weight_decay: float = 0.0, eta: float = 0.5) -> Var:
    """E as a tape node, for U, W (L, M, d) and b (L, M) given as lists of per-layer Vars."""
    L = len(U)
    M = U[0].value.shape[0]
    z = Var(x)
    for l in range(L):
        q = z @ W[l].T + b[l]
        z = z + (1.0 / (L * M)) * (activation(act, q, eta) @ U[l])
    r = z @ Var(a[:, None]) - Var(y[:, None])
    E = (0.5 / len(y)) * vsum(r * r)
    if weight_decay:
        terms = [vsum(v * v) for v in (*U, *W, *b)]
        sq = terms[0]
        for t in terms[1:]:
            sq = sq + t
        E = E + (0.5 * weight_decay / (L * M)) * sq
    return E


def autograd_loss_and_grad(U: np.ndarray, W: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray,
                           a: np.ndarray, act: str, weight_decay: float = 0.0,
                           eta: float = 0.5) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """E and its gradient by reverse-mode AD of the plain forward pass."""
    L = U.shape[0]
    Uv = [Var(U[l]) for l in range(L)]
    Wv = [Var(W[l]) for l in range(L)]
    bv = [Var(b[l]) for l in range(L)]
    E = loss_var(Uv, Wv, bv, x, y, a, act, weight_decay, eta)
    backward(E)
    return (float(E.value), np.stack([v.grad for v in Uv]), np.stack([v.grad for v in Wv]),
            np.stack([v.grad for v in bv]))


def plain_loss(U: np.ndarray, W: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray, a: np.ndarray,
               act: str, weight_decay: float = 0.0, eta: float = 0.5) -> float:
    """E by a sample-by-sample, particle-by-particle forward pass (no vectorisation)."""
    L, M, _ = U.shape
    total = 0.0
    for i in range(len(y)):
        z = np.array(x[i], dtype=float)
        for l in range(L):
            dz = np.zeros_like(z)
            for m in range(M):
                q = float(W[l, m] @ z + b[l, m])
                dz += U[l, m] * float(activation(act, Var(np.array([q])), eta).value[0])
            z = z + dz / (L * M)
        total += 0.5 * (a @ z - y[i]) ** 2
    E = total / len(y)
    if weight_decay:
        E += 0.5 * weight_decay * (np.sum(U**2) + np.sum(W**2) + np.sum(b**2)) / (L * M)
    return float(E)
