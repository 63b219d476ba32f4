"""The Julia backend: ``jl/MFRes.jl`` called through juliacall.

Kept thin on purpose: it starts Julia once per process, includes the module from
the package's own ``jl/`` folder, converts θ to Julia arrays once per chunk and
calls ``MFRes.advance!``, which runs the whole chunk of GD steps in Julia.

juliacall reads its options once, at its first import, so ``start_julia`` sets
them in ``os.environ`` before importing it (threads; signal handling, which Julia
needs with more than one thread), and nothing here imports juliacall before a
Julia backend is asked for.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError
from ..model import Particles
from . import Problem, Trajectory

MIN_JULIA = (1, 10, 3)
EXCLUDED_JULIA = {(1, 10, 1), (1, 10, 2)}
CUDA_UUID = "052768ef-5323-5732-b1bb-66c8b64840ba"

_STATE: dict[str, Any] = {}


def julia_source_dir() -> Path:
    """The folder holding ``MFRes.jl``: inside the installed package, else the checkout's ``jl/``."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "jl", here.parent.parent / "jl"):
        if (candidate / "MFRes.jl").is_file():
            return candidate
    raise BackendError(f"the Julia sources (jl/MFRes.jl) are missing from this installation ({here})")


def julia_version(exe: str) -> tuple[int, int, int] | None:
    """The version that ``exe --version`` reports, or None."""
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"julia version (\d+)\.(\d+)\.(\d+)", out)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def juliacall_compatible(version: tuple[int, int, int] | None) -> bool:
    return version is not None and version >= MIN_JULIA and version not in EXCLUDED_JULIA


def _juliapkg_prefix() -> Path | None:
    """juliapkg's environment folder for this Python (where it records a resolved setup)."""
    project = os.environ.get("PYTHON_JULIAPKG_PROJECT")
    if project:
        return Path(project) / "pyjuliapkg"
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "julia_env" / "pyjuliapkg"
    conda = os.environ.get("CONDA_PREFIX")
    if conda:
        return Path(conda) / "julia_env" / "pyjuliapkg"
    depot = os.environ.get("JULIA_DEPOT_PATH", "").split(os.pathsep)[0] or str(Path.home() / ".julia")
    return Path(depot) / "environments" / "pyjuliapkg" / "pyjuliapkg"


def find_julia() -> tuple[str, tuple[int, int, int]] | None:
    """A juliacall-compatible Julia already on this machine, found the way juliapkg looks, without downloads."""
    candidates = []
    if os.environ.get("PYTHON_JULIAPKG_EXE"):
        candidates.append(os.environ["PYTHON_JULIAPKG_EXE"])
    prefix = _juliapkg_prefix()
    if prefix is not None:
        candidates.append(str(prefix / "install" / "bin" / "julia"))
    for name in ("julia",):
        found = shutil.which(name)
        if found:
            candidates.append(found)
    for exe in candidates:
        if os.path.isfile(exe) and os.access(exe, os.X_OK):
            v = julia_version(exe)
            if juliacall_compatible(v):
                assert v is not None
                return exe, v
    return None


def usable_without_download() -> bool:
    """True where juliacall is installed, juliapkg has resolved its environment before and a
    compatible Julia is present: then starting Julia downloads nothing. Cheap; starts no Julia."""
    if "juliacall" in sys.modules:
        return True
    if importlib.util.find_spec("juliacall") is None:
        return False
    prefix = _juliapkg_prefix()
    if prefix is None or not (prefix / "meta.json").is_file():
        return False
    return find_julia() is not None


def juliacall_environment(threads: int | None) -> dict[str, str]:
    """The juliacall options to set before its first import."""
    env = {"PYTHON_JULIACALL_HANDLE_SIGNALS": "yes"}
    env["PYTHON_JULIACALL_THREADS"] = str(threads) if threads else os.environ.get("PYTHON_JULIACALL_THREADS", "auto")
    return env


