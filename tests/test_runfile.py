"""The run file for xarray users, training health, resume for real users, and the run/data defects of issue 9."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

import mfres
from mfres import health
from mfres.cli import main

CLI = [sys.executable, "-m", "mfres.cli"]
SMALL = ["-L", "4", "-M", "8", "-d", "3", "-N", "12", "--ds", "0.5", "--quiet", "--backend", "numpy"]
TINY = ["-L", "2", "-M", "4", "-d", "2", "-N", "8", "--quiet", "--backend", "numpy"]
RUNAWAY = [*TINY, "--ds", "5", "--steps", "300", "--snapshot-every", "3"]
NAMES = ("loss", "s", "grad_norm", "U", "W", "b", "prediction", "U_mean", "W_mean", "U_sq", "W_sq", "b_mean",
         "b_sq", "x", "y", "readout", "t", "particle_index", "state_U", "state_W", "state_b", "snapshot_step",
         "snapshot_s")


def cli(*args: str, cwd: Path | None = None, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=dict(os.environ, **env))


def simulate_ok(out: Path, *args: str) -> xr.Dataset:
    res = cli("simulate", *args, "--out", str(out))
    assert res.returncode == 0, res.stderr
    return xr.load_dataset(out)


# -- schema ---------------------------------------------------------------------------------------------
def test_snapshot_moments_are_over_all_particles_of_the_state(tmp_path: Path) -> None:
    """With a subset of particles stored, the per-layer moments still cover all M; at the last
    snapshot they equal those of the stored final state, computed here in plain NumPy."""
    out = tmp_path / "m.nc"
    ds = simulate_ok(out, *SMALL, "--steps", "20", "--snapshot-every", "10", "--snapshot-particles", "3")
    assert ds.sizes["particle"] == 3 and ds.sizes["state_particle"] == 8
    U, W, b = (ds[f"state_{v}"].values for v in "UWb")
    last = ds.isel(snapshot=-1)
    assert int(last.snapshot_step) == 20
    np.testing.assert_allclose(last.U_mean.values, U.mean(axis=1), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(last.W_mean.values, W.mean(axis=1), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(last.U_sq.values, [np.sum(U[l] ** 2) / 8 for l in range(4)], rtol=1e-13)
    np.testing.assert_allclose(last.W_sq.values, [np.sum(W[l] ** 2) / 8 for l in range(4)], rtol=1e-13)
    np.testing.assert_allclose(last.b_mean.values, b.mean(axis=1), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(last.b_sq.values, (b**2).mean(axis=1), rtol=1e-13)
    np.testing.assert_array_equal(last.U.values, U[:, ds.particle_index.values])


def test_schema_made_for_xarray(tmp_path: Path) -> None:
    out = tmp_path / "r.nc"
    simulate_ok(out, *SMALL, "--steps", "30", "--snapshot-every", "10")
    with netCDF4.Dataset(out) as nc:
        for name in ("step", "snapshot_step", "snapshot", "layer", "particle_index"):
            assert nc[name].dtype == np.int64 and "_FillValue" not in nc[name].ncattrs(), name
    ds = xr.open_dataset(out)
    for name in NAMES:
        assert name in ds.variables, name
    assert ds["snapshot_step"].dtype == np.int64 and list(ds["snapshot_step"].values) == [0, 10, 20, 30]
    # layer and snapshot are coordinates, with t and s beside them
    for c in ("step", "s", "snapshot", "snapshot_step", "snapshot_s", "layer", "t", "particle_index"):
        assert c in ds.coords, c
    np.testing.assert_array_equal(ds.U.sel(layer=0).values, ds.U.values[:, 0])
    assert ds.U.sel(layer=0).coords["t"].item() == 0.0
    np.testing.assert_allclose(ds["t"].values, np.arange(4) / 4)
    by_s = ds.swap_dims(snapshot="snapshot_s")
    np.testing.assert_array_equal(by_s.U.sel(snapshot_s=5.0).values, ds.U.values[1])
    assert ds.loss.coords["s"].dims == ("step",)
    # short labels, formulas in description, units everywhere
    for name in ds.variables:
        a = ds[name].attrs
        assert "units" in a and "long_name" in a and len(a["long_name"]) <= 20, (name, a.get("long_name"))
    assert ds.loss.attrs["long_name"] == "loss E" and "a.z_L(x_i)" in ds.loss.attrs["description"]
    assert ds.s.attrs["long_name"] == "pseudo-time s"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds.loss.plot()
    ax = plt.gca()
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("GD step [1]", "loss E [1]")
    plt.close("all")
    ds.loss.plot(x="s", yscale="log")
    assert plt.gca().get_xlabel() == "pseudo-time s [1]"
    plt.close("all")


# -- health ---------------------------------------------------------------------------------------------
def test_health_figures_recorded_shown_and_warned(tmp_path: Path) -> None:
    out = tmp_path / "h.nc"
    res = cli("simulate", *TINY, "--ds", "3", "--steps", "100", "--out", str(out))
    assert res.returncode == 0, res.stderr
    ds = mfres.open_run(str(out), load=True)
    figures = health.summary(ds.loss.values, ds.grad_norm.values, 3.0)
    assert ds.attrs["rise_count"] == figures["rise_count"] > 0
    assert ds.attrs["max_rise"] == pytest.approx(float(figures["max_rise"]), rel=1e-15)
    assert ds.attrs["energy_residual"] == pytest.approx(float(figures["energy_residual"]), rel=1e-15)
    for w in health.warnings_for(figures, 100):
        assert f"Warning: {w}" in res.stderr
    info = cli("info", str(out)).stdout
    assert f"E rose in {int(figures['rise_count'])} steps" in info and "energy identity residual" in info
    with pytest.warns(RuntimeWarning, match="E rose in"):
        mfres.simulate(depth=2, width=4, dim=2, samples=8, ds=3.0, steps=100, backend="numpy")


def _first_bad_by_loop(loss: np.ndarray, start: float) -> int:
    for k, e in enumerate(loss):
        if not np.isfinite(e) or e > health.RUNAWAY_FACTOR * abs(start):
            return k
    return -1


def test_first_bad_step_against_a_loop() -> None:
    """The divergence check (with its quick answer for clean series) against a plain loop, one net and a batch."""
    rng = np.random.default_rng(3)
    odd = [np.nan, np.inf, -np.inf, 2e6, 1e6, np.nextafter(1e6, 2e6), -5.0]  # 1e6 = RUNAWAY_FACTOR·1: not bad
    cases = 0
    for _ in range(400):
        loss = rng.uniform(0.0, 2.0, size=int(rng.integers(1, 40)))
        start = float(rng.choice([1.0, 1e-7, 0.0, float("nan")]))
        for _ in range(int(rng.integers(0, 3))):
            loss[rng.integers(loss.size)] = rng.choice(odd)
        want = _first_bad_by_loop(loss, start)
        assert int(health.first_bad_step(loss, start=start)) == want, (loss, start)
        cases += want >= 0
    assert cases > 100  # the slow path ran too
    batch = rng.uniform(0.0, 1.0, size=(30, 5))
    batch[7, 1], batch[3, 1], batch[12, 3], batch[0, 4] = np.nan, 3e6, -np.inf, np.inf
    got = health.first_bad_step(batch)
    assert got.tolist() == [_first_bad_by_loop(batch[:, j], batch[0, j]) for j in range(5)] == [-1, 3, -1, 12, 0]


def test_runaway_is_stopped_as_diverged_across_chunks_and_on_resume(tmp_path: Path) -> None:
    out = tmp_path / "away.nc"
    res = cli("simulate", *RUNAWAY, "--out", str(out))
    assert res.returncode == 1, res.stderr
    assert "diverged: E = " in res.stderr and "exceeds 1e+06·E(0)" in res.stderr, res.stderr
    ds = mfres.open_run(str(out), load=True)
    loss = ds.loss.values
    n = int(ds.attrs["steps_done"])
    assert ds.attrs["status"] == "diverged" and n > 3  # past the first chunk boundaries (every 3 steps)
    assert np.all(np.isfinite(loss)) and loss.size == n + 1
    assert loss[-1] > health.RUNAWAY_FACTOR * loss[0] and np.all(loss[:-1] <= health.RUNAWAY_FACTOR * loss[0])
    assert int(ds.snapshot_step[-1]) == n
    # the same run resumed from an early finished part stops at the same step with the same numbers
    part = tmp_path / "part.nc"
    args = [a if a != "300" else "4" for a in RUNAWAY]
    assert cli("simulate", *args, "--out", str(part)).returncode == 0
    again = cli("simulate", *RUNAWAY, "--out", str(part), "--resume")
    assert again.returncode == 1 and "exceeds 1e+06·E(0)" in again.stderr, again.stderr
    resumed = mfres.open_run(str(part), load=True)
    np.testing.assert_allclose(resumed.loss.values, loss, rtol=1e-12)


def test_nonfinite_loss_at_step_0(tmp_path: Path) -> None:
    out = tmp_path / "inf.nc"
    res = cli("simulate", *TINY, "--init-scale", "1e200", "--steps", "10", "--out", str(out))
    assert res.returncode == 1
    assert "E is not finite at step 0" in res.stderr and "Traceback" not in res.stderr, res.stderr
    ds = mfres.open_run(str(out), load=True)
    assert ds.attrs["status"] == "diverged" and ds.sizes["step"] == 1 and not np.isfinite(ds.loss.values[0])


# -- resume for real users -------------------------------------------------------------------------------
def write_data(path: Path, N: int = 8, d: int = 2) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((N, d))
    np.savez(path, x=x, y=np.sin(x[:, 0]))


def test_resume_with_data_file_by_the_printed_command_and_other_spellings(tmp_path: Path) -> None:
    write_data(tmp_path / "d.npz")
    args = ["simulate", "-L", "2", "-M", "4", "--ds", "0.5", "--steps", "3000", "--snapshot-every", "500",
            "--backend", "numpy", "--data", "d.npz", "--out", "r.nc"]
    ref = cli(*args[:-1], "ref.nc", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen([*CLI, *args], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, MFRES_DURABLE_SECONDS="0"))
    proc.stderr.readline()  # the header: signals are handled from here on
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "interrupted by SIGINT" in err, err
    printed = err.split("to continue: ")[1].strip()
    cmd = shlex.split(printed)
    assert cmd[0] == "mfres" and cmd[-1] == "--resume"
    again = subprocess.run([*CLI, *cmd[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    a, b = mfres.open_run(str(tmp_path / "r.nc"), load=True), mfres.open_run(str(tmp_path / "ref.nc"), load=True)
    np.testing.assert_allclose(a.loss.values, b.loss.values, rtol=1e-12)
    # an absolute path, explicit -d/-N, and a copy of the same data are the same data; other data are not
    more = ["-L", "2", "-M", "4", "--ds", "0.5", "--steps", "3100", "--snapshot-every", "500", "--backend", "numpy",
            "--quiet", "--out", str(tmp_path / "r.nc"), "--resume"]
    (tmp_path / "copy.npz").write_bytes((tmp_path / "d.npz").read_bytes())
    for data in (["--data", str(tmp_path / "d.npz"), "-d", "2", "-N", "8"], ["--data", str(tmp_path / "copy.npz")]):
        res = cli("simulate", *more, *data, cwd=tmp_path)
        assert res.returncode == 0, (data, res.stderr)
        more[more.index("--steps") + 1] = str(int(more[more.index("--steps") + 1]) + 100)
    write_data(tmp_path / "other.npz", N=9)
    res = cli("simulate", *more, "--data", "other.npz", cwd=tmp_path)
    assert res.returncode == 2 and "the data differ from the file's" in res.stderr, res.stderr


def test_resume_with_more_steps_keeps_snapshots_evenly_spaced(tmp_path: Path) -> None:
    out = tmp_path / "r.nc"
    simulate_ok(out, *TINY, "--ds", "0.5", "--steps", "200")
    res = cli("simulate", *TINY, "--ds", "0.5", "--steps", "2000", "--out", str(out), "--resume")
    assert res.returncode == 0, res.stderr
    ds = xr.load_dataset(out)
    assert list(ds.snapshot_step.values) == list(range(0, 2001, 100))
    ref = simulate_ok(tmp_path / "ref.nc", *TINY, "--ds", "0.5", "--steps", "2000")
    np.testing.assert_allclose(ds.loss.values, ref.loss.values, rtol=1e-12)
    np.testing.assert_allclose(ds.U.values, ref.U.values, rtol=1e-12)


def test_sigterm_before_the_first_snapshot_leaves_a_resumable_file(tmp_path: Path) -> None:
    # a large CSV takes a while to read: SIGTERM arrives while the data load, before any step
    rng = np.random.default_rng(0)
    x = rng.standard_normal((150_000, 2))
    rows = "\n".join(f"{a!r},{b!r},{float(np.sin(a))!r}" for a, b in x.tolist())
    (tmp_path / "big.csv").write_text("x0,x1,y\n" + rows + "\n")
    args = ["simulate", "-L", "2", "-M", "4", "--steps", "3", "--backend", "numpy", "--data", "big.csv"]
    proc = subprocess.Popen([*CLI, *args, "--out", "r.nc"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    proc.stderr.readline()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (proc.returncode, err)
    assert "interrupted by SIGTERM at step 0" in err, err
    ds = mfres.open_run(str(tmp_path / "r.nc"), load=True)
    assert ds.attrs["status"] == "interrupted" and ds.sizes["step"] == 1
    res = cli(*args, "--quiet", "--out", "r.nc", "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    ref = cli(*args, "--quiet", "--out", "ref.nc", cwd=tmp_path)
    assert ref.returncode == 0
    np.testing.assert_allclose(xr.load_dataset(tmp_path / "r.nc").loss.values,
                               xr.load_dataset(tmp_path / "ref.nc").loss.values, rtol=1e-12)


# -- defects ---------------------------------------------------------------------------------------------
def nc_data(path: Path, x: np.ndarray, y: np.ndarray, x_dims=("sample", "dim"), fill=None, missing=None,
            unwritten: bool = False) -> Path:
    with netCDF4.Dataset(path, "w") as nc:
        sizes = dict(zip(x_dims, x.shape, strict=True))
        for name, size in sizes.items():
            nc.createDimension(name, size)
        kw = {"fill_value": fill} if fill is not None else {}
        vx = nc.createVariable("x", "f8", x_dims, **kw)
        if missing is not None:
            vx.missing_value = missing
        if unwritten:
            vx[:1] = x[:1]
        else:
            vx[:] = x
        nc.createVariable("y", "f8", ("sample",))[:] = y
    return path


def run_data(tmp_path: Path, data: Path, name: str = "o.nc"):
    return CliRunner().invoke(main, ["simulate", "-L", "2", "-M", "4", "--steps", "3", "--quiet", "--backend",
                                     "numpy", "--data", str(data), "--out", str(tmp_path / name)])


def test_netcdf_data_with_missing_values_refused(tmp_path: Path) -> None:
    x = np.arange(12.0).reshape(6, 2) / 10
    y = np.ones(6)
    xf = x.copy()
    xf[2, 1] = -999.0
    cases = [(nc_data(tmp_path / "fill.nc", xf, y, fill=-999.0), "_FillValue = -999.0"),
             (nc_data(tmp_path / "miss.nc", xf, y, missing=-999.0), "missing_value = -999.0"),
             (nc_data(tmp_path / "unwritten.nc", x, y, unwritten=True), "the default fill value")]
    for path, what in cases:
        res = run_data(tmp_path, path)
        assert res.exit_code == 2 and "missing values" in res.output and what in res.output, res.output
        assert res.output.count("\n") == 1


def test_square_x_stored_dim_by_sample_is_read_by_its_dimension_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 3))
    y = rng.standard_normal(3)
    nc_data(tmp_path / "ds.nc", x.T.copy(), y, x_dims=("dim", "sample"))
    np.savez(tmp_path / "ref.npz", x=x, y=y)
    assert run_data(tmp_path, tmp_path / "ds.nc", "a.nc").exit_code == 0
    assert run_data(tmp_path, tmp_path / "ref.npz", "b.nc").exit_code == 0
    a, b = xr.load_dataset(tmp_path / "a.nc"), xr.load_dataset(tmp_path / "b.nc")
    np.testing.assert_array_equal(a.x.values, x)
    np.testing.assert_array_equal(a.loss.values, b.loss.values)
    with netCDF4.Dataset(tmp_path / "amb.nc", "w") as nc:  # no shared dimension: refused, not guessed
        for n in ("p", "q", "r"):
            nc.createDimension(n, 3)
        nc.createVariable("x", "f8", ("p", "q"))[:] = x
        nc.createVariable("y", "f8", ("r",))[:] = y
    res = run_data(tmp_path, tmp_path / "amb.nc")
    assert res.exit_code == 2 and "cannot tell samples from dimensions" in res.output


def test_csv_digit_separators_refused_and_byte_order_mark_accepted(tmp_path: Path) -> None:
    (tmp_path / "sep.csv").write_text("x0,y\n1_000,2\n3,4\n")
    res = run_data(tmp_path, tmp_path / "sep.csv")
    assert res.exit_code == 2 and "digit separators" in res.output and "line 2" in res.output
    text = "x0,x1,y\n0.1,0.2,1\n0.3,-0.4,2\n0.5,0.6,-1\n"
    (tmp_path / "plain.csv").write_text(text, encoding="utf-8")
    (tmp_path / "bom.csv").write_text(text, encoding="utf-8-sig")
    assert (tmp_path / "bom.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    assert run_data(tmp_path, tmp_path / "plain.csv", "a.nc").exit_code == 0
    res = run_data(tmp_path, tmp_path / "bom.csv", "b.nc")
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(xr.load_dataset(tmp_path / "a.nc").loss, xr.load_dataset(tmp_path / "b.nc").loss)


def test_out_that_is_a_fifo_ends_with_a_message(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.nc"
    os.mkfifo(fifo)
    for extra in ([], ["--resume"], ["--overwrite"]):
        res = cli("simulate", *TINY, "--steps", "3", "--out", str(fifo), *extra, timeout=60)
        assert res.returncode == 4 and "is not a regular file" in res.stderr, res.stderr
    res = cli("info", str(fifo), timeout=60)
    assert res.returncode == 4 and "is not a regular file" in res.stderr


def test_non_utf8_paths(tmp_path: Path) -> None:
    name = os.fsdecode(b"run-\xff\xfe.nc")
    out = os.path.join(str(tmp_path), name)
    res = subprocess.run([*CLI, "simulate", *TINY, "--steps", "5", "--out", os.fsencode(out)], capture_output=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([*CLI, "simulate", *TINY, "--steps", "9", "--out", os.fsencode(out), "--resume"],
                         capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr
    info = subprocess.run([*CLI, "info", os.fsencode(out)], capture_output=True, timeout=120)
    assert info.returncode == 0 and b"steps done: 9 of 9" in info.stdout
    ds = mfres.open_run(out, load=True)
    assert ds.sizes["step"] == 10 and "\\xff\\xfe" in ds.attrs["command"]


def test_seeds_beyond_64_bits_refused(tmp_path: Path) -> None:
    res = cli("simulate", *TINY, "--steps", "2", "--seed", str(2**64), "--out", str(tmp_path / "a.nc"))
    assert res.returncode == 2 and res.stderr.strip() == f"Error: --seed must be below 2^64, got {2**64}"
    res = cli("simulate", *TINY, "--steps", "2", "--data-seed", str(2**70), "--out", str(tmp_path / "a.nc"))
    assert res.returncode == 2 and "--data-seed must be below 2^64" in res.stderr
    ds = simulate_ok(tmp_path / "b.nc", *TINY, "--steps", "2", "--seed", str(2**64 - 1))
    assert int(ds.attrs["seed"]) == 2**64 - 1


def test_out_of_memory_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mfres.train

    def no_memory(*args: object, **kwargs: object) -> None:
        raise MemoryError

    monkeypatch.setattr(mfres.train, "run", no_memory)
    res = CliRunner().invoke(main, ["simulate", *TINY, "--out", str(tmp_path / "m.nc")])
    assert res.exit_code == 5 and "out of memory" in res.output


@pytest.mark.parametrize("overlaps", [False, True])
@pytest.mark.parametrize("fails_at", [2, 4])  # 2: the first chunk, before any durable point was made
def test_a_crash_inside_the_run_is_recorded_as_failed(tmp_path: Path, fails_at: int, overlaps: bool) -> None:
    """A backend that fails in a chunk (here out of memory; the first one or a later one, in
    the calling thread or as a backend that ``overlaps`` would) leaves a file that says so and
    keeps every step up to the chunk."""
    from mfres.backends.numpy_backend import NumpyBackend
    from mfres.config import RunConfig
    from mfres.train import run

    class RunsOutOfMemory(NumpyBackend):
        calls = 0

        def advance(self, theta, problem, ds, n):  # type: ignore[no-untyped-def]
            self.calls += 1
            if self.calls == fails_at:
                raise MemoryError
            return super().advance(theta, problem, ds, n)

    backend = RunsOutOfMemory()
    backend.overlaps = overlaps
    out = tmp_path / "oom.nc"
    config = RunConfig(depth=2, width=4, dim=2, samples=8, steps=40, snapshot_every=5, backend="numpy")
    with pytest.raises(MemoryError):
        run(config, str(out), backend=backend)
    ds = mfres.open_run(str(out), load=True)
    assert ds.attrs["status"] == "failed" and "MemoryError" in ds.attrs["status_message"]
    assert "stopped without closing" not in cli("info", str(out)).stdout
    done = int(ds.attrs["steps_done"])
    assert ds.sizes["step"] == done + 1 and np.isfinite(ds["loss"].values).all()
    if fails_at == 2:  # the durable point the failed chunk was to carry is there all the same
        assert done == 0


def test_info_on_a_file_that_is_not_a_run(tmp_path: Path) -> None:
    with netCDF4.Dataset(tmp_path / "other.nc", "w") as nc:
        nc.createDimension("n", 2)
        nc.createVariable("z", "f8", ("n",))[:] = [1.0, 2.0]
    res = cli("info", str(tmp_path / "other.nc"))
    assert res.returncode == 4 and res.stderr.strip() == f"Error: {tmp_path / 'other.nc'} is not a run file " \
        "(made by mfres simulate)", res.stderr


def test_run_says_where_its_time_went(tmp_path: Path) -> None:
    """RunResult.timing splits a run's wall time into the backend's steps, Julia's compilation
    (counted through ``startup_seconds``) and the rest; `mfres simulate` prints the split."""
    import time

    from mfres.backends.numpy_backend import NumpyBackend
    from mfres.config import RunConfig
    from mfres.train import run

    class SlowCompiling(NumpyBackend):
        calls, startup_seconds = 0, 0.0

        def advance(self, theta, problem, ds, n):  # type: ignore[no-untyped-def]
            self.calls += 1
            time.sleep(0.05)
            self.startup_seconds += 0.02  # of those 0.05 s, as a Julia backend reports its compilation
            return super().advance(theta, problem, ds, n)

    backend = SlowCompiling()
    config = RunConfig(depth=2, width=4, dim=2, samples=8, steps=30, snapshot_every=5, backend="numpy")
    t0 = time.perf_counter()
    t = run(config, str(tmp_path / "t.nc"), backend=backend, warn=False).timing
    wall = time.perf_counter() - t0
    assert backend.calls >= 7  # step 0 and at least one chunk per snapshot interval
    assert t.compile == pytest.approx(0.02 * backend.calls)
    assert t.backend >= 0.03 * backend.calls
    assert t.backend + t.compile <= t.total <= wall
    assert t.overhead == pytest.approx((t.total - t.backend - t.compile) / t.backend) and t.overhead >= 0
    res = CliRunner().invoke(main, ["simulate", *TINY[:-3], "--backend", "numpy", "--steps", "20",
                                    "--out", str(tmp_path / "c.nc")])
    assert res.exit_code == 0, res.output
    line = [s for s in res.output.splitlines() if s.startswith("time: ")]
    assert len(line) == 1 and "s stepping in the backend" in line[0] and "% of the stepping" in line[0]


def overlapping_backend(delay: float = 0.06):  # type: ignore[no-untyped-def]
    """A NumPy backend that ``overlaps`` like the executable transport: each chunk runs in a thread
    that first sleeps ``delay`` s (longer than the writing of a tiny run) and steps a copy of θ, which
    the finishing call writes back (θ keeps the chunk's start state until then, as the Backend
    interface says); ``spans`` records each chunk's (begin, end, seconds in the "child")."""
    import threading
    import time

    from mfres.backends.numpy_backend import NumpyBackend

    class Overlapping(NumpyBackend):
        overlaps, kernel_seconds = True, 0.0

        def __init__(self) -> None:
            super().__init__()
            self.spans: list[tuple[float, float, float]] = []

        def begin_advance(self, theta, problem, ds, n):  # type: ignore[no-untyped-def]
            box: dict = {}
            t0 = time.perf_counter()

            work = theta.copy()

            def child() -> None:
                time.sleep(delay)
                box["traj"] = NumpyBackend.advance(self, work, problem, ds, n)

            worker = threading.Thread(target=child)
            worker.start()

            def finish():  # type: ignore[no-untyped-def]
                worker.join()
                self.kernel_seconds = time.perf_counter() - t0
                self.spans.append((t0, time.perf_counter(), self.kernel_seconds))
                for v in "UWb":
                    getattr(theta, v)[...] = getattr(work, v)
                return box["traj"]

            return finish

    return Overlapping()


