"""Long runs that survive: resume, real kills and signals, bounded memory (a full disk: test_durability)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

import mfres
from mfres.cli import main

CLI = [sys.executable, "-m", "mfres.cli"]
FREQUENT = dict(os.environ, MFRES_DURABLE_SECONDS="0.2")  # durable points every 0.2 s, not every 5 s
NET = ["-L", "4", "-M", "16", "-d", "3", "-N", "24", "--ds", "0.5", "--quiet"]


def simulate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "simulate", *args], capture_output=True, text=True, timeout=300)


def unbroken(tmp_path: Path, steps: int, *extra: str) -> xr.Dataset:
    out = tmp_path / f"unbroken-{steps}.nc"
    res = simulate(*NET, "--steps", str(steps), *extra, "--out", str(out))
    assert res.returncode == 0, res.stderr
    return xr.load_dataset(out)


def assert_same_trajectory(a: xr.Dataset, b: xr.Dataset) -> None:
    np.testing.assert_allclose(a["loss"].values, b["loss"].values, rtol=1e-12, atol=0)
    np.testing.assert_allclose(a["grad_norm"].values, b["grad_norm"].values, rtol=1e-12, atol=0)
    for v in ("U", "W", "b", "prediction"):
        np.testing.assert_allclose(a[v].isel(snapshot=-1).values, b[v].isel(snapshot=-1).values, rtol=1e-12)


def wait_for_steps(path: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            if path.exists() and int(mfres.open_run(str(path)).attrs["state_step"]) >= n:
                return
        except mfres.errors.StorageError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{path} did not reach step {n}")


@pytest.mark.parametrize("extra", [[], ["--snapshot-particles", "5", "--dtype", "float32"]])
def test_resume_gives_the_unbroken_run(tmp_path: Path, extra: list[str]) -> None:
    out = tmp_path / "r.nc"
    first = simulate(*NET, "--steps", "70", "--snapshot-every", "20", *extra, "--out", str(out))
    assert first.returncode == 0, first.stderr
    again = simulate(*NET, "--steps", "170", "--snapshot-every", "20", *extra, "--out", str(out), "--resume")
    assert again.returncode == 0, again.stderr
    resumed = xr.load_dataset(out)
    ref = unbroken(tmp_path, 170, "--snapshot-every", "20", *extra)
    assert resumed.attrs["status"] == "finished" and resumed.attrs["steps_done"] == 170
    assert_same_trajectory(resumed, ref)
    assert list(resumed["snapshot_step"].values) == [0, 20, 40, 60, 70, 80, 100, 120, 140, 160, 170]
    if extra:
        assert resumed.sizes["particle"] == 5 and resumed["particle_index"].size == 5
        assert resumed["U_mean"].dims == ("snapshot", "layer", "dim")


def test_resume_refuses_other_options(tmp_path: Path) -> None:
    out = tmp_path / "r.nc"
    assert simulate(*NET, "--steps", "20", "--out", str(out)).returncode == 0
    before = out.read_bytes()
    res = CliRunner().invoke(main, ["simulate", *NET, "--steps", "40", "--ds", "0.25", "--seed", "2",
                                    "--out", str(out), "--resume"])
    assert res.exit_code == 2
    assert "options differ" in res.output and "--ds 0.25 (file: 0.5)" in res.output and "--seed 2" in res.output
    assert out.read_bytes() == before
    res = CliRunner().invoke(main, ["simulate", *NET, "--steps", "10", "--out", str(out), "--resume"])
    assert res.exit_code == 2 and "beyond --steps 10" in res.output
    (tmp_path / "other.nc").write_bytes(b"junk")
    res = CliRunner().invoke(main, ["simulate", *NET, "--out", str(tmp_path / "other.nc"), "--resume"])
    assert res.exit_code == 4 and "cannot reopen" in res.output


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_and_resume_continues(tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "long.nc"
    cmd = [*CLI, "simulate", *NET, "--steps", "5000000", "--snapshot-every", "50", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=FREQUENT)
    wait_for_steps(out, 300, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert f"interrupted by {sig.name}" in err and "--resume" in err and "Traceback" not in err
    with mfres.open_run(str(out)) as ds:
        assert ds.attrs["status"] == "interrupted"
        done = int(ds.attrs["steps_done"])
        assert int(ds.attrs["state_step"]) == done == int(ds["snapshot_step"][-1])
        assert np.all(np.isfinite(ds["loss"].values[: done + 1]))
    target = done + 137
    res = simulate(*NET, "--steps", str(target), "--snapshot-every", "50", "--out", str(out), "--resume")
    assert res.returncode == 0, res.stderr
    resumed = xr.load_dataset(out)
    assert_same_trajectory(resumed.isel(step=slice(0, target + 1)), unbroken(tmp_path, target, "--snapshot-every",
                                                                             "50"))


def test_sigkill_at_random_times_then_resume(tmp_path: Path) -> None:
    """Kill real runs at random moments, many times; each time the file opens, holds finite
    steps up to its last sync, and --resume carries on; the end equals an unbroken run."""
    out = tmp_path / "killed.nc"
    args = [*NET, "--steps", "400000", "--snapshot-every", "25", "--out", str(out)]
    rng = random.Random(0)
    resumed_from = []
    for trial in range(8):
        proc = subprocess.Popen([*CLI, "simulate", *args, *(["--resume"] if trial else [])],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=FREQUENT)
        # a kill before the first durable point leaves no file (the strace scan covers that);
        # here the kills fall at random moments of training, after the file exists
        deadline = time.monotonic() + 120
        while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.1, 1.3))
        proc.kill()
        proc.wait()
        with mfres.open_run(str(out)) as ds:  # a killed run's file always opens
            state = int(ds.attrs["state_step"])
            done = int(ds.attrs["steps_done"])
            loss = ds["loss"].values
            assert done >= state >= 0
            assert np.all(np.isfinite(loss[: done + 1])), f"trial {trial}: non-finite loss before step {done}"
            resumed_from.append(state)
    assert len(set(resumed_from)) > 1 and resumed_from[-1] > 0
    target = max(resumed_from) + 300
    res = simulate(*NET, "--steps", str(target), "--snapshot-every", "25", "--out", str(out), "--resume")
    assert res.returncode == 0, res.stderr
    final = xr.load_dataset(out)
    ref = unbroken(tmp_path, target, "--snapshot-every", "25")
    assert_same_trajectory(final.isel(step=slice(0, target + 1)), ref)
    # every complete snapshot, including those written before the kills, equals the unbroken run's
    steps = final["snapshot_step"].values
    for k, st in enumerate(steps):
        if st >= 0:
            j = int(np.flatnonzero(ref["snapshot_step"].values == st)[0]) if st in ref["snapshot_step"] else None
            if j is not None:
                np.testing.assert_allclose(final["U"][k].values, ref["U"][j].values, rtol=1e-12)


@pytest.mark.slow  # 100 000 steps
def test_memory_flat_over_100000_steps(tmp_path: Path) -> None:
    """A 100 000-step run: resident memory after 10 000 steps and at the end, measured in the run's process."""
    code = textwrap.dedent(f"""
        import resource, mfres
        from mfres.config import RunConfig
        from mfres.train import run
        rss = {{}}
        def progress(step, steps, loss, rate):
            pages = int(open('/proc/self/statm').read().split()[1])
            rss[step] = pages * resource.getpagesize()
        cfg = RunConfig(depth=2, width=4, dim=2, samples=8, steps=100000, ds=0.05, snapshot_every=1000,
                        backend='numpy')
        run(cfg, {str(tmp_path / 'long.nc')!r}, progress=progress)
        early = max(v for k, v in rss.items() if 10000 <= k <= 20000)
        late = max(v for k, v in rss.items() if k >= 90000)
        print(early, late)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    early, late = map(int, res.stdout.split())
    print(f"RSS after 10-20k steps: {early / 2**20:.1f} MiB; after 90-100k steps: {late / 2**20:.1f} MiB")
    assert late - early < 4 * 2**20
    with xr.open_dataset(tmp_path / "long.nc") as ds:
        assert ds.sizes["step"] == 100001 and ds.sizes["snapshot"] == 101


def test_info_prints_status_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "r.nc"
    assert simulate(*NET, "--steps", "30", "--out", str(out)).returncode == 0
    res = subprocess.run([*CLI, "info", str(out)], capture_output=True, text=True)
    assert res.returncode == 0
    assert "status: finished" in res.stdout and "steps done: 30 of 30" in res.stdout
    res = subprocess.run([*CLI, "info", str(tmp_path / "none.nc")], capture_output=True, text=True)
    assert res.returncode == 4 and "no such run file" in res.stderr
