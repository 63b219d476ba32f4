"""`mfres simulate` end to end: the run file, reproducibility, bad input, divergence."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from reference import autograd_loss_and_grad

import mfres
from mfres.cli import main

SMALL = ["-L", "4", "-M", "8", "-d", "3", "-N", "12", "--steps", "30", "--ds", "0.5", "--quiet"]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def run_ok(tmp_path: Path, *args: str, name: str = "run.nc") -> Path:
    out = tmp_path / name
    res = invoke("simulate", *SMALL, *args, "--out", str(out))
    assert res.exit_code == 0, res.output
    return out


def test_help_documents_contract_options() -> None:
    res = invoke("simulate", "--help")
    assert res.exit_code == 0
    for opt in ("--depth", "-L", "--width", "-M", "--dim", "-d", "--samples", "-N", "--data", "--data-seed",
                "--activation", "--init", "--init-scale", "--steps", "--ds", "--weight-decay", "--seed",
                "--snapshot-every", "--backend", "--dtype", "--out", "--quiet"):
        assert opt in res.output, opt
    assert "simulate" in invoke("--help").output


def test_run_file_schema(tmp_path: Path) -> None:
    out = run_ok(tmp_path, "--snapshot-every", "7", "--weight-decay", "0.01", "--seed", "5")
    with xr.open_dataset(out) as ds:
        assert ds.sizes["step"] == 31
        np.testing.assert_allclose(ds["s"], np.arange(31) * 0.5)
        assert np.all(np.isfinite(ds["loss"])) and np.all(np.isfinite(ds["grad_norm"]))
        assert list(ds["snapshot_step"].values) == [0, 7, 14, 21, 28, 30]
        assert ds["U"].dims == ("snapshot", "layer", "particle", "dim")
        assert ds["W"].shape == (6, 4, 8, 3)
        assert ds["b"].dims == ("snapshot", "layer", "particle")
        assert ds["prediction"].dims == ("snapshot", "sample")
        assert ds["x"].dims == ("sample", "dim") and ds["y"].dims == ("sample",) and ds["readout"].dims == ("dim",)
        for v in ("loss", "s", "grad_norm", "U", "W", "b", "prediction", "x", "y", "readout"):
            assert "units" in ds[v].attrs and "long_name" in ds[v].attrs, v
        a = ds.attrs
        for k in ("depth", "width", "ds", "activation", "init", "init_scale", "seed", "data_seed",
                  "weight_decay", "dtype", "backend", "mfres_version", "created", "command", "Conventions"):
            assert k in a, k
        assert (a["depth"], a["width"], a["seed"], a["backend"], a["status"]) == (4, 8, 5, "numpy", "finished")
        assert a["weight_decay"] == 0.01 and a["Conventions"].startswith("CF-")
        # prediction is a·z_L of the snapshot's particles
        res = ds["prediction"].isel(snapshot=-1).values - ds["y"].values
        E = 0.5 * np.mean(res**2) + 0.5 * 0.01 * sum(float((ds[v].isel(snapshot=-1) ** 2).sum())
                                                     for v in "UWb") / (4 * 8)
        assert E == pytest.approx(float(ds["loss"][-1]), rel=1e-12)


def test_autograd_replay_of_run_file(tmp_path: Path) -> None:
    """Replaying the run from its step-0 snapshot with an independent autograd reproduces loss and final state."""
    out = run_ok(tmp_path, "--activation", "softplus", "--init", "smooth", "--weight-decay", "0.02")
    ds = mfres.open_run(str(out), load=True)
    L, M, dsz = ds.attrs["depth"], ds.attrs["width"], ds.attrs["ds"]
    U, W, b = (ds[v].isel(snapshot=0).values for v in "UWb")
    x, y, a = ds["x"].values, ds["y"].values, ds["readout"].values
    losses = []
    for _ in range(ds.sizes["step"]):
        E, gU, gW, gb = autograd_loss_and_grad(U, W, b, x, y, a, "softplus", 0.02)
        losses.append(E)
        if len(losses) < ds.sizes["step"]:
            U, W, b = U - dsz * L * M * gU, W - dsz * L * M * gW, b - dsz * L * M * gb
    np.testing.assert_allclose(ds["loss"].values, losses, rtol=1e-9)
    for name, ref in (("U", U), ("W", W), ("b", b)):
        np.testing.assert_allclose(ds[name].isel(snapshot=-1).values, ref, rtol=1e-9, atol=1e-12)


def test_same_seed_same_file_contents(tmp_path: Path) -> None:
    one = run_ok(tmp_path, "--seed", "3", "--data", "teacher", name="a.nc")
    two = run_ok(tmp_path, "--seed", "3", "--data", "teacher", name="b.nc")
    other = run_ok(tmp_path, "--seed", "4", "--data", "teacher", name="c.nc")
    with xr.open_dataset(one) as A, xr.open_dataset(two) as B, xr.open_dataset(other) as C:
        for v in ("loss", "grad_norm", "U", "W", "b", "prediction", "x", "y"):
            np.testing.assert_array_equal(A[v].values, B[v].values)
        assert not np.array_equal(A["U"].values, C["U"].values)
        np.testing.assert_array_equal(A["x"].values, C["x"].values)  # data fixed by --data-seed alone


def test_float32_run(tmp_path: Path) -> None:
    out = run_ok(tmp_path, "--dtype", "float32", name="f32.nc")
    ref = run_ok(tmp_path, name="f64.nc")
    with xr.open_dataset(out) as a, xr.open_dataset(ref) as b:
        assert a["U"].dtype == np.float32 and a.attrs["dtype"] == "float32"
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)


def write_npz(path: Path, x, y, readout=None) -> Path:
    arrays = {"x": x, "y": y}
    if readout is not None:
        arrays["readout"] = readout
    np.savez(path, **arrays)
    return path


def test_data_files_npz_nc_csv_agree(tmp_path: Path, rng) -> None:
    x = rng.standard_normal((10, 3))
    y = np.sin(x[:, 0])
    a = np.array([1.0, -0.5, 0.25])
    write_npz(tmp_path / "d.npz", x, y, a)
    with netCDF4.Dataset(tmp_path / "d.nc", "w") as nc:
        nc.createDimension("sample", 10)
        nc.createDimension("dim", 3)
        nc.createVariable("x", "f8", ("sample", "dim"))[:] = x
        nc.createVariable("y", "f8", ("sample",))[:] = y
        nc.createVariable("readout", "f8", ("dim",))[:] = a
    rows = ["x0,x1,x2,y"] + [",".join(repr(float(v)) for v in (*x[i], y[i])) for i in range(10)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    args = ["-L", "3", "-M", "4", "--steps", "5", "--quiet"]
    results = []
    for ext in ("npz", "nc", "csv"):
        out = tmp_path / f"r-{ext}.nc"
        res = invoke("simulate", *args, "--data", str(tmp_path / f"d.{ext}"), "--out", str(out))
        assert res.exit_code == 0, res.output
        with xr.open_dataset(out) as ds:
            np.testing.assert_array_equal(ds["x"].values, x)
            results.append(ds["loss"].values)
            expected_a = a if ext != "csv" else np.full(3, 1 / np.sqrt(3))
            np.testing.assert_allclose(ds["readout"].values, expected_a)
    np.testing.assert_array_equal(results[0], results[1])


BAD_OPTIONS = [
    (["--depth", "0"], "--depth must be positive"),
    (["--width", "-3"], "--width must be positive"),
    (["-d", "0"], "--dim must be positive"),
    (["--samples", "0"], "--samples must be positive"),
    (["--ds", "0"], "--ds must be positive"),
    (["--ds", "nan"], "--ds must be finite"),
    (["--weight-decay", "-1"], "--weight-decay must be"),
    (["--activation", "relu"], "unknown activation"),
    (["--activation", "srelu:-1"], "η must be positive"),
    (["--data", "nosuchset"], "unknown data set"),
    (["--data", "missing.npz"], "no such data file"),
    (["--init-scale", "0"], "--init-scale must be positive"),
    (["--device", "cuda", "--backend", "numpy"], "needs the Julia backend"),
]


@pytest.mark.parametrize("args,message", BAD_OPTIONS)
def test_bad_options_give_one_line_message(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "bad.nc"
    res = CliRunner().invoke(main, ["simulate", "--quiet", *args, "--out", str(out)])
    assert res.exit_code != 0
    assert message in res.output, res.output
    assert "Traceback" not in res.output
    assert isinstance(res.exception, SystemExit)  # a clean exit, not an escaped exception
    assert not out.exists()


def test_click_rejects_malformed_option_values(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["simulate", "--depth", "abc", "--out", str(tmp_path / "r.nc")])
    assert res.exit_code == 2 and "Invalid value for '--depth'" in res.output
    res = CliRunner().invoke(main, ["simulate", "--init", "gaussian"])
    assert res.exit_code == 2 and "--init" in res.output


def bad_files(tmp_path: Path, rng) -> list[tuple[Path, str]]:
    x = rng.standard_normal((6, 2))
    y = rng.standard_normal(6)
    xnan = x.copy()
    xnan[2, 1] = np.nan
    yinf = y.copy()
    yinf[0] = np.inf
    cases = [
        (write_npz(tmp_path / "nan.npz", xnan, y), "NaN or infinite"),
        (write_npz(tmp_path / "inf.npz", x, yinf), "NaN or infinite"),
        (write_npz(tmp_path / "mismatch.npz", x, y[:5]), "x has 6 samples but y has 5"),
        (write_npz(tmp_path / "x1d.npz", y, y), "x must have 2 dimension"),
        (write_npz(tmp_path / "readout.npz", x, y, np.ones(3)), "readout has length 3"),
        (write_npz(tmp_path / "zero.npz", x, y, np.zeros(2)), "readout must be non-zero"),
    ]
    np.savez(tmp_path / "noy.npz", x=x)
    cases.append((tmp_path / "noy.npz", "no 'y' array"))
    (tmp_path / "garbage.npz").write_bytes(b"this is not a zip file")
    cases.append((tmp_path / "garbage.npz", "cannot read data file"))
    (tmp_path / "garbage.nc").write_bytes(b"not a netCDF file at all")
    cases.append((tmp_path / "garbage.nc", "cannot read data file"))
    (tmp_path / "text.csv").write_text("x0,x1,y\n1,2,abc\n")
    cases.append((tmp_path / "text.csv", "non-numeric"))
    (tmp_path / "header.csv").write_text("a,b\n1,2\n")
    cases.append((tmp_path / "header.csv", "CSV header"))
    (tmp_path / "ragged.csv").write_text("x0,x1,y\n1,2,3\n1,2\n")
    cases.append((tmp_path / "ragged.csv", "every CSV row"))
    (tmp_path / "data.txt").write_text("1 2 3\n")
    cases.append((tmp_path / "data.txt", "unsupported data file type"))
    return cases


def test_malformed_data_files(tmp_path: Path, rng) -> None:
    for path, message in bad_files(tmp_path, rng):
        res = CliRunner().invoke(main, ["simulate", "--quiet", "--data", str(path), "--out", str(tmp_path / "o.nc")])
        assert res.exit_code == 2, (path, res.output)
        assert message in res.output, (path, res.output)
        assert res.output.count("\n") == 1, res.output
        assert isinstance(res.exception, SystemExit)


def test_data_file_size_must_match_given_options(tmp_path: Path, rng) -> None:
    path = write_npz(tmp_path / "d.npz", rng.standard_normal((6, 2)), rng.standard_normal(6))
    res = CliRunner().invoke(main, ["simulate", "--data", str(path), "-d", "3", "--out", str(tmp_path / "o.nc")])
    assert res.exit_code == 2 and "dimension 2 but --dim 3" in res.output


def test_unwritable_output(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["simulate", *SMALL, "--out", str(tmp_path / "nodir" / "r.nc")])
    assert res.exit_code == 4 and "does not exist" in res.output
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        res = CliRunner().invoke(main, ["simulate", *SMALL, "--out", str(ro / "r.nc")])
        assert res.exit_code == 4


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    out = run_ok(tmp_path)
    before = out.read_bytes()
    res = CliRunner().invoke(main, ["simulate", *SMALL, "--out", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.output  # a usage mistake, refused before any work
    assert out.read_bytes() == before
    assert invoke("simulate", *SMALL, "--seed", "9", "--out", str(out), "--overwrite").exit_code == 0


def test_diverging_run_keeps_finite_file(tmp_path: Path) -> None:
    out = tmp_path / "div.nc"
    args = ["-L", "2", "-M", "3", "-d", "2", "-N", "4", "--weight-decay", "10", "--ds", "1e4",
            "--steps", "400", "--snapshot-every", "5", "--quiet", "--out", str(out)]
    res = CliRunner().invoke(main, ["simulate", *args])
    assert res.exit_code == 1
    assert "diverged" in res.output and "Traceback" not in res.output
    with xr.open_dataset(out) as ds:
        assert ds.attrs["status"] == "diverged"
        n = int(ds.attrs["steps_done"])
        assert 0 < n < 400
        loss = ds["loss"].values
        assert np.all(np.isfinite(loss[: n + 1]))
        assert int(ds["snapshot_step"][-1]) == n
        for v in ("U", "W", "b"):
            assert np.all(np.isfinite(ds[v].values))


def test_console_script_runs_as_a_process(tmp_path: Path) -> None:
    """The installed entry point, as a user runs it (real process, real exit codes)."""
    out = tmp_path / "p.nc"
    exe = [sys.executable, "-m", "mfres.cli"]
    ok = subprocess.run([*exe, "simulate", *SMALL, "--out", str(out)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert xr.open_dataset(out).attrs["command"].startswith("mfres simulate")
    bad = subprocess.run([*exe, "simulate", "--depth", "0", "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "Error: --depth must be positive, got 0"


def test_python_api_mirrors_cli(tmp_path: Path) -> None:
    ds = mfres.simulate(depth=4, width=8, dim=3, samples=12, steps=30, ds=0.5)
    ref = run_ok(tmp_path)
    with xr.open_dataset(ref) as r:
        np.testing.assert_array_equal(ds["loss"].values, r["loss"].values)
    assert ds.attrs["command"] == "mfres.simulate"


def test_default_run_converges_by_1000(tmp_path: Path) -> None:
    """`mfres simulate` with no options: the loss falls by at least a factor 1000."""
    out = tmp_path / "default.nc"
    res = invoke("simulate", "--quiet", "--backend", "numpy", "--out", str(out))
    assert res.exit_code == 0, res.output
    with xr.open_dataset(out) as ds:
        assert ds.attrs["depth"] == 16 and ds.attrs["width"] == 64 and ds.sizes["step"] == 2001
        assert float(ds["loss"][0]) / float(ds["loss"][-1]) > 1000
