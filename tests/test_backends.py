"""Backend selection and the Python side of the Julia bridge (what runs without Julia)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mfres.backends import julia_backend as jb

ROOT = Path(__file__).resolve().parent.parent


def run_py(code: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def test_numpy_run_never_imports_juliacall(tmp_path: Path) -> None:
    """Julia hidden (MFRES_JULIA_TRANSPORT=none, set for every test that does not ask for Julia):
    auto is NumPy and nothing imports juliacall/juliapkg."""
    res = run_py(f"""
        import sys, mfres
        mfres.simulate(out={str(tmp_path / 'r.nc')!r}, depth=2, width=3, steps=3, backend='auto')
        assert 'juliacall' not in sys.modules and 'juliapkg' not in sys.modules, 'juliacall imported'
        import mfres.cli, mfres.report
        print(mfres.open_run({str(tmp_path / 'r.nc')!r}).attrs['backend'])
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "numpy"


NO_JULIA = {"MFRES_JULIA": "", "JULIA": "", "PYTHON_JULIAPKG_EXE": "", "PYTHON_JULIAPKG_OFFLINE": "yes"}


def _path_without_julia(tmp_path: Path) -> str:
    """PATH with a stand-in python only: no julia on it."""
    bindir = tmp_path / "nojulia"
    bindir.mkdir(exist_ok=True)
    return f"{bindir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}/usr/bin{os.pathsep}/bin"


