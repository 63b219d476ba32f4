"""The training loop, written once above the backends.

It advances θ in chunks (sized to take about half a second, never past the next
snapshot), writes every step's E and velocity to the run file, takes the
snapshots, syncs, reports progress, and stops cleanly on divergence (non-finite
E), on SIGINT/SIGTERM (after the current chunk) or on a storage error.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import data as data_mod
from . import model
from .backends import Backend, Problem, select
from .config import RunConfig
from .errors import ConfigError, RunStopped, StorageError
from .init import initial_particles
from .model import Particles
from .store import RunWriter

CHUNK_SECONDS = 0.5
MAX_CHUNK = 10_000

ProgressFn = Callable[[int, int, float, float], None]
"""progress(step, steps, loss, steps_per_second)"""


@dataclass
class RunResult:
    """What a finished (or stopped) run reports: where it stopped and why."""

    path: str
    status: str
    steps_done: int
    loss: float
    backend: str
    message: str = ""


class _StopFlag:
    """Set by SIGINT/SIGTERM; checked between chunks."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        self.signal = signum


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_StopFlag]:
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = {s: signal.signal(s, flag) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(config: RunConfig, N: int, d: int) -> None:
    """Refuse, with the figures, a run whose buffers would not fit in memory."""
    need = model.workspace_bytes(config.depth, config.width, d, N, np.dtype(config.dtype),
                                 recompute=config.memory != "store")
    avail = available_memory()
    if avail is not None and need > 0.9 * avail:
        raise ConfigError(f"L={config.depth}, M={config.width}, N={N}, d={d} needs about {need / 2**30:.1f} GiB "
                          f"of buffers; {avail / 2**30:.1f} GiB is available")


def initial_state(config: RunConfig, d: int, seed: int | None = None) -> Particles:
    """The initial particles of ``config`` (with ``seed`` in place of ``config.seed`` if given)."""
    return initial_particles(config.init, config.depth, config.width, d, config.seed if seed is None else seed,
                             config.init_scale, config.length_scale, np.dtype(config.dtype))


def prepare(config: RunConfig) -> tuple[data_mod.TrainingData, Particles, Problem]:
    """The data set, the initial particles and the backend's problem for ``config``."""
    data = data_mod.load(config.data, config.samples, config.dim, config.data_seed)
    check_memory(config, data.N, data.d)
    problem = Problem.from_data(data, config.act, config.weight_decay, np.dtype(config.dtype))
    return data, initial_state(config, data.d), problem


def resume_options(options: dict[str, Any], out: str) -> dict[str, Any]:
    """Options for continuing ``out``: an unset ``snapshot_every`` is taken from the file."""
    if options.get("snapshot_every") is None and os.path.isfile(out):
        try:
            import netCDF4

            with netCDF4.Dataset(out) as nc:
                if "snapshot_every" in nc.ncattrs():
                    return {**options, "snapshot_every": int(nc.getncattr("snapshot_every"))}
        except (OSError, ValueError):
            pass  # RunWriter.resume reports an unreadable file
    return options


def run(config: RunConfig, out: str, *, backend: Backend | None = None, command: str = "",
        overwrite: bool = False, resume: bool = False, progress: ProgressFn | None = None) -> RunResult:
    """Run ``config`` and write the run file ``out``.

    With ``resume``, an existing ``out`` is continued from its last saved state
    (its options must equal ``config``'s, but for a larger ``steps``); without one,
    the run starts afresh. Raises ``RunStopped`` (after closing a consistent file)
    when the run diverges or is interrupted, and ``StorageError`` when the file
    cannot be written.
    """
    data, theta, problem = prepare(config)
    if backend is None:
        backend = select(config.backend, config.threads, config.device, config.memory)
    start = 0
    if resume and os.path.exists(out):
        writer, start, theta = RunWriter.resume(out, config, data, backend.name, command=command)
    else:
        writer = RunWriter(out, config, data, backend.name, command=command, overwrite=overwrite)
    try:
        return _loop(config, theta, problem, backend, writer, progress, start, command)
    except StorageError as e:
        if writer.ds is not None:  # the file is still consistent: record why it stopped
            with contextlib.suppress(StorageError):
                writer.set_status("failed", str(e))
        raise
    finally:
        writer.close(quiet=True)


def _snapshot(writer: RunWriter, step: int, theta: Particles, problem: Problem) -> None:
    with np.errstate(all="ignore"):
        pred = model.predict(theta, problem.x, problem.a, problem.activation)
    writer.write_snapshot(step, theta, pred)


def _loop(config: RunConfig, theta: Particles, problem: Problem, backend: Backend, writer: RunWriter,
          progress: ProgressFn | None, start: int = 0, command: str = "") -> RunResult:
    steps, every = config.steps, config.snapshot_every
    assert every is not None
    if start == 0:
        _snapshot(writer, 0, theta, problem)
    step, chunk, last_loss = start, 1, float("nan")
    rate = 0.0
    with _stop_on_signals() as stop:
        while True:
            n = min(chunk, steps - step, every - step % every) if step < steps else 0
            start_theta = theta.copy()
            t0 = time.perf_counter()
            traj = backend.advance(theta, problem, config.ds, n)
            elapsed = time.perf_counter() - t0
            if not traj.finite:
                return _diverged(config, writer, backend, problem, start_theta, step, traj.loss, traj.grad_norm)
            writer.write_steps(step, traj.loss, traj.grad_norm)
            last_loss = float(traj.loss[-1])
            step += n
            if n:
                rate = (n + 1) / max(elapsed, 1e-9)
                chunk = int(np.clip(rate * CHUNK_SECONDS, 1, MAX_CHUNK))
            if progress is not None:
                progress(step, steps, last_loss, rate)
            if n == 0 and step == start:
                pass  # nothing was trained (--steps 0, or a finished run resumed): its snapshot exists
            elif step == steps or step % every == 0:
                _snapshot(writer, step, theta, problem)
            else:
                writer.checkpoint(step, theta)
            if step == steps:
                writer.set_status("finished")
                return RunResult(writer.path, "finished", step, last_loss, backend.name)
            if stop.signal is not None:
                name = signal.Signals(stop.signal).name
                if step % every:
                    _snapshot(writer, step, theta, problem)
                if not command.startswith("mfres "):
                    again = "run again with resume=True"
                else:
                    again = command if "--resume" in command.split() else f"{command} --resume"
                msg = (f"interrupted by {name} at step {step} of {steps}; {writer.path} holds every step up to it; "
                       f"to continue: {again}")
                writer.set_status("interrupted", msg)
                raise RunStopped(msg)


def _diverged(config: RunConfig, writer: RunWriter, backend: Backend, problem: Problem, theta: Particles,
              step: int, loss: np.ndarray, grad_norm: np.ndarray) -> RunResult:
    """Keep the finite part of the chunk, snapshot the last finite state, raise ``RunStopped``."""
    k = len(loss) - 1  # index of the first non-finite value
    if k > 0:
        writer.write_steps(step, loss[:k], grad_norm[:k])
        if k > 1:
            backend.advance(theta, problem, config.ds, k - 1)  # replay up to the last finite state
        _snapshot(writer, step + k - 1, theta, problem)
    last = step + k - 1
    msg = (f"diverged: the loss became {loss[-1]} at step {step + k} (s = {(step + k) * config.ds:g}); "
           f"the file keeps steps 0..{last}; try a smaller --ds")
    writer.set_status("diverged", msg)
    raise RunStopped(msg)


__all__ = ["RunResult", "StorageError", "prepare", "run"]
