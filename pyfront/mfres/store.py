"""The run file: a netCDF4 file written step by step, read back with xarray.

Schema (names are a contract):

- per step (unlimited dimension ``step``): ``loss`` E, ``s`` pseudo-time step·Δs,
  ``grad_norm`` RMS particle velocity L M |∇_θ E|;
- per snapshot (unlimited dimension ``snapshot``, coordinates ``snapshot_step`` and
  ``snapshot_s``): ``U``, ``W`` (snapshot, layer, particle, dim), ``b`` (snapshot,
  layer, particle), ``prediction`` (snapshot, sample) = a·z_L(x_i), and per-layer
  moments over all M particles: ``U_mean``, ``W_mean`` (snapshot, layer, dim),
  ``U_sq``, ``W_sq``, ``b_mean``, ``b_sq`` (snapshot, layer), where ``_sq`` is the
  mean squared norm. With ``snapshot_particles`` K, ``particle`` holds K sampled
  particles whose indices are the coordinate ``particle_index``;
- the data: ``x`` (sample, dim), ``y`` (sample), ``readout`` (dim); the depth
  coordinate ``t`` (layer) = l/L;
- the full state for ``--resume``: ``state_U``, ``state_W``, ``state_b`` in two slots,
  written alternately at every snapshot and every ``STATE_SECONDS``; the attributes
  ``state_step`` and ``state_slot`` name the valid one, and change only after it has
  been written and synced;
- global attributes named like the options, plus ``backend`` (the one used),
  ``status`` (running, finished, interrupted, diverged, failed) and ``steps_done``.

The file is synced at every snapshot and at least every ``SYNC_SECONDS``, so a run
killed at any moment leaves a file that opens, with every step up to the last sync.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from typing import Any

import numpy as np

from . import __version__
from .config import RunConfig
from .data import TrainingData
from .errors import StorageError
from .model import Particles

CONVENTIONS = "CF-1.8"
SYNC_SECONDS = 2.0
STATE_SECONDS = 10.0
STEP_CHUNK = 4096
NO_SNAPSHOT = -1

# CF-style metadata of every variable: (long_name, units)
VARIABLES: dict[str, tuple[str, str]] = {
    "step": ("gradient-descent step", "1"),
    "s": ("pseudo-time s = step * ds (mean-field gradient-flow time)", "1"),
    "loss": ("loss E = mean_i (a.z_L(x_i) - y_i)^2 / 2 + weight-decay term", "1"),
    "grad_norm": ("RMS particle velocity |d theta/ds| = L M |grad_theta E|", "1"),
    "snapshot_step": ("step at which the snapshot was taken", "1"),
    "snapshot_s": ("pseudo-time of the snapshot", "1"),
    "U": ("outer weights U_{l,m} of the residual map U sigma(W.z + b)", "1"),
    "W": ("inner weights W_{l,m} of the residual map", "1"),
    "b": ("biases b_{l,m} of the residual map", "1"),
    "prediction": ("net output a.z_L(x_i)", "1"),
    "U_mean": ("mean of U over the particles of a layer", "1"),
    "W_mean": ("mean of W over the particles of a layer", "1"),
    "U_sq": ("mean of |U|^2 over the particles of a layer", "1"),
    "W_sq": ("mean of |W|^2 over the particles of a layer", "1"),
    "b_mean": ("mean of b over the particles of a layer", "1"),
    "b_sq": ("mean of b^2 over the particles of a layer", "1"),
    "particle_index": ("index m of the stored particle among the layer's M", "1"),
    "x": ("input samples x_i", "1"),
    "y": ("labels y_i", "1"),
    "readout": ("fixed readout vector a", "1"),
    "t": ("depth t = l/L of the layer", "1"),
    "state_U": ("full U at step state_step (slot state_slot), for resuming", "1"),
    "state_W": ("full W at step state_step (slot state_slot), for resuming", "1"),
    "state_b": ("full b at step state_step (slot state_slot), for resuming", "1"),
}

SNAPSHOT_COORDS = "snapshot_step snapshot_s"
FREE_SPACE_MARGIN = 1 << 20

# netCDF handles whose last write failed: closing them would make HDF5 flush half-updated
# metadata over the last consistent state, so they are never closed (see ``abandoned``).
_ABANDONED: list[Any] = []


def abandoned() -> bool:
    """True when a run file had a failed write in this process: the caller should end the
    process with ``os._exit`` so that the file keeps its last synced, consistent state."""
    return bool(_ABANDONED)


def _allow_concurrent_readers() -> None:
    """Let xarray open a run file while its run is still writing it.

    HDF5 otherwise holds an exclusive lock on files open for writing; the file stays
    consistent for readers at every sync, which is what they see.
    """
    os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")


def _attr(v: Any) -> Any:
    """A netCDF-storable attribute value (no None, no bool)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return int(v)
    return v


