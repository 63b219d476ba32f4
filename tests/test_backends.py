"""Backend selection and the Python side of the Julia bridge (what runs without Julia)."""

from __future__ import annotations

import json
import os
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
    res = run_py(f"""
        import sys, mfres
        mfres.simulate(out={str(tmp_path / 'r.nc')!r}, depth=2, width=3, steps=3, backend='auto')
        assert 'juliacall' not in sys.modules and 'juliapkg' not in sys.modules, 'juliacall imported'
        import mfres.cli, mfres.report
        print(mfres.open_run({str(tmp_path / 'r.nc')!r}).attrs['backend'])
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ("julia" if jb.usable_without_download() else "numpy")


def test_julia_backend_where_julia_cannot_start_fails_fast(tmp_path: Path) -> None:
    if jb.usable_without_download():
        pytest.skip("Julia is usable here; the failure path cannot be shown")
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "mfres.cli", "simulate", "--backend", "julia", "--quiet",
                          "--out", str(tmp_path / "j.nc")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHON_JULIAPKG_OFFLINE": "yes"})
    elapsed = time.monotonic() - t0
    assert res.returncode == 3, res.stderr
    assert res.stderr.startswith("Error: the Julia backend cannot start") and "--backend numpy" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "j.nc").exists()
    print(f"--backend julia failed after {elapsed:.1f} s")


def test_juliacall_options_are_set_before_its_import(tmp_path: Path) -> None:
    """A stand-in juliacall records the environment it is imported with: the bridge's options
    (threads, signal handling) must already be there."""
    fake = tmp_path / "fake"
    (fake / "juliacall").mkdir(parents=True)
    (fake / "juliacall" / "__init__.py").write_text(textwrap.dedent("""
        import json, os
        seen = {k: v for k, v in os.environ.items() if k.startswith("PYTHON_JULIACALL_")}
        open(os.environ["FAKE_JULIACALL_LOG"], "w").write(json.dumps(seen))
        raise ImportError("stand-in juliacall: no Julia here")
    """))
    log = tmp_path / "seen.json"
    res = run_py("""
        from mfres.backends import julia_backend
        from mfres.errors import BackendError
        try:
            julia_backend.start_julia(threads=2)
        except BackendError as e:
            print(e)
    """, env={"PYTHONPATH": f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "FAKE_JULIACALL_LOG": str(log)})
    assert res.returncode == 0, res.stderr
    assert "stand-in juliacall" in res.stdout
    seen = json.loads(log.read_text())
    assert seen["PYTHON_JULIACALL_THREADS"] == "2"
    assert seen["PYTHON_JULIACALL_HANDLE_SIGNALS"] == "yes"


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
