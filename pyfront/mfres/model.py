"""The finite ResNet of docs/model.md: forward pass, loss, discrete adjoint, gradient.

Pure functions on arrays. Layouts (C order): ``U, W`` are ``(L, M, d)``, ``b`` is
``(L, M)``, ``x`` is ``(N, d)``, ``y`` is ``(N,)`` and the readout ``a`` is ``(d,)``.
Depth step h = 1/L. The loss is

    E = (1/N) Σ_i ½ (a·z_L(x_i) − y_i)² + (λ/2) (1/(L M)) Σ_{l,m} |θ_{l,m}|²

and the gradient is the exact gradient of E for the finite net (discrete adjoint).
A gradient-descent step of pseudo-time Δs is ``θ ← θ − Δs L M ∇E`` (``lr = L M Δs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .activations import Activation, value_and_derivative


@dataclass
class Particles:
    """The trained parameters θ: ``U, W`` of shape (L, M, d) and ``b`` of shape (L, M).

    A batch of B independent nets of the same size has a leading axis:
    ``U, W`` (B, L, M, d), ``b`` (B, L, M).
    """

    U: np.ndarray
    W: np.ndarray
    b: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """(L, M, d)."""
        return self.U.shape[-3:]  # type: ignore[return-value]

    @property
    def batch(self) -> tuple[int, ...]:
        """() for one net, (B,) for a batch."""
        return self.U.shape[:-3]

    def copy(self) -> Particles:
        return Particles(self.U.copy(), self.W.copy(), self.b.copy())

    def astype(self, dtype: np.dtype | type) -> Particles:
        return Particles(*(np.ascontiguousarray(v, dtype=dtype) for v in (self.U, self.W, self.b)))

    def batched(self) -> Particles:
        """Views with a batch axis (B = 1 for a single net)."""
        if self.batch:
            return self
        return Particles(self.U[None], self.W[None], self.b[None])


def learning_rate(L: int, M: int, ds: float) -> float:
    """The plain learning rate on E equivalent to a pseudo-time step Δs: ``L M Δs``."""
    return L * M * ds


def workspace_bytes(L: int, M: int, d: int, N: int, dtype: np.dtype, recompute: bool = False, B: int = 1) -> int:
    """Bytes of a ``Workspace`` plus θ, its gradient and a copy of θ (what a run holds)."""
    layers = 1 if recompute else L
    work = 2 * layers * N * M + (L + 1) * N * (d + 1) + 2 * N * M + 2 * N * (d + 1) + N
    particles = 6 * L * M * (2 * d + 1)  # θ, ∇E, [W b], [U 0], the chunk-start copy, the snapshot cast
    return int(np.dtype(dtype).itemsize * B * (work + particles))


@dataclass
class Workspace:
    """Buffers reused across gradient evaluations (all in the particles' dtype).

    ``Z`` holds the states z_0..z_L (L+1, B, N, d+1), each with a last entry 1 so that
    one product [z 1]·[W b]ᵀ gives the pre-activations and one product Tᵀ[z 1] gives
    both ∂E/∂W and ∂E/∂b (``Wb`` and ``U0`` hold [W b] and [U 0]); ``S`` and ``D`` hold
    σ(q) and σ'(q) (L, B, N, M), or only one layer's (1, B, N, M) in ``recompute`` mode,
    where the adjoint recomputes each layer's activations from z_l (memory O(L N d)
    instead of O(L N M), one more product and activation per layer); the rest are one
    layer's scratch. B is the batch size (1 for a single net).
    """

    L: int
    M: int
    d: int
    N: int
    dtype: np.dtype
    B: int = 1
    recompute: bool = False
    Z: np.ndarray = field(init=False)
    S: np.ndarray = field(init=False)
    D: np.ndarray = field(init=False)
    P: np.ndarray = field(init=False)
    Pn: np.ndarray = field(init=False)
    Q: np.ndarray = field(init=False)
    T: np.ndarray = field(init=False)
    r: np.ndarray = field(init=False)
    Wb: np.ndarray = field(init=False)
    U0: np.ndarray = field(init=False)
    G: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        L, M, d, N, B, dt = self.L, self.M, self.d, self.N, self.B, self.dtype
        layers = 1 if self.recompute else L
        self.Z = np.empty((L + 1, B, N, d + 1), dt)
        self.Z[..., d] = 1
        self.S = np.empty((layers, B, N, M), dt)
        self.D = np.empty((layers, B, N, M), dt)
        self.P = np.empty((B, N, d + 1), dt)
        self.Pn = np.empty((B, N, d + 1), dt)
        self.Q = np.empty((B, N, M), dt)
        self.T = np.empty((B, N, M), dt)
        self.r = np.empty((B, N), dt)
        self.Wb = np.empty((B, L, M, d + 1), dt)
        self.U0 = np.zeros((B, L, M, d + 1), dt)
        self.G = np.empty((B, M, d + 1), dt)

    def load(self, theta: Particles) -> None:
        """Copy θ (with a batch axis) into [W b] and [U 0]."""
        d = self.d
        self.Wb[..., :d] = theta.W
        self.Wb[..., d] = theta.b
        self.U0[..., :d] = theta.U

    @classmethod
    def for_problem(cls, theta: Particles, x: np.ndarray, recompute: bool = False) -> Workspace:
        L, M, d = theta.shape
        B = theta.batch[0] if theta.batch else 1
        return cls(L, M, d, x.shape[0], theta.U.dtype, B, recompute)

    def fits(self, theta: Particles, x: np.ndarray) -> bool:
        B = theta.batch[0] if theta.batch else 1
        return (self.L, self.M, self.d, self.N, self.dtype, self.B) == (*theta.shape, x.shape[0], theta.U.dtype, B)


def _layer(work: Workspace, act: Activation, l: int, k: int) -> None:
    """σ and σ' of layer l's pre-activations [z_l 1]·[W b]ᵀ into S[k], D[k]."""
    np.matmul(work.Z[l], work.Wb[:, l].transpose(0, 2, 1), out=work.Q)
    value_and_derivative(act, work.Q, work.S[k], work.D[k])


def forward(theta: Particles, x: np.ndarray, act: Activation, work: Workspace) -> np.ndarray:
    """Run the ResNet on ``x``; fill ``work.Z`` (and ``S``, ``D``); return z_L (B, N, d), a view.

    ``theta`` must carry a batch axis (``Particles.batched``).
    """
    L, M, d = theta.shape
    c = 1.0 / (L * M)  # h/M
    Z = work.Z
    work.load(theta)
    Z[0, ..., :d] = x
    for l in range(L):
        k = 0 if work.recompute else l
        _layer(work, act, l, k)
        np.matmul(work.S[k], work.U0[:, l], out=Z[l + 1])  # last entry: Σ σ·0 = 0
        Z[l + 1] *= c
        Z[l + 1] += Z[l]  # ... + 1
    return Z[L, ..., :d]


def predict(theta: Particles, x: np.ndarray, a: np.ndarray, act: Activation) -> np.ndarray:
    """The net's output ``a·z_L(x_i)`` for each sample: (N,), or (B, N) for a batch."""
    tb = theta.batched()
    work = Workspace.for_problem(tb, x, recompute=True)
    out = forward(tb, np.asarray(x, theta.U.dtype), act, work) @ a.astype(theta.U.dtype)
    return out if theta.batch else out[0]


