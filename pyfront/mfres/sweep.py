"""Sweeps: a grid of runs over depth, width and seeds (optionally activation, init, Δs), on Dask.

Every run of a sweep shares the data set and all other options. The runs of one
grid point (all its seeds) form one Dask task, which trains them together as a
batch of nets (``NumpyBackend.advance`` on stacked particles) — or one after the
other, with a run file each, under ``keep_runs``. Results go into one netCDF file
as tasks finish:

- ``loss(<swept>, depth, width, seed, step)`` on the common pseudo-time grid
  ``s(step)`` = step·Δs_max (runs with a smaller Δs are sampled on that grid);
- ``status`` (ok, diverged, failed, missing), ``message`` and ``seconds`` per run;
- the options as global attributes.

Re-running the same sweep on an existing file redoes only the runs still
``missing``: a crash or a lost worker costs only the unfinished tasks. A diverged
or failed run is recorded as such, with its finite losses kept and NaN after.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import __version__
from .config import RunConfig
from .errors import ConfigError, StorageError

STATUSES = ("missing", "ok", "diverged", "failed")
SWEPT = ("activation", "init", "ds")  # optional grid dimensions, outermost first


@dataclass(frozen=True)
class SweepSpec:
    """The grid and the options shared by every run (``base``: ``RunConfig`` fields)."""

    depths: tuple[int, ...]
    widths: tuple[int, ...]
    seeds: int
    activations: tuple[str, ...] = ()
    inits: tuple[str, ...] = ()
    dss: tuple[float, ...] = ()
    base: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.depths or not self.widths:
            raise ConfigError("a sweep needs at least one --depth and one --width")
        if self.seeds < 1:
            raise ConfigError(f"--seeds must be positive, got {self.seeds}")
        for name, values in (("--depth", self.depths), ("--width", self.widths)):
            if len(set(values)) != len(values):
                raise ConfigError(f"{name} lists a value twice: {','.join(map(str, values))}")
        for k in ("depth", "width"):
            if k in self.base:
                raise ConfigError(f"{k} is a sweep dimension, not a shared option")
        for cfg in self.configs():  # validates every combination once, before any work
            RunConfig(**cfg)

    @property
    def dims(self) -> list[tuple[str, tuple[Any, ...]]]:
        """The grid's dimensions: swept optional ones (if given), then depth, width, seed."""
        out: list[tuple[str, tuple[Any, ...]]] = []
        for name, values in (("activation", self.activations), ("init", self.inits), ("ds", self.dss)):
            if values:
                out.append((name, tuple(values)))
        out += [("depth", self.depths), ("width", self.widths), ("seed", tuple(self.seed_values))]
        return out

    @property
    def seed_values(self) -> list[int]:
        """Initialisation seeds: base seed + 0..K−1 (the same for every grid point)."""
        s0 = int(self.base.get("seed", 0) or 0)
        return [s0 + k for k in range(self.seeds)]

    @property
    def ds_max(self) -> float:
        return max(self.dss) if self.dss else float(self.base.get("ds", RunConfig.ds))

    @property
    def steps(self) -> int:
        return int(self.base.get("steps", RunConfig.steps))

    def groups(self) -> list[dict[str, Any]]:
        """One task per grid point but seed: its options (without ``seed``) and its index."""
        grid = [values for name, values in self.dims if name != "seed"]
        names = [name for name, _ in self.dims if name != "seed"]
        out = []
        for idx in itertools.product(*(range(len(v)) for v in grid)):
            opts = dict(self.base)
            opts.pop("seed", None)
            for name, values, i in zip(names, grid, idx, strict=True):
                opts[name] = values[i]
            if "ds" in opts and self.dss:
                # every ds covers the same pseudo-time S = steps * ds_max
                opts["steps"] = round(self.steps * self.ds_max / opts["ds"])
            out.append({"index": idx, "options": opts})
        return out

    def configs(self) -> list[dict[str, Any]]:
        return [{**g["options"], "seed": s} for g in self.groups() for s in self.seed_values]

    def attributes(self) -> dict[str, Any]:
        """What identifies a sweep: a re-run on an existing file must match these."""
        spec = {"depths": list(self.depths), "widths": list(self.widths), "seeds": self.seeds,
                "activations": list(self.activations), "inits": list(self.inits), "dss": list(self.dss),
                "base": {k: v for k, v in sorted(self.base.items()) if v is not None}}
        return {"sweep_spec": json.dumps(spec, sort_keys=True)}


