"""Sweep analysis on synthetic sweeps with known answers, on a real tiny sweep, and the particle distance."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from scipy import stats

import mfres
from mfres import analysis
from mfres.cli import main


def sweep_like(final: np.ndarray, depths, widths, s=None, status=None, extra: dict | None = None,
               init: str = "smooth") -> xr.Dataset:
    """A Dataset with the variables, dimensions and attributes of ``mfres.sweep.open_sweep``'s.

    ``final`` (depth, width, seed) is the loss at the last grid point; earlier points decay to it
    (E(s) = final · (1 + 3 (1 − s/s_max))), unless ``final`` already has a step axis."""
    s = np.linspace(0, 2, 11) if s is None else np.asarray(s, float)
    dims = (*list(extra or {}), "depth", "width", "seed")
    loss = final if final.ndim == len(dims) + 1 else final[..., None] * (1 + 3 * (1 - s / s[-1]))
    shape = loss.shape[:-1]
    status = np.full(shape, "ok") if status is None else status
    coords = {**(extra or {}), "depth": np.asarray(depths, np.int64), "width": np.asarray(widths, np.int64),
              "seed": np.arange(shape[-1], dtype=np.int64), "s": ("step", s)}
    return xr.Dataset(
        {"loss": ((*dims, "step"), loss), "status": (dims, status.astype(str)),
         "message": (dims, np.full(shape, "")), "seconds": (dims, np.full(shape, 0.01))},
        coords=coords,
        attrs={"Conventions": "CF-1.8", "title": "mfres sweep over depth, width, seed", "init": init,
               "steps": s.size - 1, "ds": float(s[1] - s[0]), "ds_max": float(s[1] - s[0]), "seeds": shape[-1],
               "dim": 2, "samples": 16, "data": "sphere", "activation": "tanh"})


DEPTHS = (4, 8, 16, 32, 64)
WIDTHS = (64, 256, 1024)


def nested_final(p: float, rng: np.random.Generator, depths=DEPTHS, widths=WIDTHS, seeds=32, a=0.05,
                 sigma=0.3, indep=1e-3) -> np.ndarray:
    """E = 0.1 + a L^−p + 0.2/M + σ ξ/√M with ξ per (width, seed) shared by every depth (a nested
    initialisation), plus a small depth-specific part ``indep`` · ζ/√M."""
    L = np.array(depths, float)[:, None, None]
    M = np.array(widths, float)[None, :, None]
    xi = rng.standard_normal((1, len(widths), seeds))
    zeta = rng.standard_normal((len(depths), len(widths), seeds))
    return 0.1 + a * L**-p + 0.2 / M + (sigma * xi + indep * zeta) / np.sqrt(M)


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0])
def test_depth_order_recovered_inside_its_interval(p: float) -> None:
    """Over 20 synthetic sweeps (3 widths each) the 95 % intervals cover the true p in ≥ 85 % of the 60 cases
    (a binomial(60, 0.95) falls below 51 with probability < 1 %) and the estimates centre on p."""
    covered, estimates = 0, []
    for rep in range(20):
        ds = sweep_like(nested_final(p, np.random.default_rng(1000 * rep + int(10 * p)), indep=1e-4), DEPTHS, WIDTHS)
        r = analysis.convergence_rates(ds, n_boot=199)
        for M in WIDTHS:
            pt = r.sel(width=M)
            est, lo, hi = float(pt["depth_order"]), float(pt["depth_order_lo"]), float(pt["depth_order_hi"])
            assert lo <= est <= hi
            covered += lo < p < hi
            estimates.append(est)
    assert covered >= 51, covered
    assert abs(np.mean(estimates) - p) < 0.05 * p
    # the interval is honest: much wider with fewer seeds and more depth-specific noise
    noisy = analysis.convergence_rates(sweep_like(nested_final(p, np.random.default_rng(1), seeds=8, indep=3e-2),
                                                  DEPTHS, WIDTHS))
    w_noisy = float(noisy["depth_order_hi"].sel(width=64) - noisy["depth_order_lo"].sel(width=64))
    assert w_noisy > float(r["depth_order_hi"].sel(width=64) - r["depth_order_lo"].sel(width=64))


def test_depth_order_on_a_grid_without_constant_ratio() -> None:
    depths = (3, 5, 9, 16, 40, 64)
    ds = sweep_like(nested_final(1.0, np.random.default_rng(3), depths=depths, indep=1e-4), depths, WIDTHS)
    r = analysis.convergence_rates(ds)
    pt = r.sel(width=1024)
    assert float(pt["depth_order_lo"]) < 1 < float(pt["depth_order_hi"])
    assert abs(float(pt["depth_order"]) - 1) < 0.05
    # noise-free: exact
    L = np.array(depths, float)
    assert analysis.order_from_differences(L, 0.3 + 0.7 * L**-1.37) == pytest.approx(1.37, abs=1e-6)
    assert analysis.order_from_differences(L[::2], 0.3 + 0.7 * L[::2] ** -0.6) == pytest.approx(0.6, abs=1e-6)


def test_order_with_ratio_two_is_the_loglog_fit_of_differences() -> None:
    L = np.array([2, 4, 8, 16.0])
    E = 1 + 0.5 / L + np.array([0, 1e-3, -1e-3, 2e-4])
    D = np.abs(np.diff(E))
    ref = stats.linregress(np.log(L[:-1]), np.log(D)).slope
    assert analysis.order_from_differences(L, E) == pytest.approx(-ref, rel=1e-12)


def test_ols_slope_matches_linregress_and_skips_nan() -> None:
    rng = np.random.default_rng(0)
    x = np.arange(6.0)
    y = rng.standard_normal((6, 4))
    y[2, 1] = np.nan
    got = analysis.ols_slope(x, y)
    for j in range(4):
        ok = np.isfinite(y[:, j])
        assert got[j] == pytest.approx(stats.linregress(x[ok], y[ok, j]).slope, rel=1e-12)


def test_width_orders_and_iid_law() -> None:
    rng = np.random.default_rng(4)
    depths, widths, K = (2, 4, 8), (16, 64, 256, 1024), 64
    L = np.array(depths, float)[:, None, None]
    M = np.array(widths, float)[None, :, None]
    final = 0.2 + 0.3 * rng.standard_normal((3, 4, K)) / np.sqrt(L * M)  # iid layers: spread ∝ (LM)^−1/2
    r = analysis.convergence_rates(sweep_like(final, depths, widths, init="iid"))
    lo, hi = float(r["width_order_lo"]), float(r["width_order_hi"])
    assert lo < -0.5 < hi and abs(float(r["width_order"]) + 0.5) < 0.08
    assert float(r["iid_slope_lo"]) < -0.5 < float(r["iid_slope_hi"])
    for L_ in depths:
        assert float(r["width_slope_lo"].sel(depth=L_)) < -0.5 < float(r["width_slope_hi"].sel(depth=L_))


def test_width_bias_order_with_nested_widths() -> None:
    rng = np.random.default_rng(5)
    widths, K = (8, 16, 32, 64, 128), 48
    M = np.array(widths, float)[None, :, None]
    xi = rng.standard_normal((1, 1, K))
    final = 0.1 + 0.5 / M + 0.01 * xi / np.sqrt(M) + 1e-4 * rng.standard_normal((2, 5, K))
    r = analysis.convergence_rates(sweep_like(final, (8, 16), widths))
    pt = r.sel(depth=16)
    assert float(pt["width_bias_order_lo"]) < 1 < float(pt["width_bias_order_hi"])


def test_limit_and_its_band_cover_the_truth() -> None:
    rng = np.random.default_rng(6)
    depths, widths, K = (8, 16, 32), (64, 256, 1024), 40
    L = np.array(depths, float)[:, None, None]
    M = np.array(widths, float)[None, :, None]
    final = 0.1 + 0.4 / L + 2.0 / M + 0.2 * rng.standard_normal((1, 3, K)) / np.sqrt(M)
    r = analysis.convergence_rates(sweep_like(final, depths, widths))
    assert float(r["limit_lo"]) < 0.1 < float(r["limit_hi"])
    assert float(r["limit"]) == pytest.approx(0.1, abs=0.01)
    # in 1/L only at the widest M: biased by 2/M_max ≈ 0.002 (plus noise), not by 0.4/L
    assert abs(float(r["limit_depth"]) - (0.1 + 2.0 / 1024)) < 0.01


def test_theorem_probability_and_size_exponents() -> None:
    rng = np.random.default_rng(7)
    depths, widths, K = (4, 8, 16, 32), (16, 64, 256, 1024), 64
    L = np.array(depths, float)[:, None, None]
    M = np.array(widths, float)[None, :, None]
    xi = rng.standard_normal((1, 1, K))
    # width error only, σ ξ/√M (nested in M): the ε reached with probability 1 − η is ∝ M^−1/2
    final = 0.05 + 0.05 * xi / np.sqrt(M) + 0 * L
    ds = sweep_like(final, depths, widths)
    eps, eta = 0.01, 0.2
    res = analysis.limit_probability(ds, eps, eta)
    rates = analysis.convergence_rates(ds)
    dev = np.abs(final - float(rates["limit"]))
    frac = (dev <= eps).mean(axis=-1)
    np.testing.assert_allclose(res["near_limit"].transpose("depth", "width").values, frac)
    lo, _ = analysis.wilson((dev <= eps).sum(-1), np.full(frac.shape, K))
    np.testing.assert_allclose(res["near_limit_lo"].transpose("depth", "width").values, lo)
    assert float(res["size_width_slope_lo"]) < -2 < float(res["size_width_slope_hi"])
    # depth error only, 0.5/L, with a little seed noise: ε reached ∝ 1/L
    by_depth = analysis.limit_probability(sweep_like(0.05 + 0.5 / L + 1e-4 * xi + 0 * M, depths, widths), eps, eta)
    assert float(by_depth["size_depth_slope"]) == pytest.approx(-1, abs=0.01)
    assert float(by_depth["size_depth_slope_lo"]) <= float(by_depth["size_depth_slope"]) <= float(
        by_depth["size_depth_slope_hi"])
    # ε reached with probability 1 − η: the ⌈(1 − η) n⌉-th smallest deviation
    k = int(np.ceil(0.8 * K))
    assert float(res["eps_reached"].sel(depth=32, width=16)) == pytest.approx(np.sort(dev[3, 0])[k - 1])


def test_median_time_over_all_seeds_with_never_as_inf(tmp_path: Path) -> None:
    """The issue's case: per-seed times [never, 25, 61, never, 25] have median 61, not 25."""
    s = np.arange(0, 101.0)
    times = [np.inf, 25, 61, np.inf, 25]
    loss = np.array([[[np.where(s >= t, 1e-4, 1.0) for t in times]]])  # (1, 1, 5, step)
    ds = sweep_like(loss, (2,), (2,), s=s)
    res = analysis.size_to_eps(ds, 2e-3, 0.2)
    assert res["s_eps_median"].item() == 61
    np.testing.assert_array_equal(res["s_eps"].values.ravel(), times)
    # --at-s: at s = 50 only two seeds got there: median +inf, success 2/5
    at50 = analysis.size_to_eps(ds, 2e-3, 0.2, s=50)
    assert np.isposinf(at50["s_eps_median"].item()) and at50["success"].item() == pytest.approx(0.4)
    assert analysis.time_to_eps(ds, 2e-3, s=50).values.ravel().tolist() == [np.inf, 25, np.inf, np.inf, 25]


