"""Initial particles: the ``iid``, ``tied`` and ``smooth`` schemes of docs/model.md.

Every scheme gives each layer the same marginal ρ_0: U ~ N(0, σ² I_d),
W ~ N(0, σ² I_d), b ~ N(0, σ²) with σ = ``scale`` (default 1). They differ in the
correlation across depth t = l/L:

- ``iid``: all θ_{l,m} independent;
- ``tied``: θ_{l,m} = θ_m for every l (M profiles constant in t);
- ``smooth``: each of the M·(2d + 1) coordinates is a Gaussian process in t with
  kernel k(t, t') = exp(−(t − t')² / (2 ℓ²)), ℓ = ``length_scale`` (default 0.2),
  drawn once per seed as a function of t and read at t = l/L.

``smooth`` is nested: the profiles are a fixed truncated Karhunen–Loève expansion
θ_m(t) = Σ_j ξ_{m,j} ψ_j(t) with coefficients ξ ~ N(0, 1) drawn from the seed
alone (not from L), so layer l of depth L and layer 2l of depth 2L hold the same
particles: nets of different depth discretise one continuous-depth net. The
coefficients are drawn particle-major, so the first M profiles of width M' > M are
those of width M (``tied`` is nested in width the same way). The basis ψ_j comes
from the Nyström method on Gauss–Legendre nodes (``smooth_basis``), truncated where
the kernel's eigenvalues fall below ``KL_TOL`` of the largest, and rescaled so that
Var θ(t) = σ² exactly at every t: the marginal is ρ_0 at every depth, the covariance
is the kernel's up to the truncation (≲ 1e-9, see the tests).

Particles are always drawn in float64 from ``numpy.random.default_rng(seed)`` and
then cast, so a seed gives the same net in every backend and dtype.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .model import Particles

SCHEMES = ("iid", "tied", "smooth")
DEFAULT_LENGTH_SCALE = 0.2
KL_TOL = 1e-13
"""Karhunen–Loève modes with eigenvalue below KL_TOL · λ_0 are dropped (their variance is below round-off)."""
MAX_NODES = 1500
"""Cap on the Nyström quadrature nodes (10/ℓ of them): below ℓ ≈ 0.007 the expansion is coarser than the kernel."""


def kernel(t: np.ndarray, u: np.ndarray, length_scale: float) -> np.ndarray:
    """The squared-exponential kernel k(t, u) = exp(−(t − u)² / (2 ℓ²)) on all pairs (t_i, u_j)."""
    t, u = np.asarray(t, dtype=float), np.asarray(u, dtype=float)
    return np.exp(-0.5 * ((t[:, None] - u[None, :]) / length_scale) ** 2)


@functools.lru_cache(maxsize=16)
def _nystrom(length_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre nodes x on [0, 1] and the map A (nodes, modes) with ψ_j(t) = k(t, x) A[:, j]."""
    n = min(max(48, math.ceil(10 / length_scale)), MAX_NODES)
    x, w = np.polynomial.legendre.leggauss(n)
    x, w = (x + 1) / 2, w / 2
    sw = np.sqrt(w)
    lam, V = np.linalg.eigh(sw[:, None] * kernel(x, x, length_scale) * sw[None, :])
    lam, V = lam[::-1], V[:, ::-1]
    keep = lam > KL_TOL * lam[0]
    # eigenfunction φ_j(x_i) = V_ij / √w_i; Nyström: φ_j(t) = Σ_i w_i k(t, x_i) φ_j(x_i) / λ_j, ψ_j = √λ_j φ_j
    A = sw[:, None] * V[:, keep] / np.sqrt(lam[keep])[None, :]
    A.setflags(write=False)
    return x, A


def smooth_modes(length_scale: float) -> int:
    """How many Karhunen–Loève modes ``smooth`` uses at this ℓ (coefficients drawn per particle coordinate)."""
    return _nystrom(float(length_scale))[1].shape[1]


def smooth_basis(t: np.ndarray, length_scale: float) -> np.ndarray:
    """The basis Ψ (len(t), modes) of ``smooth``: θ(t) = Ψ(t) ξ with ξ ~ N(0, I) has Var θ(t) = 1 and
    Cov(θ(t), θ(u)) = Ψ(t)·Ψ(u) ≈ k(t, u)."""
    x, A = _nystrom(float(length_scale))
    # einsum's own loop (not BLAS) sums each row in the same order whatever len(t) is: a depth's
    # particles are bit-identical at every L that contains it
    psi = np.einsum("ti,ij->tj", kernel(np.asarray(t, dtype=float), x, length_scale), A)
    return psi / np.linalg.norm(psi, axis=1, keepdims=True)


def smooth_factor(L: int, length_scale: float) -> np.ndarray:
    """Ψ at the depths t = l/L (shape (L, modes)): Ψ Ψᵀ is the kernel matrix of those depths up to truncation."""
    return smooth_basis(np.arange(L) / L, length_scale)


def initial_particles(scheme: str, L: int, M: int, d: int, seed: int, scale: float = 1.0,
                      length_scale: float = DEFAULT_LENGTH_SCALE,
                      dtype: np.dtype | type = np.float64) -> Particles:
    """Draw θ_{l,m} for l < L, m < M by ``scheme``; see the module docstring."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown init {scheme!r}; choose one of {', '.join(SCHEMES)}")
    rng = np.random.default_rng(seed)
    k = 2 * d + 1
    if scheme == "iid":
        theta = rng.standard_normal((L, M, k))
    elif scheme == "tied":
        theta = np.broadcast_to(rng.standard_normal((1, M, k)), (L, M, k))
    else:
        xi = rng.standard_normal((M, smooth_modes(length_scale), k))  # per particle: independent of L
        theta = np.einsum("lj,mjk->lmk", smooth_factor(L, length_scale), xi)
    theta = scale * theta
    return Particles(
        np.ascontiguousarray(theta[:, :, :d], dtype=dtype),
        np.ascontiguousarray(theta[:, :, d:2 * d], dtype=dtype),
        np.ascontiguousarray(theta[:, :, 2 * d], dtype=dtype),
    )
