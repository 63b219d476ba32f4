"""The nested admissible (``smooth``) initialisation: one continuous-depth profile per particle and seed."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from mfres.init import initial_particles, kernel, smooth_basis, smooth_factor, smooth_modes


@pytest.mark.parametrize("L", [3, 8, 25])
def test_depths_shared_by_L_and_2L_hold_the_same_particles(L: int) -> None:
    a = initial_particles("smooth", L, 6, 2, seed=5)
    b = initial_particles("smooth", 2 * L, 6, 2, seed=5)
    c = initial_particles("smooth", 4 * L, 6, 2, seed=5)
    for v in "UWb":
        np.testing.assert_array_equal(getattr(a, v), getattr(b, v)[::2])
        np.testing.assert_array_equal(getattr(a, v), getattr(c, v)[::4])
        # and the in-between layers are new depths, not copies
        assert not np.allclose(getattr(b, v)[1::2], getattr(a, v))
    other_seed = initial_particles("smooth", L, 6, 2, seed=6)
    assert not np.allclose(a.U, other_seed.U)


def test_widths_are_nested_too() -> None:
    """The first M profiles of width M' > M are those of width M (coefficients drawn particle-major)."""
    a = initial_particles("smooth", 7, 4, 3, seed=2)
    b = initial_particles("smooth", 7, 9, 3, seed=2)
    np.testing.assert_allclose(a.W, b.W[:, :4], rtol=0, atol=1e-14)


@pytest.mark.parametrize("ell", [0.05, 0.2, 1.0])
def test_basis_has_unit_variance_and_the_kernels_covariance(ell: float) -> None:
    """Deterministic: Var θ(t) = 1 exactly and Ψ(t)·Ψ(u) = k(t, u) up to the KL truncation, at arbitrary t."""
    t = np.concatenate([np.linspace(0, 1, 201), np.random.default_rng(0).uniform(0, 1, 50)])
    P = smooth_basis(t, ell)
    np.testing.assert_allclose(np.sum(P**2, axis=1), 1.0, rtol=1e-14)
    np.testing.assert_allclose(P @ P.T, kernel(t, t, ell), atol=1e-9)
    assert P.shape[1] == smooth_modes(ell) < 80


def test_covariance_in_t_matches_kernel_monte_carlo() -> None:
    """Sample covariance of 60000 profiles at L = 10 depths against k(t, u).

    For unit-variance jointly normal (x, y) with correlation ρ, Var(xy) = 1 + ρ² ≤ 2, so each
    sample covariance has standard error ≤ √(2/n) = 0.0058: tolerance 5 standard errors."""
    L, ell = 10, 0.2
    th = initial_particles("smooth", L, 20000, 1, seed=4, length_scale=ell)
    prof = np.concatenate([th.U[:, :, 0], th.W[:, :, 0], th.b], axis=1)  # (L, n)
    n = prof.shape[1]
    cov = prof @ prof.T / n  # the mean is 0 by construction
    t = np.arange(L) / L
    tol = 5 * np.sqrt(2 / n)
    np.testing.assert_allclose(cov, kernel(t, t, ell), atol=tol)
    np.testing.assert_allclose(smooth_factor(L, ell) @ smooth_factor(L, ell).T, kernel(t, t, ell), atol=1e-9)


def test_marginal_at_every_depth_is_rho0() -> None:
    """At every t = l/L: mean 0 and variance σ² within 5 standard errors, and a KS test against N(0, σ²)."""
    L, M, d, sigma = 12, 3000, 2, 0.7
    th = initial_particles("smooth", L, M, d, seed=8, scale=sigma)
    for l in range(L):
        x = np.concatenate([th.U[l].ravel(), th.W[l].ravel(), th.b[l].ravel()])
        n = x.size
        assert abs(x.mean()) < 5 * sigma / np.sqrt(n)
        assert abs(x.var() / sigma**2 - 1) < 5 * np.sqrt(2 / n)
        assert stats.kstest(x / sigma, "norm").pvalue > 1e-3


def test_iid_and_tied_are_unchanged() -> None:
    """The other schemes are bit-identical to their definition (files and tests depend on them)."""
    L, M, d, seed = 5, 4, 3, 11
    g = np.random.default_rng(seed).standard_normal((L, M, 2 * d + 1))
    iid = initial_particles("iid", L, M, d, seed)
    np.testing.assert_array_equal(iid.U, g[:, :, :d])
    np.testing.assert_array_equal(iid.b, g[:, :, 2 * d])
    g1 = np.random.default_rng(seed).standard_normal((1, M, 2 * d + 1))
    tied = initial_particles("tied", L, M, d, seed)
    np.testing.assert_array_equal(tied.W, np.broadcast_to(g1[:, :, d:2 * d], (L, M, d)))