def test_sweep_where_most_seeds_fail(tmp_path: Path) -> None:
    """7 of 8 seeds never reach ε (as in the issue's L = 16, M = 4): median +inf in the file, "> s_max" in text."""
    s = np.linspace(0, 10, 21)
    base = np.ones((2, 2, 8))
    base[1, 1, 0] = 1e-5  # one seed at (L = 16, M = 16) gets there
    base[0, :, :] = 1e-5  # at L = 8 every seed does
    loss = base[..., None] * np.ones(s.size)
    loss[..., 0] = 1.0
    ds = sweep_like(loss, (8, 16), (4, 16), s=s)
    res = analysis.analyze(ds, 1e-3, 0.1, n_boot=50)
    assert np.isposinf(res["s_eps_median"].sel(depth=16, width=16)) and np.isposinf(
        res["s_eps_median"].sel(depth=16, width=4))
    assert float(res["s_eps_median"].sel(depth=8, width=4)) == s[1]
    assert float(res["success"].sel(depth=16, width=16)) == pytest.approx(1 / 8)
    out = tmp_path / "a.nc"
    res.to_netcdf(out)
    with xr.open_dataset(out) as back:
        assert np.isposinf(back["s_eps_median"].sel(depth=16, width=16))
    text = analysis.report(ds, 1e-3, 0.1, n_boot=50)
    assert "> 10" in text
    # 8/8 at L = 8: Wilson lower bound 0.68 < 0.9, so no width qualifies; the raw fraction would say M = 4
    assert np.isnan(float(res["min_width"].sel(depth=8))) and float(res["min_width_raw"].sel(depth=8)) == 4


