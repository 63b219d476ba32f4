"""Initialisations (same marginal at every depth, their depth correlations) and built-in data."""

from __future__ import annotations

import numpy as np
import pytest

from mfres.data import builtin
from mfres.errors import DataError
from mfres.init import initial_particles, smooth_factor


@pytest.mark.parametrize("scheme", ["iid", "tied", "smooth"])
def test_marginal_is_gaussian_with_init_scale(scheme: str) -> None:
    th = initial_particles(scheme, 8, 4000, 3, seed=1, scale=0.5)
    for v in (th.U, th.W, th.b):
        assert abs(v.mean()) < 0.02
        assert v.std() == pytest.approx(0.5, rel=0.03)
        # same marginal at every depth
        per_layer = v.reshape(8, -1).std(axis=1)
        np.testing.assert_allclose(per_layer, 0.5, rtol=0.06)


def test_tied_is_constant_in_depth_and_iid_is_not() -> None:
    tied = initial_particles("tied", 6, 5, 2, seed=3)
    assert np.all(tied.U == tied.U[0]) and np.all(tied.b == tied.b[0])
    iid = initial_particles("iid", 6, 5, 2, seed=3)
    assert not np.allclose(iid.U[0], iid.U[1])


def test_smooth_profiles_have_squared_exponential_correlation() -> None:
    L, ell = 20, 0.2
    th = initial_particles("smooth", L, 20000, 1, seed=4, length_scale=ell)
    prof = th.W[:, :, 0]  # (L, M): M sampled profiles
    corr = np.corrcoef(prof)
    t = np.arange(L) / L
    K = np.exp(-0.5 * ((t[:, None] - t[None, :]) / ell) ** 2)
    np.testing.assert_allclose(corr, K, atol=0.03)
    F = smooth_factor(L, ell)
    np.testing.assert_allclose(F @ F.T, K, atol=1e-10)


def test_seed_reproducible_and_dtype_cast_of_same_draw() -> None:
    a = initial_particles("smooth", 4, 3, 2, seed=9)
    b = initial_particles("smooth", 4, 3, 2, seed=9, dtype=np.float32)
    assert b.U.dtype == np.float32
    np.testing.assert_array_equal(a.U.astype(np.float32), b.U)


@pytest.mark.parametrize("name", ["sphere", "teacher"])
def test_builtin_sets(name: str) -> None:
    d1 = builtin(name, 50, 5, data_seed=2)
    d2 = builtin(name, 50, 5, data_seed=2)
    d3 = builtin(name, 50, 5, data_seed=3)
    np.testing.assert_array_equal(d1.x, d2.x)
    np.testing.assert_array_equal(d1.y, d2.y)
    assert not np.array_equal(d1.x, d3.x)
    np.testing.assert_allclose(np.linalg.norm(d1.x, axis=1), 1.0)
    np.testing.assert_allclose(d1.readout, np.full(5, 1 / np.sqrt(5)))
    assert d1.y.std() > 0.05


def test_sphere_target_is_sin_of_projection() -> None:
    d = builtin("sphere", 200, 3, data_seed=0)
    # y = sin(ω v·x) for one unit v: recover v·x = arcsin(y)/ω and check it is linear in x
    mask = np.abs(d.y) < 0.9  # |ω v·x| ≤ 2 < π − arcsin(0.9): no folded branch below 0.9
    proj = np.arcsin(d.y[mask]) / 2.0
    v, *_ = np.linalg.lstsq(d.x[mask], proj, rcond=None)
    assert np.linalg.norm(v) == pytest.approx(1.0, rel=1e-3)


def test_unknown_builtin() -> None:
    with pytest.raises(DataError, match="unknown data set"):
        builtin("moons")
