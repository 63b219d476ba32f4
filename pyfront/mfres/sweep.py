"""Sweeps: a grid of runs over depth, width and seeds (optionally activation, init, Δs), on Dask.

Every run of a sweep shares the data set and all other options. The runs of one grid
point form one Dask task, which trains its seeds together as a batch of nets through
``mfres.backends.select(backend, ...)`` (one backend object per worker process,
reused by every task) — or one after the other, with a run file each, under
``keep_runs``. The sweep file (``mfres.sweep_store``: durable, one writer) holds:

- ``loss(<swept>, depth, width, seed, step)`` on the common pseudo-time grid
  ``s(step)`` = step·Δs_max. Every swept Δs must divide Δs_max a whole number of times
  r (checked up front): that run makes r·steps steps and the grid holds its steps
  0, r, 2r, ..., so every run reaches the common final s exactly;
- per run: ``status`` (ok, diverged, failed, missing), ``message``, ``seconds``,
  ``rise_count`` and ``max_rise`` (``mfres.health``), ``backend``;
- the options as global attributes, ``sweep_spec`` (the grid and options, JSON) and
  ``backend`` (the backends used).

``ok`` means finite losses over the whole grid; ``diverged`` means E became non-finite
or exceeded ``health.RUNAWAY_FACTOR``·E(0) (losses kept before that step, NaN after).
Re-running the same sweep on its file redoes exactly the runs that are ``missing`` or
``failed``; the result equals an unbroken sweep bitwise.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import numbers
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import __version__
from .config import RunConfig
from .errors import BackendError, ConfigError, MfresError, StorageError
from .model import default_threads
from .sweep_store import RUN_VARIABLES, STATUSES, SweepStore, check_regular
from .sweep_store import read as _read

SWEPT = ("activation", "init", "ds")  # optional grid dimensions, outermost first
BACKENDS = ("numpy", "julia", "auto")
PUBLISH_SECONDS = 10.0
"""The published sweep file is rebuilt at most this often (and at the end); each task's
results are durable on their own as soon as it ends."""
CONNECT_SECONDS = 10.0
SYNCHRONOUS = "synchronous"
RATIO_TOLERANCE = 1e-9

__all__ = ["RUN_VARIABLES", "STATUSES", "SweepSpec", "describe", "open_sweep", "run_sweep"]


@dataclass(frozen=True)
class SweepSpec:
    """The grid and the options shared by every run (``base``: ``RunConfig`` fields).

    ``seeds`` K: every grid point runs the seeds ``base["seed"]`` + 0..K−1. Each of
    ``activations``, ``inits``, ``dss`` left empty is not swept (its value comes from
    ``base``). Raises ``ConfigError`` for a repeated value, a Δs that does not divide the
    largest one, or any invalid run.
    """

    depths: tuple[int, ...]
    widths: tuple[int, ...]
    seeds: int
    activations: tuple[str, ...] = ()
    inits: tuple[str, ...] = ()
    dss: tuple[float, ...] = ()
    base: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.depths or not self.widths:
            raise ConfigError("a sweep needs at least one depth and one width")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, numbers.Integral) or self.seeds < 1:
            raise ConfigError(f"seeds must be a positive number of seeds per grid point, got {self.seeds!r}")
        object.__setattr__(self, "seeds", int(self.seeds))
        for k in ("depth", "width"):
            if k in self.base:
                raise ConfigError(f"{k} is a sweep dimension, not a shared option")
        # normalise the swept values as a run would (so 'TANH' and 'tanh' are one value)
        norm = {"activations": [RunConfig(activation=a).activation for a in self.activations] if self.activations
                else [], "inits": list(self.inits), "dss": [float(v) for v in self.dss]}
        for name, values in (("depth", self.depths), ("width", self.widths), ("activation", norm["activations"]),
                             ("init", norm["inits"]), ("ds", norm["dss"])):
            repeated = sorted({v for v in values if list(values).count(v) > 1}, key=str)
            if repeated:
                raise ConfigError(f"{name} lists {', '.join(map(str, repeated))} more than once; "
                                  "give each swept value once")
        object.__setattr__(self, "activations", tuple(norm["activations"]))
        object.__setattr__(self, "dss", tuple(norm["dss"]))
        self._check_ds_ratios()
        for cfg in self.configs():  # validates every combination once, before any work
            RunConfig(**cfg)
        names = [run_file_name(self, g["options"], s) for g in self.groups() for s in self.seed_values]
        if len(set(names)) != len(names):  # cannot happen with distinct values; never overwrite a kept run
            raise ConfigError("two runs of this sweep would get the same kept-run file name")

    def _check_ds_ratios(self) -> None:
        for ds in self.dss:
            if not (np.isfinite(ds) and ds > 0):
                raise ConfigError(f"ds must be positive, got {ds:g}")
            r = self.ds_max / ds
            if abs(r - round(r)) > RATIO_TOLERANCE * r:
                raise ConfigError(
                    f"ds {ds:g} does not divide the largest ds {self.ds_max:g} (ratio {r:.6g}): every run must "
                    f"reach the common final s = steps × {self.ds_max:g} exactly, on the common grid; sweep Δs "
                    f"values that divide the largest a whole number of times (e.g. {self.ds_max:g}, "
                    f"{self.ds_max / 2:g}, {self.ds_max / 4:g}) or run the others as a separate sweep")

    @property
    def dims(self) -> list[tuple[str, tuple[Any, ...]]]:
        """The grid's dimensions: swept optional ones (if given), then depth, width, seed."""
        out: list[tuple[str, tuple[Any, ...]]] = []
        for name, values in (("activation", self.activations), ("init", self.inits), ("ds", self.dss)):
            if values:
                out.append((name, tuple(values)))
        out += [("depth", tuple(self.depths)), ("width", tuple(self.widths)), ("seed", tuple(self.seed_values))]
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
        """Steps of the common grid (of the runs with the largest Δs)."""
        return int(self.base.get("steps", RunConfig.steps))

    @property
    def grid_s(self) -> np.ndarray:
        return np.arange(self.steps + 1) * self.ds_max

    def stride(self, ds: float) -> int:
        """r = Δs_max / Δs: a run with ``ds`` makes r steps per grid step."""
        return round(self.ds_max / ds)

    def groups(self) -> list[dict[str, Any]]:
        """One task per grid point but seed: its options (without ``seed``), grid index and stride."""
        grid = [values for name, values in self.dims if name != "seed"]
        names = [name for name, _ in self.dims if name != "seed"]
        out = []
        for idx in itertools.product(*(range(len(v)) for v in grid)):
            opts = dict(self.base)
            opts.pop("seed", None)
            opts.pop("backend", None)
            for name, values, i in zip(names, grid, idx, strict=True):
                opts[name] = values[i]
            stride = self.stride(float(opts.get("ds", RunConfig.ds))) if self.dss else 1
            opts["steps"] = self.steps * stride
            out.append({"index": idx, "options": opts, "stride": stride})
        return out

    def configs(self) -> list[dict[str, Any]]:
        return [{**g["options"], "seed": s} for g in self.groups() for s in self.seed_values]

    def attributes(self) -> dict[str, Any]:
        """``sweep_spec``: the grid and every shared option, as JSON."""
        spec = {"depths": list(self.depths), "widths": list(self.widths), "seeds": self.seeds,
                "activations": list(self.activations), "inits": list(self.inits), "dss": list(self.dss),
                "base": {k: v for k, v in sorted(self.base.items()) if v is not None}}
        return {"sweep_spec": json.dumps(spec, sort_keys=True)}

    def identity(self) -> str:
        """What a re-run must match: the grid and the options that change the numbers
        (not threads, memory mode, backend or snapshot settings)."""
        spec = json.loads(self.attributes()["sweep_spec"])
        numeric = set(RunConfig.NUMERIC_FIELDS) | {"steps"}
        spec["base"] = {k: v for k, v in spec["base"].items() if k in numeric}
        return json.dumps(spec, sort_keys=True)


