"""Sweeps on a real local Dask cluster, their resumption, statuses, analysis and plots."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import netCDF4
import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

import mfres
from mfres import analysis
from mfres import plot as figures
from mfres.cli import main
from mfres.sweep import SweepSpec, run_sweep

matplotlib.use("Agg")

ACCEPTANCE = ["--depth", "8", "--width", "8,32,128,512", "--seeds", "8", "--dim", "2", "--samples", "16",
              "--steps", "40", "--ds", "0.05", "--init", "iid", "--workers", "2", "--quiet"]


@pytest.fixture(scope="module")
def acceptance_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "sweep.nc"
    res = CliRunner().invoke(main, ["sweep", *ACCEPTANCE, "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_acceptance_sweep_width_slope(acceptance_sweep: Path) -> None:
    """The issue's command on 2 Dask workers: the seed spread falls with width at slope ≈ −1/2."""
    ds = xr.load_dataset(acceptance_sweep)
    assert ds["loss"].dims == ("depth", "width", "seed", "step")
    assert ds.sizes == {"depth": 1, "width": 4, "seed": 8, "step": 41}
    np.testing.assert_allclose(ds["s"].values, np.arange(41) * 0.05)
    assert set(ds["status"].values.ravel()) == {"ok"}
    assert np.all(ds["seconds"].values > 0)
    assert ds.attrs["steps"] == 40 and ds.attrs["init"] == "iid" and "sweep_spec" in ds.attrs
    rates = analysis.convergence_rates(ds)
    slope = float(rates["width_slope"].sel(depth=8))
    lo, hi = float(rates["width_slope_lo"].sel(depth=8)), float(rates["width_slope_hi"].sel(depth=8))
    print(f"width slope {slope:.3f} [{lo:.3f}, {hi:.3f}] (theory -0.5)")
    assert -0.75 <= slope <= -0.3
    assert lo < slope < hi


def test_sweep_runs_equal_single_runs(acceptance_sweep: Path) -> None:
    """Batched seeds in a Dask task follow the same trajectory as `mfres simulate` of that run."""
    ds = xr.load_dataset(acceptance_sweep)
    for M, seed in ((8, 0), (128, 5)):
        single = mfres.simulate(depth=8, width=M, dim=2, samples=16, steps=40, ds=0.05, init="iid", seed=seed,
                                backend="numpy")
        np.testing.assert_allclose(ds["loss"].sel(depth=8, width=M, seed=seed).values, single["loss"].values,
                                   rtol=1e-12)


def test_resume_redoes_only_missing_runs(tmp_path: Path, acceptance_sweep: Path) -> None:
    out = tmp_path / "resume.nc"
    out.write_bytes(acceptance_sweep.read_bytes())
    before = xr.load_dataset(out)
    with netCDF4.Dataset(out, "a") as nc:  # lose two grid points, as after a crash
        status = np.asarray(nc["status"][...], dtype=object)
        status[0, 1, :] = "missing"
        status[0, 3, :] = "missing"
        nc["status"][...] = status
        nc["loss"][0, 1] = np.nan
        nc["loss"][0, 3] = np.nan
    res = CliRunner().invoke(main, ["sweep", *ACCEPTANCE, "--out", str(out)])
    assert res.exit_code == 0, res.output
    after = xr.load_dataset(out)
    np.testing.assert_array_equal(after["loss"].values, before["loss"].values)
    assert set(after["status"].values.ravel()) == {"ok"}
    # the runs not lost kept their original timing: they were not redone
    np.testing.assert_array_equal(after["seconds"].values[0, [0, 2]], before["seconds"].values[0, [0, 2]])
    assert not np.array_equal(after["seconds"].values[0, 1], before["seconds"].values[0, 1])