def start_julia(threads: int | None = None) -> Any:
    """Start Julia (once per process) and return the ``MFRes`` module; raise ``BackendError`` if it cannot."""
    if "MFRes" in _STATE:
        if threads and threads != _STATE["threads"]:
            raise BackendError(f"Julia already runs with {_STATE['threads']} threads in this process; "
                               f"the thread count is fixed when Julia starts")
        return _STATE["MFRes"]
    if "juliacall" not in sys.modules:
        for k, v in juliacall_environment(threads).items():
            if k == "PYTHON_JULIACALL_HANDLE_SIGNALS":
                os.environ.setdefault(k, v)
            else:
                os.environ[k] = v
    source = julia_source_dir()
    try:
        import juliacall
    except Exception as e:  # juliapkg raises plain Exceptions (no Julia, no network, ...)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise BackendError(
            f"the Julia backend cannot start ({type(e).__name__}: {reason}). "
            "juliacall needs Julia >= 1.10.3 (it downloads one on first use where the network allows); "
            "use --backend numpy here") from None
    try:
        bridge = juliacall.newmodule("MFResBridge")
        bridge.include(str(source / "MFRes.jl"))
        mfres_jl = bridge.MFRes
        nthreads = int(bridge.seval("Threads.nthreads()"))
    except Exception as e:
        raise BackendError(f"loading jl/MFRes.jl into Julia failed: {e}") from None
    _STATE.update(MFRes=mfres_jl, bridge=bridge, threads=nthreads, juliacall=juliacall)
    return mfres_jl


def enable_cuda() -> None:
    """Load CUDA.jl (adding it through juliapkg on first use) and MFRes's CUDA glue."""
    if _STATE.get("cuda"):
        return
    import juliapkg

    if not any(p.name == "CUDA" for p in _required_packages(juliapkg)):
        juliapkg.add("CUDA", CUDA_UUID)
        juliapkg.resolve()
    bridge = _STATE["bridge"]
    try:
        bridge.seval("using CUDA")
        bridge.seval("MFRes.use_cuda!(CUDA)")
        if not bool(bridge.seval("CUDA.functional()")):
            raise BackendError("CUDA.jl loaded but reports no usable GPU (CUDA.functional() is false)")
    except BackendError:
        raise
    except Exception as e:
        raise BackendError(f"the CUDA device cannot be used: {e}") from None
    _STATE["cuda"] = True


def _required_packages(juliapkg: Any) -> list[Any]:
    try:
        return list(juliapkg.deps.required_packages())
    except Exception:
        return []


class JuliaBackend:
    """MFRes.jl through juliacall: whole chunks of GD steps per call."""

    name = "julia"

    def __init__(self, threads: int | None = None, device: str = "cpu") -> None:
        self.jl = start_julia(threads)
        self.device = device
        if device == "cuda":
            enable_cuda()

    @property
    def threads(self) -> int:
        return int(_STATE["threads"])

    def _to_julia(self, a: np.ndarray) -> Any:
        # a.T is a free view whose memory is column-major in Julia's (reversed) index order
        return self.jl.to_device(self.jl.host_array(np.ascontiguousarray(a).T), self.device)

    @staticmethod
    def _tail(problem: Problem) -> tuple[str, float, float]:
        return problem.activation.name, float(problem.activation.eta), float(problem.weight_decay)

    def _problem(self, problem: Problem) -> tuple[Any, Any, Any]:
        key = id(problem)
        if _STATE.get("problem_key") != key:
            _STATE["problem"] = (self._to_julia(problem.x), self._to_julia(problem.y), self._to_julia(problem.a))
            _STATE["problem_key"] = key
            _STATE["problem_ref"] = problem  # keeps id(problem) from being reused
        return _STATE["problem"]

    def _copy_back(self, theta: Particles, U: Any, W: Any, b: Any) -> None:
        for dst, src in ((theta.U, U), (theta.W, W), (theta.b, b)):
            dst[...] = np.asarray(self.jl.host_array(src)).T

    def loss_and_grad(self, theta: Particles, problem: Problem) -> tuple[float, Particles]:
        X, y, a = self._problem(problem)
        U, W, b = (self._to_julia(v) for v in (theta.U, theta.W, theta.b))
        E, gU, gW, gb = self.jl.gradient(U, W, b, X, y, a, *self._tail(problem))
        grad = Particles(np.empty_like(theta.U), np.empty_like(theta.W), np.empty_like(theta.b))
        self._copy_back(grad, gU, gW, gb)
        return float(E), grad

    def advance(self, theta: Particles, problem: Problem, ds: float, n: int) -> Trajectory:
        X, y, a = self._problem(problem)
        U, W, b = (self._to_julia(v) for v in (theta.U, theta.W, theta.b))
        losses, norms = self.jl.advance_chunk(U, W, b, X, y, a, float(ds), int(n), *self._tail(problem))
        self._copy_back(theta, U, W, b)
        return Trajectory(np.array(losses, dtype=np.float64), np.array(norms, dtype=np.float64))
