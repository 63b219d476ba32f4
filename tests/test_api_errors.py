"""The user-facing edges: one-line errors with the right exit codes, a clean stdout, the
Python API for notebooks (progress, errors in Python terms), plot options checked
against the file, and the clouds animation."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from conftest import ROOT

import mfres
from mfres.cli import main
from mfres.errors import BackendError, ConfigError, python_terms

SMALL = ["-L", "4", "-M", "6", "-d", "2", "-N", "8", "--steps", "20", "--ds", "0.5", "--snapshot-every", "5"]
EXE = [sys.executable, "-m", "mfres.cli"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "pyfront") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def process(*args: str, env: dict[str, str] | None = None, code: str | None = None):
    cmd = [sys.executable, "-c", code, *args] if code else [*EXE, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env or ENV)


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def run_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run.nc"
    res = cli("simulate", *SMALL, "--quiet", "--out", str(out))
    assert res.exit_code == 0, res.output
    return out


# -- the CLI's errors ----------------------------------------------------------------------
@pytest.mark.parametrize("args,fragment", [
    (["simulate", "--ds", "abc"], "Invalid value for '--ds': 'abc' is not a valid float"),
    (["simulate", "--dpth", "3"], "No such option '--dpth'"),
    (["simulate", "--init", "gaussian"], "Invalid value for '--init'"),
    (["plot"], "Missing argument 'FILE'"),
])
def test_click_usage_errors_are_one_line(args: list[str], fragment: str) -> None:
    res = cli(*args)
    assert res.exit_code == 2
    line = one_error_line(res.stderr)
    assert fragment in line
    assert line.endswith(f"; see 'mfres {args[0]} --help'")
    assert res.stdout == ""


def test_click_usage_error_in_a_real_process() -> None:
    res = process("simulate", "--ds", "abc")
    assert res.returncode == 2
    assert one_error_line(res.stderr) == ("Error: Invalid value for '--ds': 'abc' is not a valid float; "
                                          "see 'mfres simulate --help'")
    assert res.stdout == ""


def test_taken_out_is_refused_before_any_work(run_file: Path) -> None:
    before = run_file.read_bytes()
    res = cli("simulate", *SMALL, "--out", str(run_file))  # not --quiet: no header, no bar either
    assert res.exit_code == 2
    assert "exists; pass --overwrite to replace it" in one_error_line(res.stderr)
    assert res.stdout == ""
    assert run_file.read_bytes() == before
    res = cli("simulate", *SMALL, "--out", str(run_file), "--overwrite", "--resume")
    assert res.exit_code == 2 and "exclude each other" in one_error_line(res.stderr)
    proc = process("simulate", *SMALL, "--out", str(run_file))
    assert proc.returncode == 2 and "exists" in one_error_line(proc.stderr) and proc.stdout == ""
    assert run_file.read_bytes() == before


def test_out_folder_and_missing_folder(tmp_path: Path) -> None:
    res = cli("simulate", *SMALL, "--out", str(tmp_path))
    assert res.exit_code == 2 and "is a directory" in one_error_line(res.stderr)
    with pytest.raises(ConfigError, match="is a folder; out must name a file"):
        mfres.simulate(str(tmp_path), steps=1)
    res = cli("simulate", *SMALL, "--out", str(tmp_path / "no" / "r.nc"))
    assert res.exit_code == 4 and "does not exist" in one_error_line(res.stderr)


def test_zero_steps_evaluates_the_initial_net(tmp_path: Path) -> None:
    out = tmp_path / "zero.nc"
    res = cli("simulate", *SMALL[:-4], "--steps", "0", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "no steps (--steps 0): the initial net's loss is" in res.stderr
    with xr.open_dataset(out) as ds:
        assert ds.sizes["step"] == 1 and list(ds["snapshot_step"].values) == [0]
        assert ds.attrs["status"] == "finished"
    info = cli("info", str(out))
    assert "snapshots: 1 at steps 0\n" in info.stdout


def _printing_select(*args, **kwargs):
    """A backend selection that prints like juliapkg does, then uses NumPy."""
    from mfres.backends.numpy_backend import NumpyBackend

    print("[juliapkg] Locating Julia ^1.10.3")
    return NumpyBackend()


def test_library_output_goes_to_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mfres.backends

    monkeypatch.setattr(mfres.backends, "select", _printing_select)
    res = cli("simulate", *SMALL, "--out", str(tmp_path / "r.nc"))
    assert res.exit_code == 0, res.output
    assert res.stdout == ""
    assert "[juliapkg] Locating Julia" in res.stderr
    res = cli("simulate", *SMALL, "--quiet", "--out", str(tmp_path / "q.nc"))  # --quiet: not at all
    assert res.exit_code == 0 and res.stdout == "" and res.stderr == ""


def test_library_and_child_output_goes_to_stderr_in_a_process(tmp_path: Path) -> None:
    """Python prints and a child process writing to file descriptor 1 both land on stderr."""
    code = ("import os, sys, mfres.backends as b\n"
            "from mfres.backends.numpy_backend import NumpyBackend\n"
            "def select(*a, **k):\n"
            "    print('[juliapkg] Locating Julia')\n"
            "    os.system('echo from-a-child-process')\n"
            "    return NumpyBackend()\n"
            "b.select = select\n"
            "from mfres.cli import main\n"
            "sys.argv = ['mfres'] + sys.argv[1:]\n"
            "main()\n")
    res = process("simulate", *SMALL, "--out", str(tmp_path / "r.nc"), code=code)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""
    assert "[juliapkg] Locating Julia" in res.stderr and "from-a-child-process" in res.stderr
    assert "wrote" in res.stderr
    res = process("simulate", *SMALL, "--quiet", "--out", str(tmp_path / "q.nc"), code=code)
    assert res.returncode == 0 and res.stdout == "" and res.stderr == "", res.stderr
    res = process("info", code=code)  # stdout is left alone outside runs
    assert res.returncode == 0 and res.stdout.startswith("mfres ")


def test_backend_error_is_one_line_exit_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mfres.backends

    def refuse(*args, **kwargs):
        raise BackendError("--device cuda needs the Julia backend, which is not usable here")

    monkeypatch.setattr(mfres.backends, "select", refuse)
    out = tmp_path / "r.nc"
    res = cli("simulate", *SMALL, "--device", "cuda", "--out", str(out))
    assert res.exit_code == 3
    assert "--device cuda needs the Julia backend" in one_error_line(res.stderr)
    assert res.stdout == "" and not out.exists()


def test_cuda_with_default_backend_does_not_run_numpy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MFRES_JULIA_TRANSPORT", "none")  # no Julia: auto would mean NumPy, which has no GPU
    out = tmp_path / "r.nc"
    res = cli("simulate", *SMALL, "--device", "cuda", "--out", str(out))
    assert res.exit_code == 3
    one_error_line(res.stderr)
    assert not out.exists()


# -- mfres plot: options checked against the file -------------------------------------------
@pytest.mark.parametrize("args,fragment", [
    (["--kind", "clouds", "--at-s", "abc"], "--at-s must be a comma list of numbers, got 'abc'"),
    (["--kind", "clouds", "--at-s", "999"], "--at-s 999 is outside the run's snapshots: s = 0 to 10"),
    (["--kind", "clouds", "--at-s", "-1"], "--at-s -1 is outside the run's snapshots"),
    (["--kind", "clouds", "--at-s", "2.5,3"], "picks the snapshot at s = 2.5 again"),
    (["--kind", "weights", "--layers", "99,-1"], "--layers 99 is not a layer of this run: it has layers 0..3"),
    (["--kind", "clouds", "--layers", "0,-1"], "--layers -1 is not a layer of this run"),
    (["--kind", "weights", "--layers", "a,b"], "--layers must be a comma list of integers"),
    (["--kind", "loss", "--at-s", "1"], "--at-s applies to --kind clouds, success, rates and size, not loss"),
    (["--kind", "loss", "--layers", "1"], "--layers applies to --kind weights and clouds"),
    (["--kind", "weights", "--animate", "a.gif"], "--animate applies to --kind clouds"),
    (["--kind", "clouds", "--animate", "a.txt"], "the file type must be .gif, .mp4"),
    (["--kind", "clouds", "--out", "a.jpeg"], "the file type must be .png, .pdf, .svg"),
    (["--kind", "success"], "needs a sweep file"),
])
def test_plot_options_are_checked(run_file: Path, tmp_path: Path, args: list[str], fragment: str) -> None:
    args = [a if not a.startswith("a.") else str(tmp_path / a) for a in args]
    res = cli("plot", str(run_file), *args)
    assert res.exit_code == 2, res.output
    assert fragment in one_error_line(res.stderr)
    assert not list(tmp_path.iterdir())  # nothing written


def test_plot_missing_file_is_a_storage_error(tmp_path: Path) -> None:
    res = cli("plot", str(tmp_path / "none.nc"))
    assert res.exit_code == 4 and "no such run file" in one_error_line(res.stderr)


def test_clouds_at_chosen_times_and_layers(run_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.png"
    res = cli("plot", str(run_file), "--kind", "clouds", "--at-s", "0,10", "--layers", "0,3", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ds = mfres.open_run(str(run_file), load=True)
    fig = mfres.plot_clouds(ds, at_s=[0, 10], layers=[0, 3])
    axes = [ax for ax in fig.axes if ax.get_title().startswith("$s")]
    assert [ax.get_title() for ax in axes] == ["$s = 0$", "$s = 10$"]
    # the panel shows exactly the chosen layers' particles of that snapshot
    shown = axes[-1].collections[0].get_offsets()
    assert len(shown) == 2 * ds.sizes["particle"]
    np.testing.assert_allclose(np.sort(shown[:, 1]), np.sort(ds["b"].isel(snapshot=-1, layer=[0, 3]).values.ravel()))
    legend = [t.get_text() for t in axes[-1].get_legend().get_texts()]
    assert legend == ["$l=0$ ($t=0.00$)", "$l=3$ ($t=0.75$)"]


def test_animation_gif_has_one_frame_per_snapshot(run_file: Path, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "clouds.gif"
    res = cli("plot", str(run_file), "--kind", "clouds", "--layers", "0,2", "--animate", str(out), "--fps", "4")
    assert res.exit_code == 0, res.output
    with xr.open_dataset(run_file) as ds:
        snapshots = ds.sizes["snapshot"]
    with Image.open(out) as im:
        assert im.format == "GIF" and im.n_frames == snapshots
        assert im.info["duration"] == 250


def test_animation_mp4_needs_ffmpeg(run_file: Path, tmp_path: Path) -> None:
    from matplotlib import animation

    out = tmp_path / "clouds.mp4"
    res = cli("plot", str(run_file), "--kind", "clouds", "--animate", str(out))
    if animation.writers.is_available("ffmpeg"):
        assert res.exit_code == 0 and out.stat().st_size > 0
    else:
        assert res.exit_code == 2 and "needs ffmpeg" in one_error_line(res.stderr)
        assert not out.exists()


def test_figures_on_files_with_snapshot_and_layer_coordinates(run_file: Path, tmp_path: Path) -> None:
    """The run figures select by position and by names present in both file layouts."""
    ds = mfres.open_run(str(run_file), load=True)
    coords = ds.assign_coords(layer=np.arange(ds.sizes["layer"]), snapshot=np.arange(ds.sizes["snapshot"]))
    coords = coords.set_coords([v for v in ("snapshot_step", "snapshot_s", "t", "s") if v in coords.data_vars])
    for one in (ds, coords):
        for fig in (mfres.plot_loss(one), mfres.plot_weights(one, layers=[1]), mfres.plot_clouds(one, at_s=[5])):
            assert fig.axes
    gif = mfres.save_figure(mfres.animate_clouds(coords, layers=[0]), str(tmp_path / "a.gif"))
    from PIL import Image

    with Image.open(gif) as im:
        assert im.n_frames == coords.sizes["snapshot"]


# -- the Python API ----------------------------------------------------------------------------
def test_import_is_cheap() -> None:
    res = process(code="import sys, mfres; print(sorted(m for m in ('numpy', 'xarray', 'matplotlib', 'dask', "
                       "'juliacall', 'netCDF4', 'tqdm') if m in sys.modules))")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_api_names_and_docstrings() -> None:
    for name in ("simulate", "sweep", "analyze", "open_run", "open_sweep", "plot_loss", "plot_weights",
                 "plot_clouds", "animate_clouds", "plot_success", "plot_rates", "save_figure"):
        fn = getattr(mfres, name)
        assert callable(fn) and fn.__doc__ and len(fn.__doc__) > 40, name
    importlib.import_module("mfres.sweep")  # importing the submodule does not rebind the API function

    assert mfres.sweep.__doc__.startswith("Run a grid of nets") and mfres.sweep.SweepSpec.__name__ == "SweepSpec"


def test_python_terms() -> None:
    assert (python_terms("r.nc exists; pass --overwrite (or --resume)")
            == "r.nc exists; pass overwrite=True (or resume=True)")
    assert python_terms("--at-s 9 and --snapshot-every; /tmp/a--b.nc") == "at_s 9 and snapshot_every; /tmp/a--b.nc"


def test_api_errors_name_keywords(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^depth must be positive, got 0$"):
        mfres.simulate(depth=0)
    out = tmp_path / "r.nc"
    out.write_bytes(b"")
    with pytest.raises(ConfigError) as e:
        mfres.simulate(str(out), depth=2, width=2, steps=1)
    assert "pass overwrite=True to replace it (or resume=True" in str(e.value) and "--" not in str(e.value)
    ds = mfres.simulate(dim=2, samples=8, depth=2, width=3, steps=10, ds=0.5)
    with pytest.raises(ConfigError, match="at_s 99 is outside"):
        mfres.plot_clouds(ds, at_s=[99])
    with pytest.raises(ConfigError, match="layers 7 is not a layer"):
        mfres.plot_weights(ds, layers=[7])
    one = mfres.plot_clouds(ds, at_s=5, layers=1)  # single values are accepted as such
    assert [ax.get_title() for ax in one.axes if ax.get_title()] == ["$s = 5$"]


def test_api_progress(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    opts = {"dim": 2, "samples": 8, "depth": 2, "width": 3, "steps": 40, "ds": 0.5}
    mfres.simulate(**opts)
    mfres.simulate(progress=False, **opts)
    quiet = capfd.readouterr()
    assert quiet.out == "" and quiet.err == ""
    mfres.simulate(progress=True, **opts)
    bar = capfd.readouterr()
    assert bar.out == "" and "training" in bar.err and "40/40" in bar.err and "E=" in bar.err
    calls: list[tuple[int, int]] = []
    ds = mfres.simulate(progress=lambda step, steps, loss, rate: calls.append((step, steps)), **opts)
    assert calls and calls[-1] == (40, 40) and [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert ds.sizes["step"] == 41
    with pytest.raises(ConfigError, match="progress must be True, False, None or a callable"):
        mfres.simulate(progress="yes", **opts)


def test_api_resume_progress_starts_at_the_file(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "r.nc")
    opts = {"dim": 2, "samples": 8, "depth": 2, "width": 3, "ds": 0.5, "snapshot_every": 10}
    mfres.simulate(out, steps=20, **opts)
    capfd.readouterr()
    ds = mfres.simulate(out, steps=30, resume=True, progress=True, **opts)
    assert ds.sizes["step"] == 31 and "30/30" in capfd.readouterr().err


def test_api_sweep_and_analyze(tmp_path: Path) -> None:
    out = str(tmp_path / "sweep.nc")
    sw = mfres.sweep(out, depth=[2, 4], width=[4, 8], seeds=2, dim=2, samples=8, steps=20, ds=0.5, workers=1)
    assert set(sw["status"].values.ravel()) == {"ok"} and sw["loss"].shape == (2, 2, 2, 21)
    res = mfres.analyze(out, eps=10.0, eta=0.1)  # every run is below a loss of 10
    np.testing.assert_array_equal(res["success"].values, np.ones((2, 2)))
    assert res.attrs["eps"] == 10.0
    again = mfres.analyze(mfres.open_sweep(out), eps=10.0, eta=0.1)
    np.testing.assert_array_equal(again["success"].values, res["success"].values)
    with pytest.raises(ConfigError, match="eps must be positive"):
        mfres.analyze(out, eps=-1)