# -- one task ---------------------------------------------------------------------
def run_group(options: dict[str, Any], seeds: Sequence[int], grid_s: np.ndarray,
              keep_runs: str | None = None) -> dict[str, Any]:
    """Train the runs of one grid point (one per seed); return their losses on ``grid_s``.

    Runs in a Dask worker: plain data in, plain data out, never raises for a failed run.
    """
    t0 = time.perf_counter()
    K = len(seeds)
    loss = np.full((K, len(grid_s)), np.nan)
    status = ["failed"] * K
    message = [""] * K
    try:
        if keep_runs:
            for j, seed in enumerate(seeds):
                loss[j], status[j], message[j] = _one_run_file({**options, "seed": seed}, grid_s, keep_runs)
        else:
            loss[:], status, message = _batched(options, seeds, grid_s)
    except Exception as e:  # a failed task is a result, not a crash of the sweep
        message = [f"{type(e).__name__}: {e}"] * K
        status = ["failed"] * K
        loss[:] = np.nan
        message[0] += "\n" + traceback.format_exc(limit=3)
    return {"loss": loss, "status": status, "message": message,
            "seconds": (time.perf_counter() - t0) / K}


def _on_grid(s: np.ndarray, values: np.ndarray, grid_s: np.ndarray) -> np.ndarray:
    """Values at the grid's pseudo-times (exact where the grid falls on steps, linear in s otherwise)."""
    out = np.interp(grid_s, s, values, right=np.nan)
    out[grid_s > s[-1] + 1e-12 * max(1.0, s[-1])] = np.nan
    return out


def _batched(options: dict[str, Any], seeds: Sequence[int], grid_s: np.ndarray
             ) -> tuple[np.ndarray, list[str], list[str]]:
    from .backends.numpy_backend import NumpyBackend
    from .model import Particles
    from .train import initial_state, prepare

    cfg = RunConfig(**{**options, "seed": seeds[0], "backend": "numpy"})
    data, first, problem = prepare(cfg)
    nets = [first, *(initial_state(cfg, data.d, seed) for seed in seeds[1:])]
    theta = Particles(*(np.stack([getattr(t, v) for t in nets]) for v in "UWb"))
    with np.errstate(all="ignore"):
        traj = NumpyBackend(cfg.memory).advance(theta, problem, cfg.ds, cfg.steps)
    s = np.arange(cfg.steps + 1) * cfg.ds
    loss = np.empty((len(seeds), len(grid_s)))
    status, message = [], []
    for j in range(len(seeds)):
        lj = traj.loss[:, j].copy()
        bad = np.flatnonzero(~np.isfinite(lj))
        if bad.size:
            lj[bad[0]:] = np.nan
            status.append("diverged")
            message.append(f"loss became {traj.loss[bad[0], j]} at step {bad[0]} (s = {s[bad[0]]:g})")
        else:
            status.append("ok")
            message.append("")
        loss[j] = _on_grid(s, lj, grid_s)
    return loss, status, message


