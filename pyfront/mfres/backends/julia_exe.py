"""The Julia backend through a Julia executable (any Julia ≥ 1.5, no packages).

One long-lived child ``julia jl/server.jl`` per backend object. Arrays never cross
the pipe: θ, its gradient, the data and the per-step losses live in one file in
``/dev/shm`` (else the temp dir), a ``numpy.memmap`` here and ``Mmap.mmap`` arrays
there; the file is unlinked as soon as both sides have mapped it. A C-order array of
NumPy shape ``(n1, ..., nk)`` is a Julia array of dims ``(nk, ..., n1)`` over the
same bytes, so ``U`` of shape ``(L, M, d)`` is MFRes's ``(d, M, L)``. Per chunk, θ is
copied into the shared file and back (a memcpy of L·M·(2d+1) numbers), the data once
per problem; the requests are one short line each way (protocol in ``jl/server.jl``).

The child runs in its own session, so a terminal's Ctrl-C reaches only mfres, which
finishes the chunk and stops the child. It dies with its parent: Linux's
``PR_SET_PDEATHSIG`` (SIGKILL), and the server exits at end of its stdin. Responses are
awaited with a poll that notices a dead child; an error inside Julia comes back as a
``BackendError`` carrying Julia's message.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..children import array_offsets, map_arrays, pdeathsig, popen, shm_dir
from ..errors import BackendError
from ..model import Particles
from . import SKYLAKEX_FLAGS, Problem, Trajectory, blas_environment, kernel_memory

MIN_VERSION = (1, 5, 0)
POLL_SECONDS = 0.2


def julia_version(exe: str) -> tuple[int, int, int] | None:
    """The version that ``exe --version`` reports, or None."""
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"julia version (\d+)\.(\d+)\.(\d+)", out)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def candidates() -> list[tuple[str, str]]:
    """(where from, path) of the Julia executables to try: $MFRES_JULIA, $JULIA, ``julia`` on PATH."""
    found = []
    for var in ("MFRES_JULIA", "JULIA"):
        if os.environ.get(var):
            found.append((f"${var}", os.environ[var]))
    on_path = shutil.which("julia")
    if on_path:
        found.append(("PATH", on_path))
    return found


def locate() -> tuple[str, tuple[int, int, int], str] | None:
    """(path, version, where from) of the first Julia ≥ 1.5 among ``candidates()``, or None.

    Runs ``julia --version`` (a fraction of a second); starts no Julia session."""
    for origin, exe in candidates():
        path = shutil.which(exe) or exe
        if os.path.isfile(path) and os.access(path, os.X_OK):
            v = julia_version(path)
            if v is not None and v >= MIN_VERSION:
                return path, v, origin
    return None


def find_executable() -> tuple[str, tuple[int, int, int]] | None:
    """The first Julia ≥ 1.5 among ``candidates()`` and its version, or None."""
    found = locate()
    return None if found is None else (found[0], found[1])


CPU_TARGET_VARIABLE = "MFRES_JULIA_CPU_TARGET"


@functools.cache
def julia_cpu_name(exe: str) -> str | None:
    """The CPU that Julia ``exe`` takes this one for (``Sys.CPU_NAME``), or None (0.2 s, once per path)."""
    try:
        res = subprocess.run([exe, "--startup-file=no", "--history-file=no", "-e", "print(Sys.CPU_NAME)"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return (res.stdout.strip() or None) if res.returncode == 0 else None


def cpu_target_option(exe: str, flags: set[str] | None = None) -> list[str]:
    """Julia's ``-C`` option: the code generator's target CPU.

    A Julia older than the CPU (Julia 1.5.3 on an AMD Zen 4) names it "generic" and, although
    it still uses the CPU's vector extensions, tunes its code for no CPU: on that Zen 4 the
    small size's step ran 2–2.5x slower than with ``-C haswell``. There mfres names a CPU
    that the flags admit: "skylake-avx512" where the CPU has Skylake-X's AVX-512 subsets
    (``SKYLAKEX_FLAGS``; on that Zen 4 the large size's step 0.71–0.85x of its time with
    haswell code, the others alike within the noise, ``benchmarks/julia_bench.jl``), else
    "haswell" (AVX2 and FMA) or "sandybridge" (AVX). Julia turns off any feature of the
    named CPU that this one lacks. ``MFRES_JULIA_CPU_TARGET`` decides instead ("native", in
    any case: Julia's own choice)."""
    from . import cpu_flags

    chosen = os.environ.get(CPU_TARGET_VARIABLE, "").strip()
    if chosen:
        return [] if chosen.lower() == "native" else ["-C", chosen]
    if julia_cpu_name(exe) != "generic":
        return []
    flags = cpu_flags() if flags is None else flags
    if SKYLAKEX_FLAGS <= flags:
        return ["-C", "skylake-avx512"]
    if {"avx2", "fma"} <= flags:
        return ["-C", "haswell"]
    if "avx" in flags:
        return ["-C", "sandybridge"]
    return []


def julia_command(exe: str, thread_opts: list[str]) -> tuple[list[str], dict[str, str]]:
    """How mfres starts a Julia: the command's first words (``exe``, ``thread_opts``, the code
    generator's target of ``cpu_target_option``, no start-up file) and its environment (with
    the BLAS kernels of ``blas_environment``). The benchmarks start theirs the same way."""
    return ([exe, *thread_opts, *cpu_target_option(exe), "--startup-file=no"],
            {**os.environ, **blas_environment()})


def server_script() -> Path:
    from .julia_backend import julia_source_dir

    return julia_source_dir() / "server.jl"


def thread_option(threads: int | None) -> tuple[list[str], str]:
    """Julia's ``-t`` option for ``threads`` and where the count comes from.

    ``--threads N`` wins; else the user's ``JULIA_NUM_THREADS`` (the child inherits it,
    no option given); else all cores (``-t auto``)."""
    if threads:
        return ["-t", str(int(threads))], "--threads"
    if os.environ.get("JULIA_NUM_THREADS"):
        return [], "JULIA_NUM_THREADS"
    return ["-t", "auto"], "all cores"


class _Shared:
    """The shared file: one memmap holding θ (with a batch axis), ∇E, the data, the losses, the outputs."""

    def __init__(self, dtype: np.dtype, L: int, M: int, d: int, N: int, B: int, cap: int) -> None:
        self.dtype, self.B, self.cap = np.dtype(dtype), B, cap
        nets = max(B, 1)
        shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {
            "U": ((nets, L, M, d), self.dtype), "W": ((nets, L, M, d), self.dtype), "b": ((nets, L, M), self.dtype),
            "gU": ((L, M, d), self.dtype), "gW": ((L, M, d), self.dtype), "gb": ((L, M), self.dtype),
            "x": ((N, d), self.dtype), "y": ((N,), self.dtype), "a": ((d,), self.dtype),
            "loss": ((nets, cap + 1), np.dtype(np.float64)), "norm": ((nets, cap + 1), np.dtype(np.float64)),
            "pred": ((nets, N), self.dtype),
        }
        self.offsets, size = array_offsets(shapes)
        fd, self.path = tempfile.mkstemp(prefix=f"mfres-{os.getpid()}-", suffix=".bin", dir=shm_dir())
        try:
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            self.arrays = map_arrays(self.path, shapes)
        except OSError as e:
            self.unlink()
            raise BackendError(f"cannot create the shared array file in {shm_dir()}: {e}") from None
        self.sizes = (L, M, d, N)
        self.problem: Any = None  # the Problem whose data the file holds

    def request(self) -> str:
        L, M, d, N = self.sizes
        t = "float64" if self.dtype == np.float64 else "float32"
        names = ("U", "W", "b", "gU", "gW", "gb", "x", "y", "a", "loss", "norm", "pred")
        offs = " ".join(str(self.offsets[k]) for k in names)
        return f"layout {self.path} {t} {L} {M} {d} {N} {self.B} {self.cap} {offs}"

    def fits(self, dtype: np.dtype, L: int, M: int, d: int, N: int, B: int, n: int) -> bool:
        return self.dtype == dtype and self.sizes == (L, M, d, N) and self.B == B and n <= self.cap

    def unlink(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def _dtype_name(dtype: np.dtype) -> str:
    if dtype == np.float64:
        return "float64"
    if dtype == np.float32:
        return "float32"
    raise BackendError(f"the Julia backend runs float64 or float32, not {dtype}")


_LIVE: weakref.WeakSet[JuliaExeBackend] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for backend in list(_LIVE):
        backend.close()


class JuliaExeBackend:
    """MFRes.jl in a child Julia process (see the module docstring).

    Attributes after start: ``exe``, ``version``, ``threads`` (Julia's count),
    ``threads_from`` (--threads, JULIA_NUM_THREADS or all cores), ``pid``, and
    ``startup_seconds``: Julia's start plus compilation, accumulated (the first
    chunk of each dtype, activation and one net or batch compiles the kernels once), and
    ``kernel_seconds``: the time the last ``advance`` spent in the kernels (timed in Julia),
    ``continued``: whether it started from the ∇E the previous chunk left (see ``advance``).
    """

    name = "julia"
    transport = "executable"
    overlaps = True  # a chunk runs in the child while the caller writes its file

    def __init__(self, exe: str | None = None, threads: int | None = None, device: str = "cpu",
                 memory: str = "auto") -> None:
        if exe is None:
            found = find_executable()
            if found is None:
                raise BackendError("no Julia executable found (set MFRES_JULIA or JULIA, or put julia >= 1.5 on PATH)")
            exe = found[0]
        self.exe = exe
        self.device = device
        self.memory = memory
        self._shared: _Shared | None = None
        self._warm: set[tuple[str, str, float, bool]] = set()
        self._buf = b""
        self._pending: str | None = None  # a chunk sent and not yet finished (begin_advance)
        self.kernel_seconds = 0.0
        self.continued = False
        opts, self.threads_from = thread_option(threads)
        t0 = time.perf_counter()
        command, env = julia_command(exe, opts)
        argv = [*command, "--history-file=no", str(server_script())]
        self._stderr = tempfile.TemporaryFile()
        try:
            self.proc = popen(args=argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                              env=env, start_new_session=True,
                              preexec_fn=pdeathsig(), close_fds=True)
        except OSError as e:
            raise BackendError(f"cannot start Julia ({exe}): {e}") from None
        self.pid = self.proc.pid
        _LIVE.add(self)
        try:
            words = self._read_reply("ready", "starting")
            self.version, self.threads = words[0], int(words[1])
            self.blas = words[2] if len(words) > 2 else "unknown"
            self.cpu_target = words[3] if len(words) > 3 else "unknown"
            self.startup_seconds = time.perf_counter() - t0
            if threads and self.threads != threads:
                raise BackendError(f"Julia started with {self.threads} threads, not the {threads} asked for")
            if device != "cpu":
                self._request(f"device {device}")
        except BaseException:
            self.close()
            raise

    # --- protocol ------------------------------------------------------------

    def _died(self, doing: str) -> BackendError:
        code = self.proc.poll()
        how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited ({code})"
        self._stderr.seek(0)
        tail = self._stderr.read().decode(errors="replace").strip().splitlines()[-3:]
        detail = ("; it said: " + " | ".join(tail)) if tail else ""
        return BackendError(f"the Julia process (pid {self.pid}) {how} while {doing}{detail}")

    def _read_line(self, doing: str) -> str:
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        while b"\n" not in self._buf:
            ready, _, _ = select.select([fd], [], [], POLL_SECONDS)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.proc.wait(timeout=10)
                    raise self._died(doing)
                self._buf += chunk
            elif self.proc.poll() is not None:
                raise self._died(doing)
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def _read_reply(self, expect: str, doing: str) -> list[str]:
        line = self._read_line(doing)
        head, _, rest = line.partition(" ")
        if head == expect:
            return rest.split()
        if head == "error":
            raise BackendError(f"Julia: {rest}")
        raise BackendError(f"unexpected reply from the Julia process while {doing}: {line[:200]!r}")

    def _not_busy(self, what: str) -> None:
        # the child reads and writes the shared arrays until its reply is read
        if self._pending is not None:
            raise BackendError(f"{what} while a chunk is still {self._pending}: finish it first")

    def _send(self, line: str) -> str:
        """Write one request; return what the child is then doing (for messages)."""
        self._not_busy(f"a request ('{line.split()[0]}')")
        if self.proc.poll() is not None or self.proc.stdin is None or self.proc.stdin.closed:
            raise self._died(f"idle (before '{line.split()[0]}')")
        doing = f"running '{line.split()[0]}'"
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._died(doing) from None
        return doing

    def _receive(self, doing: str) -> list[str]:
        try:
            return self._read_reply("ok", doing)
        except KeyboardInterrupt:
            # the reply would come out of step with the next request: stop the child
            self.close()
            raise

    def _request(self, line: str) -> list[str]:
        return self._receive(self._send(line))

    # --- shared memory -------------------------------------------------------

    def _prepare(self, theta: Particles, problem: Problem, n: int) -> tuple[_Shared, bool]:
        """The shared file, holding ``problem``'s data and θ; and whether θ and the data were
        already there, unchanged since the last call (the server's ∇E is then θ's)."""
        self._not_busy("new arrays")
        dtype = theta.U.dtype
        name = _dtype_name(dtype)
        L, M, d = theta.shape
        N = problem.x.shape[0]
        B = theta.batch[0] if theta.batch else 0
        if problem.x.dtype != dtype:
            raise BackendError(f"θ is {dtype} but the data are {problem.x.dtype}")
        act = problem.activation  # compiled first: the warm-up also compiles the requests
        key = (name, act.name, float(act.eta), d if B > 0 else 0)  # batches compile per d
        if key not in self._warm:
            t0 = time.perf_counter()
            self._request(f"warmup {name} {act.name} {float(act.eta)!r}" + (f" batch {d}" if B > 0 else ""))
            self.startup_seconds += time.perf_counter() - t0
            self._warm.add(key)
        sh = self._shared
        if sh is None or not sh.fits(dtype, L, M, d, N, B, n):
            cap = max(n, 2 * sh.cap if sh is not None and sh.sizes == (L, M, d, N) else 0, 16)
            if sh is not None:
                self._shared = None
                del sh
            sh = _Shared(dtype, L, M, d, N, B, cap)
            try:
                self._request(sh.request())
            finally:
                sh.unlink()  # both sides hold mappings; no file is left behind
            self._shared = sh
        tb = theta.batched()
        unchanged = sh.problem is problem and all(np.array_equal(sh.arrays[v], getattr(tb, v)) for v in "UWb")
        if sh.problem is not problem:
            sh.arrays["x"][...] = problem.x
            sh.arrays["y"][...] = problem.y
            sh.arrays["a"][...] = problem.a
            sh.problem = problem
        if not unchanged:
            sh.arrays["U"][...] = tb.U
            sh.arrays["W"][...] = tb.W
            sh.arrays["b"][...] = tb.b
        return sh, unchanged

    @staticmethod
    def _tail(problem: Problem) -> str:
        act = problem.activation
        return f"{act.name} {float(act.eta)!r} {float(problem.weight_decay)!r}"

    # --- the Backend interface -----------------------------------------------

    def advance(self, theta: Particles, problem: Problem, ds: float, n: int) -> Trajectory:
        """n GD steps in place (a batch: all nets, never stopping early), as ``NumpyBackend``.

        A chunk that starts where the previous one ended (same data, θ unchanged) reuses
        that chunk's last ∇E: n gradient evaluations for n steps, not n + 1, the same numbers.
        """
        return self.begin_advance(theta, problem, ds, n)()

    def begin_advance(self, theta: Particles, problem: Problem, ds: float, n: int) -> Callable[[], Trajectory]:
        """Send the chunk to the child and return while it runs (see the Backend interface):
        until the returned function is called, ``theta`` keeps the state the chunk started from."""
        sh, unchanged = self._prepare(theta, problem, n)
        mode = kernel_memory(self.memory, theta, problem)
        # θ where the last chunk left it: the server still holds its ∇E (it checks the rest)
        cont = " continue" if unchanged and n > 0 and not theta.batch else ""
        doing = self._send(f"advance {int(n)} {float(ds)!r} {self._tail(problem)} {mode}{cont}")
        self._pending, self.kernel_seconds = doing, 0.0
        done: list[Trajectory] = []

        def finish() -> Trajectory:
            if done:
                return done[0]
            try:
                reply = self._receive(doing)
            finally:
                self._pending = None
            k, self.kernel_seconds = int(reply[0]), float(reply[1])
            self.continued = len(reply) > 2 and reply[2] == "1"
            tb = theta.batched()
            tb.U[...] = sh.arrays["U"]
            tb.W[...] = sh.arrays["W"]
            tb.b[...] = sh.arrays["b"]
            loss = sh.arrays["loss"][:, :k].T.copy()
            norm = sh.arrays["norm"][:, :k].T.copy()
            pred = sh.arrays["pred"].copy()
            if not theta.batch:
                loss, norm, pred = loss[:, 0], norm[:, 0], pred[0]
            done.append(Trajectory(loss, norm, pred))
            return done[0]

        return finish

    def loss_and_grad(self, theta: Particles, problem: Problem) -> tuple[float, Particles]:
        """E(θ) and ∇E for one net."""
        if theta.batch:
            raise BackendError("loss_and_grad takes one net, not a batch")
        sh, _ = self._prepare(theta, problem, 0)
        E = float(self._request(f"gradient {self._tail(problem)} {kernel_memory(self.memory, theta, problem)}")[0])
        return E, Particles(sh.arrays["gU"].copy(), sh.arrays["gW"].copy(), sh.arrays["gb"].copy())

    def describe(self) -> str:
        return (f"Julia {self.version} at {self.exe} (executable transport, pid {self.pid}), "
                f"{self.threads} thread(s) from {self.threads_from}, BLAS {self.blas}, CPU target {self.cpu_target}, "
                f"start-up {self.startup_seconds:.1f} s")

    def close(self) -> None:
        """Stop the child (asks it to exit, then kills it after a few seconds)."""
        proc = getattr(self, "proc", None)
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert proc.stdin is not None
                proc.stdin.write(b"close\n")
                proc.stdin.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        with contextlib.suppress(OSError, ValueError):
            if proc.stdin is not None:
                proc.stdin.close()
            if proc.stdout is not None:
                proc.stdout.close()
        self._shared = None
        _LIVE.discard(self)

    def __enter__(self) -> JuliaExeBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
