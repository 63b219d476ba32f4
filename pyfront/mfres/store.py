"""The run file: a netCDF4 file written step by step, read back with xarray.

Schema (names are a contract):

- per step (unlimited dimension ``step``): ``loss`` E, ``s`` pseudo-time step·Δs,
  ``grad_norm`` RMS particle velocity L M |∇_θ E|;
- per snapshot (unlimited dimension ``snapshot``, coordinate ``snapshot_step``):
  ``U``, ``W`` (snapshot, layer, particle, dim), ``b`` (snapshot, layer, particle),
  ``prediction`` (snapshot, sample) = a·z_L(x_i);
- the data: ``x`` (sample, dim), ``y`` (sample), ``readout`` (dim);
- depth coordinate ``t`` (layer) = l/L;
- global attributes named like the options, plus ``backend`` (the one used),
  ``status`` (running, finished, interrupted, diverged, failed), ``steps_done``.

Written incrementally and synced at least at every snapshot and every few
seconds, so a killed run leaves a readable file up to the last sync.
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
STEP_CHUNK = 4096

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
    "x": ("input samples x_i", "1"),
    "y": ("labels y_i", "1"),
    "readout": ("fixed readout vector a", "1"),
    "t": ("depth t = l/L of the layer", "1"),
}


def _attr(v: Any) -> Any:
    """A netCDF-storable attribute value (no None, no bool)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return int(v)
    return v


class RunWriter:
    """Creates a run file and appends steps and snapshots to it.

    Every netCDF/HDF5 failure (unwritable path, disk full) is raised as
    ``StorageError``; ``close`` is safe to call after one.
    """

    def __init__(self, path: str, config: RunConfig, data: TrainingData, backend: str,
                 command: str = "", overwrite: bool = False) -> None:
        import netCDF4

        self.path = path
        self.config = config
        if os.path.exists(path) and not overwrite:
            raise StorageError(f"{path} exists; pass --overwrite to replace it (or --resume to continue it)")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise StorageError(f"cannot write {path}: directory {directory} does not exist")
        L, M, d, N = config.depth, config.width, data.d, data.N
        dt = np.dtype(config.dtype)
        try:
            self.ds = ds = netCDF4.Dataset(path, "w", format="NETCDF4")
        except OSError as e:
            raise StorageError(f"cannot write {path}: {e}") from None
        self._last_sync = time.monotonic()
        self._n_snap = 0
        self.steps_written = 0
        try:
            ds.createDimension("step", None)
            ds.createDimension("snapshot", None)
            ds.createDimension("layer", L)
            ds.createDimension("particle", M)
            ds.createDimension("dim", d)
            ds.createDimension("sample", N)
            nan = np.nan
            self._var("step", "i8", ("step",), chunks=(STEP_CHUNK,))
            self._var("s", "f8", ("step",), chunks=(STEP_CHUNK,), fill=nan)
            self._var("loss", "f8", ("step",), chunks=(STEP_CHUNK,), fill=nan, coords="s")
            self._var("grad_norm", "f8", ("step",), chunks=(STEP_CHUNK,), fill=nan, coords="s")
            self._var("snapshot_step", "i8", ("snapshot",), chunks=(1024,))
            self._var("snapshot_s", "f8", ("snapshot",), chunks=(1024,), fill=nan)
            snap = "snapshot_step snapshot_s"
            self._var("U", dt, ("snapshot", "layer", "particle", "dim"), chunks=(1, L, M, d), fill=nan, coords=snap)
            self._var("W", dt, ("snapshot", "layer", "particle", "dim"), chunks=(1, L, M, d), fill=nan, coords=snap)
            self._var("b", dt, ("snapshot", "layer", "particle"), chunks=(1, L, M), fill=nan, coords=snap)
            self._var("prediction", "f8", ("snapshot", "sample"), chunks=(1, N), fill=nan, coords=snap)
            self._var("x", "f8", ("sample", "dim"))[:] = data.x
            self._var("y", "f8", ("sample",))[:] = data.y
            self._var("readout", "f8", ("dim",))[:] = data.readout
            self._var("t", "f8", ("layer",))[:] = np.arange(L) / L
            ds.setncatts(self._global_attributes(config, data, backend, command))
            ds.sync()
        except (OSError, RuntimeError) as e:
            self.close()
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
        attrs: dict[str, Any] = {
            "Conventions": CONVENTIONS,
            "title": (f"mfres run: mean-field ResNet L={config.depth} M={config.width} "
                      f"d={data.d} N={data.N}, {config.activation}, init {config.init}"),
            "source": f"mfres {__version__}",
            "mfres_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "history": f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%dT%H:%M:%SZ} {command or 'mfres.simulate'}",
            "references": "Ding, Chen, Li, Wright, JMLR 23 (2022), arXiv:2105.14417",
        }
        for k, v in config.as_dict().items():
            attrs[k] = _attr(v)
        attrs["dim"] = data.d
        attrs["samples"] = data.N
        attrs["data"] = config.data
        attrs["data_source"] = data.source
        attrs["backend"] = backend
        attrs["status"] = "running"
        attrs["steps_done"] = 0
        return attrs

    def _guard(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except (OSError, RuntimeError) as e:
            raise StorageError(f"writing {what} to {self.path} failed ({e}); "
                               f"the file holds the run up to step {self.steps_written}") from None

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

        self._guard("steps", write)
        self.steps_written = start + n - 1

    def write_snapshot(self, step: int, theta: Particles, prediction: np.ndarray) -> None:
        """Append a snapshot of θ and the net's output at ``step`` and sync."""
        k = self._n_snap

        def write() -> None:
            self.ds["snapshot_step"][k] = step
            self.ds["snapshot_s"][k] = step * self.config.ds
            self.ds["U"][k] = theta.U
            self.ds["W"][k] = theta.W
            self.ds["b"][k] = theta.b
            self.ds["prediction"][k] = prediction

        self._guard("a snapshot", write)
        self._n_snap += 1
        self.sync(force=True)

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

    def close(self) -> None:
        ds = getattr(self, "ds", None)
        if ds is not None and ds.isopen():
            try:
                ds.close()
            except (OSError, RuntimeError) as e:
                raise StorageError(f"closing {self.path} failed: {e}") from None


def open_run(path: str, **kwargs: Any) -> Any:
    """Open a run file as an ``xarray.Dataset`` (lazily; ``xarray.load_dataset`` semantics with ``load=True``)."""
    import xarray as xr

    load = kwargs.pop("load", False)
    if not os.path.isfile(path):
        raise StorageError(f"{path}: no such run file")
    try:
        opener = xr.load_dataset if load else xr.open_dataset
        return opener(path, engine="netcdf4", **kwargs)
    except (OSError, ValueError) as e:
        raise StorageError(f"{path}: cannot open as a run file ({e})") from None