def test_wilson_is_scipys_and_judges_reaching() -> None:
    lo, hi = analysis.wilson(8, 10)
    ci = stats.binomtest(8, 10).proportion_ci(0.95, method="wilson")
    assert (lo, hi) == (pytest.approx(ci.low, rel=1e-12), pytest.approx(ci.high, rel=1e-12))
    assert analysis.wilson(5, 5)[0] == pytest.approx(0.5655, abs=1e-4)
    lo0, hi0 = analysis.wilson(0, 8)
    assert lo0 == pytest.approx(0, abs=1e-12) and 0.3 < hi0 < 0.4
    # 3/10 ≥ 1 − 0.7 in exact arithmetic (in floating point 0.3 < 0.30000000000000004)
    loss = np.ones((1, 1, 10))
    loss[..., :3] = 1e-6
    res = analysis.size_to_eps(sweep_like(loss, (4,), (8,)), 1e-3, 0.7)
    assert float(res["min_width_raw"].sel(depth=4)) == 8


def test_non_trials_are_left_out_and_health_is_counted() -> None:
    s = np.linspace(0, 1, 6)
    loss = np.ones((1, 2, 4, 6)) * np.linspace(1, 0.5, 6)
    loss[0, 0, 1, 3] = 2.0  # E rose
    loss[0, 1, 2, 4:] = np.nan  # diverged
    loss[0, 1, 3, 2] = 1e9  # runaway while finite
    status = np.full((1, 2, 4), "ok", dtype=object)
    status[0, 1, 2] = "diverged"
    status[0, 0, 3] = "failed"
    ds = sweep_like(loss, (4,), (8, 16), s=s, status=status)
    size = analysis.size_to_eps(ds, 0.6, 0.5)
    assert size["trials"].sel(width=8).item() == 3 and size["trials"].sel(width=16).item() == 4
    assert size["successes"].sel(width=16).item() == 3  # the diverged one has NaN at the end
    h = analysis.health(ds)
    assert h["rose"].sel(width=8).item() == 1 and h["failed"].sel(width=8).item() == 1
    assert h["diverged"].sel(width=16).item() == 1 and h["runaway"].sel(width=16).item() == 2