def _one_run_file(options: dict[str, Any], grid_s: np.ndarray, folder: str) -> tuple[np.ndarray, str, str]:
    from .errors import RunStopped
    from .store import open_run
    from .train import run

    cfg = RunConfig(**{**options, "backend": options.get("backend", "numpy")})
    name = "run_" + "_".join(f"{k}{v}" for k, v in (("L", cfg.depth), ("M", cfg.width), ("seed", cfg.seed),
                                                     ("act", cfg.activation), ("init", cfg.init),
                                                     ("ds", f"{cfg.ds:g}"))) + ".nc"
    path = os.path.join(folder, name.replace(":", "-"))
    status, msg = "ok", ""
    try:
        run(cfg, path, overwrite=True, command="mfres sweep")
    except RunStopped as e:
        status, msg = ("diverged" if "diverged" in str(e) else "failed"), str(e)
    with open_run(path, load=True) as ds:
        loss = ds["loss"].values
        s = ds["s"].values
    finite = np.isfinite(loss)
    if not finite.any():
        return np.full(len(grid_s), np.nan), status, msg
    n = int(np.flatnonzero(finite)[-1]) + 1
    return _on_grid(s[:n], loss[:n], grid_s), status, msg


# -- the sweep file -------------------------------------------------------------------
class SweepFile:
    """The sweep's netCDF file: created with every run ``missing``, filled as tasks finish."""

    def __init__(self, path: str, spec: SweepSpec, command: str = "") -> None:
        import netCDF4

        from .store import _allow_concurrent_readers

        _allow_concurrent_readers()
        self.path, self.spec = path, spec
        self.grid_s = np.arange(spec.steps + 1) * spec.ds_max
        dims = spec.dims
        if os.path.exists(path):
            try:
                self.nc = netCDF4.Dataset(path, "a")
            except OSError as e:
                raise StorageError(f"cannot reopen {path}: {e}") from None
            theirs = self.nc.getncattr("sweep_spec") if "sweep_spec" in self.nc.ncattrs() else None
            if theirs != spec.attributes()["sweep_spec"]:
                self.nc.close()
                raise ConfigError(f"{path} holds a different sweep (its options differ); "
                                  "use another --out to start a new one")
            return
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise StorageError(f"cannot write {path}: directory {directory} does not exist")
        try:
            self.nc = nc = netCDF4.Dataset(path, "w", format="NETCDF4")
            for name, values in dims:
                nc.createDimension(name, len(values))
                kind = "f8" if name == "ds" else ("i8" if name in ("depth", "width", "seed") else str)
                v = nc.createVariable(name, kind, (name,))
                v[:] = np.array(values, dtype=object if kind is str else kind)
                v.long_name = {"depth": "depth L", "width": "width M", "seed": "initialisation seed",
                               "ds": "pseudo-time step", "activation": "activation", "init": "initialisation"}[name]
            nc.createDimension("step", len(self.grid_s))
            s = nc.createVariable("s", "f8", ("step",))
            s[:] = self.grid_s
            s.long_name, s.units = "pseudo-time s (common grid)", "1"
            names = tuple(n for n, _ in dims)
            chunks = tuple([1] * (len(names) - 1) + [spec.seeds, len(self.grid_s)])
            loss = nc.createVariable("loss", "f8", (*names, "step"), fill_value=np.nan, chunksizes=chunks)
            loss.long_name, loss.units, loss.coordinates = "loss E at pseudo-time s", "1", "s"
            st = nc.createVariable("status", str, names)
            st.long_name = "run status: " + ", ".join(STATUSES)
            msg = nc.createVariable("message", str, names)
            msg.long_name = "why a run diverged or failed"
            sec = nc.createVariable("seconds", "f8", names, fill_value=np.nan)
            sec.long_name, sec.units = "wall-clock time of the run", "s"
            shape = tuple(len(v) for _, v in dims)
            st[...] = np.full(shape, "missing", dtype=object)
            msg[...] = np.full(shape, "", dtype=object)
            now = _dt.datetime.now(_dt.timezone.utc)
            attrs = {"Conventions": "CF-1.8", "title": f"mfres sweep over {', '.join(names)}",
                     "source": f"mfres {__version__}", "mfres_version": __version__,
                     "created": now.isoformat(timespec="seconds"), "command": command,
                     "history": f"{now:%Y-%m-%dT%H:%M:%SZ} {command or 'mfres.sweep'}",
                     "steps": spec.steps, "ds_max": spec.ds_max, "seeds": spec.seeds}
            for k, v in spec.base.items():
                if v is not None and k not in attrs:
                    attrs[k] = v if not isinstance(v, bool) else int(v)
            attrs.update(spec.attributes())
            nc.setncatts(attrs)
            nc.sync()
        except (OSError, RuntimeError) as e:
            raise StorageError(f"cannot write {path}: {e}") from None

    def missing(self) -> list[dict[str, Any]]:
        """The groups with at least one run still missing."""
        status = np.asarray(self.nc["status"][...], dtype=object)
        return [g for g in self.spec.groups() if np.any(status[g["index"]] == "missing")]

    def write(self, index: tuple[int, ...], result: dict[str, Any]) -> None:
        try:
            self.nc["loss"][index] = result["loss"]
            status = np.asarray(self.nc["status"][...], dtype=object)
            status[index] = np.array(result["status"], dtype=object)
            self.nc["status"][...] = status
            msg = np.asarray(self.nc["message"][...], dtype=object)
            msg[index] = np.array(result["message"], dtype=object)
            self.nc["message"][...] = msg
            self.nc["seconds"][index] = np.full(len(result["status"]), result["seconds"])
            self.nc.sync()
        except (OSError, RuntimeError) as e:
            raise StorageError(f"writing results to {self.path} failed ({e}); finished runs are kept") from None

    def close(self) -> None:
        if self.nc.isopen():
            self.nc.close()