def test_other_options_refuse_an_existing_sweep_file(acceptance_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "other.nc"
    out.write_bytes(acceptance_sweep.read_bytes())
    args = [a if a != "0.05" else "0.1" for a in ACCEPTANCE]
    res = CliRunner().invoke(main, ["sweep", *args, "--out", str(out)])
    assert res.exit_code == 2 and "different sweep" in res.output


def test_diverged_and_failed_runs_are_recorded(tmp_path: Path) -> None:
    # weight decay λ = 1: GD multiplies θ by about (1 − Δs) each step, which blows up for Δs = 20
    spec = SweepSpec((2,), (3, 4), 2, (), (), (0.5, 20.0),
                     {"dim": 2, "samples": 4, "steps": 300, "weight_decay": 1.0})
    counts = run_sweep(spec, str(tmp_path / "div.nc"), workers=1)
    ds = xr.load_dataset(tmp_path / "div.nc")
    assert counts["diverged"] == 4 and counts["ok"] == 4
    div = ds["loss"].sel(ds=20.0)
    assert np.all(ds["status"].sel(ds=20.0).values == "diverged")
    assert all("loss became" in m for m in ds["message"].sel(ds=20.0).values.ravel())
    assert np.isfinite(div.isel(step=0)).all()  # finite losses before the divergence are kept
    assert np.isnan(div.isel(step=-1)).all()
    assert np.all(ds["status"].sel(ds=0.5).values == "ok")
    # the Δs = 0.5 runs cover the same pseudo-time on the common grid s = k·20
    np.testing.assert_allclose(ds["s"].values, np.arange(301) * 20.0)
    assert np.isfinite(ds["loss"].sel(ds=0.5).values).all()
    # a run that fails inside its worker (its data file vanished) is recorded as failed
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((5, 2)), y=np.zeros(5))
    spec = SweepSpec((2,), (3,), 2, base={"data": str(data), "steps": 5})
    os.remove(data)
    counts = run_sweep(spec, str(tmp_path / "fail.nc"), workers=1)
    ds = xr.load_dataset(tmp_path / "fail.nc")
    assert counts["failed"] == 2
    assert "no such data file" in str(ds["message"].values.ravel()[0])
    assert np.isnan(ds["loss"].values).all()


def test_sweep_on_an_existing_scheduler(tmp_path: Path) -> None:
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        res = CliRunner().invoke(main, ["sweep", "--depth", "2,4", "--width", "3", "--seeds", "2", "--steps", "5",
                                        "--activation", "tanh,gelu", "--scheduler", cluster.scheduler_address,
                                        "--quiet", "--out", str(tmp_path / "s.nc")])
    assert res.exit_code == 0, res.output
    ds = xr.load_dataset(tmp_path / "s.nc")
    assert ds["loss"].dims == ("activation", "depth", "width", "seed", "step")
    assert list(ds["activation"].values) == ["tanh", "gelu"]
    assert not np.isnan(ds["loss"].values).any()


def test_keep_runs_writes_run_files(tmp_path: Path) -> None:
    spec = SweepSpec((2,), (3,), 2, base={"steps": 6, "snapshot_every": 3})
    run_sweep(spec, str(tmp_path / "k.nc"), workers=1, keep_runs=str(tmp_path / "runs"))
    files = sorted((tmp_path / "runs").glob("*.nc"))
    assert len(files) == 2
    sweep = xr.load_dataset(tmp_path / "k.nc")
    for f in files:
        run = xr.load_dataset(f)
        seed = run.attrs["seed"]
        np.testing.assert_allclose(sweep["loss"].sel(depth=2, width=3, seed=seed).values, run["loss"].values,
                                   rtol=1e-12)
        assert list(run["snapshot_step"].values) == [0, 3, 6]


# -- analysis on synthetic sweeps with known answers -------------------------------------------
def synthetic_sweep(rng: np.random.Generator, depths=(4, 8, 16, 32, 64), widths=(16, 64, 256, 1024, 4096),
                    seeds=64) -> xr.Dataset:
    """loss(L, M, seed) at the last step = 0.1 + 0.5/L + 0.3 ξ/√M, ξ ~ N(0, 1)."""
    L = np.array(depths, float)[:, None, None]
    M = np.array(widths, float)[None, :, None]
    final = 0.1 + 0.5 / L + 0.3 * rng.standard_normal((len(depths), len(widths), seeds)) / np.sqrt(M)
    s = np.linspace(0, 1, 5)
    loss = final[..., None] * (1 + 2 * (1 - s))  # decreasing in s, ends at `final`
    return xr.Dataset(
        {"loss": (("depth", "width", "seed", "step"), loss),
         "status": (("depth", "width", "seed"), np.full(final.shape, "ok", dtype=object))},
        coords={"depth": list(depths), "width": list(widths), "seed": np.arange(seeds), "s": ("step", s)})


