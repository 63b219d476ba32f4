"""The training loop, written once above the backends.

It advances θ in chunks (sized to take about half a second, never past the next
snapshot), hands every step's E and velocity and the snapshots to the durable
writer, makes durable points when the writer says they are due, reports progress,
and stops cleanly on divergence (non-finite E, or E above health.RUNAWAY_FACTOR·E(0)),
on SIGINT/SIGTERM (after the current chunk) or on a storage error.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import data as data_mod
from . import health, model
from .backends import Backend, Problem, Trajectory, select
from .config import RunConfig
from .errors import ConfigError, RunStopped, StorageError
from .init import initial_particles
from .model import Particles
from .store import RunWriter
from .store.reader import read_attrs
from .store.schema import HEALTH_ATTRS

CHUNK_SECONDS = 0.5
MAX_CHUNK = 10_000
# Where the backend overlaps, the final file is drafted during the run's last chunks (at most
# DRAFT_CHUNKS of them, and no earlier than DRAFT_SECONDS before the end), in slices of
# DRAFT_SHARE of a chunk's expected time, so that the writing stays inside the chunks: at the
# default size a draft takes about 25 ms and a chunk 20. A durable point drops the draft (it
# would lack the rows the segment takes from memory); the next chunk begins it again.
DRAFT_CHUNKS = 4
DRAFT_SECONDS = 1.0
DRAFT_SHARE = 0.8

ProgressFn = Callable[[int, int, float, float], None]
"""progress(step, steps, loss, steps_per_second)"""


@dataclass
class Timing:
    """Wall-clock seconds of one ``run``, from opening the run file to publishing it.

    ``backend``: inside the backend's ``advance`` (the steps), less ``compile`` (the growth
    of the backend's ``startup_seconds`` during the run: the executable transport's
    compilation of the kernels; juliacall reports none, so there its compilation counts as
    stepping); ``total``: everything, so that ``rest`` = ``total − backend − compile`` is
    the loop's own time and the file's (snapshots, durable points, publishing) and
    ``overhead`` that time as a fraction of ``backend``. Work done while a chunk runs in a
    child process (``chunk``'s ``meanwhile``) counts as stepping up to the chunk's own time
    in the child (``kernel_seconds``): it cost the run no wall-clock time.
    """

    total: float = 0.0
    backend: float = 0.0
    compile: float = 0.0

    @property
    def rest(self) -> float:
        return self.total - self.backend - self.compile

    @property
    def overhead(self) -> float:
        return self.rest / self.backend if self.backend > 0 else float("nan")

    def advance(self, backend: Backend, theta: Particles, problem: Problem, ds: float, n: int) -> Trajectory:
        """``backend.advance``, timed (``chunk`` with nothing to do meanwhile)."""
        return self.chunk(backend, theta, problem, ds, n)[0]

    def chunk(self, backend: Backend, theta: Particles, problem: Problem, ds: float, n: int,
              meanwhile: Callable[[], None] | None = None) -> tuple[Trajectory, float]:
        """``backend.advance`` with ``meanwhile()`` run during the chunk where the backend
        ``overlaps``, else before it (a chunk that fails must not take the durable point with it);
        returns the trajectory and the chunk's stepping seconds."""
        if meanwhile is not None and not backend.overlaps:
            meanwhile()
            meanwhile = None
        c0, t0 = backend.startup_seconds, time.perf_counter()
        try:
            finish = backend.begin_advance(theta, problem, ds, n)
        except BaseException:
            if meanwhile is not None:
                with contextlib.suppress(Exception):
                    meanwhile()
            raise
        t1 = time.perf_counter()
        if meanwhile is not None:
            try:
                meanwhile()
            except BaseException:
                with contextlib.suppress(Exception):
                    finish()  # the child's reply, so that the backend stays usable
                raise
        t2 = time.perf_counter()
        traj = finish()
        t3 = time.perf_counter()
        compiled = backend.startup_seconds - c0
        hidden = min(t2 - t1, backend.kernel_seconds) if backend.overlaps else 0.0
        stepping = (t1 - t0) + (t3 - t2) + hidden - compiled
        self.compile += compiled
        self.backend += stepping
        return traj, stepping


@dataclass
class RunResult:
    """What a finished (or stopped) run reports: where it stopped and why, and where its time went."""

    path: str
    status: str
    steps_done: int
    loss: float
    backend: str
    message: str = ""
    health: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    timing: Timing = field(default_factory=Timing)


class StopFlag:
    """Set by SIGINT/SIGTERM; checked between chunks."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        self.signal = signum


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag | None = None) -> Iterator[StopFlag]:
    """Turn SIGINT/SIGTERM into a flag for the duration (nested uses share the outer flag)."""
    if flag is not None:
        yield flag
        return
    flag = StopFlag()
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
    """Options for continuing ``out``: an unset ``snapshot_every`` is taken from the file,
    unless the file's was the default too (the spacing then follows the new ``steps``)."""
    if options.get("snapshot_every") is None and os.path.isfile(out):
        try:
            attrs = read_attrs(out)
        except StorageError:
            return options  # RunWriter reports an unreadable file
        if "snapshot_every" in attrs and not int(attrs.get("snapshot_every_auto", 0)):
            return {**options, "snapshot_every": int(attrs["snapshot_every"])}
    return options


def run(config: RunConfig, out: str, *, backend: Backend | None = None, command: str = "",
        overwrite: bool = False, resume: bool = False, progress: ProgressFn | None = None,
        stop: StopFlag | None = None, warn: bool = True) -> RunResult:
    """Run ``config`` and write the run file ``out``.

    With ``resume``, an existing ``out`` is continued from its last durable state
    (its options and data must equal ``config``'s, but for a larger ``steps``); without
    one, the run starts afresh. Raises ``RunStopped`` (after publishing a complete
    file) when the run diverges or is interrupted, and ``StorageError`` when the file
    cannot be written. The health warnings of ``mfres.health`` are issued with
    ``warnings.warn`` when ``warn``, and returned in ``RunResult.warnings`` always.
    """
    with stop_on_signals(stop) as flag:
        data, theta, problem = prepare(config)
        if backend is None:
            backend = select(config.backend, config.threads, config.device, config.memory)
        timing, t0 = Timing(), time.perf_counter()
        writer = RunWriter(out, config, data, backend.name, command=command, overwrite=overwrite,
                           resume=resume and os.path.exists(out))
        try:
            result = _loop(config, theta, problem, backend, writer, progress, flag, command, timing)
        except RunStopped:
            raise  # its status is already in the file
        except StorageError as e:
            writer.fail(str(e))
            raise
        except BaseException as e:  # out of memory, a backend failure: say so in the file
            writer.fail(f"stopped by {type(e).__name__}: {e}" if str(e) else f"stopped by {type(e).__name__}")
            raise
        finally:
            writer.close()
            timing.total = time.perf_counter() - t0
    if warn:
        for w in result.warnings:
            warnings.warn(w, RuntimeWarning, stacklevel=2)
    return result


def _prediction(theta: Particles, problem: Problem, traj: Trajectory | None) -> np.ndarray:
    """The net's output at θ: from the backend's last forward pass when ``traj`` ended at θ."""
    if traj is not None and traj.prediction is not None:
        return np.array(traj.prediction)
    with np.errstate(all="ignore"):
        return model.predict(theta, problem.x, problem.a, problem.activation)


def _snapshot(writer: RunWriter, step: int, theta: Particles, problem: Problem, traj: Trajectory | None) -> None:
    """Snapshot θ with the net's output (``_prediction``)."""
    writer.write_snapshot(step, theta, _prediction(theta, problem, traj))


def _meanwhile(writer: RunWriter, step: int, theta: Particles, saved: list[Particles], commit: bool,
               snapshot: np.ndarray | None, draft: tuple[int, int] | None, seconds: float,
               end_in: float) -> Callable[[], None]:
    """What the loop does while the backend runs the next chunk from θ at ``step`` (``theta`` holds
    that state until the chunk's results come back): keep a copy of θ in ``saved`` (a divergence
    replays from it), then the writer's work: the snapshot of θ owed from the last chunk
    (``snapshot``: the net's output there), the durable point (``commit``; the run expects to end in
    ``end_in`` seconds), then, within ``seconds`` of the start, a slice of the draft of the final
    file, begun here if ``draft`` = (the steps, the snapshots) still to come. The file receives them
    in the order it would without a chunk running."""

    def work() -> None:
        t0 = time.perf_counter()
        saved.append(theta.copy())
        if snapshot is not None:
            writer.write_snapshot(step, theta, snapshot)
        if commit:
            writer.commit(step, theta, end_in=end_in)
        if draft is not None:
            writer.begin_final_draft(*draft)
        writer.work_on_draft(seconds - (time.perf_counter() - t0))
    return work


def _again(command: str) -> str:
    if not command.startswith("mfres "):
        return "run again with resume=True"
    return command if "--resume" in command.split() else f"{command} --resume"


def _loop(config: RunConfig, theta: Particles, problem: Problem, backend: Backend, writer: RunWriter,
          progress: ProgressFn | None, stop: StopFlag, command: str, clock: Timing) -> RunResult:
    steps, every = config.steps, config.snapshot_every
    assert every is not None
    step = writer.start_step
    traj: Trajectory | None = None  # the last chunk, which ended at θ
    if writer.start_state is not None:
        theta = writer.start_state
        e0 = writer.e0
    else:  # E(0) and the step-0 snapshot; the first durable point comes with the first chunk
        traj = clock.advance(backend, theta, problem, config.ds, 0)
        e0 = float(traj.loss[0])
        writer.write_steps(0, traj.loss, traj.grad_norm)
        _snapshot(writer, 0, theta, problem, traj)
        if not np.isfinite(e0):
            msg = (f"diverged: E is not finite at step 0 (E = {e0}): the data or --init-scale are too large "
                   f"for this net; the file keeps that step")
            writer.finish("diverged", msg, 0, theta)
            raise RunStopped(msg)
    # A durable point is owed at a chunk boundary (the first one of a fresh run: the run file
    # exists from then on) and made with the next chunk: while it runs, where the backend runs
    # it in a child process, so that the file costs no wall-clock time. The first chunk (one
    # step, which measures the rate) is too short for that: the point then waits for the next
    # boundary. A run that stops first publishes everything anyway.
    owed = writer.start_state is None
    chunk, last_loss, rate = 1, e0 if step == 0 else float("nan"), 0.0
    # A snapshot at a chunk boundary before the run's end is written with the next chunk, like
    # a durable point (written in between, at the default size it took 7-14 % of a Julia run).
    snapshot: np.ndarray | None = None
    while True:
        if stop.signal is not None or step == steps:
            break
        n = min(chunk, steps - step, every - step % every)
        now = owed and (rate > 0 or not backend.overlaps)
        left = steps - step
        draft = None
        if (backend.overlaps and rate > 0 and (now or not writer.drafting) and left <= DRAFT_CHUNKS * n
                and left <= DRAFT_SECONDS * rate):
            draft = (left, (steps - 1) // every - step // every + 1)  # snapshots: (step, steps]
        saved: list[Particles] = []  # θ at step, copied while the chunk runs
        meanwhile = _meanwhile(writer, step, theta, saved, now, snapshot, draft,
                               DRAFT_SHARE * n / rate if rate else 0.0, left / rate if rate else float("inf"))
        snapshot = None
        try:
            traj, elapsed = clock.chunk(backend, theta, problem, config.ds, n, meanwhile)
        except BaseException:
            if owed and not now and saved:  # the point this chunk was not to carry: keep what was computed
                with contextlib.suppress(Exception):
                    writer.commit(step, saved[0])
            raise
        owed = owed and not now
        bad = int(health.first_bad_step(traj.loss, start=e0))
        if bad >= 0:
            return _diverged(config, writer, backend, problem, saved[0], step, traj, bad, e0, clock)
        writer.write_steps(step, traj.loss, traj.grad_norm)
        last_loss = float(traj.loss[-1])
        step += n
        rate = (n + 1) / max(elapsed, 1e-9)
        chunk = int(min(max(rate * CHUNK_SECONDS, 1), MAX_CHUNK))
        if progress is not None:
            progress(step, steps, last_loss, rate)
        if step == steps:
            _snapshot(writer, step, theta, problem, traj)
        elif step % every == 0:
            snapshot = _prediction(theta, problem, traj)
        if step < steps and stop.signal is None and writer.due():
            owed = True
    if snapshot is not None:  # stopped at a boundary: no next chunk to carry it
        writer.write_snapshot(step, theta, snapshot)
    if step == steps and stop.signal is None:
        status, msg = "finished", ""
    else:
        name = signal.Signals(stop.signal).name if stop.signal is not None else "a signal"
        if step % every and step != steps:
            _snapshot(writer, step, theta, problem, traj)
        status = "interrupted"
        msg = (f"interrupted by {name} at step {step} of {steps}; {writer.path} holds every step up to it; "
               f"to continue: {_again(command)}")
    writer.finish(status, msg, step, theta)
    if status != "finished":
        raise RunStopped(msg)
    figs = {k: writer.attrs[k] for k in HEALTH_ATTRS}
    return RunResult(writer.path, status, step, last_loss, backend.name, msg, figs,
                     health.warnings_for(figs, step), clock)


def _diverged(config: RunConfig, writer: RunWriter, backend: Backend, problem: Problem, theta: Particles,
              step: int, traj: Any, k: int, e0: float, clock: Timing) -> RunResult:
    """Keep the chunk up to its first bad E, snapshot that state, publish, raise ``RunStopped``.

    A non-finite E at index k keeps the steps before it; a finite E above RUNAWAY_FACTOR·E(0)
    is kept itself (it is the evidence).
    """
    value = float(traj.loss[k])
    finite = bool(np.isfinite(value))
    keep = k + 1 if finite else k
    writer.write_steps(step, traj.loss[:keep], traj.grad_norm[:keep])
    last = step + keep - 1
    replay = clock.advance(backend, theta, problem, config.ds, keep - 1) if keep > 1 else None  # to the last kept state
    _snapshot(writer, last, theta, problem, replay)
    s_bad = (step + k) * config.ds
    if finite:
        what = (f"E = {value:.3g} exceeds {health.RUNAWAY_FACTOR:g}·E(0) = {health.RUNAWAY_FACTOR * e0:.3g} "
                f"at step {step + k} (s = {s_bad:g})")
    else:
        what = f"E became {value} at step {step + k} (s = {s_bad:g})"
    msg = f"diverged: {what}; the file keeps steps 0..{last}; try a smaller --ds"
    writer.finish("diverged", msg, last, theta)
    raise RunStopped(msg)


__all__ = ["RunResult", "StorageError", "Timing", "prepare", "run", "stop_on_signals"]
