"""The durable sweep file: immutable result segments beside a published netCDF file.

HDF5 (under netCDF4) updates metadata in place and has no journal, so the published
sweep file ``OUT`` is never modified: it is only ever replaced whole.

- ``OUT.parts/`` holds the sidecar: ``lock`` (the one writer's ``fcntl.flock``) and
  one immutable segment ``seg-<seq>.npz`` per finished task (the runs of one grid point,
  or some of its seeds). A segment is written under a temporary name, fsync'ed,
  renamed into place and the folder fsync'ed: once its name exists, its runs are on disk.
- ``OUT`` is rebuilt from everything known (the previous ``OUT`` plus the newer
  segments) as a new file in the sidecar, fsync'ed, ``os.replace``'d over ``OUT`` and the
  directory fsync'ed; its attribute ``segments_merged`` is the highest segment number it
  contains, and the segments up to it are then deleted.
- ``read`` (``mfres.sweep.open_sweep``) returns ``OUT`` with the newer segments applied,
  newest last; plain ``xarray.open_dataset(OUT)`` sees the sweep as of its last publication.

A kill at any moment leaves ``OUT`` either as it was or as its replacement, and every
segment either absent or whole: no finished run is lost.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import glob
import hashlib
import os
import stat
from typing import Any

import numpy as np

from .errors import ConfigError, StorageError

STATUSES = ("missing", "ok", "diverged", "failed")
PARTS_SUFFIX = ".parts"
SEGMENT_GLOB = "seg-*.npz"
NOT_RUN = -1  # rise_count of a run that has not run

# per-run variables: name -> (netCDF type, fill value or None, long_name, units)
RUN_VARIABLES: dict[str, tuple[str, Any, str, str]] = {
    "status": ("str", "missing", "run status: " + ", ".join(STATUSES), ""),
    "message": ("str", "", "why a run diverged or failed", ""),
    "seconds": ("f8", np.nan, "wall-clock time of the run", "s"),
    "rise_count": ("i8", NOT_RUN, "number of GD steps that raised E (-1: not run)", "1"),
    "max_rise": ("f8", np.nan, "largest rise of E in one GD step", "1"),
    "backend": ("str", "", "backend that computed the run", ""),
}
DIM_LONG_NAMES = {"depth": "depth L", "width": "width M", "seed": "initialisation seed", "ds": "pseudo-time step",
                  "activation": "activation", "init": "initialisation"}


def parts_dir(path: str) -> str:
    """The sidecar folder of the sweep file ``path``."""
    return os.path.abspath(path) + PARTS_SUFFIX


def spec_digest(identity: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


# -- durable file primitives --------------------------------------------------------------
def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_regular(path: str, what: str = "sweep file") -> None:
    """Refuse a ``path`` that exists but is not a regular file (a FIFO would block every open)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StorageError(f"cannot use {path} as the {what}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode)
                else "not a regular file")
        raise StorageError(f"{path} is {kind}; the {what} must be a regular file path")


# -- the grid state in memory --------------------------------------------------------------
class SweepState:
    """Every run's results, as arrays over the grid ``dims`` (name, values) and ``n_steps`` grid times."""

    def __init__(self, dims: list[tuple[str, tuple[Any, ...]]], n_steps: int) -> None:
        self.dims = dims
        self.shape = tuple(len(v) for _, v in dims)
        self.loss = np.full((*self.shape, n_steps), np.nan)
        self.runs: dict[str, np.ndarray] = {}
        for name, (kind, fill, _, _) in RUN_VARIABLES.items():
            dtype = object if kind == "str" else kind
            self.runs[name] = np.full(self.shape, fill, dtype=dtype)
        self.merged = 0  # highest segment number included

    def apply(self, seg: dict[str, Any]) -> None:
        """Record one segment's runs (later segments override earlier ones)."""
        where = (*(int(i) for i in seg["index"]), np.asarray(seg["seed_pos"], dtype=np.int64))
        self.loss[where] = seg["loss"]
        for name in RUN_VARIABLES:
            values = seg[name]
            self.runs[name][where] = values.astype(object) if values.dtype.kind == "U" else values

    def counts(self) -> dict[str, int]:
        return {k: int(np.sum(self.runs["status"] == k)) for k in STATUSES}

    def backends(self) -> str:
        return ",".join(sorted({str(b) for b in self.runs["backend"].ravel() if b}))


