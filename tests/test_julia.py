"""The Julia kernels: their own suite under 1 and 2 threads, conformance with the NumPy
backend, `fatou lint`, and the wheel that carries them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from reference import autograd_loss_and_grad

from mfres import activations
from mfres.backends import Problem
from mfres.backends.numpy_backend import NumpyBackend
from mfres.data import builtin
from mfres.init import initial_particles

CASES = [
    # name, L, M, d, N, activation, init, weight decay, Δs, steps, dtype
    ("tanh-iid", 8, 16, 4, 32, "tanh", "iid", 0.0, 1.0, 40, "float64"),
    ("sigmoid-tied", 5, 12, 3, 20, "sigmoid", "tied", 0.01, 0.5, 30, "float64"),
    ("softplus-smooth", 6, 10, 2, 16, "softplus", "smooth", 0.0, 0.5, 30, "float64"),
    ("gelu-iid-wd", 4, 24, 5, 40, "gelu", "iid", 0.1, 0.3, 30, "float64"),
    ("srelu-smooth", 7, 9, 3, 25, "srelu:0.3", "smooth", 0.0, 0.5, 30, "float64"),
    ("relu2-iid", 3, 8, 2, 12, "relu2", "iid", 0.05, 0.02, 30, "float64"),
    ("tanh-float32", 8, 16, 4, 32, "tanh", "iid", 0.0, 1.0, 40, "float32"),
]


def write_case(root: Path, name: str, L: int, M: int, d: int, N: int, act: str, init: str, wd: float,
               ds: float, steps: int, dtype: str) -> None:
    """Inputs and the NumPy backend's results, as raw bytes in Julia's column-major layouts
    (the bytes of C-order (L, M, d) arrays), which is the bridge's own conversion."""
    case = root / name
    case.mkdir()
    data = builtin("sphere", N, d, data_seed=1)
    dt = np.dtype(dtype)
    theta = initial_particles(init, L, M, d, seed=2, dtype=dt)
    prob = Problem.from_data(data, activations.parse(act), wd, dt)
    backend = NumpyBackend()
    E, g = backend.loss_and_grad(theta, prob)
    arrays = {"U": theta.U, "W": theta.W, "b": theta.b, "X": prob.x, "y": prob.y, "a": prob.a,
              "gU": g.U, "gW": g.W, "gb": g.b}
    for k, v in arrays.items():
        (case / f"{k}.bin").write_bytes(np.ascontiguousarray(v).tobytes())
    traj = backend.advance(theta, prob, ds, steps)
    for k, v in {"Uf": theta.U, "Wf": theta.W, "bf": theta.b}.items():
        (case / f"{k}.bin").write_bytes(np.ascontiguousarray(v).tobytes())
    (case / "E.bin").write_bytes(np.array([E]).tobytes())
    (case / "losses.bin").write_bytes(traj.loss.tobytes())
    a = prob.activation
    rtol = 1e-12 if dtype == "float64" else 1e-4
    meta = dict(L=L, M=M, d=d, N=N, activation=a.name, eta=a.eta, weight_decay=wd, ds=ds, nsteps=steps,
                dtype=dtype, rtol=rtol)
    (case / "meta.txt").write_text("".join(f"{k}={v}\n" for k, v in meta.items()))


@pytest.fixture(scope="module")
def conformance_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("conformance")
    for case in CASES:
        write_case(root, *case)
    return root


@pytest.mark.slow  # the whole Julia suite, twice: about 10 min each on 2 busy cores
@pytest.mark.parametrize("threads", [1, 2])
def test_julia_suite_and_conformance(julia: str, conformance_dir: Path, threads: int) -> None:
    env = {**os.environ, "MFRES_CONFORMANCE_DIR": str(conformance_dir)}
    res = subprocess.run([julia, "-t", str(threads), "--startup-file=no", f"--project={ROOT}",
                          str(ROOT / "jl" / "test" / "runtests.jl")], capture_output=True, text=True, env=env,
                         timeout=900)
    print(res.stdout[-4000:])
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert res.stdout.count("conformance ") >= len(CASES)
    # Julia's trajectory, read back here: equal to the NumPy backend's to 1e-12 relative
    for name, *_, dtype in CASES:
        jl = np.fromfile(conformance_dir / name / "julia_losses.bin")
        ref = np.fromfile(conformance_dir / name / "losses.bin")
        tol = 1e-12 if dtype == "float64" else 1e-4
        np.testing.assert_allclose(jl, ref, rtol=tol)
    # and against an independent autograd replay of the same GD steps
    name, L, M, d, N, act, _init, wd, ds, steps, _ = CASES[3]
    case = conformance_dir / name
    U, W = (np.fromfile(case / f"{v}.bin").reshape(L, M, d) for v in "UW")
    b = np.fromfile(case / "b.bin").reshape(L, M)
    x, y, a = np.fromfile(case / "X.bin").reshape(N, d), np.fromfile(case / "y.bin"), np.fromfile(case / "a.bin")
    replay = []
    for _ in range(steps + 1):
        E, gU, gW, gb = autograd_loss_and_grad(U, W, b, x, y, a, act, wd)
        replay.append(E)
        U, W, b = U - ds * L * M * gU, W - ds * L * M * gW, b - ds * L * M * gb
    np.testing.assert_allclose(np.fromfile(case / "julia_losses.bin"), replay, rtol=1e-9)


def test_fatou_lint_clean() -> None:
    fatou = shutil.which("fatou") or str(Path(sys.executable).parent / "fatou")
    if not os.path.exists(fatou):
        pytest.skip("fatou is not installed (pip install fatou)")
    res = subprocess.run([fatou, "lint", "--color", "never", str(ROOT / "jl")], capture_output=True, text=True)
    assert res.returncode == 0 and "clean" in (res.stdout + res.stderr), res.stdout + res.stderr


def test_jl_sources_use_nothing_newer_than_julia_1_5() -> None:
    for path in (ROOT / "jl").rglob("*.jl"):
        text = path.read_text()
        for banned in ("@atomic", "\npublic ", "Base.@assume_effects", "import LinearAlgebra as"):
            assert banned not in text, f"{path}: {banned.strip()} is not available on Julia 1.5"
        for line in text.splitlines():
            assert not line.lstrip().startswith("using CUDA"), f"{path}: CUDA must load only on request"


def test_wheel_carries_julia_sources(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path), str(ROOT)], capture_output=True, text=True)
    if res.returncode != 0 and "hatchling" in res.stderr:
        pytest.skip("hatchling is not installed in this environment (pip install hatchling)")
    assert res.returncode == 0, res.stderr[-3000:]
    wheel = next(tmp_path.glob("mfres-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    jl_files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "jl").rglob("*.jl")}
    for f in jl_files:
        assert f"mfres/{f}" in names, f
    for f in ("mfres/Project.toml", "mfres/juliapkg.json", "mfres/cli.py", "mfres/backends/julia_backend.py"):
        assert f in names, f
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "mfres = mfres.cli:main" in entry