@pytest.mark.julia_auto
def test_julia_backend_without_any_julia_fails_fast(tmp_path: Path) -> None:
    """No juliacall environment and no Julia executable: --backend julia and --device cuda are one-line
    errors saying why; auto is NumPy."""
    env = {**NO_JULIA, "PATH": _path_without_julia(tmp_path), "MFRES_JULIA_TRANSPORT": ""}
    if shutil.which("julia", path=env["PATH"]):
        pytest.skip("julia is in /usr/bin or /bin here")
    t0 = time.monotonic()
    for args, msg in ((["--backend", "julia"], "Error: --backend julia: no usable Julia here"),
                      (["--backend", "auto", "--device", "cuda"], "Error: --device cuda needs the Julia backend")):
        out = tmp_path / "j.nc"
        res = subprocess.run([sys.executable, "-m", "mfres.cli", "simulate", *args, "--quiet", "--out", str(out)],
                             capture_output=True, text=True, timeout=300, env={**os.environ, **env})
        assert res.returncode == 3, res.stderr
        assert res.stderr.startswith(msg) and "MFRES_JULIA" in res.stderr and "--backend numpy" in res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
        assert not out.exists()
    print(f"two failures in {time.monotonic() - t0:.1f} s")
    res = run_py("""
        from mfres.backends import select, describe
        print(type(select("auto")).__name__)
        print(describe())
    """, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "NumpyBackend" and "not usable here" in res.stdout


def test_device_cuda_never_runs_numpy() -> None:
    from mfres.backends import select
    from mfres.errors import BackendError

    with pytest.raises(BackendError, match="CPU only"):
        select("numpy", device="cuda")
    with pytest.raises(BackendError, match="--device cuda needs the Julia backend"):
        select("auto", device="cuda")  # Julia hidden (MFRES_JULIA_TRANSPORT=none)
    with pytest.raises(BackendError, match="unknown device"):
        select("auto", device="tpu")


FAKE_JULIACALL = """
import json, os, signal
seen = {k: v for k, v in os.environ.items() if k.startswith("PYTHON_JULIACALL_")}
open(os.environ["FAKE_JULIACALL_LOG"], "w").write(json.dumps(seen))
if os.environ.get("FAKE_JULIACALL_FAIL"):
    raise ImportError("stand-in juliacall: no Julia here")
if seen.get("PYTHON_JULIACALL_HANDLE_SIGNALS") == "yes":
    # what Julia's signal handling does to the thread that starts it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGQUIT})

class _Bridge:
    MFRes = "MFRes"
    def include(self, path):
        self.path = path
    def seval(self, code):
        assert code == "Threads.nthreads()"
        return int(os.environ.get("FAKE_JULIA_THREADS", "1"))

def newmodule(name):
    return _Bridge()
"""


def _fake_juliacall(tmp_path: Path) -> dict[str, str]:
    fake = tmp_path / "fake"
    (fake / "juliacall").mkdir(parents=True, exist_ok=True)
    (fake / "juliacall" / "__init__.py").write_text(FAKE_JULIACALL)
    return {"PYTHONPATH": f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "FAKE_JULIACALL_LOG": str(tmp_path / "seen.json"), "PYTHON_JULIACALL_THREADS": "",
            "PYTHON_JULIACALL_HANDLE_SIGNALS": "", "JULIA_NUM_THREADS": ""}


@pytest.mark.parametrize("threads, julia_num_threads, want_threads, want_signals", [
    (2, "", "2", "yes"),          # --threads 2: Julia handles signals (needed with threads)
    (1, "", "1", None),           # one thread: Python keeps its signal handling
    (None, "3", None, "yes"),     # the user's JULIA_NUM_THREADS is respected (juliacall reads it)
    (None, "", None, None),       # juliacall's default: 1 thread
])
def test_juliacall_options_are_set_before_its_import(tmp_path: Path, threads: int | None, julia_num_threads: str,
                                                     want_threads: str | None, want_signals: str | None) -> None:
    """A stand-in juliacall records the environment it is imported with: the bridge's options
    (threads, signal handling only with more than one thread) must already be there."""
    env = {**_fake_juliacall(tmp_path), "FAKE_JULIACALL_FAIL": "1", "JULIA_NUM_THREADS": julia_num_threads}
    res = run_py(f"""
        from mfres.backends import julia_backend
        from mfres.errors import BackendError
        try:
            julia_backend.start_julia(threads={threads})
        except BackendError as e:
            print(e)
    """, env=env)
    assert res.returncode == 0, res.stderr
    assert "stand-in juliacall" in res.stdout
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen.get("PYTHON_JULIACALL_THREADS", "") == (want_threads or "")
    assert seen.get("PYTHON_JULIACALL_HANDLE_SIGNALS", "") == (want_signals or "")


def test_juliacall_start_unblocks_stop_signals_and_warns_about_threads(tmp_path: Path) -> None:
    """With Julia handling signals (threads > 1) SIGINT/SIGTERM are unblocked on the main thread after the
    start, so the training loop's handlers work; a second --threads cannot take effect and says so."""
    env = {**_fake_juliacall(tmp_path), "FAKE_JULIA_THREADS": "2"}
    res = run_py("""
        import signal, warnings
        from mfres.backends import julia_backend
        julia_backend.start_julia(threads=2)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        print(signal.SIGINT in blocked, signal.SIGTERM in blocked, signal.SIGQUIT in blocked)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            julia_backend.start_julia(threads=1)
        print(str(w[0].message))
    """, env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "False False True"
    assert "--threads 1 cannot take effect" in lines[1] and "2 thread(s)" in lines[1]


def test_threads_warning_when_juliacall_was_imported_first(tmp_path: Path) -> None:
    env = {**_fake_juliacall(tmp_path)}
    res = run_py("""
        import warnings
        import juliacall
        from mfres.backends import julia_backend
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            julia_backend.start_julia(threads=2)
        print(str(w[0].message))
    """, env=env)
    assert res.returncode == 0, res.stderr
    assert "juliacall was imported before" in res.stdout


def test_cuda_without_cuda_jl_tells_the_command_before_julia_starts(tmp_path: Path) -> None:
    """--device cuda through juliacall without CUDA.jl resolved: the one juliapkg command, and Julia
    (juliacall) is never imported, so nothing is installed into a live session."""
    env = {**_fake_juliacall(tmp_path), "PYTHON_JULIAPKG_PROJECT": str(tmp_path / "jlenv")}
    res = run_py("""
        import sys
        from mfres.backends import julia_backend
        from mfres.errors import BackendError
        try:
            julia_backend.JuliaBackend(device="cuda")
        except BackendError as e:
            print(e)
        print("juliacall" in sys.modules)
    """, env=env)
    assert res.returncode == 0, res.stderr
    msg, imported = res.stdout.splitlines()
    assert "--device cuda needs CUDA.jl" in msg
    assert f"juliapkg.add('CUDA', '{jb.CUDA_UUID}'); juliapkg.resolve()" in msg
    assert imported == "False" and not (tmp_path / "seen.json").exists()


def test_julia_version_parsing_and_compatibility(tmp_path: Path) -> None:
    fake = tmp_path / "julia"
    fake.write_text("#!/bin/sh\necho 'julia version 1.10.2'\n")
    fake.chmod(0o755)
    assert jb.julia_version(str(fake)) == (1, 10, 2)
    assert not jb.juliacall_compatible((1, 10, 2))
    assert not jb.juliacall_compatible((1, 5, 3))
    assert jb.juliacall_compatible((1, 10, 3)) and jb.juliacall_compatible((1, 11, 0))
    assert jb.julia_version(str(tmp_path / "missing")) is None


def test_auto_ignores_old_julia_on_path(tmp_path: Path) -> None:
    """A Julia 1.5 on PATH (as in CI) must not make --backend auto try juliacall."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "julia"
    fake.write_text("#!/bin/sh\necho 'julia version 1.5.3'\n")
    fake.chmod(0o755)
    res = run_py("""
        from mfres.backends import julia_backend
        print(julia_backend.find_julia(), julia_backend.usable_without_download())
    """, env={"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "PYTHON_JULIAPKG_EXE": ""})
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["None", "False"]


def test_julia_sources_found_from_checkout() -> None:
    src = jb.julia_source_dir()
    assert (src / "MFRes.jl").is_file() and (src / "bridge.jl").is_file()


def test_info_reports_backends() -> None:
    res = subprocess.run([sys.executable, "-m", "mfres.cli", "info"], capture_output=True, text=True)
    assert res.returncode == 0
    assert "numpy backend: available" in res.stdout and "julia backend:" in res.stdout