def particle_subset(M: int, K: int | None, seed: int) -> np.ndarray:
    """The sorted indices of the K particles per layer that snapshots store (all if K is None)."""
    if K is None or K >= M:
        return np.arange(M)
    return np.sort(np.random.default_rng([seed, 0x5A4D]).choice(M, size=K, replace=False))


class RunWriter:
    """Creates (or reopens, for ``--resume``) a run file and appends steps and snapshots.

    Every netCDF/HDF5 failure (unwritable path, disk full) is raised as
    ``StorageError``; ``close`` is safe to call after one.
    """

    def __init__(self, path: str, config: RunConfig, data: TrainingData, backend: str,
                 command: str = "", overwrite: bool = False, _resume: bool = False) -> None:
        self.path = path
        self.config = config
        self.ds: Any = None
        self._last_sync = self._last_state = time.monotonic()
        self.steps_written = 0
        self._n_snap = 0
        self._slot = 1
        self.subset = particle_subset(config.width, config.snapshot_particles, config.seed)
        if _resume:
            self._open_existing(data, backend, command)
        else:
            self._create(data, backend, command, overwrite)

    # -- creating -------------------------------------------------------------
    def _create(self, data: TrainingData, backend: str, command: str, overwrite: bool) -> None:
        import netCDF4

        _allow_concurrent_readers()
        path, config = self.path, self.config
        if os.path.exists(path) and not overwrite:
            raise StorageError(f"{path} exists; pass --overwrite to replace it (or --resume to continue it)")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise StorageError(f"cannot write {path}: directory {directory} does not exist")
        L, M, d, N = config.depth, config.width, data.d, data.N
        K = len(self.subset)
        dt = np.dtype(config.dtype)
        try:
            self.ds = ds = netCDF4.Dataset(path, "w", format="NETCDF4")
        except OSError as e:
            raise StorageError(f"cannot write {path}: {e}") from None
        try:
            for name, size in (("step", None), ("snapshot", None), ("layer", L), ("particle", K), ("dim", d),
                               ("sample", N), ("state_slot", 2), ("state_particle", M)):
                ds.createDimension(name, size)
            nan = np.nan
            self._var("step", "i8", ("step",), chunks=(STEP_CHUNK,))
            self._var("s", "f8", ("step",), chunks=(STEP_CHUNK,), fill=nan)
            self._var("loss", "f8", ("step",), chunks=(STEP_CHUNK,), fill=nan, coords="s")
            self._var("grad_norm", "f8", ("step",), chunks=(STEP_CHUNK,), fill=nan, coords="s")
            self._var("snapshot_step", "i8", ("snapshot",), chunks=(1024,), fill=NO_SNAPSHOT)
            self._var("snapshot_s", "f8", ("snapshot",), chunks=(1024,), fill=nan)
            self._var("U", dt, ("snapshot", "layer", "particle", "dim"), chunks=(1, L, K, d), fill=nan,
                      coords=SNAPSHOT_COORDS)
            self._var("W", dt, ("snapshot", "layer", "particle", "dim"), chunks=(1, L, K, d), fill=nan,
                      coords=SNAPSHOT_COORDS)
            self._var("b", dt, ("snapshot", "layer", "particle"), chunks=(1, L, K), fill=nan, coords=SNAPSHOT_COORDS)
            self._var("prediction", "f8", ("snapshot", "sample"), chunks=(1, N), fill=nan, coords=SNAPSHOT_COORDS)
            for name in ("U_mean", "W_mean"):
                self._var(name, "f8", ("snapshot", "layer", "dim"), chunks=(1, L, d), fill=nan,
                          coords=SNAPSHOT_COORDS)
            for name in ("U_sq", "W_sq", "b_mean", "b_sq"):
                self._var(name, "f8", ("snapshot", "layer"), chunks=(1, L), fill=nan, coords=SNAPSHOT_COORDS)
            self._var("particle_index", "i8", ("particle",))[:] = self.subset
            self._var("x", "f8", ("sample", "dim"))[:] = data.x
            self._var("y", "f8", ("sample",))[:] = data.y
            self._var("readout", "f8", ("dim",))[:] = data.readout
            self._var("t", "f8", ("layer",))[:] = np.arange(L) / L
            self._var("state_U", dt, ("state_slot", "layer", "state_particle", "dim"), chunks=(1, L, M, d))
            self._var("state_W", dt, ("state_slot", "layer", "state_particle", "dim"), chunks=(1, L, M, d))
            self._var("state_b", dt, ("state_slot", "layer", "state_particle"), chunks=(1, L, M))
            ds.setncatts(self._global_attributes(self.config, data, backend, command))
            ds.sync()
        except (OSError, RuntimeError) as e:
            self.close(quiet=True)
            raise StorageError(f"cannot write {path}: {e}") from None

    def _var(self, name: str, dtype: Any, dims: tuple[str, ...], chunks: tuple[int, ...] | None = None,
             fill: float | None = None, coords: str | None = None) -> Any:
        kw: dict[str, Any] = {}
        if chunks is not None:
            kw["chunksizes"] = chunks
        if fill is not None:
            kw["fill_value"] = np.array(fill, dtype=dtype)
        v = self.ds.createVariable(name, dtype, dims, **kw)
        long_name, units = VARIABLES[name]
        v.long_name = long_name
        v.units = units
        if coords:
            v.coordinates = coords
        return v

    @staticmethod
    def _global_attributes(config: RunConfig, data: TrainingData, backend: str, command: str) -> dict[str, Any]:
        now = _dt.datetime.now(_dt.timezone.utc)
        attrs: dict[str, Any] = {
            "Conventions": CONVENTIONS,
            "title": (f"mfres run: mean-field ResNet L={config.depth} M={config.width} "
                      f"d={data.d} N={data.N}, {config.activation}, init {config.init}"),
            "source": f"mfres {__version__}",
            "mfres_version": __version__,
            "created": now.isoformat(timespec="seconds"),
            "command": command,
            "history": f"{now:%Y-%m-%dT%H:%M:%SZ} {command or 'mfres.simulate'}",
            "references": "Ding, Chen, Li, Wright, JMLR 23 (2022), arXiv:2105.14417",
        }
        for k, v in config.as_dict().items():
            attrs[k] = _attr(v)
        attrs.update(dim=data.d, samples=data.N, data=config.data, data_source=data.source, backend=backend,
                     status="running", status_message="", steps_done=0, state_step=-1, state_slot=-1)
        return attrs

    # -- resuming -------------------------------------------------------------
    @classmethod
    def resume(cls, path: str, config: RunConfig, data: TrainingData, backend: str,
               command: str = "") -> tuple[RunWriter, int, Particles]:
        """Reopen ``path`` to continue it under ``config``: the writer, the step and the state to go on from.

        Raises ``StorageError`` when the file is not a resumable run and ``ConfigError``
        when its options differ from ``config``'s.
        """
        w = cls(path, config, data, backend, command, _resume=True)
        return w, w._resume_step, w._resume_state

    def _open_existing(self, data: TrainingData, backend: str, command: str) -> None:
        import netCDF4

        from .errors import ConfigError

        _allow_concurrent_readers()
        path, config = self.path, self.config
        try:
            self.ds = ds = netCDF4.Dataset(path, "a")
        except OSError as e:
            raise StorageError(f"cannot reopen {path} to resume: {e}") from None
        try:
            attrs = {k: ds.getncattr(k) for k in ds.ncattrs()}
            if "state_step" not in attrs or "state_U" not in ds.variables:
                raise StorageError(f"{path} is not an mfres run file that can be resumed")
            diffs = []
            for k in RunConfig.NUMERIC_FIELDS:
                mine, theirs = _attr(getattr(config, k)), attrs.get(k)
                if isinstance(mine, float) or isinstance(theirs, float):
                    same = theirs is not None and str(theirs) != "" and float(mine) == float(theirs)
                else:
                    same = str(mine) == str(theirs)
                if not same:
                    diffs.append(f"--{k.replace('_', '-')} {mine} (file: {theirs})")
            if not diffs:
                for name, arr in (("x", data.x), ("y", data.y), ("readout", data.readout)):
                    if not np.array_equal(np.asarray(ds[name][...]), arr):
                        diffs.append(f"the data set's {name} differs from the file's")
            if diffs:
                raise ConfigError(f"cannot resume {path}: options differ from the file's: {'; '.join(diffs)}")
            step = int(attrs["state_step"])
            slot = int(attrs["state_slot"])
            if step < 0 or slot not in (0, 1):
                raise StorageError(f"{path} holds no saved state to resume from (it stopped before its first sync)")
            if step > config.steps:
                raise ConfigError(f"cannot resume {path}: it is at step {step}, beyond --steps {config.steps}")
            dt = np.dtype(config.dtype)
            self._resume_state = Particles(*(np.ascontiguousarray(ds[f"state_{v}"][slot], dtype=dt) for v in "UWb"))
            self._resume_step = step
            self._slot = slot
            # every snapshot up to the state's step is complete; later ones are stale
            snap_steps = np.asarray(ds["snapshot_step"][:]).astype(np.int64)
            keep = int(np.searchsorted(snap_steps, step, side="right")) if snap_steps.size else 0
            while keep > 0 and snap_steps[keep - 1] == NO_SNAPSHOT:
                keep -= 1
            self._n_snap = keep
            n_snap = ds.dimensions["snapshot"].size
            if n_snap > keep:
                ds["snapshot_step"][keep:n_snap] = np.full(n_snap - keep, NO_SNAPSHOT)
            n_steps = ds.dimensions["step"].size
            if n_steps > step + 1:
                for v in ("s", "loss", "grad_norm"):
                    ds[v][step + 1:n_steps] = np.full(n_steps - step - 1, np.nan)
            self.steps_written = step
            now = _dt.datetime.now(_dt.timezone.utc)
            ds.history = f"{attrs.get('history', '')}\n{now:%Y-%m-%dT%H:%M:%SZ} {command or 'mfres.simulate'} (resumed)"
            ds.steps = config.steps
            ds.snapshot_every = config.snapshot_every
            ds.backend = backend if attrs.get("backend") in (backend, None) else f"{attrs['backend']},{backend}"
            ds.status = "running"
            ds.status_message = f"resumed at step {step}"
            ds.sync()
        except (OSError, RuntimeError, KeyError, IndexError) as e:
            self.close(quiet=True)
            raise StorageError(f"cannot resume {path}: {type(e).__name__}: {e}") from None
        except Exception:
            self.close(quiet=True)
            raise

    # -- appending ------------------------------------------------------------
    def _guard(self, what: str, fn: Any, *args: Any, nbytes: int = 0) -> Any:
        self._check_space(what, nbytes)
        try:
            return fn(*args)
        except (OSError, RuntimeError) as e:
            if self.ds is not None:
                _ABANDONED.append(self.ds)
                self.ds = None
            raise StorageError(f"writing {what} to {self.path} failed ({e}); "
                               f"the file holds the run up to its last sync") from None

    def _check_space(self, what: str, nbytes: int) -> None:
        """Refuse a write that would not fit on the disk, before HDF5 sees a full disk."""
        try:
            st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        if free < FREE_SPACE_MARGIN + 2 * nbytes:
            raise StorageError(f"disk full: {free / 2**20:.1f} MiB left where {self.path} is, too little to "
                               f"write {what}; the file holds the run up to step {self.steps_written}")

    def write_steps(self, start: int, loss: np.ndarray, grad_norm: np.ndarray) -> None:
        """Write E and the RMS velocity at steps start..start+len−1."""
        n = len(loss)
        if n == 0:
            return

        def write() -> None:
            sl = slice(start, start + n)
            steps = np.arange(start, start + n)
            self.ds["step"][sl] = steps
            self.ds["s"][sl] = steps * self.config.ds
            self.ds["loss"][sl] = loss
            self.ds["grad_norm"][sl] = grad_norm
            self.ds.steps_done = start + n - 1

        self._guard("steps", write, nbytes=32 * max(n, STEP_CHUNK))
        self.steps_written = start + n - 1

    def write_snapshot(self, step: int, theta: Particles, prediction: np.ndarray) -> None:
        """Append a snapshot at ``step`` (particles, output, moments) and save the full state (synced)."""
        k = self._n_snap
        sub = self.subset

        def write() -> None:
            ds = self.ds
            ds["U"][k] = theta.U[:, sub]
            ds["W"][k] = theta.W[:, sub]
            ds["b"][k] = theta.b[:, sub]
            ds["prediction"][k] = prediction
            for name, v in (("U", theta.U), ("W", theta.W)):
                v64 = v.astype(np.float64)
                ds[f"{name}_mean"][k] = v64.mean(axis=1)
                ds[f"{name}_sq"][k] = (v64**2).sum(axis=2).mean(axis=1)
            b64 = theta.b.astype(np.float64)
            ds["b_mean"][k] = b64.mean(axis=1)
            ds["b_sq"][k] = (b64**2).mean(axis=1)
            ds["snapshot_s"][k] = step * self.config.ds
            ds["snapshot_step"][k] = step  # last: a snapshot without its step is incomplete

        self._guard("a snapshot", write, nbytes=2 * theta.U.nbytes + theta.b.nbytes + 16 * prediction.size)
        self._n_snap += 1
        self.save_state(step, theta)  # its sync flushes the snapshot too

    def save_state(self, step: int, theta: Particles) -> None:
        """Write the full state into the slot not in use, sync, then point ``state_step`` at it."""
        slot = 1 - self._slot

        def write() -> None:
            for name, v in (("U", theta.U), ("W", theta.W), ("b", theta.b)):
                self.ds[f"state_{name}"][slot] = v
            self.ds.sync()
            self.ds.state_slot = slot
            self.ds.state_step = step
            self.ds.sync()

        self._guard("the state", write, nbytes=2 * theta.U.nbytes + theta.b.nbytes)
        self._slot = slot
        self._last_sync = self._last_state = time.monotonic()

    def checkpoint(self, step: int, theta: Particles) -> None:
        """Between snapshots: sync every ``SYNC_SECONDS``, save the state every ``STATE_SECONDS``."""
        if time.monotonic() - self._last_state >= STATE_SECONDS:
            self.save_state(step, theta)
        else:
            self.sync()

    def sync(self, force: bool = False) -> None:
        """Flush to disk, at most every ``SYNC_SECONDS`` unless ``force``."""
        now = time.monotonic()
        if force or now - self._last_sync >= SYNC_SECONDS:
            self._guard("the file", self.ds.sync)
            self._last_sync = now

    def set_status(self, status: str, message: str = "") -> None:
        def write() -> None:
            self.ds.status = status
            self.ds.status_message = message

        self._guard("the status", write)

    def close(self, quiet: bool = False) -> None:
        ds, self.ds = self.ds, None
        if ds is not None and ds.isopen():
            try:
                ds.close()
            except (OSError, RuntimeError) as e:
                if not quiet:
                    raise StorageError(f"closing {self.path} failed: {e}") from None


def valid_snapshots(ds: Any) -> Any:
    """The run ``ds`` without incomplete snapshots (a run killed while writing one leaves
    ``snapshot_step`` = −1), and without steps past ``steps_done``."""
    keep = ds["snapshot_step"].values >= 0
    out = ds.isel(snapshot=np.flatnonzero(keep))
    done = int(ds.attrs.get("steps_done", ds.sizes["step"] - 1))
    return out.isel(step=slice(0, done + 1))


def open_run(path: str, load: bool = False, **kwargs: Any) -> Any:
    """Open a run file as an ``xarray.Dataset`` (lazily unless ``load``)."""
    import xarray as xr

    _allow_concurrent_readers()
    if not os.path.isfile(path):
        raise StorageError(f"{path}: no such run file")
    try:
        opener = xr.load_dataset if load else xr.open_dataset
        return opener(path, engine="netcdf4", **kwargs)
    except (OSError, ValueError) as e:
        raise StorageError(f"{path}: cannot open as a run file ({e})") from None
