"""Reading a run: the published netCDF file plus the segments written after it.

``open_run`` always shows everything durable: the published ``run.nc`` merged with the
pending segments of the same run (see ``layout``). A closed run without segments opens
lazily as plain netCDF; any other netCDF file (a sweep file, another program's) opens as is.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import health
from ..errors import StorageError
from . import layout
from .schema import SNAPSHOT, STATE, STEP, VARIABLES


def _allow_concurrent_readers() -> None:
    """Let xarray open a netCDF file that another process writes in place (sweep files).

    Run files need no such setting: they are never open for writing under their own name.
    """
    os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")


def check_regular(path: str, what: str = "run file") -> None:
    """Raise ``StorageError`` unless ``path`` is an existing regular file (a FIFO would hang the reader)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise StorageError(f"{path}: no such {what}") from None
    except OSError as e:
        raise StorageError(f"{path}: cannot open ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise StorageError(f"{path} is not a regular file")


@dataclass
class Pending:
    """The segments that continue a published file, in order, and the step they reach."""

    segments: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    tip: int = -1

    @property
    def metas(self) -> list[dict[str, Any]]:
        return [m for _, _, m in self.segments]


def pending_segments(path: str, attrs: dict[str, Any]) -> Pending:
    """The chain of segments of the run whose published attributes are ``attrs``."""
    run_id = attrs.get("run_id")
    tip = int(attrs.get("steps_done", -1))
    out = Pending(tip=tip)
    if not run_id:
        return out
    side = layout.sidecar(path)
    published_seq = int(attrs.get("segment_seq", 0))
    for seq, name in layout.segments(side):
        if seq <= published_seq:
            continue
        try:
            meta = layout.read_segment_meta(side, name)
        except FileNotFoundError:
            raise
        except Exception:  # a foreign or damaged file: segments are renamed into place complete, so not ours
            break
        if meta.get("run_id") != run_id or meta.get("base") != out.tip:
            break
        out.segments.append((seq, name, meta))
        out.tip = int(meta["step"])
    return out


def read_attrs(path: str) -> dict[str, Any]:
    """The published file's global attributes (``StorageError`` if it is not netCDF)."""
    import netCDF4

    check_regular(path)
    try:
        with layout.hdf5_name(path) as name, netCDF4.Dataset(name) as nc:
            return {k: nc.getncattr(k) for k in nc.ncattrs()}
    except (OSError, RuntimeError) as e:
        raise StorageError(f"{path}: cannot open as a netCDF run file ({e})") from None


def _open_published(path: str, load: bool) -> Any:
    import xarray as xr

    try:
        with layout.hdf5_name(path) as name:
            if name != path:  # read through /proc while the file is open: fully, then close it
                load = True
            return (xr.load_dataset if load else xr.open_dataset)(name, engine="netcdf4")
    except (OSError, ValueError, RuntimeError) as e:
        raise StorageError(f"{path}: cannot open as a run file ({e})") from None


def open_run(path: str, load: bool = False) -> Any:
    """Open a run file as an ``xarray.Dataset``, with every durable step (lazily unless ``load``).

    A run still being written, or one that stopped with pending segments, is returned
    loaded in memory, merged with its segments. Sweep files and other netCDF files open as is.
    """
    check_regular(path)
    last_error: Exception | None = None
    for _ in range(10):
        before = layout.file_identity(path)
        ds = _open_published(path, load)
        try:
            pending = pending_segments(path, ds.attrs)
            newest = [name for _, name, meta in pending.segments if meta.get("has_state")][-1:]
            data = [layout.read_segment(layout.sidecar(path), name, state=[name] == newest)
                    for _, name, _ in pending.segments]
        except FileNotFoundError as e:  # the writer published and removed them meanwhile: read again
            ds.close()
            last_error = e
            continue
        if layout.file_identity(path) != before:  # published anew while read: its segments may be gone
            ds.close()
            last_error = FileNotFoundError("the published file was replaced")
            continue
        if not data:
            return ds
        try:
            ds.load()
            return merge(ds, data)
        finally:
            ds.close()
    raise StorageError(f"{path}: the run kept changing while being read ({last_error}); try again")


def merge(ds: Any, segments: list[dict[str, Any]]) -> Any:
    """The published dataset ``ds`` (loaded) continued by ``segments`` (``layout.read_segment`` dicts)."""
    import xarray as xr

    attrs = dict(ds.attrs)
    for seg in segments:
        meta = seg["meta"]
        attrs.update({k: v for k, v in meta.get("attrs", {}).items()})
        attrs["steps_done"] = attrs["state_step"] = int(meta["step"])
    ds_step = float(attrs.get("ds", 1.0))
    new: dict[str, Any] = {}
    for name, var in ds.variables.items():
        spec = VARIABLES.get(str(name))
        data = var.values
        if spec is not None and spec.role in (STEP, SNAPSHOT):
            parts = [data] + [seg[name] for seg in segments if name in seg]
            data = np.concatenate(parts, axis=0) if len(parts) > 1 else data
        elif spec is not None and spec.role == STATE:
            for seg in segments:
                if name in seg:
                    data = seg[name]
        new[name] = (var.dims, data, var.attrs)
    n = len(new["loss"][1])
    k = len(new["snapshot_step"][1])
    for name, values in (("step", np.arange(n, dtype=np.int64)), ("s", np.arange(n) * ds_step),
                         ("snapshot", np.arange(k, dtype=np.int64)),
                         ("snapshot_s", new["snapshot_step"][1] * ds_step)):
        if name in new:
            dims, _, a = new[name]
            new[name] = (dims, values, a)
    coords = [str(c) for c in ds.coords]
    out = xr.Dataset({n_: xr.Variable(*v) for n_, v in new.items() if n_ not in coords},
                     coords={c: xr.Variable(*new[c]) for c in coords}, attrs=attrs)
    figures = health.summary(out["loss"].values, out["grad_norm"].values, ds_step)
    out.attrs.update(rise_count=int(figures["rise_count"]), max_rise=float(figures["max_rise"]),
                     energy_residual=float(figures["energy_residual"]))
    return out


def valid_snapshots(ds: Any) -> Any:
    """The run ``ds`` (kept for callers of the older format: every snapshot in a run file is complete now)."""
    if "snapshot_step" in ds and ds["snapshot_step"].dtype.kind == "f":  # a legacy file with -1 fills
        return ds.isel(snapshot=np.flatnonzero(np.nan_to_num(ds["snapshot_step"].values, nan=-1) >= 0))
    return ds


def status_of(path: str, attrs: dict[str, Any]) -> str:
    """A plain-language note when ``status`` says running but no process holds the run's lock, else ''."""
    if attrs.get("status") != "running" or not attrs.get("run_id"):
        return ""
    if layout.lock_holder(path) is not None:
        return ""
    cmd = str(attrs.get("command") or "mfres simulate ...")
    again = cmd if "--resume" in cmd.split() else f"{cmd} --resume"
    return f"stopped without closing (no process is writing it); resume with: {again}"
