"""One task of a sweep: the runs of one grid point (some or all of its seeds), in a worker.

Plain data in, plain data out, no files but the optional kept run files, never raises
for a failed run. The seeds of a task train together as one batch of B nets
(``Backend.advance`` on particles with a leading batch axis); under ``keep_runs`` each
seed runs alone through ``mfres.train.run`` and keeps its run file.

A run with Δs = Δs_max / r makes r·steps GD steps; its losses on the sweep's common
grid s_k = k·Δs_max are its steps 0, r, 2r, ... (exact values, no interpolation).
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import health
from .config import RunConfig
from .errors import ConfigError

_BACKENDS: dict[tuple[Any, ...], Any] = {}
"""One backend object per worker process and choice, reused by every task it runs (a Julia
backend keeps its Julia process)."""


def worker_backend(name: str, threads: int | None, device: str, memory: str) -> Any:
    """This process's backend for (name, threads, device, memory), made on first use."""
    from .backends import select

    key = (name, threads, device, memory)
    if key not in _BACKENDS:
        _BACKENDS[key] = select(name, threads, device, memory)
    return _BACKENDS[key]


def open_backends() -> set[tuple[Any, ...]]:
    """The keys of the backends this process holds now (to ``close_backends`` all others later)."""
    return set(_BACKENDS)


def close_backends(keep: set[tuple[Any, ...]]) -> None:
    """Close and forget this process's backends but those of ``keep`` (their keys)."""
    for key in [k for k in _BACKENDS if k not in keep]:
        backend = _BACKENDS.pop(key)
        with contextlib.suppress(Exception):
            backend.close()


def startup_total() -> float:
    """Seconds this process's backends have spent starting (Julia and its compilation, NumPy's helpers)."""
    return sum(float(b.startup_seconds) for b in _BACKENDS.values())


def batch_bytes(config: RunConfig, N: int, d: int, B: int) -> int:
    """Memory of one task training B nets of ``config`` at once on N samples of dimension d."""
    from . import model
    from .backends.numpy_backend import choose_recompute

    dtype = np.dtype(config.dtype)
    recompute = config.memory == "recompute" or choose_recompute(config.memory, config.depth, config.width, N,
                                                                 dtype, B)
    trajectory = 2 * 8 * (config.steps + 1) * B  # losses and velocities, float64
    return model.workspace_bytes(config.depth, config.width, d, N, dtype, recompute=recompute, B=B) + trajectory


def run_task(options: dict[str, Any], seeds: Sequence[int], stride: int, backend: str,
             keep_runs: str | None = None, run_name: Any = None) -> dict[str, Any]:
    """Train the runs of one grid point for ``seeds``; their losses at every ``stride``-th step.

    ``options``: ``RunConfig`` fields but ``seed`` (``steps`` already the run's own);
    returns per run ``loss`` (B, steps/stride + 1), ``status``, ``message``, ``seconds``,
    ``rise_count``, ``max_rise``, and the ``backend`` used, its ``threads`` and the task's
    ``startup_seconds`` (Julia's start and compilation, NumPy's helper processes, when the task
    paid for them).
    """
    t0, s0 = time.perf_counter(), startup_total()
    B = len(seeds)
    n_grid = int(options["steps"]) // stride + 1
    out: dict[str, Any] = {"loss": np.full((B, n_grid), np.nan), "status": ["failed"] * B, "message": [""] * B,
                           "rise_count": np.full(B, -1), "max_rise": np.full(B, np.nan), "backend": backend}
    try:
        if keep_runs:
            for j, seed in enumerate(seeds):
                cfg = RunConfig(**{**options, "seed": seed, "backend": backend})
                loss, status, msg, used = _one_run_file(cfg, os.path.join(keep_runs, run_name(seed)))
                _judge(out, j, loss, stride, status, msg, cfg.ds)
        else:
            cfg = RunConfig(**{**options, "seed": seeds[0], "backend": backend})
            losses, used = _batched(cfg, seeds)
            for j in range(B):
                _judge(out, j, losses[:, j], stride, "ok", "", cfg.ds)
        out["backend"], out["threads"] = used.name, int(getattr(used, "threads", 0) or 0)
    except Exception as e:  # a failed task is a result, not a crash of the sweep
        out["status"] = ["failed"] * B
        out["message"] = [f"{type(e).__name__}: {e}"] * B
        out["message"][0] += "\n" + traceback.format_exc(limit=3)
        out["loss"][:] = np.nan
        out["rise_count"][:] = -1
        out["max_rise"][:] = np.nan
    out["seconds"] = np.full(B, (time.perf_counter() - t0) / B)
    out["startup_seconds"] = startup_total() - s0
    return out


