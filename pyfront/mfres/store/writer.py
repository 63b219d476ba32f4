"""The durable run writer: nothing published is ever modified in place.

A *durable point* writes the steps, snapshots and full state since the last one as an
immutable segment (``layout``): temporary name, fsync, rename, fsync of the folder. A
*publish* writes a complete new ``run.nc`` (published file + segments + what is in
memory) under a temporary name, fsyncs it, ``os.replace``-s it over the old one and
fsyncs the directory, then drops the segments it absorbed. A kill at any moment thus
leaves the last published file intact and every durable segment readable
(``reader.open_run`` merges them); a power loss costs at most the steps since the last
durable point.

Where the backend computes in another process, the final file is *drafted* while the last
chunks run (``begin_final_draft``, then ``work_on_draft`` in slices that fit inside each
chunk): written and fsync'ed under its temporary name with all but those chunks' rows,
which the last durable point adds before the fsync and rename; a draft that does not fit
the run's end is dropped and the file written whole.

Publishing happens at the first and the last durable point of a session, and in
between when ``MAX_SEGMENTS`` segments wait, or when the pending segments have
reached the published file's size and ``PUBLISH_SECONDS`` have passed (so the file
at least doubles between publishes and their total cost stays linear in its size),
unless the run expects to end within ``PUBLISH_SECONDS`` (its last publish then comes first).
Durable points come every ``DURABLE_SECONDS`` (environment ``MFRES_DURABLE_SECONDS``;
0 makes every chunk boundary one, for tests), or more rarely when writing one costs
more than 2 % of the interval, or sooner when ``MAX_BUFFER_BYTES`` of snapshots wait. One writer at a time:
``fcntl.flock`` on the run's lock file, released by the kernel when the process dies.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import time
import uuid
from collections.abc import Generator, Iterator
from typing import Any

import netCDF4  # at import, not at the first publish: its 0.1 s is start-up, not a run's time
import numpy as np

from .. import __version__, health
from ..errors import ConfigError, StorageError
from ..model import Particles
from . import layout
from .reader import check_regular, pending_segments, read_attrs
from .schema import (
    SNAPSHOT_DATA,
    STATE_DATA,
    STEP_DATA,
    VARIABLES,
    attr_value,
    cf_attributes,
    data_sha256,
    dtype_of,
    global_attributes,
    particle_subset,
    snapshot_moments,
)

DURABLE_SECONDS = float(os.environ.get("MFRES_DURABLE_SECONDS", "5"))
PUBLISH_SECONDS = 6 * DURABLE_SECONDS  # between publishes in mid-run (each one rewrites the whole file)
DURABLE_SHARE = 0.02
MAX_SEGMENTS = 32
MAX_BUFFER_BYTES = 32 << 20  # snapshots held in memory before a durable point is forced
FREE_SPACE_MARGIN = 1 << 20
COPY_BLOCK = 1 << 16
# The publish at a run's end gives freed buffers back to the OS only for a file above this size:
# what glibc keeps of a small file's buffers is reused by the next run, and the trim (0.5 ms)
# was 5 % of the file's work at the default size (an end publish of a large run still trims).
FINAL_TRIM_BYTES = 8 << 20
LOCK_RETRY_SECONDS = 0.3

# identified by the data's content hash on --resume, not by how they were named
DATA_FIELDS = ("data", "dim", "samples", "data_seed")


def _fsync_dir(fd: int) -> None:
    os.fsync(fd)


def _give_back_memory() -> None:
    """Return the publish's transient buffers to the OS (glibc keeps freed small blocks otherwise,
    and a long run's resident memory would creep up with each publish)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RunLock:
    """The one-writer lock of a run: ``flock`` on ``.run.nc.mfres/lock`` (released by the kernel on any death)."""

    def __init__(self, path: str, side: str, sidefd: int) -> None:
        self.fd = os.open(layout.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644, dir_fd=sidefd)
        deadline = time.monotonic() + LOCK_RETRY_SECONDS  # a reader's brief probe may hold it for a moment
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                pid = os.pread(self.fd, 32, 0).decode(errors="replace").strip()
                os.close(self.fd)
                raise StorageError(f"{path} is being written by another mfres process"
                                   f"{f' (pid {pid})' if pid else ''}; wait for it to end or choose another --out"
                                   ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


class RunWriter:
    """Writes one run durably: ``open`` it, feed ``write_steps``/``write_snapshot``, ``commit`` when ``due``,
    ``finish`` once. ``start_step``/``start_state``/``e0`` say where a resumed run goes on from."""

    def __init__(self, path: str, config: Any, data: Any, backend: str, command: str = "", *,
                 overwrite: bool = False, resume: bool = False) -> None:
        self.path, self.config, self.data, self.backend, self.command = path, config, data, backend, command
        self.subset = particle_subset(config.width, config.snapshot_particles, config.seed)
        self.dir = os.path.dirname(os.path.abspath(path))
        self.name = os.path.basename(os.path.abspath(path))
        self.side = layout.sidecar(path)
        self.start_step, self.start_state, self.e0 = 0, None, None
        self.lock: RunLock | None = None
        self.dirfd = self.sidefd = -1
        self._loss: list[np.ndarray] = []
        self._gn: list[np.ndarray] = []
        self._snaps: list[dict[str, np.ndarray]] = []
        self._next = 0  # next step index the buffers expect
        self._buffered = 0
        self.tip = -1  # last durable step
        self.pending: list[tuple[int, str, int]] = []  # (seq, name, bytes) not yet published
        self.seq = 0
        self.published = False
        self.published_bytes = 0
        self.n_steps = 0  # rows in the published file
        self._grid: int | None = None  # at the next publish, keep only snapshots on this step grid
        self._last = self._published_at = time.monotonic()
        self._cost = 0.0
        self._draft: dict[str, Any] | None = None  # a new file being written (begin_final_draft), until published
        self._drafting: Iterator[None] | None = None  # the draft's pieces still to write (work_on_draft)
        self._open(overwrite, resume)

    # -- opening -----------------------------------------------------------------------
    def _open(self, overwrite: bool, resume: bool) -> None:
        path = self.path
        if not os.path.isdir(self.dir):
            raise StorageError(f"cannot write {path}: directory {self.dir} does not exist")
        if os.path.lexists(path):
            check_regular(path)
        try:
            self.dirfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.mkdir(self.side)
                _fsync_dir(self.dirfd)
            except FileExistsError:
                pass
            self.sidefd = os.open(self.side, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            self.close()
            raise StorageError(f"cannot write {path}: {e.strerror or e}") from None
        try:
            self.lock = RunLock(path, self.side, self.sidefd)
            exists = os.path.exists(path)
            if exists and resume:
                self._resume()
            elif exists and not overwrite:
                raise StorageError(f"{path} exists; pass --overwrite to replace it (or --resume to continue it)")
            else:
                self.run_id = uuid.uuid4().hex
                self.attrs = global_attributes(self.config, self.data, self.backend, self.command, self.run_id,
                                               __version__)
                self.attrs["snapshot_every_auto"] = int(getattr(self.config, "snapshot_every_auto", False))
        except BaseException:
            self.close()
            raise

    def _resume(self) -> None:
        path, config = self.path, self.config
        try:
            attrs = read_attrs(path)
        except StorageError as e:
            raise StorageError(f"cannot reopen {path} to resume: {e}") from None
        if not attrs.get("run_id") or "state_step" not in attrs:
            raise StorageError(f"cannot reopen {path} to resume: it is not a run file of this mfres version "
                               "(start afresh with --overwrite)")
        pending = pending_segments(path, attrs)
        for m in pending.metas:
            attrs.update(m.get("attrs", {}))
        diffs = []
        for k in config.NUMERIC_FIELDS:
            if k in DATA_FIELDS:
                continue
            mine, theirs = attr_value(getattr(config, k)), attrs.get(k)
            if isinstance(mine, float) or isinstance(theirs, float):
                same = theirs is not None and str(theirs) != "" and float(mine) == float(theirs)
            else:
                same = str(mine) == str(theirs)
            if not same:
                diffs.append(f"--{k.replace('_', '-')} {mine} (file: {theirs})")
        mine_hash = data_sha256(self.data.x, self.data.y, self.data.readout)
        if attrs.get("data_sha256") != mine_hash:
            diffs.append(f"the data differ from the file's (--data {config.data}: {self.data.N} samples of "
                         f"dimension {self.data.d}; file: {attrs.get('data')}, {attrs.get('samples')} of "
                         f"{attrs.get('dim')})")
        if diffs:
            raise ConfigError(f"cannot resume {path}: options differ from the file's: {'; '.join(diffs)}")
        step = pending.tip
        if step > config.steps:
            raise ConfigError(f"cannot resume {path}: it is at step {step}, beyond --steps {config.steps}")
        self.run_id = str(attrs["run_id"])
        self.attrs = attrs
        self.published = True
        self.seq = max([int(attrs.get("segment_seq", 0))] + [s for s, _, _ in pending.segments])
        self.pending = [(s, n, 0) for s, n, _ in pending.segments]
        self.tip = step
        self._next = step + 1
        self.start_step = step
        with layout.hdf5_name(path) as name, netCDF4.Dataset(name) as nc:
            self.n_steps = nc.dimensions["step"].size
            self.e0 = float(nc["loss"][0])
            state = {v: np.asarray(nc[v][...]) for v in STATE_DATA}
        newest = [n for _, n, m in pending.segments if m.get("has_state")]
        if newest:
            seg = layout.read_segment(self.side, newest[-1])
            state = {v: seg[v] for v in STATE_DATA}
        dt = np.dtype(config.dtype)
        self.start_state = Particles(*(np.ascontiguousarray(state[f"state_{v}"], dtype=dt) for v in "UWb"))
        # a default snapshot spacing follows a new --steps: keep the file's snapshots on the new grid
        every = int(config.snapshot_every)
        if getattr(config, "snapshot_every_auto", False) and int(attrs.get("snapshot_every_auto", 0)) \
                and every != int(attrs.get("snapshot_every", every)):
            self._grid = every
        now = _dt.datetime.now(_dt.timezone.utc)
        self.attrs.update(
            history=f"{attrs.get('history', '')}\n{now:%Y-%m-%dT%H:%M:%SZ} {self.command or 'mfres.simulate'} "
                    "(resumed)",
            steps=config.steps, snapshot_every=every,
            snapshot_every_auto=int(getattr(config, "snapshot_every_auto", False)),
            backend=self.backend if attrs.get("backend") in (self.backend, None)
            else f"{attrs['backend']},{self.backend}",
            status="running", status_message=f"resumed at step {step}")
        self.publish_now()

    # -- buffering ---------------------------------------------------------------------
    def write_steps(self, start: int, loss: np.ndarray, grad_norm: np.ndarray) -> None:
        """Record E and the RMS velocity at steps start..start+len−1 (a repeated first step is dropped)."""
        skip = self._next - start
        if skip < 0:
            raise ValueError(f"steps {self._next}..{start - 1} were never written")
        loss, grad_norm = np.asarray(loss, np.float64)[skip:], np.asarray(grad_norm, np.float64)[skip:]
        if len(loss):
            self._loss.append(loss.copy())
            self._gn.append(grad_norm.copy())
            self._next += len(loss)

    def write_snapshot(self, step: int, theta: Particles, prediction: np.ndarray) -> None:
        """Record a snapshot at ``step``: the stored particles, the output a·z_L(x_i), the moments."""
        sub = self.subset if len(self.subset) < theta.shape[1] else slice(None)  # a slice copies faster
        snap = {"snapshot_step": np.int64(step), "U": theta.U[:, sub].copy(), "W": theta.W[:, sub].copy(),
                "b": theta.b[:, sub].copy(), "prediction": np.asarray(prediction, np.float64).copy()}
        snap.update(snapshot_moments(theta.U, theta.W, theta.b))
        self._snaps.append(snap)
        self._buffered += sum(a.nbytes for a in snap.values() if isinstance(a, np.ndarray))

    @property
    def steps_written(self) -> int:
        return self._next - 1

    def due(self) -> bool:
        """Whether a durable point is due (by time, and by what the last one cost)."""
        if DURABLE_SECONDS <= 0:  # tests: a durable point at every chunk boundary
            return True
        interval = max(DURABLE_SECONDS, self._cost / DURABLE_SHARE)
        return time.monotonic() - self._last >= interval or self._buffered >= MAX_BUFFER_BYTES

    # -- durable points ----------------------------------------------------------------
    def _payload(self, step: int, theta: Particles | None, since: tuple[int, int] = (0, 0)) -> dict[str, Any]:
        """The rows held in memory, from the ``since`` = (step row, snapshot) on, and the state ``theta``."""
        if self.steps_written != step:
            raise ValueError(f"durable point at step {step} but steps up to {self.steps_written} were written")
        L, K, d, N = self.config.depth, len(self.subset), self.data.d, self.data.N
        dt = np.dtype(self.config.dtype)
        arrays: dict[str, Any] = {
            "loss": np.concatenate(self._loss)[since[0]:] if self._loss else np.empty(0),
            "grad_norm": np.concatenate(self._gn)[since[0]:] if self._gn else np.empty(0)}
        shapes = {"U": (L, K, d), "W": (L, K, d), "b": (L, K), "prediction": (N,), "U_mean": (L, d),
                  "W_mean": (L, d), "U_sq": (L,), "W_sq": (L,), "b_mean": (L,), "b_sq": (L,), "snapshot_step": ()}
        snaps = self._snaps[since[1]:]
        for name in SNAPSHOT_DATA:
            want = dtype_of(name, self.config.dtype)
            if snaps:
                arrays[name] = np.stack([np.asarray(s[name], dtype=want) for s in snaps])
            else:
                arrays[name] = np.empty((0, *shapes[name]), dtype=want)
        if theta is not None:
            for v in "UWb":
                arrays[f"state_{v}"] = np.ascontiguousarray(getattr(theta, v), dtype=dt)
        return arrays

    def _meta(self, step: int, has_state: bool) -> dict[str, Any]:
        keys = ("status", "status_message", "steps", "snapshot_every", "backend", "history")
        return {"run_id": self.run_id, "base": self.tip, "step": step, "has_state": has_state,
                "attrs": {k: _jsonable(self.attrs[k]) for k in keys if k in self.attrs}}

    def commit(self, step: int, theta: Particles, publish: bool = False, end_in: float = float("inf")) -> None:
        """A durable point at ``step`` (the last step written) with the full state ``theta``; ``end_in``:
        the seconds the run expects to take still."""
        t0 = time.monotonic()
        if publish and self._complete_draft(step, theta):
            self._clear(step)
        elif publish or not self.published:
            self._publish(self._payload(step, theta), step)
            self._clear(step)
        else:
            self._discard_draft()  # it lacks the rows that leave memory for the segment
            self._write_segment(self._payload(step, theta), step, has_state=True)
            self._clear(step)  # durable from here on
            grown = sum(b for _, _, b in self.pending) >= self.published_bytes
            if len(self.pending) >= MAX_SEGMENTS or (grown and t0 - self._published_at >= PUBLISH_SECONDS
                                                     and end_in >= PUBLISH_SECONDS):
                self._publish(None, step)
        self._last = time.monotonic()
        self._cost = self._last - t0

    def publish_now(self) -> None:
        """Publish the published file and the pending segments as one new file (nothing in memory)."""
        self._publish(None, self.tip)

    def _clear(self, step: int) -> None:
        self._loss, self._gn, self._snaps = [], [], []
        self._buffered = 0
        self.tip = step

    def _check_space(self, what: str, nbytes: int) -> None:
        """Refuse a write that would not fit, keeping ``FREE_SPACE_MARGIN`` for the status record."""
        try:
            st = os.statvfs(self.sidefd)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        if free < FREE_SPACE_MARGIN + int(1.1 * nbytes) + 65536:
            raise StorageError(f"disk full: {free / 2**20:.1f} MiB left where {self.path} is, too little to "
                               f"write {what}; {self._holds()}")

    def _holds(self) -> str:
        return (f"{self.path} holds the run up to step {self.tip}" if self.published
                else f"{self.path} was not written")

    def _storage_error(self, what: str, e: BaseException) -> StorageError:
        try:
            st = os.statvfs(self.sidefd)
            full = st.f_bavail * st.f_frsize < FREE_SPACE_MARGIN + (1 << 20)
        except OSError:
            full = False
        if getattr(e, "errno", None) == errno.ENOSPC or full:
            return StorageError(f"disk full while writing {what} ({e}); {self._holds()}")
        return StorageError(f"writing {what} for {self.path} failed ({e}); {self._holds()}")

    def _write_segment(self, arrays: dict[str, Any], step: int, has_state: bool) -> None:
        seq = self.seq + 1
        name = layout.segment_name(seq)
        tmp = f".{name}.{os.getpid()}.tmp"
        nbytes = sum(np.asarray(a).nbytes for a in arrays.values()) + 4096
        if has_state:
            self._check_space("a segment", nbytes)
        meta = self._meta(step, has_state)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=self.sidefd)
            try:
                with os.fdopen(fd, "wb", closefd=False) as f:
                    np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=self.sidefd, dst_dir_fd=self.sidefd)
            _fsync_dir(self.sidefd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.sidefd)
            raise self._storage_error("a segment", e) from None
        self.seq = seq
        self.pending.append((seq, name, os.stat(name, dir_fd=self.sidefd).st_size))

    def _publish(self, arrays: dict[str, Any] | None, step: int) -> None:
        """Write published + pending segments + ``arrays`` as a new file and rename it over the published one."""
        self._discard_draft()
        draft = self._start_draft([arrays] if arrays is not None else [], 0, 0)
        self._finish_draft(draft, [], step)

    @property
    def drafting(self) -> bool:
        """Whether a draft of the final file is under way or written (``begin_final_draft``)."""
        return self._draft is not None or self._drafting is not None

    def begin_final_draft(self, steps: int, snapshots: int) -> None:
        """Start the final file, as far as it is known now, under its temporary name: meant for while the
        backend computes the run's last ``steps`` steps and ``snapshots`` snapshots, so that ``finish`` has
        only their rows to add (the file is published then as by any publish). The writing itself is done
        by ``work_on_draft`` (and by ``finish``, for what is left). Optional: a draft that cannot be
        written, or that ``finish`` finds does not fit, is dropped."""
        self._discard_draft()
        if not self.published or self._grid is not None:
            return
        try:
            arrays = self._payload(self.steps_written, None)
        except Exception:  # the draft is optional: finish writes the file whole
            return
        snap = sum(a.nbytes for a in self._snaps[-1].values() if isinstance(a, np.ndarray)) if self._snaps else 0
        state = self.config.depth * self.config.width * (2 * self.data.d + 1) * np.dtype(self.config.dtype).itemsize
        self._drafting = self._final_draft_pieces(arrays, (len(arrays["loss"]), len(self._snaps)), steps, snapshots,
                                                  16 * steps + snapshots * snap + state)

    def work_on_draft(self, seconds: float = float("inf")) -> bool:
        """Write pieces of the draft (``begin_final_draft``) for about ``seconds`` (the piece under way
        when they run out is finished); whether nothing is left to write. A draft that a durable
        point has outdated is dropped, and so is one that fails."""
        if self._drafting is None:
            return True
        if self._draft is not None and self._draft["seq"] != self.seq:
            self._discard_draft()
            return True
        until = time.perf_counter() + seconds
        try:
            while True:
                next(self._drafting)
                if time.perf_counter() >= until:
                    return False
        except StopIteration:
            self._drafting = None
        except Exception:
            self._discard_draft()
        return True

    def draft_final_file(self, steps: int, snapshots: int) -> None:
        """``begin_final_draft`` and all of ``work_on_draft`` at once."""
        self.begin_final_draft(steps, snapshots)
        self.work_on_draft()

    def _final_draft_pieces(self, arrays: dict[str, Any], memory: tuple[int, int], steps: int, snapshots: int,
                            more_bytes: int) -> Iterator[None]:
        """``_draft_pieces`` of the final draft, then its sync and fsync; ``memory``: the rows (steps,
        snapshots) held in memory when ``arrays`` were taken, which ``finish``'s rows follow."""
        draft = yield from self._draft_pieces([arrays], steps, snapshots, more_bytes)
        draft["memory"] = memory
        yield
        try:
            draft["nc"].sync()
            yield
            os.fsync(draft["fd"])
        except BaseException as e:
            raise self._drop_draft(e) from None
        draft["complete"] = True

    def _complete_draft(self, step: int, theta: Particles) -> bool:
        """Publish through the draft (``begin_final_draft``), with the state ``theta`` at ``step``, if it
        holds everything but the rows written since it began."""
        self.work_on_draft()
        draft = self._draft
        if draft is None or not draft.get("complete"):
            self._discard_draft()
            return False
        n_mem, k_mem = draft["memory"]
        fits = (self.seq == draft["seq"] and sum(map(len, self._loss)) - n_mem == draft["n"] - draft["n_at"]
                and len(self._snaps) - k_mem == draft["k"] - draft["k_at"])
        if not fits:
            self._discard_draft()
            return False
        self._finish_draft(draft, [self._payload(step, theta, since=(n_mem, k_mem))], step,
                           trim_above=FINAL_TRIM_BYTES)
        return True

    def _start_draft(self, memory: list[dict[str, Any]], steps: int, snapshots: int) -> dict[str, Any]:
        """``_draft_pieces``, all at once."""
        pieces = self._draft_pieces(memory, steps, snapshots)
        while True:
            try:
                next(pieces)
            except StopIteration as done:
                return done.value

    def _draft_pieces(self, memory: list[dict[str, Any]], steps: int, snapshots: int,
                      more_bytes: int = 0) -> Generator[None, None, dict[str, Any]]:
        """Open a new file under a temporary name and write published + pending segments + ``memory``
        into it, sized for ``steps`` and ``snapshots`` more rows (``_finish_draft`` adds them, about
        ``more_bytes``); yields between pieces of a few milliseconds, returns the draft."""
        tmp = f".publish.{os.getpid()}.tmp.nc"
        tmp_path = layout.hdf5_dir_name(self.side, self.sidefd, tmp)
        # the state: memory's, else the newest segment's (its files list it; its meta says has_state)
        state_from = None if any("state_U" in p for p in memory) else next(
            (n for _, n, _ in reversed(self.pending) if layout.read_segment_meta(self.side, n).get("has_state")), None)
        segments = [layout.read_segment(self.side, n, state=n == state_from) for _, n, _ in self.pending]
        parts = [*segments, *memory]
        nbytes = self.published_bytes + sum(sum(np.asarray(a).nbytes for k, a in p.items() if k != "meta")
                                            for p in parts)
        self._check_space("the run file", nbytes + more_bytes)
        if self._grid is not None:  # resumed onto a new snapshot spacing: keep the snapshots on it
            for p in parts:
                if "snapshot_step" in p:
                    keep = np.flatnonzero(np.asarray(p["snapshot_step"]) % self._grid == 0)
                    for k in SNAPSHOT_DATA:
                        p[k] = p[k][keep]
        draft: dict[str, Any] = {"tmp": tmp, "seq": self.seq, "fd": -1, "nc": None}
        self._draft = draft  # for _discard_draft, until the draft is published or dropped
        try:
            with contextlib.ExitStack() as stack:
                old = None
                if self.published:
                    name = stack.enter_context(layout.hdf5_name(self.path))
                    old = stack.enter_context(netCDF4.Dataset(name))
                    old.set_auto_mask(False)
                    yield
                draft["nc"] = netCDF4.Dataset(tmp_path, "w", format="NETCDF4")
                draft["nc"].set_auto_maskandscale(False)  # plain arrays in, the values as they are
                draft["fd"] = os.open(tmp, os.O_RDONLY, dir_fd=self.sidefd)
                yield
                draft.update((yield from self._write_file(draft["nc"], old, parts, steps, snapshots)))
        except BaseException as e:
            raise self._drop_draft(e) from None
        del segments, parts
        return draft

    def _finish_draft(self, draft: dict[str, Any], tail: list[dict[str, Any]], step: int,
                      trim_above: int = 0) -> None:
        """Add ``tail``'s rows to the draft, close and fsync it, rename it over the published file; then
        give the freed buffers back to the OS (``_give_back_memory``) if the file exceeds ``trim_above`` bytes."""
        try:
            self._write_rest(draft, tail, step)
            nc, draft["nc"] = draft["nc"], None
            nc.close()
            os.fsync(draft["fd"])
            size = os.fstat(draft["fd"]).st_size
            os.replace(draft["tmp"], self.name, src_dir_fd=self.sidefd, dst_dir_fd=self.dirfd)
            _fsync_dir(self.dirfd)
        except BaseException as e:
            raise self._drop_draft(e) from None
        fd, draft["fd"], self._draft = draft["fd"], -1, None
        with contextlib.suppress(OSError):
            os.close(fd)
        self.published, self.published_bytes, self.pending = True, size, []
        self._published_at = time.monotonic()
        draft.clear()  # the whole series, before any memory goes back
        if size > trim_above:
            _give_back_memory()
        self._grid = None
        # every segment now is either absorbed or stale (older runs, abandoned temporaries)
        for n in os.listdir(self.sidefd):
            if n != layout.LOCK_NAME:
                with contextlib.suppress(OSError):
                    os.unlink(n, dir_fd=self.sidefd)

    def _drop_draft(self, e: BaseException) -> BaseException:
        """Discard the draft after ``e``; what to raise: a ``StorageError`` for an OS or HDF5 error, else ``e``."""
        self._discard_draft()
        return self._storage_error("the run file", e) if isinstance(e, (OSError, RuntimeError)) else e

    def _discard_draft(self) -> None:
        """Close and remove an unfinished draft, if any (the published file is untouched)."""
        pieces, self._drafting = self._drafting, None
        if pieces is not None:
            with contextlib.suppress(Exception):  # it also drops the draft (or is running, and will)
                pieces.close()
        draft, self._draft = self._draft, None
        if draft is None:
            return
        if draft["nc"] is not None:
            with contextlib.suppress(Exception):
                draft["nc"].close()
        if draft["fd"] >= 0:
            with contextlib.suppress(OSError):
                os.close(draft["fd"])
        with contextlib.suppress(OSError):
            os.unlink(draft["tmp"], dir_fd=self.sidefd)

    def _write_file(self, nc: Any, old: Any, parts: list[dict[str, Any]], steps: int, snapshots: int
                    ) -> Generator[None, None, dict[str, Any]]:
        """Create the variables for ``old`` + ``parts`` + ``steps`` and ``snapshots`` more rows and write
        ``old`` and ``parts`` into them, yielding after each variable; returns where the rows still to
        come go (``_write_rest``)."""
        config, data = self.config, self.data
        L, M, K, d, N = config.depth, config.width, len(self.subset), data.d, data.N
        old_keep = None
        n_old = k_old = 0
        if old is not None:
            n_old = old.dimensions["step"].size
            old_steps = np.asarray(old["snapshot_step"][...], dtype=np.int64)
            old_keep = np.flatnonzero(old_steps % self._grid == 0 if self._grid else old_steps >= 0)
            k_old = len(old_keep)
        parts = [p for p in parts if "loss" in p]  # status records carry no data
        n_at = n_old + sum(len(p["loss"]) for p in parts)
        k_at = k_old + sum(len(p["snapshot_step"]) for p in parts)
        n, k = n_at + steps, k_at + snapshots
        for dim, size in (("step", n), ("snapshot", k), ("layer", L), ("particle", K), ("dim", d),
                          ("sample", N), ("state_particle", M)):
            nc.createDimension(dim, size)
        out = {}
        for name, spec in VARIABLES.items():
            v = nc.createVariable(name, dtype_of(name, config.dtype), spec.dims, fill_value=False)
            v.setncatts(cf_attributes(name))
            out[name] = v
        yield
        # per step: E and velocity (read whole: they also give the health figures)
        series = {}
        for name in STEP_DATA:
            a = [np.asarray(old[name][...], dtype=np.float64)] if old is not None else []
            series[name] = np.concatenate([*a, *(np.asarray(p[name], dtype=np.float64) for p in parts)]
                                          or [np.empty(0)])
            out[name][:n_at] = series[name]
            yield
        steps_index = np.arange(n, dtype=np.int64)
        out["step"][:] = steps_index
        out["s"][:] = steps_index * config.ds
        yield
        # per snapshot, in blocks
        snap_steps = []
        for name in SNAPSHOT_DATA:
            pos = 0
            if old is not None and k_old:
                src = old[name]
                for lo in range(0, k_old, 64):
                    idx = old_keep[lo:lo + 64]
                    block = src[int(idx[0]):int(idx[-1]) + 1][idx - idx[0]]
                    out[name][pos:pos + len(idx)] = block
                    if name == "snapshot_step":
                        snap_steps.append(np.asarray(block, dtype=np.int64))
                    pos += len(idx)
            for p in parts:
                a = p[name]
                if len(a):
                    out[name][pos:pos + len(a)] = a
                    if name == "snapshot_step":
                        snap_steps.append(np.asarray(a, dtype=np.int64))
                    pos += len(a)
            yield
        out["snapshot"][:] = np.arange(k, dtype=np.int64)
        out["layer"][:] = np.arange(L, dtype=np.int64)
        out["t"][:] = np.arange(L) / L
        out["particle_index"][:] = self.subset
        out["x"][:] = data.x
        out["y"][:] = data.y
        out["readout"][:] = data.readout
        yield
        state = None
        for p in parts:
            if "state_U" in p:
                state = p
        if state is None and old is None:
            raise ValueError("a run file needs the full state: none was given and none was published")
        for name in STATE_DATA:
            out[name][:] = state[name] if state is not None else old[name][...]
        return {"out": out, "series": series, "snap_steps": snap_steps, "n_at": n_at, "k_at": k_at, "n": n, "k": k}

    def _write_rest(self, draft: dict[str, Any], tail: list[dict[str, Any]], step: int) -> None:
        """Write ``tail``'s rows, the state and the global attributes into the draft of ``_write_file``."""
        out, series, snap_steps = draft["out"], draft["series"], draft["snap_steps"]
        pos = draft["n_at"]
        for p in tail:
            m = len(p["loss"])
            for name in STEP_DATA:
                a = np.asarray(p[name], dtype=np.float64)
                out[name][pos:pos + m] = a
                series[name] = np.concatenate([series[name], a])
            pos += m
        kpos = draft["k_at"]
        for p in tail:
            m = len(p["snapshot_step"])
            if m:
                for name in SNAPSHOT_DATA:
                    out[name][kpos:kpos + m] = p[name]
                snap_steps.append(np.asarray(p["snapshot_step"], dtype=np.int64))
            kpos += m
        if (pos, kpos) != (draft["n"], draft["k"]):
            raise ValueError(f"the file was sized for {draft['n']} steps and {draft['k']} snapshots, "
                             f"not {pos} and {kpos}")
        for p in tail:
            if "state_U" in p:
                for name in STATE_DATA:
                    out[name][:] = p[name]
        all_snap = np.concatenate(snap_steps) if snap_steps else np.empty(0, np.int64)
        out["snapshot_s"][:] = all_snap * self.config.ds
        figures = health.summary(series["loss"], series["grad_norm"], self.config.ds)
        self.attrs.update(steps_done=step, state_step=step, segment_seq=self.seq,
                          rise_count=int(figures["rise_count"]), max_rise=float(figures["max_rise"]),
                          energy_residual=float(figures["energy_residual"]))
        draft["nc"].setncatts({k: attr_value(v) for k, v in self.attrs.items()})
        self.n_steps = draft["n"]

    # -- ending --------------------------------------------------------------------------
    def finish(self, status: str, message: str, step: int, theta: Particles) -> None:
        """The last durable point: publish everything with ``status``."""
        self.attrs.update(status=status, status_message=message)
        self.commit(step, theta, publish=True)

    def fail(self, message: str) -> None:
        """Record ``failed`` in a tiny status segment (it fits in the space kept free); never raises."""
        if not self.published:
            return
        self.attrs.update(status="failed", status_message=message)
        with contextlib.suppress(Exception):
            self._write_segment({}, self.tip, has_state=False)

    def close(self) -> None:
        if self.sidefd >= 0:
            self._discard_draft()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        for name in ("sidefd", "dirfd"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return v