def run_file_name(spec: SweepSpec, options: dict[str, Any], seed: int) -> str:
    """The kept run file of one run: every grid coordinate, Δs written exactly (``repr``)."""
    parts = [f"L{options['depth']}", f"M{options['width']}", f"seed{seed}"]
    if spec.activations:
        parts.append("act" + str(options["activation"]))
    if spec.inits:
        parts.append("init" + str(options["init"]))
    if spec.dss:
        parts.append("ds" + repr(float(options["ds"])))
    name = "run_" + "_".join(parts) + ".nc"
    return "".join(c if c.isalnum() or c in "._-+" else "-" for c in name)


# -- the Dask side ------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_dask() -> Iterator[None]:
    """Silence distributed's log lines (e.g. a taken dashboard port) here and in spawned workers."""
    loggers = [logging.getLogger(n) for n in ("distributed", "tornado", "bokeh")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    old = os.environ.get("DASK_LOGGING__DISTRIBUTED")
    os.environ["DASK_LOGGING__DISTRIBUTED"] = "critical"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="distributed")  # "Port 8787 is already in use", ...
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if old is None:
            os.environ.pop("DASK_LOGGING__DISTRIBUTED", None)
        else:
            os.environ["DASK_LOGGING__DISTRIBUTED"] = old


def _connect(address: str, timeout: float) -> Any:
    """A ``Client`` of the scheduler at ``address``, or ``ConfigError`` within ``timeout`` seconds.

    distributed's own ``timeout`` does not cover a peer that accepts and never answers,
    so the connection is made in a thread that is abandoned if it does not return.
    """
    from dask.distributed import Client
    from distributed.comm import parse_address

    try:
        _, loc = parse_address(address)
        host, sep, port = loc.rpartition(":")
        if not (sep and host and port.isdigit()) or any(c.isspace() for c in address):
            raise ValueError("expected host:port, e.g. tcp://127.0.0.1:8786")
    except (ValueError, TypeError) as e:
        raise ConfigError(f"scheduler {address!r} is not a scheduler address ({e})") from None
    box: dict[str, Any] = {}

    def connect() -> None:
        try:
            box["client"] = Client(address, timeout=f"{timeout}s")
        except BaseException as e:  # reported to the caller's thread
            box["error"] = e

    t = threading.Thread(target=connect, name="mfres-connect", daemon=True)
    t.start()
    t.join(timeout + 2.0)
    if "client" in box:
        return box["client"]
    why = f"{type(box['error']).__name__}: {box['error']}" if "error" in box else \
        f"it accepted the connection but did not answer within {timeout:g} s"
    raise ConfigError(f"cannot use the Dask scheduler at {address}: {why}")