def test_extra_swept_dimension_is_kept() -> None:
    rng = np.random.default_rng(8)
    finals = np.stack([nested_final(1.0, rng), nested_final(1.0, rng)])
    ds = sweep_like(finals, DEPTHS, WIDTHS, extra={"init": np.array(["tied", "smooth"])})
    res = analysis.analyze(ds, 0.2, 0.2, n_boot=99)
    assert res["depth_order"].dims == ("init", "width")
    assert res["s_eps_median"].dims == ("init", "depth", "width")
    assert "init = tied" in analysis.report(ds, 0.2, 0.2, n_boot=99, result=res)


def test_bootstrap_is_reproducible() -> None:
    ds = sweep_like(nested_final(1.0, np.random.default_rng(9), seeds=12), DEPTHS, WIDTHS)
    a = analysis.convergence_rates(ds, n_boot=200)
    b = analysis.convergence_rates(ds, n_boot=200)
    xr.testing.assert_identical(a, b)


# -- particle measures and decay --------------------------------------------------------------------
def test_sliced_wasserstein_known_values() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 3))
    assert analysis.sliced_wasserstein(x, x) == 0
    assert analysis.sliced_wasserstein(x, x[::-1]) == pytest.approx(0, abs=1e-14)  # order does not matter
    mu = np.array([0.3, -0.4, 1.2])
    omega = np.random.default_rng(0).standard_normal((256, 3))
    omega /= np.linalg.norm(omega, axis=1, keepdims=True)
    exact = np.sqrt(np.mean((omega @ mu) ** 2))  # a shift moves every projected quantile by ω·μ
    assert analysis.sliced_wasserstein(x, x + mu) == pytest.approx(exact, rel=1e-12)
    assert exact == pytest.approx(np.linalg.norm(mu) / np.sqrt(3), rel=0.1)  # E(ω·μ)² = |μ|²/k
    # unequal sizes, 1-D: W2² between {0, 1} and {0, 1/2, 1} is 1/12
    assert analysis.sliced_wasserstein(np.array([[0.0], [1]]), np.array([[0.0], [0.5], [1]])) == pytest.approx(
        np.sqrt(1 / 12), rel=1e-12)


