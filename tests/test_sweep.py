"""Sweeps on a real local Dask cluster, their resumption, statuses, analysis and plots."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
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
from mfres.errors import ConfigError, StorageError
from mfres.sweep import (
    STATUSES,
    SweepSpec,
    describe,
    is_sweep_file,
    open_sweep,
    placement,
    run_file_name,
    run_sweep,
)
from mfres.sweep_store import SweepStore

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
                     {"dim": 2, "samples": 4, "steps": 60, "weight_decay": 1.0})
    counts = run_sweep(spec, str(tmp_path / "div.nc"), scheduler="synchronous")
    ds = xr.load_dataset(tmp_path / "div.nc")
    assert counts["diverged"] == 4 and counts["ok"] == 4
    div = ds["loss"].sel(ds=20.0)
    assert np.all(ds["status"].sel(ds=20.0).values == "diverged")
    messages = ds["message"].sel(ds=20.0).values.ravel()
    assert all(" at step " in m and ("not finite" in m or "E(0)" in m) for m in messages)
    assert np.all(ds["rise_count"].sel(ds=20.0).values > 0) and np.all(ds["max_rise"].sel(ds=20.0).values > 0)
    assert np.all(ds["rise_count"].sel(ds=0.5).values >= 0)
    assert set(ds["backend"].values.ravel()) == {"numpy"} and ds.attrs["backend"] == "numpy"
    assert np.isfinite(div.isel(step=0)).all()  # finite losses before the divergence are kept
    assert np.isnan(div.isel(step=-1)).all()
    assert np.all(ds["status"].sel(ds=0.5).values == "ok")
    # the Δs = 0.5 runs cover the same pseudo-time on the common grid s = k·20
    np.testing.assert_allclose(ds["s"].values, np.arange(61) * 20.0)
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
                      dashboard_address=":0") as cluster:
        res = CliRunner().invoke(main, ["sweep", "--depth", "2,4", "--width", "3", "--seeds", "2", "--steps", "5",
                                        "--activation", "tanh,gelu", "--scheduler", cluster.scheduler_address,
                                        "--quiet", "--out", str(tmp_path / "s.nc")])
    assert res.exit_code == 0, res.output
    ds = xr.load_dataset(tmp_path / "s.nc")
    assert ds["loss"].dims == ("activation", "depth", "width", "seed", "step")
    assert list(ds["activation"].values) == ["tanh", "gelu"]
    assert not np.isnan(ds["loss"].values).any()


@pytest.mark.parametrize(("workers", "scheduler", "tasks", "cores", "expected"), [
    (None, None, 1, 2, ("here", 1, None)),  # one task: no cluster to start
    (None, None, 5, 1, ("here", 1, None)),  # one core
    (None, None, 5, 2, ("local", 2, 1)),
    (None, None, 3, 8, ("local", 3, 2)),  # one worker per task, the cores shared among them
    (1, None, 1, 2, ("local", 1, 2)),  # asked for: a cluster, whose worker has every core
    (4, None, 2, 2, ("local", 2, 1)),
    (3, None, 9, 2, ("local", 3, 1)),  # more workers than cores: one thread each
    (None, "synchronous", 5, 2, ("synchronous", 1, None)),
    (None, "tcp://127.0.0.1:8786", 5, 2, ("scheduler", 0, None)),
])
def test_placement(workers: int | None, scheduler: str | None, tasks: int, cores: int, expected: tuple) -> None:
    p = placement(workers, scheduler, tasks, cores)
    assert (p.where, p.workers, p.threads) == expected


def test_default_sweep_of_one_task_starts_no_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Left to choose, a sweep with one task runs it here (no cluster is started), bitwise as
    --scheduler synchronous does; with several tasks it starts one worker per task up to the cores."""
    sweep_mod = importlib.import_module("mfres.sweep")  # (the attribute mfres.sweep is the API function)
    started: list[int] = []

    def no_cluster(workers: int) -> None:
        started.append(workers)
        raise RuntimeError("no cluster in this test")

    monkeypatch.setattr(sweep_mod, "_local_cluster", no_cluster)
    task_mod = importlib.import_module("mfres.sweep_task")
    monkeypatch.setattr(task_mod, "_BACKENDS", {})  # (none kept by an earlier test in this process)
    spec = SweepSpec((2,), (5,), 3, base={"dim": 2, "samples": 8, "steps": 12, "ds": 0.5})
    infos: list[dict] = []
    counts = run_sweep(spec, str(tmp_path / "one.nc"), progress=lambda d, t, info: infos.append(info))
    assert counts["ok"] == 3 and started == []
    assert infos[-1]["threads"] == sweep_mod.default_threads()  # every core, as a run alone has
    assert not task_mod._BACKENDS  # closed with the sweep
    run_sweep(spec, str(tmp_path / "sync.nc"), scheduler="synchronous")
    assert_same_results(open_sweep(str(tmp_path / "one.nc")), open_sweep(str(tmp_path / "sync.nc")))
    monkeypatch.setattr(sweep_mod, "default_threads", lambda: 4)
    wide = SweepSpec((2,), (3, 4, 5), 2, base={"dim": 2, "samples": 8, "steps": 4})
    with pytest.raises(RuntimeError, match="no cluster in this test"):
        run_sweep(wide, str(tmp_path / "wide.nc"))
    assert started == [3]


