"""The Julia backend through juliacall: ``jl/MFRes.jl`` inside this Python process.

Kept thin on purpose: it starts Julia once per process, includes the module from
the package's own ``jl/`` folder, converts θ to Julia arrays once per chunk and
calls ``MFRes.advance_chunk`` (one net) or ``MFRes.advance_nets`` (a batch), which
run the whole chunk of GD steps in Julia.

juliacall reads its options once, at its first import, so ``start_julia`` sets
them in ``os.environ`` before importing it: the thread count (``--threads``, else
the user's ``PYTHON_JULIACALL_THREADS`` / ``JULIA_NUM_THREADS``, which juliacall
reads itself) and, only with more than one thread, signal handling by Julia
(needed then; it blocks SIGINT/SIGTERM in Python's main thread, which is undone
right after the start). Nothing here imports juliacall before a Julia backend is
asked for. CUDA.jl must be declared to juliapkg and resolved *before* Julia starts
(``cuda_command()`` is the one command); it is never added to a live session.

The other transport, a Julia executable in a child process, is ``julia_exe``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError
from ..model import Particles
from . import Problem, Trajectory, blas_environment, kernel_memory, run_at_once

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


def expected_threads(threads: int | None) -> int:
    """The thread count juliacall will start Julia with: ``threads``, else the user's
    ``PYTHON_JULIACALL_THREADS``, else ``JULIA_NUM_THREADS`` (juliacall's own default), else 1."""
    if threads:
        return int(threads)
    value = os.environ.get("PYTHON_JULIACALL_THREADS") or os.environ.get("JULIA_NUM_THREADS") or "1"
    if value.strip().split(",")[0] == "auto":
        return os.cpu_count() or 1
    try:
        return int(value.strip().split(",")[0])
    except ValueError:
        return 1


def juliacall_environment(threads: int | None) -> dict[str, str]:
    """The juliacall options to set before its first import (the user's own settings are kept,
    but for ``--threads``, which wins). Signal handling by Julia only with more than one thread."""
    env: dict[str, str] = {}
    if threads:
        env["PYTHON_JULIACALL_THREADS"] = str(int(threads))
    if expected_threads(threads) > 1 and not os.environ.get("PYTHON_JULIACALL_HANDLE_SIGNALS"):
        env["PYTHON_JULIACALL_HANDLE_SIGNALS"] = "yes"
    return env


def unblock_stop_signals() -> None:
    """Undo the blocking of SIGINT/SIGTERM that Julia's signal handling leaves on this (the
    main) thread, so that Ctrl-C and SIGTERM reach the training loop's handlers again."""
    if threading_is_main() and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def cuda_command() -> str:
    """The one command that declares CUDA.jl to juliapkg and installs it (run once, with network)."""
    return (f"{os.path.basename(sys.executable)} -c \"import juliapkg; juliapkg.add('CUDA', '{CUDA_UUID}'); "
            "juliapkg.resolve()\"")


def cuda_resolved() -> bool:
    """True if CUDA.jl is declared to juliapkg and its environment was resolved with it (no download needed)."""
    try:
        import juliapkg.deps
    except ImportError:
        return False
    try:
        meta = juliapkg.deps.load_meta() or {}
        if "CUDA" not in {p.get("name") for p in meta.get("pkgs", []) if isinstance(p, dict)}:
            return False
        with contextlib.redirect_stdout(io.StringIO()):  # juliapkg logs each file it reads
            _, declared = juliapkg.deps.find_requirements()
    except Exception:  # an unreadable juliapkg.json: treated as not declared
        return False
    return any(p.name == "CUDA" for p in declared)


def start_julia(threads: int | None = None, device: str = "cpu") -> Any:
    """Start Julia (once per process) and return the ``MFRes`` module; raise ``BackendError`` if it cannot."""
    if device == "cuda" and not _STATE.get("cuda") and not cuda_resolved():
        raise BackendError("--device cuda needs CUDA.jl in juliacall's Julia environment, installed before Julia "
                           f"starts; run once: {cuda_command()}")
    if "MFRes" in _STATE:
        if threads and threads != _STATE["threads"]:
            warnings.warn(f"--threads {threads} cannot take effect: Julia already runs in this process with "
                          f"{_STATE['threads']} thread(s) (the count is fixed when Julia starts)", stacklevel=2)
        return _STATE["MFRes"]
    if "juliacall" in sys.modules:
        if threads:
            warnings.warn(f"--threads {threads} may not take effect: juliacall was imported before mfres "
                          "started Julia, so its thread count is already fixed", stacklevel=2)
    else:
        os.environ.update(juliacall_environment(threads))
    os.environ.update(blas_environment())  # read when Julia loads its BLAS, after this
    source = julia_source_dir()
    t0 = time.perf_counter()
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
    finally:
        if os.environ.get("PYTHON_JULIACALL_HANDLE_SIGNALS") == "yes":
            unblock_stop_signals()
    if threads and nthreads != threads:
        warnings.warn(f"--threads {threads} did not take effect: Julia runs with {nthreads} thread(s)", stacklevel=2)
    _STATE.update(MFRes=mfres_jl, bridge=bridge, threads=nthreads, juliacall=juliacall,
                  startup_seconds=time.perf_counter() - t0)
    return mfres_jl


def enable_cuda() -> None:
    """Load CUDA.jl (declared and resolved through juliapkg before Julia started) and MFRes's CUDA glue."""
    if _STATE.get("cuda"):
        return
    bridge = _STATE["bridge"]
    try:
        bridge.seval("using CUDA")
        if not bool(bridge.seval("CUDA.functional()")):
            raise BackendError("CUDA.jl loaded but reports no usable GPU (CUDA.functional() is false); "
                               "use --device cpu")
        bridge.seval("MFRes.use_cuda!(CUDA)")
    except BackendError:
        raise
    except Exception as e:
        raise BackendError(f"the CUDA device cannot be used: {e}") from None
    _STATE["cuda"] = True


class JuliaBackend:
    """MFRes.jl through juliacall: whole chunks of GD steps per call, batches looped in Julia."""

    name = "julia"
    transport = "juliacall"
    overlaps = False  # Julia runs in this process, in the calling thread
    kernel_seconds = 0.0  # not measured apart

    def __init__(self, threads: int | None = None, device: str = "cpu", memory: str = "auto") -> None:
        self.jl = start_julia(threads, device)
        self.device = device
        self.memory = memory
        if device == "cuda":
            enable_cuda()

    @property
    def threads(self) -> int:
        return int(_STATE["threads"])

    @property
    def startup_seconds(self) -> float:
        """Julia's start and the include of MFRes.jl in this process (compilation then runs at first use)."""
        return float(_STATE.get("startup_seconds", 0.0))

    def describe(self) -> str:
        return f"Julia through juliacall (in-process), {self.threads} thread(s), device {self.device}"

    def close(self) -> None:
        """Nothing to stop: Julia lives as long as this process."""

    def _to_julia(self, a: np.ndarray) -> Any:
        # a.T is a free view whose memory is column-major in Julia's (reversed) index order
        return self.jl.to_device(self.jl.host_array(np.ascontiguousarray(a).T), self.device)

    @staticmethod
    def _tail(problem: Problem) -> tuple[str, float, float]:
        return problem.activation.name, float(problem.activation.eta), float(problem.weight_decay)

    def _problem(self, problem: Problem) -> tuple[Any, Any, Any]:
        key = (id(problem), self.device)
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
        E, gU, gW, gb = self.jl.gradient(U, W, b, X, y, a, *self._tail(problem),
                                         memory=kernel_memory(self.memory, theta, problem))
        grad = Particles(np.empty_like(theta.U), np.empty_like(theta.W), np.empty_like(theta.b))
        self._copy_back(grad, gU, gW, gb)
        return float(E), grad

    def advance(self, theta: Particles, problem: Problem, ds: float, n: int) -> Trajectory:
        """n GD steps in place; a batch (leading axis B) advances every net, never stopping early."""
        if theta.batch:
            return self._advance_batch(theta, problem, ds, n)
        X, y, a = self._problem(problem)
        U, W, b = (self._to_julia(v) for v in (theta.U, theta.W, theta.b))
        losses, norms = self.jl.advance_chunk(U, W, b, X, y, a, float(ds), int(n), *self._tail(problem),
                                              memory=kernel_memory(self.memory, theta, problem))
        self._copy_back(theta, U, W, b)
        return Trajectory(np.array(losses, dtype=np.float64), np.array(norms, dtype=np.float64))

    def begin_advance(self, theta: Particles, problem: Problem, ds: float, n: int) -> Callable[[], Trajectory]:
        return run_at_once(self, theta, problem, ds, n)

    def _advance_batch(self, theta: Particles, problem: Problem, ds: float, n: int) -> Trajectory:
        X, y, a = self._problem(problem)
        B = theta.batch[0]
        nets = [[self._to_julia(getattr(theta, v)[j]) for j in range(B)] for v in "UWb"]
        Us, Ws, bs = (self.jl.seval("Any[]") for _ in range(3))
        for vec, arrays in zip((Us, Ws, bs), nets, strict=True):
            for arr in arrays:
                self.jl.seval("push!")(vec, arr)
        zeros = self.jl.seval("(n, B) -> zeros(Float64, n, B)")
        jl_losses, jl_norms = zeros(n + 1, B), zeros(n + 1, B)  # Julia (n + 1, B) matrices
        self.jl.advance_nets(Us, Ws, bs, X, y, a, float(ds), int(n), *self._tail(problem), jl_losses, jl_norms,
                             memory=kernel_memory(self.memory, theta, problem))
        for j in range(B):
            net = Particles(theta.U[j], theta.W[j], theta.b[j])
            self._copy_back(net, nets[0][j], nets[1][j], nets[2][j])
        # a Julia matrix seen from NumPy keeps Julia's dims: (n + 1, B)
        return Trajectory(np.array(jl_losses, dtype=np.float64), np.array(jl_norms, dtype=np.float64))