def test_sliced_wasserstein_decreases_with_sample_size() -> None:
    rng = np.random.default_rng(1)
    means = []
    for M in (32, 128, 512, 2048):
        means.append(np.mean([analysis.sliced_wasserstein(rng.standard_normal((M, 5)), rng.standard_normal((M, 5)),
                                                          projections=64) for _ in range(6)]))
    assert all(a > b for a, b in itertools.pairwise(means)), means
    assert means[0] / means[-1] > 4  # ~ M^−1/2: a factor 8 over 64×


def test_particle_distance_between_run_files(tmp_path: Path) -> None:
    common = {"depth": 4, "dim": 2, "samples": 8, "steps": 6, "ds": 0.1, "snapshot_every": 3, "init": "smooth"}
    a = mfres.simulate(width=40, seed=0, out=str(tmp_path / "a.nc"), **common)
    mfres.simulate(width=40, seed=0, out=str(tmp_path / "b.nc"), **common)
    mfres.simulate(width=400, seed=1, out=str(tmp_path / "c.nc"), **common)
    assert analysis.particle_distance(str(tmp_path / "a.nc"), str(tmp_path / "b.nc"), 0.3, layer=1) == 0
    d = analysis.particle_distance(str(tmp_path / "a.nc"), str(tmp_path / "c.nc"), 0.3, t=0.5)
    assert 0 < d < 1
    th = analysis.particles_at(a, 0.0, layer=2)
    assert th.shape == (40, 5)
    with pytest.raises(ValueError, match="no snapshot at s"):
        analysis.particles_at(a, 0.15, layer=0)


def test_decay_fit() -> None:
    s = np.linspace(0, 100, 201)
    with np.errstate(divide="ignore"):
        power = analysis.decay_fit(s, 2 * s**-1.5)
    assert power["alpha"] == pytest.approx(1.5) and power["alpha_resid"] < 1e-10 < power["rate_resid"]
    exp = analysis.decay_fit(s, 3 * np.exp(-0.3 * s))
    assert exp["rate"] == pytest.approx(0.3) and exp["rate_resid"] < 1e-10


# -- a real tiny sweep, end to end --------------------------------------------------------------------
def test_analyze_end_to_end_on_a_real_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.nc"
    res = CliRunner().invoke(main, ["sweep", "-L", "2,4,8", "-M", "4,16", "--seeds", "4", "-d", "2", "-N", "8",
                                    "--steps", "20", "--ds", "0.5", "--init", "smooth", "--workers", "1",
                                    "--quiet", "--out", str(sweep)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "a.nc"
    res = CliRunner().invoke(main, ["analyze", str(sweep), "--eps", "0.05", "--eta", "0.5", "--at-s", "8",
                                    "--boot", "200", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "depth order p" in res.output and "95%" in res.output and "theory -0.5" in res.output
    ds = xr.load_dataset(sweep)
    with xr.open_dataset(out) as a:
        for v in ("depth_order", "depth_order_lo", "depth_order_hi", "width_order", "width_order_lo",
                  "width_order_hi", "s_eps_median"):
            assert v in a, v
        assert a["depth_order"].dims == ("width",) and a["width_order"].dims == ()
        assert a["s_eps_median"].dims == ("depth", "width")
        assert a["depth_order_lo"].sel(width=16) <= a["depth_order"].sel(width=16) <= a["depth_order_hi"].sel(width=16)
        # the median is over all seeds, never = +inf, up to --at-s only
        s = ds["s"].values
        for L in (2, 4, 8):
            for M in (4, 16):
                loss = ds["loss"].sel(depth=L, width=M).values[:, s <= 8]
                first = [s[np.argmax(row < 0.05)] if (row < 0.05).any() else np.inf for row in loss]
                assert float(a["s_eps_median"].sel(depth=L, width=M)) == np.median(first)
    bad = CliRunner().invoke(main, ["analyze", str(sweep), "--at-s", "99"])
    assert bad.exit_code != 0 and "outside" in bad.output