def test_fit_loglog_exact_power_law() -> None:
    x = np.array([1, 2, 4, 8, 16.0])
    fit = analysis.fit_loglog(x, 3 * x**-0.7)
    assert fit.slope == pytest.approx(-0.7) and np.exp(fit.intercept) == pytest.approx(3)
    assert fit.stderr == pytest.approx(0, abs=1e-12)


def test_size_to_eps_and_time_to_eps() -> None:
    ds = synthetic_sweep(np.random.default_rng(1), seeds=40)
    eps = 0.1 + 0.5 / 16 + 0.01  # reached for L ≥ 16 at wide widths
    res = analysis.size_to_eps(ds, eps, eta=0.1)
    succ = res["success"]
    assert succ.sel(depth=64, width=4096) == 1 and succ.sel(depth=4, width=4096) == 0
    assert res["min_width"].sel(depth=64) <= 1024
    assert np.isnan(res["min_width"].sel(depth=4))
    assert res["min_depth"].sel(width=4096) == 16
    t = analysis.time_to_eps(ds, eps)
    assert np.all(np.isposinf(t.sel(depth=4, width=4096).values))  # never: bias 0.125 > ε − 0.1, noise 0.005
    assert t.sel(depth=64, width=4096).max() <= 1.0


def test_analyze_cli(acceptance_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "analysis.nc"
    res = CliRunner().invoke(main, ["analyze", str(acceptance_sweep), "--eps", "0.1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "seed spread vs M" in res.output and "theory -0.5" in res.output
    with xr.open_dataset(out) as a:
        assert "success" in a and "width_slope" in a


# -- plots -----------------------------------------------------------------------------------
def test_plots_render_with_expected_artists(acceptance_sweep: Path, tmp_path: Path) -> None:
    from matplotlib.collections import PathCollection, QuadMesh
    from matplotlib.image import AxesImage

    run = mfres.simulate(depth=6, width=20, steps=60, snapshot_every=10, out=str(tmp_path / "r.nc"))
    fig = figures.loss(run)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and "pseudo-time" in ax.get_xlabel() and ax.get_title()
    assert len(ax.get_lines()) == 1
    fig = figures.weights(run, layers=[0, 5])
    panels = [a for a in fig.axes if a.get_title()]  # colorbars have no title
    meshes = [c for a in panels for c in a.collections if isinstance(c, QuadMesh)]
    assert len(panels) == len(meshes) == 3 * 3  # 3 quantities × (2 layers + depth profile)
    assert all(a.get_xlabel() for a in panels)
    fig = figures.clouds(run, at_s=[0, 60])
    assert sum(isinstance(c, PathCollection) for a in fig.axes for c in a.collections) == 2
    sweep = xr.load_dataset(acceptance_sweep)
    fig = figures.loss(sweep)
    assert len(fig.axes[0].get_lines()) == 4 and fig.axes[0].get_legend() is not None
    fig = figures.success(sweep, 0.1, 0.1)
    assert sum(isinstance(i, AxesImage) for a in fig.axes for i in a.images) == 3
    assert len(fig.axes[0].texts) == 4
    fig = figures.rates(sweep)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]  # one depth: only the width panel
    assert any(lbl.startswith("fit slope") for lbl in labels) and "slope −1/2" in labels
    for kind, f in (("loss", tmp_path / "r.nc"), ("weights", tmp_path / "r.nc"), ("rates", acceptance_sweep)):
        png = tmp_path / f"{kind}.png"
        res = CliRunner().invoke(main, ["plot", str(f), "--kind", kind, "--out", str(png)])
        assert res.exit_code == 0, res.output
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = CliRunner().invoke(main, ["plot", str(acceptance_sweep), "--kind", "weights"])
    assert res.exit_code == 2 and "needs a run file" in res.output