def read_segment(path: str) -> dict[str, Any] | None:
    """A segment's contents, or None if it is unreadable (it is then ignored and later removed)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except Exception:
        return None


def segment_seq(path: str) -> int:
    try:
        return int(os.path.basename(path)[4:-4])
    except ValueError:
        return -1


def list_segments(parts: str) -> list[tuple[int, str]]:
    found = [(segment_seq(p), p) for p in glob.glob(os.path.join(glob.escape(parts), SEGMENT_GLOB))]
    return sorted(f for f in found if f[0] > 0)


def read(path: str, digest: str | None = None, attempts: int = 5) -> Any:
    """The published sweep file ``path`` as a loaded ``xarray.Dataset``, with its newer segments applied."""
    import xarray as xr

    check_regular(path)
    if not os.path.isfile(path):
        raise StorageError(f"{path}: no such sweep file")
    parts = parts_dir(path)
    from .store.layout import file_identity

    for _ in range(attempts):
        before = file_identity(path)
        try:
            ds = xr.load_dataset(path, engine="netcdf4")
        except (OSError, ValueError) as e:
            raise StorageError(f"{path}: cannot open as a sweep file ({e})") from None
        if "sweep_spec" not in ds.attrs or "status" not in ds:
            return ds  # not a sweep (the caller says so)
        merged = int(ds.attrs.get("segments_merged", 0))
        want = digest or ds.attrs.get("sweep_digest")
        try:
            newer = [(q, p) for q, p in list_segments(parts) if q > merged]
            segs = [read_segment(p) for _, p in newer]
        except FileNotFoundError:
            continue  # a newer publication removed them meanwhile: read again
        if file_identity(path) != before:
            continue  # published anew while read: the segments it absorbed may be gone
        segs = [seg for seg in segs if seg is not None and str(seg["digest"]) == want]
        if segs:
            strings = [n for n, (kind, *_) in RUN_VARIABLES.items() if kind == "str" and n in ds]
            for name in strings:  # fixed-width strings would truncate longer values
                ds[name] = ds[name].astype(object)
            for seg in segs:
                where = (*(int(i) for i in seg["index"]), np.asarray(seg["seed_pos"], dtype=np.int64))
                ds["loss"].values[where] = seg["loss"]
                for name in RUN_VARIABLES:
                    if name in ds:
                        ds[name].values[where] = seg[name]
            for name in strings:
                ds[name] = ds[name].astype(str)
            ds.attrs["segments_pending"] = len(segs)
        return ds
    raise StorageError(f"{path}: the sweep file kept changing while being read; try again")


# -- the writer ---------------------------------------------------------------------------------
class SweepStore:
    """The one writer of a sweep file: holds the lock, writes segments, publishes ``path``.

    ``dims``: the grid's (name, values), last ``seed``; ``grid_s``: the common pseudo-times;
    ``identity``: what makes two sweeps the same (a re-run must match it); ``attrs``: the
    global attributes of a new file.
    """

    def __init__(self, path: str, dims: list[tuple[str, tuple[Any, ...]]], grid_s: np.ndarray, identity: str,
                 attrs: dict[str, Any], command: str = "", overwrite: bool = False) -> None:
        self.path = os.path.abspath(path)
        self.shown = path
        self.dims, self.grid_s, self.identity = dims, grid_s, identity
        self.digest = spec_digest(identity)
        self.parts = parts_dir(path)
        self.command = command
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise StorageError(f"cannot write {path}: directory {directory} does not exist")
        check_regular(path)
        if os.path.exists(self.parts) and not os.path.isdir(self.parts):
            raise StorageError(f"{self.parts} is in the way: the sweep's sidecar folder must be a directory")
        try:
            os.makedirs(self.parts, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create {self.parts}: {e.strerror}") from None
        self._lock_fd = self._lock()
        try:
            self._cleanup_temporaries()
            if overwrite:  # under the lock: nobody else is writing these
                for _, p in list_segments(self.parts):
                    os.remove(p)
                if os.path.exists(self.path):
                    os.remove(self.path)
                fsync_dir(os.path.dirname(self.path))
            self.state = SweepState(dims, len(grid_s))
            self.attrs = dict(attrs)
            self._load_existing()
            self.seq = max([self.state.merged, *(q for q, _ in list_segments(self.parts))])
            self.dirty = not os.path.exists(self.path) or self.seq > self.state.merged
            now = _dt.datetime.now(_dt.timezone.utc)
            line = f"{now:%Y-%m-%dT%H:%M:%SZ} {command or 'mfres.sweep.run_sweep'}"
            history = self.attrs.get("history", "")
            self.attrs["history"] = f"{history}\n{line}" if history else line
            if self.dirty:
                self.publish()
        except BaseException:
            self.close()
            raise

    # -- the lock
    def _lock(self) -> int:
        lock = os.path.join(self.parts, "lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StorageError(f"cannot create the lock file {lock}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f" ({holder})" if holder else ""
                raise StorageError(f"{self.shown} is being written by another sweep{who}; wait for it to end "
                                   "or choose another output file") from None
            raise StorageError(f"cannot lock {lock}: {e.strerror}") from None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}: {self.command}".encode(errors="replace")[:4000], 0)
        return fd

    def close(self) -> None:
        """Release the lock (the kernel also releases it if this process dies)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _cleanup_temporaries(self) -> None:
        for p in glob.glob(os.path.join(glob.escape(self.parts), ".tmp-*")):
            with contextlib.suppress(OSError):
                os.remove(p)

    # -- reading what exists
    def _load_existing(self) -> None:
        import netCDF4

        if os.path.exists(self.path):
            try:
                with netCDF4.Dataset(self.path) as nc:
                    theirs = nc.getncattr("sweep_identity") if "sweep_identity" in nc.ncattrs() else None
                    if theirs is None and "sweep_spec" in nc.ncattrs():
                        theirs = nc.getncattr("sweep_spec")
                    if theirs is None:
                        raise ConfigError(f"{self.shown} exists and is not a sweep file; choose another output file")
                    if theirs != self.identity:
                        raise ConfigError(f"{self.shown} holds a different sweep (its options differ); "
                                          "use another output file to start a new one")
                    self._check_grid(nc)
                    nc.set_auto_mask(False)
                    self.state.loss[...] = nc["loss"][...]
                    for name, (kind, _, _, _) in RUN_VARIABLES.items():
                        if name in nc.variables:  # (files from before a variable existed lack it)
                            self.state.runs[name][...] = np.asarray(nc[name][...], dtype=object if kind == "str"
                                                                    else kind)
                    self.state.merged = int(nc.getncattr("segments_merged")) if "segments_merged" in nc.ncattrs() \
                        else 0
                    self.attrs.update({k: nc.getncattr(k) for k in ("created", "history") if k in nc.ncattrs()})
            except ConfigError:
                raise
            except (OSError, RuntimeError, KeyError, IndexError, ValueError) as e:
                raise StorageError(f"{self.shown} exists but cannot be read as a sweep file ({e}); "
                                   "move it away to start afresh") from None
        for q, p in list_segments(self.parts):
            if q <= self.state.merged:
                continue
            seg = read_segment(p)
            if seg is None:
                continue
            if str(seg["digest"]) != self.digest:
                raise ConfigError(f"{self.parts} holds results of a different sweep; remove that folder or "
                                  "use another output file")
            self.state.apply(seg)

    def _check_grid(self, nc: Any) -> None:
        for name, values in self.dims:
            if name not in nc.dimensions or len(nc.dimensions[name]) != len(values):
                raise ConfigError(f"{self.shown} has another grid ({name}); use another output file")
        if len(nc.dimensions["step"]) != len(self.grid_s):
            raise ConfigError(f"{self.shown} has another number of steps; use another output file")

    # -- writing
    def record(self, index: tuple[int, ...], seed_pos: list[int], result: dict[str, Any]) -> None:
        """Make one task's runs durable as a new segment (then apply it in memory)."""
        k = len(seed_pos)
        seg = {"digest": np.array(self.digest), "index": np.asarray(index, dtype=np.int64),
               "seed_pos": np.asarray(seed_pos, dtype=np.int64),
               "loss": np.asarray(result["loss"], dtype=np.float64).reshape(k, len(self.grid_s))}
        for name, (kind, _, _, _) in RUN_VARIABLES.items():
            v = np.broadcast_to(np.asarray(result[name]), (k,))
            seg[name] = v.astype(str) if kind == "str" else v.astype(kind)
        self.seq += 1
        final = os.path.join(self.parts, f"seg-{self.seq:09d}.npz")
        tmp = os.path.join(self.parts, f".tmp-seg-{self.seq:09d}.npz")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **seg)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, final)
            fsync_dir(self.parts)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            self.seq -= 1
            raise StorageError(f"cannot write results into {self.parts} ({e.strerror}); the runs finished so "
                               f"far are kept in {self.shown}") from None
        self.state.apply(seg)
        self.dirty = True

    def publish(self) -> None:
        """Rebuild ``path`` from the state in memory: new file, fsync, ``os.replace``, directory fsync."""
        tmp = os.path.join(self.parts, f".tmp-publish-{os.getpid()}.nc")
        merged = self.seq
        try:
            self._write_netcdf(tmp, merged)
            fsync_file(tmp)
            os.replace(tmp, self.path)
            fsync_dir(os.path.dirname(self.path))
        except (OSError, RuntimeError) as e:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            why = getattr(e, "strerror", None) or str(e)
            raise StorageError(f"cannot write {self.shown} ({why}); the finished runs are kept in "
                               f"{self.parts}") from None
        self.state.merged = merged
        self.dirty = False
        for q, p in list_segments(self.parts):
            if q <= merged:
                with contextlib.suppress(OSError):
                    os.remove(p)

    def _write_netcdf(self, path: str, merged: int) -> None:
        import netCDF4

        from .store import _allow_concurrent_readers

        _allow_concurrent_readers()
        names = tuple(n for n, _ in self.dims)
        with netCDF4.Dataset(path, "w", format="NETCDF4") as nc:
            for name, values in self.dims:
                nc.createDimension(name, len(values))
                kind = "f8" if name == "ds" else ("i8" if name in ("depth", "width", "seed") else str)
                v = nc.createVariable(name, kind, (name,))
                v[:] = np.array(values, dtype=object if kind is str else kind)
                v.long_name = DIM_LONG_NAMES[name]
            nc.createDimension("step", len(self.grid_s))
            s = nc.createVariable("s", "f8", ("step",))
            s[:] = self.grid_s
            s.long_name, s.units = "pseudo-time s (common grid)", "1"
            chunks = (*([1] * (len(names) - 1)), self.state.shape[-1], len(self.grid_s))
            loss = nc.createVariable("loss", "f8", (*names, "step"), fill_value=np.nan, chunksizes=chunks)
            loss[...] = self.state.loss
            loss.long_name, loss.units, loss.coordinates = "loss E at pseudo-time s", "1", "s"
            for name, (kind, fill, long_name, units) in RUN_VARIABLES.items():
                if kind == "str":
                    v = nc.createVariable(name, str, names)
                else:
                    v = nc.createVariable(name, kind, names, fill_value=fill if kind == "f8" else False)
                v[...] = self.state.runs[name]
                v.long_name = long_name
                if units:
                    v.units = units
            attrs = {**self.attrs, "segments_merged": merged, "sweep_identity": self.identity,
                     "sweep_digest": self.digest, "backend": self.state.backends(),
                     "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
            nc.setncatts({k: (int(v) if isinstance(v, bool) else v) for k, v in attrs.items() if v is not None})


__all__ = ["RUN_VARIABLES", "STATUSES", "SweepState", "SweepStore", "check_regular", "parts_dir", "read"]