# -- running a sweep --------------------------------------------------------------------
def run_sweep(spec: SweepSpec, out: str, *, workers: int | None = None, scheduler: str | None = None,
              keep_runs: str | None = None, command: str = "",
              progress: Callable[[int, int, dict[str, Any]], None] | None = None) -> dict[str, int]:
    """Run every missing run of ``spec`` on Dask and record it in ``out``; return status counts.

    ``scheduler``: the address of a running ``dask.distributed`` scheduler; otherwise a
    local cluster of ``workers`` processes (default: one per core) on 127.0.0.1.
    """
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ConfigError("mfres sweep needs dask.distributed: pip install 'mfres[sweep]'") from None
    if keep_runs:
        os.makedirs(keep_runs, exist_ok=True)
    sweep_file = SweepFile(out, spec, command)
    try:
        todo = sweep_file.missing()
        total = len(spec.groups())
        done = total - len(todo)
        if progress:
            progress(done, total, {})
        if todo:
            cluster = None
            if scheduler:
                client = Client(scheduler, timeout="30s")
            else:
                cluster = LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1,
                                       processes=True, host="127.0.0.1", dashboard_address=None)
                client = Client(cluster)
            try:
                seeds = spec.seed_values
                futures = {client.submit(run_group, g["options"], seeds, sweep_file.grid_s, keep_runs,
                                         pure=False): g for g in todo}
                for fut in as_completed(futures):
                    g = futures[fut]
                    try:
                        result = fut.result()
                    except Exception as e:  # a lost worker, an unpicklable error: record, go on
                        K = len(seeds)
                        result = {"loss": np.full((K, len(sweep_file.grid_s)), np.nan), "status": ["failed"] * K,
                                  "message": [f"task failed: {type(e).__name__}: {e}"] * K, "seconds": np.nan}
                    sweep_file.write(g["index"], result)
                    done += 1
                    if progress:
                        progress(done, total, {**g["options"], "status": result["status"]})
            finally:
                client.close()
                if cluster is not None:
                    cluster.close()
        status = np.asarray(sweep_file.nc["status"][...], dtype=object)
        return {k: int(np.sum(status == k)) for k in STATUSES}
    finally:
        sweep_file.close()


def open_sweep(path: str, load: bool = True) -> Any:
    """A sweep file as an ``xarray.Dataset``."""
    from .store import open_run

    return open_run(path, load=load)
