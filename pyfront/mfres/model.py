"""The finite ResNet of MODEL.md: forward pass, loss, discrete adjoint, gradient.

Pure functions on arrays. Layouts (C order): ``U, W`` are ``(L, M, d)``, ``b`` is
``(L, M)``, ``x`` is ``(N, d)``, ``y`` is ``(N,)`` and the readout ``a`` is ``(d,)``.
Depth step h = 1/L. The loss is

    E = (1/N) Σ_i ½ (a·z_L(x_i) − y_i)² + (λ/2) (1/(L M)) Σ_{l,m} |θ_{l,m}|²

and the gradient is the exact gradient of E for the finite net (discrete adjoint).
A gradient-descent step of pseudo-time Δs is ``θ ← θ − Δs L M ∇E`` (``lr = L M Δs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .activations import Activation, value_and_derivative


@dataclass
class Particles:
    """The trained parameters θ: ``U, W`` of shape (L, M, d) and ``b`` of shape (L, M)."""

    U: np.ndarray
    W: np.ndarray
    b: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """(L, M, d)."""
        return self.U.shape  # type: ignore[return-value]

    def copy(self) -> Particles:
        return Particles(self.U.copy(), self.W.copy(), self.b.copy())

    def astype(self, dtype: np.dtype | type) -> Particles:
        return Particles(*(np.ascontiguousarray(v, dtype=dtype) for v in (self.U, self.W, self.b)))


def learning_rate(L: int, M: int, ds: float) -> float:
    """The plain learning rate on E equivalent to a pseudo-time step Δs: ``L M Δs``."""
    return L * M * ds


@dataclass
class Workspace:
    """Buffers reused across gradient evaluations (all in the particles' dtype).

    ``Z`` holds the states z_0..z_L (L+1, N, d); ``S`` and ``D`` hold σ(q) and σ'(q)
    for every layer (L, N, M); the rest are one layer's scratch.
    """

    L: int
    M: int
    d: int
    N: int
    dtype: np.dtype
    Z: np.ndarray = field(init=False)
    S: np.ndarray = field(init=False)
    D: np.ndarray = field(init=False)
    P: np.ndarray = field(init=False)
    Pn: np.ndarray = field(init=False)
    Q: np.ndarray = field(init=False)
    T: np.ndarray = field(init=False)
    r: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        L, M, d, N, dt = self.L, self.M, self.d, self.N, self.dtype
        self.Z = np.empty((L + 1, N, d), dt)
        self.S = np.empty((L, N, M), dt)
        self.D = np.empty((L, N, M), dt)
        self.P = np.empty((N, d), dt)
        self.Pn = np.empty((N, d), dt)
        self.Q = np.empty((N, M), dt)
        self.T = np.empty((N, M), dt)
        self.r = np.empty(N, dt)

    @classmethod
    def for_problem(cls, theta: Particles, x: np.ndarray) -> Workspace:
        L, M, d = theta.shape
        return cls(L, M, d, x.shape[0], theta.U.dtype)

    def fits(self, theta: Particles, x: np.ndarray) -> bool:
        return (self.L, self.M, self.d, self.N, self.dtype) == (*theta.shape, x.shape[0], theta.U.dtype)


def workspace_bytes(L: int, M: int, d: int, N: int, dtype: np.dtype) -> int:
    """Bytes of a ``Workspace`` plus θ, its gradient and a copy of θ (what a run holds)."""
    per_layer_state = 2 * N * M + N * d  # S, D and z_l
    particles = 4 * L * M * (2 * d + 1)  # θ, ∇E, the chunk-start copy, the snapshot cast
    return int(np.dtype(dtype).itemsize * (L * per_layer_state + N * d + 2 * N * M + 2 * N * d + N + particles))


def forward(theta: Particles, x: np.ndarray, act: Activation, work: Workspace) -> np.ndarray:
    """Run the ResNet on ``x``; fill ``work.Z``, ``work.S``, ``work.D``; return z_L (a view)."""
    L, M, _ = theta.shape
    c = 1.0 / (L * M)  # h/M
    Z, Q = work.Z, work.Q
    Z[0] = x
    for l in range(L):
        np.matmul(Z[l], theta.W[l].T, out=Q)
        Q += theta.b[l]
        value_and_derivative(act, Q, work.S[l], work.D[l])
        np.matmul(work.S[l], theta.U[l], out=Z[l + 1])
        Z[l + 1] *= c
        Z[l + 1] += Z[l]
    return Z[L]


def predict(theta: Particles, x: np.ndarray, a: np.ndarray, act: Activation) -> np.ndarray:
    """The net's output ``a·z_L(x_i)`` for each sample, shape (N,)."""
    work = Workspace.for_problem(theta, x)
    return forward(theta, np.asarray(x, theta.U.dtype), act, work) @ a.astype(theta.U.dtype)


def decay_term(theta: Particles, weight_decay: float) -> float:
    """(λ/2) (1/(L M)) Σ |θ|², accumulated in float64."""
    if weight_decay == 0:
        return 0.0
    L, M, _ = theta.shape
    sq = sum(float(np.vdot(v, v)) for v in (theta.U, theta.W, theta.b))
    return 0.5 * weight_decay * sq / (L * M)


def loss(theta: Particles, x: np.ndarray, y: np.ndarray, a: np.ndarray, act: Activation,
         weight_decay: float = 0.0) -> float:
    """E(θ) without the gradient."""
    r = predict(theta, x, a, act) - y
    return 0.5 * float(np.mean(r.astype(np.float64) ** 2)) + decay_term(theta, weight_decay)


def loss_and_grad(theta: Particles, x: np.ndarray, y: np.ndarray, a: np.ndarray, act: Activation,
                  weight_decay: float = 0.0, work: Workspace | None = None,
                  grad: Particles | None = None) -> tuple[float, Particles]:
    """E(θ) and ∇_θ E by the discrete adjoint of MODEL.md.

    ``work`` and ``grad`` are optional preallocated buffers (reused when given).
    E is returned as a Python float; the gradient has θ's dtype.
    """
    L, M, _d = theta.shape
    N = x.shape[0]
    dt = theta.U.dtype
    if work is None or not work.fits(theta, x):
        work = Workspace.for_problem(theta, x)
    if grad is None:
        grad = Particles(np.empty_like(theta.U), np.empty_like(theta.W), np.empty_like(theta.b))
    zL = forward(theta, x, act, work)
    r = work.r
    np.matmul(zL, a, out=r)
    r -= y
    E = 0.5 * float(np.dot(r, r)) / N + decay_term(theta, weight_decay)

    c = 1.0 / (L * M)  # h/M
    cg = dt.type(c / N)
    P, Pn, T = work.P, work.Pn, work.T
    np.multiply(r[:, None], a[None, :], out=P)  # p_L
    for l in range(L - 1, -1, -1):
        # P holds p_{l+1}; T = σ'(q) (U·p_{l+1})
        np.matmul(P, theta.U[l].T, out=T)
        T *= work.D[l]
        np.matmul(work.S[l].T, P, out=grad.U[l])
        np.matmul(T.T, work.Z[l], out=grad.W[l])
        np.sum(T, axis=0, out=grad.b[l])
        np.matmul(T, theta.W[l], out=Pn)
        Pn *= c
        P += Pn
    for g in (grad.U, grad.W, grad.b):
        g *= cg
    if weight_decay:
        wd = dt.type(weight_decay * c)
        for g, v in zip((grad.U, grad.W, grad.b), (theta.U, theta.W, theta.b), strict=False):
            g += wd * v
    return E, grad


def velocity_rms(grad: Particles) -> float:
    """RMS over particles of the velocity |dθ/ds| = L M |∇_θ E| (each particle's 2d+1 components)."""
    L, M, _ = grad.shape
    sq = sum(float(np.vdot(g, g)) for g in (grad.U, grad.W, grad.b))
    return float(L * M * np.sqrt(sq / (L * M)))


def gd_step(theta: Particles, grad: Particles, ds: float) -> None:
    """θ ← θ − Δs L M ∇E, in place."""
    L, M, _ = theta.shape
    step = theta.U.dtype.type(ds * L * M)
    for v, g in zip((theta.U, theta.W, theta.b), (grad.U, grad.W, grad.b), strict=False):
        v -= step * g
