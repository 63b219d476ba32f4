"""Initial particles: the ``iid``, ``tied`` and ``smooth`` schemes of docs/model.md.

Every scheme gives each layer the same marginal ρ_0: U ~ N(0, σ² I_d),
W ~ N(0, σ² I_d), b ~ N(0, σ²) with σ = ``scale`` (default 1). They differ in the
correlation across depth t = l/L:

- ``iid``: all θ_{l,m} independent;
- ``tied``: θ_{l,m} = θ_m for every l (M profiles constant in t);
- ``smooth``: each of the M profiles is a Gaussian process in t with kernel
  exp(−(t − t')² / (2 ℓ²)), ℓ = ``length_scale`` (default 0.2), sampled at t = l/L.

Particles are always drawn in float64 from ``numpy.random.default_rng(seed)`` and
then cast, so a seed gives the same net in every backend and dtype.
"""

from __future__ import annotations

import numpy as np

from .model import Particles

SCHEMES = ("iid", "tied", "smooth")
DEFAULT_LENGTH_SCALE = 0.2


def smooth_factor(L: int, length_scale: float) -> np.ndarray:
    """A matrix F (L, L) with F Fᵀ = K, K the squared-exponential kernel at t = l/L.

    Built from the eigendecomposition so that it stays valid when K is numerically
    singular (large L, long ℓ): negative round-off eigenvalues are clipped to 0.
    """
    t = np.arange(L) / L
    K = np.exp(-0.5 * ((t[:, None] - t[None, :]) / length_scale) ** 2)
    w, V = np.linalg.eigh(K)
    return V * np.sqrt(np.clip(w, 0.0, None))


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
        g = rng.standard_normal((L, M, k))
        theta = np.einsum("ij,jmk->imk", smooth_factor(L, length_scale), g)
    theta = scale * theta
    return Particles(
        np.ascontiguousarray(theta[:, :, :d], dtype=dtype),
        np.ascontiguousarray(theta[:, :, d:2 * d], dtype=dtype),
        np.ascontiguousarray(theta[:, :, 2 * d], dtype=dtype),
    )