def decay_term(theta: Particles, weight_decay: float) -> np.ndarray | float:
    """(λ/2) (1/(L M)) Σ |θ|² per net, accumulated in float64."""
    if weight_decay == 0:
        return np.zeros(theta.batch) if theta.batch else 0.0
    L, M, _ = theta.shape
    sq = sum(np.sum(np.square(v, dtype=np.float64), axis=tuple(range(len(theta.batch), v.ndim)))
             for v in (theta.U, theta.W, theta.b))
    out = 0.5 * weight_decay * sq / (L * M)
    return out if theta.batch else float(out)


def loss(theta: Particles, x: np.ndarray, y: np.ndarray, a: np.ndarray, act: Activation,
         weight_decay: float = 0.0) -> float:
    """E(θ) without the gradient."""
    r = predict(theta, x, a, act) - y
    E = 0.5 * np.mean(r.astype(np.float64) ** 2, axis=-1) + decay_term(theta, weight_decay)
    return E if theta.batch else float(E)


def loss_and_grad(theta: Particles, x: np.ndarray, y: np.ndarray, a: np.ndarray, act: Activation,
                  weight_decay: float = 0.0, work: Workspace | None = None,
                  grad: Particles | None = None, recompute: bool = False) -> tuple[Any, Particles]:
    """E(θ) and ∇_θ E by the discrete adjoint of docs/model.md.

    ``work`` and ``grad`` are optional preallocated buffers (reused when given);
    ``recompute`` chooses the low-memory workspace when none is given. E is a Python
    float for one net, a float64 array (B,) for a batch; the gradient has θ's dtype
    and shape.
    """
    L, M, _d = theta.shape
    N = x.shape[0]
    dt = theta.U.dtype
    tb = theta.batched()
    if work is None or not work.fits(tb, x):
        work = Workspace.for_problem(tb, x, recompute)
    if grad is None:
        grad = Particles(np.empty_like(theta.U), np.empty_like(theta.W), np.empty_like(theta.b))
    gb = grad.batched()
    zL = forward(tb, x, act, work)
    r = work.r
    np.matmul(zL, a, out=r)
    r -= y
    E = 0.5 * np.einsum("bn,bn->b", r, r, dtype=np.float64) / N
    E = E + decay_term(tb, weight_decay)

    c = 1.0 / (L * M)  # h/M
    cg = dt.type(c / N)
    P, Pn, T, G = work.P, work.Pn, work.T, work.G
    np.multiply(r[..., None], a, out=P[..., :_d])  # p_L
    P[..., _d] = 0  # P's last entry only ever meets U0's zero column; keep it finite
    for l in range(L - 1, -1, -1):
        if work.recompute:
            _layer(work, act, l, 0)
        k = 0 if work.recompute else l
        # P holds p_{l+1}; T = σ'(q) (U·p_{l+1})
        np.matmul(P, work.U0[:, l].transpose(0, 2, 1), out=T)
        T *= work.D[k]
        np.matmul(work.S[k].transpose(0, 2, 1), P[..., :_d], out=gb.U[:, l])
        np.matmul(T.transpose(0, 2, 1), work.Z[l], out=G)  # [∂W ∂b]
        gb.W[:, l] = G[..., :_d]
        gb.b[:, l] = G[..., _d]
        np.matmul(T, work.Wb[:, l], out=Pn)
        Pn *= c
        P += Pn
    for g in (grad.U, grad.W, grad.b):
        g *= cg
    if weight_decay:
        wd = dt.type(weight_decay * c)
        for g, v in zip((grad.U, grad.W, grad.b), (theta.U, theta.W, theta.b), strict=True):
            g += wd * v
    return (E if theta.batch else float(E[0])), grad


def velocity_rms(grad: Particles) -> Any:
    """RMS over particles of the velocity |dθ/ds| = L M |∇_θ E| (each particle's 2d+1 components).

    A float for one net, an array (B,) for a batch."""
    L, M, _ = grad.shape
    nb = len(grad.batch)
    sq = sum(np.sum(np.square(g, dtype=np.float64), axis=tuple(range(nb, g.ndim))) for g in (grad.U, grad.W, grad.b))
    out = L * M * np.sqrt(sq / (L * M))
    return out if grad.batch else float(out)


def gd_step(theta: Particles, grad: Particles, ds: float) -> None:
    """θ ← θ − Δs L M ∇E, in place."""
    L, M, _ = theta.shape
    step = theta.U.dtype.type(ds * L * M)
    for v, g in zip((theta.U, theta.W, theta.b), (grad.U, grad.W, grad.b), strict=True):
        v -= step * g