def _local_cluster(workers: int) -> Any:
    from dask.distributed import Client, LocalCluster

    try:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=":0", silence_logs=logging.CRITICAL)  # (no fixed port to collide)
        return Client(cluster), cluster
    except Exception as e:  # a worker killed while starting, no free port, ...
        raise BackendError(f"cannot start a local Dask cluster of {workers} workers ({type(e).__name__}: {e}); "
                           "the finished runs are kept: run the same command again") from None


@dataclass(frozen=True)
class Placement:
    """Where a sweep's tasks run: ``here`` (this process, one after another, placed so by
    default), ``synchronous`` (the same, asked for), ``local`` (a new cluster of ``workers``
    processes on 127.0.0.1) or ``scheduler`` (a running cluster), and the ``threads`` each
    task's backend gets when the sweep's options leave them unset (``None``: the backend's own
    default, as for a run alone)."""

    where: str
    workers: int
    threads: int | None


def placement(workers: int | None, scheduler: str | None, tasks: int, cores: int) -> Placement:
    """Place ``tasks`` tasks on a machine of ``cores`` cores.

    ``scheduler``: an address (that cluster) or ``"synchronous"`` (here). ``workers`` N:
    a local cluster of N processes, fewer when fewer tasks are to do. Neither: one process
    per core, at most one per task, and a single one (one task, or one core) runs here,
    without a cluster, whose start (about 1.5 s measured, more than a small task's work)
    would buy no parallelism. A local cluster's W workers share the cores: each task's
    backend gets cores // W threads (Julia threads, NumPy helper processes), not every core
    W times over.
    """
    if scheduler == SYNCHRONOUS:
        return Placement(SYNCHRONOUS, 1, None)
    if scheduler:
        return Placement("scheduler", 0, None)
    n = max(1, min(workers or cores, tasks))
    if workers is None and n == 1:
        return Placement("here", 1, None)
    return Placement("local", n, max(1, cores // n))


def _check_workers(workers: Any, scheduler: str | None) -> int | None:
    if workers is None:
        return None
    if isinstance(workers, bool) or not isinstance(workers, int | np.integer):
        raise ConfigError(f"workers must be a whole number of processes, got {workers!r}")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers} (leave it unset for one per core)")
    if scheduler and scheduler != SYNCHRONOUS:
        raise ConfigError("workers sets the size of a local cluster; a scheduler brings its own workers")
    return int(workers)


def _check_memory(spec: SweepSpec, workers: int, keep_runs: bool) -> None:
    """Refuse up front, with the figures, a sweep whose tasks would not fit in memory together
    (``workers``: how many run at once, as ``placement`` gives them)."""
    from . import data as data_mod
    from .sweep_task import batch_bytes
    from .train import available_memory

    avail = available_memory()
    if avail is None:
        return
    base = spec.groups()[0]["options"]
    try:
        data = data_mod.load(base.get("data", RunConfig.data), base.get("samples"), base.get("dim"),
                             base.get("data_seed", 0))
    except MfresError:
        return  # every task will report why it cannot load the data
    B = 1 if keep_runs else spec.seeds
    worst, where = 0, None
    for g in spec.groups():
        cfg = RunConfig(**{**g["options"], "seed": 0, "backend": "numpy"})
        need = batch_bytes(cfg, data.N, data.d, B)
        if need > worst:
            worst, where = need, cfg
    at_once = workers
    if where is not None and worst * at_once > 0.9 * avail:
        raise ConfigError(
            f"a task trains {B} nets at once (L={where.depth}, M={where.width}, N={data.N}, d={data.d}): about "
            f"{worst / 2**30:.2f} GiB, {worst * at_once / 2**30:.2f} GiB for {at_once} workers at once; "
            f"{avail / 2**30:.2f} GiB is available. Use fewer seeds or workers, or memory='recompute'")


# -- running a sweep -----------------------------------------------------------------------------------
def _todo(spec: SweepSpec, store: SweepStore) -> list[tuple[dict[str, Any], list[int]]]:
    """(group, seed positions) of every run still to do: missing, failed, or `ok` without all its losses."""
    status = store.state.runs["status"]
    finite = np.isfinite(store.state.loss).all(axis=-1)
    out = []
    for g in spec.groups():
        st, fin = status[g["index"]], finite[g["index"]]
        redo = [j for j in range(spec.seeds) if st[j] in ("missing", "failed") or (st[j] == "ok" and not fin[j])]
        if redo:
            out.append((g, redo))
    return out


def run_sweep(spec: SweepSpec, out: str, *, workers: int | None = None, scheduler: str | None = None,
              backend: str = "numpy", keep_runs: str | None = None, overwrite: bool = False, command: str = "",
              progress: Callable[[int, int, dict[str, Any]], None] | None = None,
              publish_seconds: float = PUBLISH_SECONDS, connect_timeout: float = CONNECT_SECONDS) -> dict[str, int]:
    """Run every run of ``spec`` not yet done in the sweep file ``out``; return the status counts.

    ``scheduler``: the address of a running ``dask.distributed`` scheduler, or
    ``"synchronous"`` to run the tasks in this process one after another; otherwise a
    local cluster of ``workers`` processes on 127.0.0.1, or by default one per core, where
    a single task to do runs in this process (``placement``).
    ``backend``: numpy, julia or auto, chosen in each worker. ``overwrite``: start afresh,
    removing an existing ``out`` and its sidecar folder ``out.parts``. ``progress(done,
    total, info)`` is called as tasks end (``info``: the task's options, its runs' ``status``,
    the ``startup_seconds`` its ``backend`` paid and that backend's ``threads``). Only one
    process may write ``out`` at a time.
    """
    workers = _check_workers(workers, scheduler)
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    check_regular(out)
    if keep_runs:
        if os.path.exists(keep_runs) and not os.path.isdir(keep_runs):
            raise StorageError(f"{keep_runs} is not a folder (keep_runs)")
        try:
            os.makedirs(keep_runs, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create {keep_runs}: {e.strerror}") from None
    cores = default_threads()
    if not scheduler or scheduler == SYNCHRONOUS:
        _check_memory(spec, placement(workers, scheduler, len(spec.groups()), cores).workers, bool(keep_runs))
    attrs = _attributes(spec, command)
    client = None
    if scheduler and scheduler != SYNCHRONOUS:  # before any file is made: a wrong address leaves nothing
        with _quiet_dask():
            client = _connect(scheduler, connect_timeout)
    try:
        store = SweepStore(out, spec.dims, spec.grid_s, spec.identity(), attrs, command, overwrite=overwrite)
    except BaseException:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close(timeout=5)
        raise
    try:
        todo = _todo(spec, store)
        total = len(spec.groups())
        done = total - len(todo)
        if progress:
            progress(done, total, {})
        last = time.monotonic()
        cost = 0.0
        place = placement(workers, scheduler, len(todo), cores)
        results = _results(spec, todo, place, client, backend, keep_runs)
        with contextlib.closing(results):
            for g, redo, result in results:
                store.record(g["index"], redo, result)
                done += 1
                if time.monotonic() - last >= max(publish_seconds, 20 * cost):
                    t0 = time.monotonic()
                    store.publish()  # rewriting the whole file: at most 1/20 of the time
                    last = time.monotonic()
                    cost = last - t0
                if progress:
                    progress(done, total, {**g["options"], "status": list(result["status"]),
                                           "startup_seconds": float(result.get("startup_seconds", 0.0)),
                                           "backend": str(result.get("backend", "")),
                                           "threads": int(result.get("threads", 0))})
        if store.dirty:
            store.publish()
        return store.state.counts()
    finally:
        if store.dirty:
            with contextlib.suppress(StorageError):
                store.publish()  # (interrupted: the segments hold the runs anyway)
        store.close()


def _results(spec: SweepSpec, todo: list[tuple[dict[str, Any], list[int]]], place: Placement, client: Any,
             backend: str, keep_runs: str | None) -> Iterator[tuple[dict[str, Any], list[int], dict[str, Any]]]:
    """Run the tasks as ``place`` says (on ``client`` for a scheduler); yield (group, seed positions,
    result) as they end, a lost task as ``failed``."""
    from .sweep_task import run_task

    if not todo:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close(timeout=5)
        return
    seeds = spec.seed_values
    # a Julia thread count the user set in the environment is theirs, in workers as in a run alone
    julia_threads_set = any(os.environ.get(v) for v in ("JULIA_NUM_THREADS", "PYTHON_JULIACALL_THREADS"))

    def args(g: dict[str, Any], redo: list[int]) -> tuple[Any, ...]:
        name = _namer(spec, g["options"]) if keep_runs else None
        options = g["options"]
        if place.threads and options.get("threads") is None and not (backend != "numpy" and julia_threads_set):
            options = {**options, "threads": place.threads}
        return options, [seeds[j] for j in redo], g["stride"], backend, keep_runs, name

    if place.where in ("here", SYNCHRONOUS):
        from .sweep_task import close_backends, open_backends

        before = open_backends()
        try:
            for g, redo in todo:
                yield g, redo, run_task(*args(g, redo))
        finally:
            # placed here by default, the backends this sweep started go with it, as a cluster's
            # workers do; asked for (synchronous), they stay for the next sweep in this process
            if place.where == "here":
                close_backends(before)
        return
    with _quiet_dask():
        from dask.distributed import as_completed

        cluster = None
        if client is None:
            client, cluster = _local_cluster(place.workers)
        try:
            futures = {client.submit(run_task, *args(g, redo), pure=False): (g, redo) for g, redo in todo}
            finished = as_completed(futures)
            while True:
                try:
                    fut = next(finished)
                except StopIteration:
                    break
                except Exception as e:  # the scheduler went away
                    raise BackendError(f"lost the Dask scheduler ({type(e).__name__}: {e}); the finished runs are "
                                       "kept: run the same command again") from None
                g, redo = futures[fut]
                try:
                    result = fut.result()
                except Exception as e:  # a lost worker (KilledWorker), an unpicklable error: the runs failed
                    result = _lost(len(redo), len(spec.grid_s), f"task lost: {type(e).__name__}: {e}")
                yield g, redo, result
        finally:
            with contextlib.suppress(Exception):
                client.close(timeout=5)
            if cluster is not None:
                with contextlib.suppress(Exception):
                    cluster.close(timeout=10)


class _namer:
    """Picklable run-file namer of one grid point: seed -> file name."""

    def __init__(self, spec: SweepSpec, options: dict[str, Any]) -> None:
        self.names = {s: run_file_name(spec, options, s) for s in spec.seed_values}

    def __call__(self, seed: int) -> str:
        return self.names[seed]


def _lost(k: int, n: int, message: str) -> dict[str, Any]:
    return {"loss": np.full((k, n), np.nan), "status": ["failed"] * k, "message": [message] * k,
            "seconds": np.full(k, np.nan), "rise_count": np.full(k, -1), "max_rise": np.full(k, np.nan),
            "backend": ""}


def _attributes(spec: SweepSpec, command: str) -> dict[str, Any]:
    import datetime as _dt

    now = _dt.datetime.now(_dt.timezone.utc)
    names = [n for n, _ in spec.dims]
    attrs: dict[str, Any] = {"Conventions": "CF-1.8", "title": f"mfres sweep over {', '.join(names)}",
                             "source": f"mfres {__version__}", "mfres_version": __version__,
                             "created": now.isoformat(timespec="seconds"), "command": command,
                             "steps": spec.steps, "ds_max": spec.ds_max, "seeds": spec.seeds}
    for k, v in spec.base.items():
        if v is not None and k not in attrs and k != "backend":
            attrs[k] = v if not isinstance(v, bool) else int(v)
    attrs.update(spec.attributes())
    return attrs


# -- reading ------------------------------------------------------------------------------------------
def open_sweep(path: str) -> Any:
    """A sweep file as a loaded ``xarray.Dataset``, including results not yet published into it.

    Raises ``StorageError`` if ``path`` is missing or not a netCDF file, ``ConfigError``
    if it is not a sweep file.
    """
    ds = _read(path)
    if "sweep_spec" not in ds.attrs or "status" not in ds or "seed" not in ds.dims:
        raise ConfigError(f"{path} is not a sweep file (made by mfres sweep)")
    return ds


def is_sweep_file(path: str) -> bool:
    """Whether ``path`` is a netCDF file written by ``run_sweep`` (cheap: reads attributes only)."""
    import netCDF4

    try:
        check_regular(path)
        with netCDF4.Dataset(path) as nc:
            return "sweep_spec" in nc.ncattrs() and "status" in nc.variables
    except (OSError, UnicodeError, StorageError):  # a path netCDF4 cannot spell is no sweep of ours
        return False


def describe(path: str) -> str:
    """A plain-text summary of a sweep file, for ``mfres info``: grid, status counts, losses, progress."""
    ds = open_sweep(path)
    a = ds.attrs
    status = ds["status"].values.astype(str)
    counts = {k: int(np.sum(status == k)) for k in STATUSES}
    grid = ", ".join(f"{n} ∈ {{{', '.join(str(v) for v in ds[n].values)}}}" for n in ds["status"].dims
                     if n != "seed")
    lines = [f"{path}: {a.get('title', 'mfres sweep')}",
             f"grid: {grid}; {ds.sizes['seed']} seeds each ({status.size} runs)",
             "runs: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v),
             f"steps: {a.get('steps', '?')} on the common grid, s up to {float(ds['s'].values[-1]):g} "
             f"(Δs_max = {a.get('ds_max', '?')})",
             f"backend: {a.get('backend') or 'none yet'}"]
    ok = status == "ok"
    if ok.any():
        final = ds["loss"].values[..., -1][ok]
        lines.append(f"final loss of ok runs: median {np.median(final):.6g}, range {final.min():.6g} .. "
                     f"{final.max():.6g}")
    if "max_rise" in ds and ok.any():
        # rises at the level of round-off (E flat at convergence) are not worth a word
        rise = ds["max_rise"].values[ok]
        real = rise > 1e-9 * np.abs(ds["loss"].values[..., 0][ok])
        if real.any():
            lines.append(f"E rose in some steps of {int(real.sum())} ok runs (largest rise {rise.max():.3g}); "
                         "a smaller Δs follows the flow more closely")
    pending = int(a.get("segments_pending", 0))
    if pending:
        lines.append(f"{pending} finished tasks not yet merged into the file (read with mfres.sweep.open_sweep)")
    if counts["missing"] or counts["failed"]:
        lines.append("re-run the same command to do the missing and failed runs: " + str(a.get("command", "")))
    lines.append(f"created {a.get('created', '?')} by mfres {a.get('mfres_version', '?')}")
    return "\n".join(lines)