def test_durable_points_are_written_while_a_child_process_steps(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the backend ``overlaps`` (the executable transport), each durable point is written
    while the next chunk runs: it holds the state of the step it names (that of an independent
    NumPy run to that step, bit for bit), the file equals a plain NumPy run's, and the run's
    time split counts the hidden writing as stepping."""
    import time

    from mfres.backends import Problem
    from mfres.backends.numpy_backend import NumpyBackend
    from mfres.config import RunConfig
    from mfres.store import writer as writer_mod
    from mfres.train import prepare, run

    backend = overlapping_backend()
    spans = backend.spans

    commits: list[tuple[int, mfres.model.Particles, float, float]] = []
    plain_commit = writer_mod.RunWriter.commit

    def recording_commit(self, step, theta, publish=False, end_in=float("inf")):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        plain_commit(self, step, theta, publish, end_in)
        if not publish:
            commits.append((step, theta.copy(), t0, time.perf_counter()))

    monkeypatch.setattr(writer_mod, "DURABLE_SECONDS", 0.0)  # a durable point at every chunk boundary
    monkeypatch.setattr(writer_mod.RunWriter, "commit", recording_commit)
    config = RunConfig(depth=3, width=6, dim=2, samples=8, steps=12, snapshot_every=3, ds=0.5, backend="numpy")
    t = run(config, str(tmp_path / "o.nc"), backend=backend, warn=False).timing
    assert len(commits) >= 4 and commits[0][0] == 1  # the first chunk (one step) is too short to hide one
    for step, _, c0, c1 in commits:  # each one inside a chunk's span
        assert any(b0 <= c0 and c1 <= b1 for b0, b1, _ in spans), step
    _, theta0, problem = prepare(config)
    for step, state, _, _ in commits:
        ref = theta0.copy()
        NumpyBackend().advance(ref, Problem(problem.x, problem.y, problem.a, problem.activation), config.ds, step)
        for v in "UWb":
            np.testing.assert_array_equal(getattr(state, v), getattr(ref, v), err_msg=f"step {step}")
    monkeypatch.setattr(writer_mod.RunWriter, "commit", plain_commit)
    run(config, str(tmp_path / "p.nc"), backend=NumpyBackend(), warn=False)
    with xr.open_dataset(tmp_path / "o.nc") as o, xr.open_dataset(tmp_path / "p.nc") as p:
        for name in ("loss", "grad_norm", "U", "W", "b", "prediction", "state_U", "state_W", "state_b"):
            np.testing.assert_array_equal(o[name].values, p[name].values, err_msg=name)
    # the writing was hidden: stepping is the chunks' whole spans, not their spans less the writing
    assert t.backend >= 0.999 * sum(k for _, _, k in spans)


def _dataset_equal(a: Path, b: Path) -> None:
    """Two run files hold the same dimensions, variables (bit for bit) and run attributes."""
    with xr.open_dataset(a) as x, xr.open_dataset(b) as y:
        assert dict(x.sizes) == dict(y.sizes)
        assert set(x.variables) == set(y.variables)
        for name in x.variables:
            np.testing.assert_array_equal(x[name].values, y[name].values, err_msg=name)
        for k in ("status", "status_message", "steps_done", "state_step", "rise_count", "max_rise",
                  "energy_residual"):
            assert str(x.attrs.get(k)) == str(y.attrs.get(k)), k


@pytest.mark.parametrize(("share", "durable"), [(0.8, 5.0), (1e-9, 5.0), (0.8, 0.0)])
def test_final_file_is_drafted_while_the_last_chunks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         share: float, durable: float) -> None:
    """Where the backend overlaps, the final file is written ahead, in slices inside the run's last
    chunks (with a tiny share of each chunk, one piece a chunk and the rest at the end), and the end of
    the run only adds the rows that came after it began: the file equals a plain NumPy run's, and
    nothing is left beside it. A durable point at every chunk boundary drops each draft, and the
    draft begun again after the last one is used."""
    import time

    from mfres import train
    from mfres.backends.numpy_backend import NumpyBackend
    from mfres.config import RunConfig
    from mfres.store import writer as writer_mod
    from mfres.train import run

    begun: list[tuple[int, int, int]] = []
    slices: list[tuple[float, float]] = []
    completed: list[bool] = []
    plain_begin, plain_work = writer_mod.RunWriter.begin_final_draft, writer_mod.RunWriter.work_on_draft
    plain_complete = writer_mod.RunWriter._complete_draft

    def recording_begin(self, steps, snapshots):  # type: ignore[no-untyped-def]
        begun.append((self.steps_written, steps, snapshots))
        plain_begin(self, steps, snapshots)

    def recording_work(self, seconds=float("inf")):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        done = plain_work(self, seconds)
        if seconds < float("inf"):  # the loop's slices, not finish's rest
            slices.append((t0, time.perf_counter()))
        return done

    def recording_complete(self, step, theta):  # type: ignore[no-untyped-def]
        completed.append(plain_complete(self, step, theta))
        return completed[-1]

    monkeypatch.setattr(writer_mod.RunWriter, "begin_final_draft", recording_begin)
    monkeypatch.setattr(writer_mod.RunWriter, "work_on_draft", recording_work)
    monkeypatch.setattr(writer_mod.RunWriter, "_complete_draft", recording_complete)
    monkeypatch.setattr(writer_mod, "DURABLE_SECONDS", durable)
    monkeypatch.setattr(train, "DRAFT_SHARE", share)
    config = RunConfig(depth=3, width=6, dim=2, samples=8, steps=12, snapshot_every=3, ds=0.5, backend="numpy")
    backend = overlapping_backend()
    run(config, str(tmp_path / "o.nc"), backend=backend, warn=False)
    # the chunks after the first (one step) start at 1, 3, 6, 9; a draft begins in those that end
    # within DRAFT_CHUNKS chunks of their size: at the first, or after every durable point
    window = [s for s, n in ((1, 2), (3, 3), (6, 3), (9, 3)) if 12 - s <= train.DRAFT_CHUNKS * n]
    assert [b[0] for b in begun] == (window[:1] if durable else window)
    for start, steps, snapshots in begun:  # with the steps and snapshots still to come
        assert start + steps == 12 and snapshots == len([k for k in (3, 6, 9, 12) if k > start])
    assert slices and all(any(b0 <= t0 and t1 <= b1 for b0, b1, _ in backend.spans) for t0, t1 in slices)
    assert completed == [True]
    begun.clear()
    run(config, str(tmp_path / "p.nc"), backend=NumpyBackend(), warn=False)
    assert begun == []  # a backend that does not overlap writes no draft
    _dataset_equal(tmp_path / "o.nc", tmp_path / "p.nc")
    assert os.listdir(tmp_path / ".o.nc.mfres") == ["lock"]


@pytest.mark.parametrize("end", ["fits", "fits, in slices", "fewer steps", "a segment between",
                                 "a segment mid-draft", "closed", "closed mid-draft"])
def test_a_draft_is_used_only_where_it_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, end: str) -> None:
    """A draft made with rows still in memory is completed with the rest and gives the file written
    without one, whether written at once or one piece at a time; a draft sized for more steps than the
    run made (a divergence in the last chunk), or one that a segment written after it (or between its
    pieces) outdates, is dropped and the file written whole; a writer closed with a draft, finished or
    not (a crash), leaves the published file as it was and no temporary file."""
    from mfres.store import writer as writer_mod
    from mfres.store.writer import RunWriter
    from mfres.train import prepare

    used: list[bool] = []
    plain_complete = writer_mod.RunWriter._complete_draft

    def recording_complete(self, step, theta):  # type: ignore[no-untyped-def]
        used.append(plain_complete(self, step, theta))
        return used[-1]

    monkeypatch.setattr(writer_mod.RunWriter, "_complete_draft", recording_complete)
    config = mfres.config.RunConfig(depth=3, width=6, dim=2, samples=8, steps=12, snapshot_every=3, ds=0.5,
                                    backend="numpy")
    data, theta, _ = prepare(config)
    rng = np.random.default_rng(0)
    loss, gn = rng.random(13), rng.random(13)
    last = 11 if end == "fewer steps" else 12
    outs = []
    for name, draft in (("a.nc", True), ("b.nc", False)):
        w = RunWriter(str(tmp_path / name), config, data, "numpy")
        w.write_steps(0, loss[:7], gn[:7])
        for k in (0, 3, 6):
            w.write_snapshot(k, theta, np.full(8, k, float))
        w.commit(6, theta)
        w.write_steps(7, loss[7:10], gn[7:10])  # rows in memory when the draft is made
        w.write_snapshot(9, theta, np.full(8, 9.0))
        if draft and end in ("fits, in slices", "a segment mid-draft", "closed mid-draft"):
            w.begin_final_draft(3, 1)
            pieces = 1
            while not w.work_on_draft(0.0):  # one piece a call
                pieces += 1
                if end != "fits, in slices" and pieces == 4:
                    break
            assert pieces > 8 or end != "fits, in slices"
            assert w.drafting and len(os.listdir(tmp_path / f".{name}.mfres")) == 2
        elif draft:
            w.draft_final_file(3, 1)
            assert w._draft is not None and len(os.listdir(tmp_path / f".{name}.mfres")) == 2
        outs.append(tmp_path / name)
        if end.startswith("closed"):
            w.close()
            continue
        if end.startswith("a segment"):
            w.commit(9, theta)
        w.write_steps(10, loss[10:last + 1], gn[10:last + 1])
        w.write_snapshot(last, theta, np.full(8, float(last)))
        w.finish("finished" if last == 12 else "diverged", "", last, theta)
        w.close()
        assert os.listdir(tmp_path / f".{name}.mfres") == ["lock"]
    assert used == ([] if end.startswith("closed") else [end.startswith("fits"), False])
    _dataset_equal(*outs)
    with xr.open_dataset(outs[0]) as ds:
        assert ds.sizes["step"] == (7 if end.startswith("closed") else last + 1)
        np.testing.assert_array_equal(ds["loss"].values, loss[:ds.sizes["step"]])
        assert list(ds["snapshot_step"].values) == [0, 3, 6] + ([] if end.startswith("closed") else [9, last])
    if end.startswith("closed"):
        assert [n for n in os.listdir(tmp_path / ".a.nc.mfres") if "publish" in n] == []


@pytest.mark.parametrize("end_in", [float("inf"), 0.5])
def test_no_mid_run_publish_right_before_the_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  end_in: float) -> None:
    """Once the pending segments outgrow the published file and PUBLISH_SECONDS have passed, a durable
    point publishes, unless the run expects to end sooner than that (its last publish comes first);
    either way the file read back holds every step."""
    from mfres.store import writer as writer_mod
    from mfres.store.writer import RunWriter
    from mfres.train import prepare

    monkeypatch.setattr(writer_mod, "PUBLISH_SECONDS", 1.0)
    config = mfres.config.RunConfig(depth=3, width=6, dim=2, samples=8, steps=12, snapshot_every=3, ds=0.5,
                                    backend="numpy")
    data, theta, _ = prepare(config)
    loss = np.random.default_rng(1).random(13)
    w = RunWriter(str(tmp_path / "r.nc"), config, data, "numpy")
    w.write_steps(0, loss[:4], loss[:4])
    w.write_snapshot(0, theta, np.zeros(8))
    w.commit(3, theta)  # the first durable point publishes
    w._published_at -= 2.0  # as if PUBLISH_SECONDS had passed and the segments outgrew the file
    w.published_bytes = 1
    for k in (3, 6, 9):
        w.write_steps(k + 1, loss[k + 1:k + 4], loss[k + 1:k + 4])
        w.write_snapshot(k, theta, np.full(8, float(k)))
        w.commit(k + 3, theta, end_in=end_in)
    # the first of the three publishes (the file then is new again), or none does
    assert read_attrs_steps(tmp_path / "r.nc") == (6 if end_in > 1.0 else 3)
    assert len(w.pending) == (2 if end_in > 1.0 else 3)
    w.finish("finished", "", 12, theta)
    w.close()
    with mfres.open_run(str(tmp_path / "r.nc"), load=True) as ds:
        np.testing.assert_array_equal(ds["loss"].values, loss)
        assert list(ds["snapshot_step"].values) == [0, 3, 6, 9]


def read_attrs_steps(path: Path) -> int:
    """The steps_done of the published file alone (segments not merged)."""
    with xr.open_dataset(path) as ds:
        return int(ds.attrs["steps_done"])