def test_local_workers_share_the_cores(tmp_path: Path) -> None:
    """Each of a local cluster's W workers gives its backend cores // W threads (at least 1), with
    bitwise the numbers of the same sweep run here on every core."""
    spec = SweepSpec((2,), (3, 40), 2, base={"dim": 2, "samples": 64, "steps": 30, "ds": 0.5})
    infos: list[dict] = []
    counts = run_sweep(spec, str(tmp_path / "s.nc"), workers=2, progress=lambda d, t, info: infos.append(info))
    assert counts["ok"] == 4
    cores = mfres.model.default_threads()
    assert [i["threads"] for i in infos if i] == [max(1, cores // 2)] * 2
    run_sweep(spec, str(tmp_path / "here.nc"), scheduler="synchronous")
    assert_same_results(open_sweep(str(tmp_path / "s.nc")), open_sweep(str(tmp_path / "here.nc")))


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


# -- durability: real kills of the driver and of the workers ------------------------------------
CLI = [sys.executable, "-m", "mfres.cli"]
SMALL = {"depths": [2, 3], "widths": [3, 4], "seeds": 2, "dss": [0.5, 0.25],
         "base": {"dim": 2, "samples": 8, "steps": 30}}
DRIVER = textwrap.dedent("""
    import json, sys
    from mfres.sweep import SweepSpec, run_sweep
    a = json.loads(sys.argv[1])
    print(json.dumps(run_sweep(SweepSpec(**a["spec"]), a["out"], scheduler=a.get("scheduler"),
                               workers=a.get("workers"), publish_seconds=0)))
""")


def drive(out: Path, spec: dict = SMALL, prefix: tuple[str, ...] = (), timeout: float = 120,
          scheduler: str | None = "synchronous") -> subprocess.CompletedProcess:
    """The sweep ``spec`` on ``out`` by a driver process (publishing after every task)."""
    arg = json.dumps({"spec": spec, "out": str(out), "scheduler": scheduler})
    return subprocess.run([*prefix, sys.executable, "-c", DRIVER, arg], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> xr.Dataset:
    out = tmp_path_factory.mktemp("ref") / "ref.nc"
    res = drive(out)
    assert res.returncode == 0, res.stderr
    return open_sweep(str(out))


def assert_same_results(ds: xr.Dataset, ref: xr.Dataset) -> None:
    """Bitwise the same losses, statuses and health figures as an unbroken sweep."""
    for name in ("loss", "rise_count", "max_rise"):
        np.testing.assert_array_equal(ds[name].values, ref[name].values, err_msg=name)
    np.testing.assert_array_equal(ds["status"].values.astype(str), ref["status"].values.astype(str))


def assert_consistent(out: Path) -> None:
    """What a killed driver leaves opens, loads every variable, and never calls a run ok without its losses."""
    if not out.exists():
        return
    ds = open_sweep(str(out))
    for v in ds.data_vars.values():
        v.values  # noqa: B018  (every variable loads)
    status = ds["status"].values.astype(str)
    assert set(status.ravel()) <= set(STATUSES)
    ok = status == "ok"
    assert np.isfinite(ds["loss"].values[ok]).all()
    with xr.open_dataset(out) as plain:  # the published file alone is a sweep file too
        assert plain["loss"].shape == ds["loss"].shape


def syscall_count(tmp_path: Path, syscall: str) -> int:
    log = tmp_path / f"{syscall}.log"
    res = drive(tmp_path / f"count-{syscall}.nc", prefix=("strace", "-f", "-qq", "-e", f"trace={syscall}",
                                                         "-o", str(log)))
    assert res.returncode == 0, res.stderr
    return sum(1 for line in log.read_text().splitlines() if f"{syscall}(" in line)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed: kill-point scan not run")
@pytest.mark.parametrize("syscall", ["pwrite64", "rename", "fsync", "write", "unlink"])
def test_driver_killed_at_write_syscalls(tmp_path: Path, reference: xr.Dataset, syscall: str) -> None:
    """SIGKILL injected at the k-th write-type syscall: the file opens, a re-run completes it bitwise."""
    total = syscall_count(tmp_path, syscall)
    assert total >= 8, total
    points = sorted({1, 2, total // 2, (3 * total) // 4, total})
    for k in points:
        out = tmp_path / f"kill-{syscall}-{k}.nc"
        res = drive(out, prefix=("strace", "-f", "-qq", "-o", "/dev/null", "-e",
                                 f"inject={syscall}:signal=KILL:when={k}"))
        assert res.returncode != 0, f"{syscall} #{k} of {total} was not reached"
        assert_consistent(out)
        again = drive(out)
        assert again.returncode == 0, again.stderr
        assert_same_results(open_sweep(str(out)), reference)


def test_driver_killed_between_tasks_loses_no_finished_run(tmp_path: Path, reference: xr.Dataset) -> None:
    """SIGKILL of the driver after its k-th segment: those runs are kept, not redone."""
    for k in (1, 4):
        out = tmp_path / f"k{k}.nc"
        arg = json.dumps({"spec": SMALL, "out": str(out), "scheduler": "synchronous"})
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, arg], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        parts = Path(str(out) + ".parts")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(parts.glob("seg-*.npz"))) >= k or _merged(out) >= k:
                break
            time.sleep(0.005)
        proc.kill()
        proc.wait()
        assert_consistent(out)
        kept = open_sweep(str(out))
        done = kept["status"].values.astype(str) != "missing"
        assert done.sum() >= 2 * k if proc.returncode == -9 else True
        again = drive(out)
        assert again.returncode == 0, again.stderr
        after = open_sweep(str(out))
        assert_same_results(after, reference)
        # runs finished before the kill were not redone (their timing is the one from before)
        np.testing.assert_array_equal(after["seconds"].values[done], kept["seconds"].values[done])


def _merged(out: Path) -> int:
    try:
        with netCDF4.Dataset(out) as nc:
            return int(nc.getncattr("segments_merged"))
    except (OSError, AttributeError):
        return 0


DASK_SWEEP = ["--depth", "3", "--width", "48,64,80,96", "--seeds", "3", "--dim", "2", "--samples", "32",
              "--steps", "2000", "--ds", "0.2", "--workers", "1", "--quiet"]


@pytest.fixture(scope="module")
def dask_reference(tmp_path_factory: pytest.TempPathFactory) -> xr.Dataset:
    """An unbroken CLI sweep on a local Dask cluster, run while port 8787 is taken (no log noise allowed)."""
    out = tmp_path_factory.mktemp("dask") / "ref.nc"
    with socket.socket() as taken:
        with contextlib.suppress(OSError):
            taken.bind(("127.0.0.1", 8787))
            taken.listen(1)
        res = subprocess.run([*CLI, "sweep", *DASK_SWEEP, "--out", str(out)], capture_output=True, text=True,
                             timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip().splitlines() == [f"12 ok; wrote {out}"], res.stderr  # nothing from Dask
    return open_sweep(str(out))


def _workers_of(pid: int) -> list[int]:
    """The Dask worker processes spawned by the driver ``pid``."""
    out = []
    children = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):  # (a child is listed under the thread that forked it)
        with contextlib.suppress(OSError):
            children.update((task / "children").read_text().split())
    for child in children:
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.append(int(child))
    return out


def _wait_for_finished_runs(out: Path, proc: subprocess.Popen, at_least: int = 1, timeout: float = 120) -> None:
    """Until the sweep ``proc`` writing ``out`` has finished ``at_least`` runs (in a segment, or
    already merged into the file: a segment may live only for milliseconds)."""
    parts = Path(str(out) + ".parts")
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if at_least == 1 and list(parts.glob("seg-*.npz")):
            return
        with contextlib.suppress(StorageError, ConfigError, OSError):  # not there yet, or being replaced
            if (open_sweep(str(out))["status"].values.astype(str) == "ok").sum() >= at_least:
                return
        time.sleep(0.02)
    assert proc.poll() is None, "the sweep ended before the test could interrupt it"


@pytest.mark.slow
def test_dask_workers_killed_repeatedly(tmp_path: Path, dask_reference: xr.Dataset) -> None:
    """SIGKILL each worker the nanny starts, 3 times, with no retries allowed: the lost tasks are recorded
    failed, the finished ones kept; a re-run redoes the failed ones and equals an unbroken sweep bitwise."""
    out = tmp_path / "s.nc"
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
    proc = subprocess.Popen([*CLI, "sweep", *DASK_SWEEP, "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    _wait_for_finished_runs(out, proc)
    killed, seen = 0, set()
    deadline = time.monotonic() + 120
    while killed < 3 and proc.poll() is None and time.monotonic() < deadline:
        for w in set(_workers_of(proc.pid)) - seen:  # each new worker the nanny starts
            seen.add(w)
            time.sleep(0.5)  # let it take a task
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)
                killed += 1
        time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    assert killed >= 1
    assert_consistent(out)
    status = open_sweep(str(out))["status"].values.astype(str)
    print(f"{killed} worker kills; then {dict(zip(*np.unique(status, return_counts=True), strict=True))}")
    assert (status == "ok").any() and (status == "failed").any(), (status, err)
    assert proc.returncode == 1 and "run the same command again" in err and "Traceback" not in err, err
    res = subprocess.run([*CLI, "sweep", *DASK_SWEEP, "--out", str(out)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert_same_results(open_sweep(str(out)), dask_reference)


@pytest.mark.slow
def test_dask_driver_killed(tmp_path: Path, dask_reference: xr.Dataset) -> None:
    """SIGKILL of the driver mid-sweep: no worker outlives it, no finished run is lost, a re-run completes it."""
    out = tmp_path / "s.nc"
    proc = subprocess.Popen([*CLI, "sweep", *DASK_SWEEP, "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for_finished_runs(out, proc)
    workers = _workers_of(proc.pid)
    proc.kill()
    proc.wait()
    assert workers and proc.returncode == -signal.SIGKILL
    time.sleep(3)
    assert not [w for w in workers if Path(f"/proc/{w}").exists() and
                b"spawn_main" in Path(f"/proc/{w}/cmdline").read_bytes()], "a worker outlived its driver"
    assert_consistent(out)
    kept = open_sweep(str(out))
    done = kept["status"].values.astype(str) == "ok"
    assert done.any() and not done.all()
    res = subprocess.run([*CLI, "sweep", *DASK_SWEEP, "--out", str(out)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    after = open_sweep(str(out))
    assert_same_results(after, dask_reference)
    np.testing.assert_array_equal(after["seconds"].values[done], kept["seconds"].values[done])  # not redone


def test_second_writer_refused(tmp_path: Path) -> None:
    out = tmp_path / "s.nc"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from mfres.sweep import SweepSpec, run_sweep
        from mfres.sweep_store import SweepStore
        spec = SweepSpec((2,), (3,), 1, base={{"steps": 3}})
        s = SweepStore({str(out)!r}, spec.dims, spec.grid_s, spec.identity(), {{}}, "holder")
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--overwrite"]):
            res = subprocess.run([*CLI, "sweep", "-L", "2", "-M", "3", "--seeds", "1", "--steps", "3", "--quiet",
                                  "--scheduler", "synchronous", "--out", str(out), *extra],
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 4, res.stderr
            assert "being written by another sweep" in res.stderr and "Traceback" not in res.stderr
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the lock with the holder's death (its sweep is another: --overwrite replaces it)
    res = subprocess.run([*CLI, "sweep", "-L", "2", "-M", "3", "--seeds", "1", "--steps", "3", "--quiet",
                          "--scheduler", "synchronous", "--out", str(out), "--overwrite"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def _failed_result(n: int) -> dict:
    """One run's task result, failed, on a grid of n losses (as ``SweepStore.record`` takes it)."""
    return {"loss": np.full((1, n), np.nan), "status": ["failed"], "message": ["x"], "seconds": [-1.0],
            "rise_count": [-1], "max_rise": [np.nan], "backend": ""}


def test_a_reader_racing_a_publication_reads_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``open_sweep`` between a publication's rename and its removal of the segments it absorbed:
    the reader sees the file replaced and reads again, never showing fewer results than are durable."""
    from mfres import sweep_store

    out = tmp_path / "s.nc"
    assert drive(out).returncode == 0
    spec = SweepSpec(**SMALL)
    store = SweepStore(str(out), spec.dims, spec.grid_s, spec.identity(), {}, "test")
    n = len(spec.grid_s)
    store.record((0, 0, 0), [1], _failed_result(n))
    store.close()  # a segment beyond the published file
    assert open_sweep(str(out))["status"].values[0, 0, 0, 1] == "failed"
    real, calls = sweep_store.list_segments, []

    def racing(parts: str) -> list:
        calls.append(parts)
        if len(calls) == 1:  # as a publication would: a new file renamed over it, the segment gone
            shutil.copy2(out, str(out) + ".new")
            os.replace(str(out) + ".new", out)
            return []
        return real(parts)

    monkeypatch.setattr(sweep_store, "list_segments", racing)
    assert open_sweep(str(out))["status"].values[0, 0, 0, 1] == "failed" and len(calls) >= 2


def test_redo_exactly_missing_failed_and_incomplete(tmp_path: Path, reference: xr.Dataset) -> None:
    out = tmp_path / "s.nc"
    assert drive(out).returncode == 0
    spec = SweepSpec(**SMALL)
    store = SweepStore(str(out), spec.dims, spec.grid_s, spec.identity(), {}, "test")
    n = len(spec.grid_s)
    bad = _failed_result(n)
    store.record((0, 0, 0), [1], bad)
    incomplete = {**bad, "loss": np.r_[np.ones(n - 1), np.nan][None], "status": ["ok"]}  # never trusted
    store.record((1, 1, 0), [0], incomplete)
    store.close()  # killed before publishing: the segments hold these
    before = open_sweep(str(out))
    assert before["status"].values[0, 0, 0, 1] == "failed" and before.attrs["segments_pending"] == 2
    assert drive(out).returncode == 0
    after = open_sweep(str(out))
    assert_same_results(after, reference)
    redone = np.zeros(after["status"].shape, bool)
    redone[0, 0, 0, 1] = redone[1, 1, 0, 0] = True
    secs_before, secs_after = before["seconds"].values, after["seconds"].values
    np.testing.assert_array_equal(secs_after[~redone], secs_before[~redone])
    assert np.all(secs_after[redone] != secs_before[redone])
    assert not list(Path(str(out) + ".parts").glob("seg-*"))  # all merged into the published file


# -- refused up front: bad grids, options, addresses, outputs --------------------------------------
def sweep_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "sweep", "-L", "2", "-M", "3", "--seeds", "1", "--steps", "3", "--quiet", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(("args", "needle"), [
    (["--ds", "0.3,0.7"], "does not divide the largest ds 0.7"),
    (["--ds", "0.1,0.1"], "ds lists 0.1 more than once"),
    (["--ds", "0.1,0.10"], "ds lists 0.1 more than once"),
    (["--activation", "tanh,tanh"], "activation lists tanh more than once"),
    (["--activation", "tanh,TANH"], "activation lists tanh more than once"),
    (["--init", "iid,iid"], "init lists iid more than once"),
    (["-M", "3,3"], "width lists 3 more than once"),
    (["--workers", "-1"], "workers must be at least 1"),
    (["--workers", "0"], "workers must be at least 1"),
    (["--scheduler", "not an address"], "is not a scheduler address"),
])
def test_bad_sweep_options_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "s.nc"
    res = sweep_cli(*args, "--out", str(out))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], res.stderr
    assert not out.exists()


def test_scheduler_that_never_answers_or_is_closed(tmp_path: Path) -> None:
    spec = SweepSpec((2,), (3,), 1, base={"steps": 3})
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts (the kernel's backlog) and never answers
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match="did not answer within 2 s"):
            run_sweep(spec, str(tmp_path / "a.nc"), scheduler=f"tcp://127.0.0.1:{port}", connect_timeout=2)
        assert time.monotonic() - t0 < 30
        res = sweep_cli("--scheduler", f"tcp://127.0.0.1:{port}", "--out", str(tmp_path / "a.nc"), timeout=60)
    assert res.returncode == 2 and "did not answer" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match=r"cannot use the Dask scheduler at .*(Timed out|refused)"):
        run_sweep(spec, str(tmp_path / "b.nc"), scheduler=f"tcp://127.0.0.1:{port}", connect_timeout=2)
    assert not (tmp_path / "a.nc").exists() and not (tmp_path / "b.nc").exists()


def test_out_fifo_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.nc"
    os.mkfifo(fifo)
    res = sweep_cli("--scheduler", "synchronous", "--out", str(fifo), timeout=60)
    assert res.returncode == 4 and "is a FIFO" in res.stderr, res.stderr
    with pytest.raises(StorageError, match="FIFO"):
        open_sweep(str(fifo))


def test_memory_check_covers_the_whole_batch(tmp_path: Path) -> None:
    from mfres import model
    from mfres.sweep import _check_memory
    from mfres.train import available_memory

    avail = available_memory()
    if avail is None:
        pytest.skip("no MemAvailable on this system")
    L, N, d, B = 4, 64, 2, 64
    per_m = model.workspace_bytes(L, 2, d, N, np.dtype("float64"), recompute=True) - \
        model.workspace_bytes(L, 1, d, N, np.dtype("float64"), recompute=True)
    M = int(avail * 0.03 / per_m)  # one net: 3 % of the memory; the batch of 64: about twice all of it
    spec = SweepSpec((L,), (M,), B, base={"dim": d, "samples": N, "steps": 1, "memory": "recompute"})
    with pytest.raises(ConfigError, match=f"trains {B} nets at once.*GiB is available"):
        run_sweep(spec, str(tmp_path / "m.nc"), workers=1)
    assert not (tmp_path / "m.nc").exists()
    _check_memory(SweepSpec((L,), (M,), 1, base=spec.base), 1, False)  # one seed alone would fit


def test_smaller_ds_reaches_the_common_final_time(tmp_path: Path) -> None:
    spec = SweepSpec((2,), (3,), 2, dss=(0.5, 0.125), base={"dim": 2, "samples": 8, "steps": 12})
    run_sweep(spec, str(tmp_path / "s.nc"), scheduler="synchronous", keep_runs=str(tmp_path / "runs"))
    ds = open_sweep(str(tmp_path / "s.nc"))
    assert set(ds["status"].values.ravel()) == {"ok"}
    np.testing.assert_allclose(ds["s"].values[-1], 6.0)
    files = sorted(p.name for p in (tmp_path / "runs").glob("*.nc"))
    assert len(files) == 4 and len(set(files)) == 4
    for seed in (0, 1):
        run = mfres.open_run(str(tmp_path / "runs" / run_file_name(spec, {"depth": 2, "width": 3, "ds": 0.125},
                                                                    seed)), load=True)
        assert len(run["loss"]) == 4 * 12 + 1  # r = 4 steps per grid step, to s = 6 exactly
        np.testing.assert_array_equal(ds["loss"].sel(ds=0.125, seed=seed).values.ravel(), run["loss"].values[::4])
    # kept-run names write Δs exactly: 0.1 and 0.10000001 never share a file
    a = run_file_name(spec, {"depth": 2, "width": 3, "ds": 0.1}, 0)
    b = run_file_name(spec, {"depth": 2, "width": 3, "ds": 0.10000001}, 0)
    assert a != b


def test_judge_marks_runaway_and_incomplete_runs() -> None:
    from mfres.sweep_task import _judge

    out = {"loss": np.zeros((3, 4)), "status": [""] * 3, "message": [""] * 3, "rise_count": np.zeros(3, int),
           "max_rise": np.zeros(3)}
    _judge(out, 0, np.array([1.0, 0.5, 2e6, 1e7, 3e9, 1e10, 1e12]), 2, "ok", "", 0.1)  # finite, runaway at step 2
    assert out["status"][0] == "diverged" and "E(0) at step 2" in out["message"][0]
    np.testing.assert_array_equal(out["loss"][0], [1.0, np.nan, np.nan, np.nan])
    assert out["rise_count"][0] == 1 and out["max_rise"][0] == 2e6 - 0.5
    _judge(out, 1, np.array([1.0, 0.9, 0.8, 0.7, 0.6]), 2, "ok", "", 0.1)  # ends short of step 6
    assert out["status"][1] == "failed" and "incomplete" in out["message"][1]
    _judge(out, 2, np.linspace(1, 0.5, 7), 2, "ok", "", 0.1)
    assert out["status"][2] == "ok" and out["rise_count"][2] == 0
    np.testing.assert_array_equal(out["loss"][2], np.linspace(1, 0.5, 7)[::2])


def test_one_backend_per_worker_reused_across_tasks() -> None:
    from mfres import sweep_task

    sweep_task._BACKENDS.clear()
    opts = {"depth": 2, "width": 3, "dim": 2, "samples": 4, "steps": 3}
    a = sweep_task.run_task(opts, [0, 1], 1, "numpy")
    first = dict(sweep_task._BACKENDS)
    b = sweep_task.run_task({**opts, "width": 5}, [0], 1, "numpy")
    assert len(sweep_task._BACKENDS) == 1 and next(iter(sweep_task._BACKENDS.values())) is next(iter(first.values()))
    assert a["backend"] == b["backend"] == "numpy" and a["status"] == ["ok", "ok"]
    assert a["loss"].shape == (2, 4)


def test_describe_and_is_sweep_file(tmp_path: Path, reference: xr.Dataset) -> None:
    out = tmp_path / "s.nc"
    assert drive(out).returncode == 0
    assert is_sweep_file(str(out))
    text = describe(str(out))
    assert "16 ok" in text and "ds ∈ {0.5, 0.25}" in text and "backend: numpy" in text
    run = tmp_path / "r.nc"
    mfres.simulate(out=str(run), depth=2, width=3, steps=2, backend="numpy")
    assert not is_sweep_file(str(run))
    with pytest.raises(ConfigError, match="not a sweep file"):
        open_sweep(str(run))


def test_ctrl_c_stops_a_sweep_of_kept_runs_in_this_process(tmp_path: Path) -> None:
    """SIGINT of a one-task `--keep-runs` sweep (placed in the mfres process): the sweep stops (it
    does not go on to the next seed), the interrupted run's file says so, a re-run completes it."""
    out, runs = tmp_path / "s.nc", tmp_path / "runs"
    args = [*CLI, "sweep", "-L", "3", "-M", "96", "--seeds", "4", "-d", "2", "-N", "32", "--steps", "3000",
            "--ds", "0.2", "--quiet", "--keep-runs", str(runs), "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and len(list(runs.glob("*.nc"))) < 2:
        time.sleep(0.02)  # the second run has started: the first is finished
    assert proc.poll() is None, "the sweep ended before the test could interrupt it"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err.strip().startswith("Error: interrupted") and "Traceback" not in err, err
    files = sorted(runs.glob("*.nc"), key=lambda f: f.stat().st_mtime)
    assert len(files) == 2, files  # no run after the interrupted one
    assert [mfres.open_run(str(f)).attrs["status"] for f in files] == ["finished", "interrupted"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    assert set(open_sweep(str(out))["status"].values.ravel().astype(str)) == {"ok"}


def test_ctrl_c_keeps_finished_runs(tmp_path: Path) -> None:
    """SIGINT of `mfres sweep`: one line, exit 1, the finished runs kept and published, the lock released."""
    out = tmp_path / "s.nc"
    # six tasks, the first the smallest: the signal comes once the first has finished
    args = [*CLI, "sweep", "-L", "3", "-M", "48,64,80,96,112,128", "--seeds", "3", "-d", "2", "-N", "32",
            "--steps", "1500",
            "--ds", "0.2", "--scheduler", "synchronous", "--quiet", "--out", str(out)]
    # as a terminal's foreground job: a background job of a non-interactive shell (a CI
    # script's `&`) inherits SIGINT ignored, and Python, like other programs, keeps it so
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_finished_runs(out, proc, at_least=3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err.strip().startswith("Error: interrupted") and "Traceback" not in err, err
    with xr.open_dataset(out) as plain:  # the segments were merged into the published file on the way out
        assert (plain["status"].values.astype(str) == "ok").sum() >= 3
    res = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
