"""Durable run files: a SIGKILL at any write-type system call, one writer at a time, honest status.

The kill-point scan runs the same small run under ``strace``, killing it at the k-th call of
each write-type system call; after each kill the file (if any) must open and load with
``mfres.open_run``, and ``--resume`` must finish with the unbroken run's numbers.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import mfres

CLI = [sys.executable, "-m", "mfres.cli"]
RUN = ["simulate", "-L", "3", "-M", "6", "-d", "2", "-N", "8", "--steps", "60", "--snapshot-every", "10",
       "--ds", "0.5", "--backend", "numpy", "--quiet"]
# every write-type system call; each group is counted and injected as one
SYSCALLS = ["pwrite64", "write", "rename,renameat,renameat2", "fsync,fdatasync", "ftruncate", "unlink,unlinkat"]
LONG = ["simulate", "-L", "4", "-M", "16", "-d", "3", "-N", "24", "--ds", "0.5", "--quiet", "--backend", "numpy",
        "--snapshot-every", "50"]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", MFRES_DURABLE_SECONDS="0")
    e.update(extra)
    return e


def mfres_cli(*args: str, timeout: float = 120, **kw: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env(**kw))


def syscall_counts(out: Path) -> dict[str, int]:
    """How often the small run makes each write-type system call (strace -c)."""
    report = out.parent / "counts.txt"
    names = ",".join(SYSCALLS)
    res = subprocess.run(["strace", "-f", "-qq", "-c", "-o", str(report), "-e", f"trace={names}", *CLI, *RUN,
                          "--out", str(out)], capture_output=True, text=True, timeout=120, env=env())
    assert res.returncode == 0, res.stderr
    counts: dict[str, int] = {}
    for line in report.read_text().splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
        if m:
            counts[m.group(2)] = int(m.group(1))
    return {group: sum(counts.get(n, 0) for n in group.split(",")) for group in SYSCALLS}


def load_everything(path: Path) -> xr.Dataset:
    ds = mfres.open_run(str(path), load=True)
    for name in ds.variables:
        np.asarray(ds[name].values)
    return ds


def kill_points(counts: dict[str, int], per_call: int) -> list[tuple[str, int]]:
    points = []
    for group, n in counts.items():
        if n:
            ks = sorted({round(float(k)) for k in np.linspace(1, n, min(per_call, n))})
            points += [(group, k) for k in ks]
    return points


def scan(tmp_path: Path, per_call: int) -> None:
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed: the kill-point scan needs it (apt-get install strace)")
    ref_path = tmp_path / "unbroken.nc"
    counts = syscall_counts(ref_path)
    assert counts["pwrite64"] > 0 and counts["fsync,fdatasync"] > 0 and counts["rename,renameat,renameat2"] > 0
    ref = load_everything(ref_path)
    assert ref.attrs["status"] == "finished"
    seen_files = 0
    for group, k in kill_points(counts, per_call):
        out = tmp_path / f"killed-{group.split(',')[0]}-{k}.nc"
        res = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "-e", f"trace={group}",
                              "-e", f"inject={group}:signal=KILL:when={k}", *CLI, *RUN, "--out", str(out)],
                             capture_output=True, text=True, timeout=120, env=env())
        where = f"killed at {group} #{k} (rc {res.returncode})"
        assert "Traceback" not in res.stderr, (where, res.stderr)
        if out.exists():
            seen_files += 1
            ds = load_everything(out)  # the published file plus every durable segment
            n = ds.sizes["step"]
            pending = len(list(Path(mfres.store.layout.sidecar(str(out))).glob("seg-*.npz")))
            print(f"{where}: file at step {n - 1}, {ds.attrs['status']}, {pending} segment files")
            assert n == int(ds.attrs["steps_done"]) + 1, where
            np.testing.assert_array_equal(ds["loss"].values, ref["loss"].values[:n], err_msg=where)
            assert set(ds["snapshot_step"].values) <= set(ref["snapshot_step"].values), where
        again = subprocess.run([*CLI, *RUN, "--out", str(out), "--resume"], capture_output=True, text=True,
                               timeout=120, env=env())
        assert again.returncode == 0, (where, again.stderr)
        final = load_everything(out)
        assert final.attrs["status"] == "finished", where
        np.testing.assert_allclose(final["loss"].values, ref["loss"].values, rtol=1e-12, atol=0, err_msg=where)
        np.testing.assert_allclose(final["grad_norm"].values, ref["grad_norm"].values, rtol=1e-12, err_msg=where)
        np.testing.assert_allclose(final["U"].isel(snapshot=-1).values, ref["U"].isel(snapshot=-1).values,
                                   rtol=1e-12, err_msg=where)
        assert list(final["snapshot_step"].values) == list(ref["snapshot_step"].values), where
    assert seen_files > 0


def test_kill_at_write_syscalls_fast_subset(tmp_path: Path) -> None:
    scan(tmp_path, per_call=2)


@pytest.mark.slow
def test_kill_at_write_syscalls_full_scan(tmp_path: Path) -> None:
    scan(tmp_path, per_call=4)


def start_long(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *LONG, "--steps", "5000000", "--out", str(out), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env(MFRES_DURABLE_SECONDS="0.2"))


def wait_for_file(out: Path, proc: subprocess.Popen, steps: int = 1, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        if out.exists():
            try:
                if int(mfres.open_run(str(out)).attrs["steps_done"]) >= steps:
                    return
            except mfres.errors.StorageError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"{out} did not appear")


def test_second_writer_refused_while_first_runs(tmp_path: Path) -> None:
    out = tmp_path / "busy.nc"
    first = start_long(out)
    try:
        wait_for_file(out, first, steps=100)
        for extra in ([], ["--overwrite"], ["--resume"]):
            res = mfres_cli(*LONG, "--steps", "100", "--out", str(out), *extra)
            assert res.returncode == 4, (extra, res.stderr)
            assert "is being written by another mfres process" in res.stderr, res.stderr
            assert f"(pid {first.pid})" in res.stderr and res.stderr.count("\n") == 1, res.stderr
        assert first.poll() is None  # untouched, still running
    finally:
        first.kill()
        first.wait()
    # the kernel dropped the dead writer's lock: info says so, and --resume takes over
    info = mfres_cli("info", str(out))
    assert info.returncode == 0
    assert "status: running" in info.stdout and "stopped without closing" in info.stdout, info.stdout
    assert "--resume" in info.stdout
    done = int(mfres.open_run(str(out)).attrs["steps_done"])
    res = mfres_cli(*LONG, "--steps", str(done + 30), "--out", str(out), "--resume")
    assert res.returncode == 0, res.stderr
    assert "stopped without closing" not in mfres_cli("info", str(out)).stdout


def test_plain_xarray_reads_the_file_while_the_run_writes_it(tmp_path: Path) -> None:
    out = tmp_path / "live.nc"
    proc = start_long(out)
    try:
        wait_for_file(out, proc, steps=200)
        code = ("import sys, xarray as xr\n"
                "ds = xr.open_dataset(sys.argv[1])\n"
                "for v in ds.variables: ds[v].values\n"
                "print(ds.attrs['status'], ds.sizes['step'])\n")
        for _ in range(3):
            res = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                                 timeout=60, env={k: v for k, v in os.environ.items()
                                                  if k != "HDF5_USE_FILE_LOCKING"})
            assert res.returncode == 0, res.stderr
            status, n = res.stdout.split()
            assert status == "running" and int(n) >= 1
            time.sleep(0.3)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "interrupted by SIGINT" in err


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 3 MiB file system (tmpfs), mounted for the test; skipped where mounting is not allowed."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_stop_is_recorded_as_failed(small_disk: Path) -> None:
    out = small_disk / "full.nc"
    res = mfres_cli("simulate", "-L", "8", "-M", "64", "-d", "4", "--steps", "100000", "--snapshot-every", "100",
                    "--quiet", "--backend", "numpy", "--out", str(out), timeout=300)
    assert res.returncode == 4, res.stderr
    assert res.stderr.startswith("Error: disk full") and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1
    ds = load_everything(out)
    assert ds.attrs["status"] == "failed" and "disk full" in ds.attrs["status_message"]
    done = int(ds.attrs["state_step"])
    assert done > 0 and ds.sizes["step"] == done + 1
    assert np.all(np.isfinite(ds["loss"].values))
    info = mfres_cli("info", str(out))
    assert "status: failed" in info.stdout and "stopped without closing" not in info.stdout


def test_a_reader_racing_a_publication_reads_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A publication that lands between a reader's opening of the published file and its
    listing of the segments (which that publication absorbed and removed) must not show the
    reader fewer steps than are durable: ``open_run`` sees the file replaced and reads again."""
    from mfres.store import reader

    out = tmp_path / "r.nc"
    code = f"""
import os
from mfres.backends.numpy_backend import NumpyBackend
from mfres.config import RunConfig
from mfres.store import writer
from mfres.train import run
writer.DURABLE_SECONDS, writer.PUBLISH_SECONDS = 0, 1e9  # a segment at each chunk boundary, kept
writer.RunWriter.finish = lambda self, *a, **k: os._exit(0)  # dies before its last publication
run(RunConfig(depth=3, width=6, dim=2, samples=8, steps=30, snapshot_every=5, backend="numpy"),
    {str(out)!r}, backend=NumpyBackend())
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env())
    assert res.returncode == 0, res.stderr
    whole = load_everything(out)
    durable = int(whole.attrs["steps_done"])  # in segments beyond the published file
    assert durable >= 20 and int(reader.read_attrs(str(out))["steps_done"]) < durable
    real, calls = reader.pending_segments, []

    def racing(path: str, attrs: dict) -> reader.Pending:
        calls.append(path)
        if len(calls) == 1:  # as a publication would: a new file renamed over it, its segments gone
            shutil.copy2(path, str(out) + ".new")
            os.replace(str(out) + ".new", path)
            return reader.Pending(tip=int(attrs["steps_done"]))
        return real(path, attrs)

    monkeypatch.setattr(reader, "pending_segments", racing)
    seen = mfres.open_run(str(out), load=True)
    assert len(calls) >= 2 and int(seen.attrs["steps_done"]) == durable
    np.testing.assert_array_equal(seen["loss"].values, whole["loss"].values)