def _judge(out: dict[str, Any], j: int, loss: np.ndarray, stride: int, status: str, message: str,
           ds: float) -> None:
    """Status, health figures and grid losses of run j from its every-step losses."""
    loss = np.asarray(loss, dtype=np.float64)
    n_grid = out["loss"].shape[1]
    need = (n_grid - 1) * stride + 1
    bad = int(health.first_bad_step(loss)) if loss.size else 0
    if bad >= 0:
        kept = loss[: bad + 1]
        with np.errstate(invalid="ignore"):
            what = "is not finite" if not np.isfinite(loss[bad]) else \
                f"exceeds {health.RUNAWAY_FACTOR:g}·E(0)"
        status = "diverged"
        message = f"E = {loss[bad]:.6g} {what} at step {bad} (s = {bad * ds:g})"
        loss = np.concatenate([loss[:bad], np.full(max(need - bad, 0), np.nan)])
    else:
        kept = loss
    count, biggest = health.rises(kept)
    out["rise_count"][j], out["max_rise"][j] = int(count), float(biggest)
    grid = np.full(n_grid, np.nan)
    sampled = loss[:need:stride]
    grid[: len(sampled)] = sampled
    if status == "ok" and not (len(loss) >= need and np.isfinite(grid).all()):
        # never `ok` without every loss up to the common final time
        status = "failed"
        message = f"incomplete: {np.isfinite(grid).sum()} of {n_grid} grid losses ({message or 'run ended early'})"
    out["loss"][j] = grid
    out["status"][j] = status
    out["message"][j] = message


def _batched(cfg: RunConfig, seeds: Sequence[int]) -> tuple[np.ndarray, Any]:
    from . import data as data_mod
    from .backends import Problem
    from .model import Particles
    from .train import available_memory, initial_state

    data = data_mod.load(cfg.data, cfg.samples, cfg.dim, cfg.data_seed)
    need = batch_bytes(cfg, data.N, data.d, len(seeds))
    avail = available_memory()
    if avail is not None and need > 0.9 * avail:
        raise ConfigError(f"{len(seeds)} nets of L={cfg.depth}, M={cfg.width} on N={data.N}, d={data.d} need about "
                          f"{need / 2**30:.2f} GiB; this worker has {avail / 2**30:.2f} GiB available")
    problem = Problem.from_data(data, cfg.act, cfg.weight_decay, np.dtype(cfg.dtype))
    nets = [initial_state(cfg, data.d, seed) for seed in seeds]
    theta = Particles(*(np.stack([getattr(t, v) for t in nets]) for v in "UWb"))
    backend = worker_backend(cfg.backend, cfg.threads, cfg.device, cfg.memory)
    with np.errstate(all="ignore"):
        traj = backend.advance(theta, problem, cfg.ds, cfg.steps)
    return np.asarray(traj.loss, dtype=np.float64).reshape(-1, len(seeds)), backend


def _one_run_file(cfg: RunConfig, path: str) -> tuple[np.ndarray, str, str, Any]:
    """One kept run. A run that Ctrl-C (or SIGTERM) stopped, when the task runs in the sweep's
    own main thread, stops the sweep (``KeyboardInterrupt``) instead of failing one run."""
    from .errors import RunStopped
    from .store import open_run
    from .train import run, stop_on_signals

    backend = worker_backend(cfg.backend, cfg.threads, cfg.device, cfg.memory)
    status, msg = "ok", ""
    with stop_on_signals() as flag:  # (in a Dask worker's thread a flag that no signal sets)
        try:
            run(cfg, path, backend=backend, overwrite=True, command="mfres sweep --keep-runs", warn=False,
                stop=flag)
        except RunStopped as e:
            if flag.signal is not None:
                raise KeyboardInterrupt from None
            status, msg = ("diverged" if "diverged" in str(e) else "failed"), str(e)
    with open_run(path, load=True) as ds:
        loss = np.asarray(ds["loss"].values, dtype=np.float64)
        done = int(ds.attrs.get("steps_done", len(loss) - 1))
    return loss[: done + 1], status, msg, backend
