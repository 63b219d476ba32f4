"""The Python API behind ``import mfres`` (and under the CLI): run, sweep, analyse, open.

Errors are ``mfres.errors`` exceptions worded for Python callers (``overwrite=True``
rather than ``--overwrite``). ``progress=True`` shows a ``tqdm.auto`` bar (a text bar
in a terminal, a widget in Jupyter when ipywidgets is installed); ``None`` or
``False`` shows nothing; a callable is called as the loop reports progress.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .errors import ConfigError, MfresError, RunStopped, StorageError

Progress = bool | None | Callable[..., None]


@contextlib.contextmanager
def python_errors() -> Iterator[None]:
    """Re-word ``MfresError`` messages raised inside for Python callers (see ``mfres.errors``)."""
    try:
        yield
    except MfresError as e:
        e.in_python_terms()
        raise


def check_output(out: str, *, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse, before any work, an output path that a run cannot use.

    Raises ``ConfigError`` (a usage mistake: exit code 2 in the CLI) if ``out`` exists
    and neither ``overwrite`` nor ``resume`` is given, if both are, or if ``out`` is a
    folder; ``StorageError`` (exit code 4) if another process writes it, if it is not a
    regular file, or if its folder does not exist or cannot be written.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if os.path.isdir(out):
        raise ConfigError(f"{out} is a folder; --out must name a file")
    from .store.layout import lock_holder

    holder = lock_holder(out)
    if holder is not None:
        raise StorageError(f"{out} is being written by another mfres process{f' (pid {holder})' if holder else ''}; "
                           "wait for it to end or choose another --out")
    if os.path.exists(out) and not os.path.isfile(out):
        raise StorageError(f"{out} is not a regular file")
    if os.path.exists(out) and not (overwrite or resume):
        raise ConfigError(f"{out} exists; pass --overwrite to replace it (or --resume to continue it)")
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise StorageError(f"cannot write {out}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise StorageError(f"cannot write {out}: directory {directory} is not writable")


def steps_done(path: str) -> int:
    """The ``steps_done`` attribute of an existing run file (0 if absent or unreadable)."""
    if not os.path.isfile(path):
        return 0
    try:
        import netCDF4

        with netCDF4.Dataset(path) as nc:
            return int(nc.getncattr("steps_done")) if "steps_done" in nc.ncattrs() else 0
    except (OSError, ValueError, RuntimeError):
        return 0


def _given(progress: Progress) -> Any:
    """A ``progress`` other than ``True``: ``None`` for ``None``/``False``, a callable as it is."""
    if progress is None or progress is False:
        return None
    if not callable(progress):
        raise ConfigError(f"progress must be True, False, None or a callable, got {progress!r}")
    return progress


@contextlib.contextmanager
def training_progress(progress: Progress, steps: int, start: int = 0,
                      file: Any = None) -> Iterator[Callable[[int, int, float, float], None] | None]:
    """The ``progress(step, steps, loss, steps_per_second)`` callback for ``train.run``.

    ``True``: a ``tqdm.auto`` bar over the steps (written to ``file``, default stderr)
    showing steps/s and the current loss; ``None``/``False``: no callback; a callable
    is passed through.
    """
    if progress is not True:
        yield _given(progress)
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=min(start, steps), desc="training", unit="step", file=file or sys.stderr,
               dynamic_ncols=True, leave=True)

    def update(step: int, total: int, loss: float, rate: float) -> None:
        bar.set_postfix_str(f"E={loss:.3e}", refresh=False)
        bar.update(step - bar.n)

    try:
        yield update
    finally:
        bar.close()


@contextlib.contextmanager
def sweep_progress(progress: Progress, total: int,
                   file: Any = None) -> Iterator[Callable[[int, int, dict[str, Any]], None] | None]:
    """The ``progress(done, total, info)`` callback for ``sweep.run_sweep``: a ``tqdm.auto``
    bar over the grid points for ``True``; see ``training_progress``."""
    if progress is not True:
        yield _given(progress)
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="grid points", unit="point", file=file or sys.stderr, dynamic_ncols=True)

    def update(done: int, total: int, info: dict[str, Any]) -> None:
        if info:
            bar.set_postfix_str(f"L={info.get('depth')} M={info.get('width')}", refresh=False)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def simulate(out: str | None = None, *, overwrite: bool = False, resume: bool = False, progress: Progress = None,
             **options: Any) -> Any:
    """Train one net by gradient descent and return its run file as an ``xarray.Dataset`` (in memory).

    ``options`` are the ``mfres simulate`` options as keywords (``RunConfig`` fields):
    ``depth`` L, ``width`` M, ``dim`` d, ``samples`` N, ``data``, ``data_seed``,
    ``activation``, ``init``, ``init_scale``, ``length_scale``, ``steps``, ``ds`` (Δs;
    the run reaches s = steps·Δs), ``weight_decay`` λ, ``seed``, ``snapshot_every``,
    ``snapshot_particles``, ``backend``, ``dtype``, ``threads``, ``device``, ``memory``.

    ``out``: the run file to write (netCDF4); ``None`` writes to a temporary folder,
    removed afterwards. An existing ``out`` is refused unless ``overwrite=True``;
    ``resume=True`` continues it from its last saved state (same options, ``steps`` may
    grow). ``progress``: ``True`` for a progress bar (terminal or Jupyter), ``None``/``False``
    for none, or a callable ``progress(step, steps, loss, steps_per_second)``.

    Raises ``ConfigError`` for invalid options, ``BackendError`` for an unusable
    backend, ``StorageError`` when the file cannot be written, and ``RunStopped`` when
    the run diverges or is interrupted (the file at ``out`` then keeps every step done).

    >>> ds = mfres.simulate(depth=8, width=32, steps=500, progress=True)
    >>> ds.loss.plot(x="s", yscale="log")
    """
    import tempfile

    from .config import RunConfig
    from .store import open_run as _open
    from .train import resume_options, run

    with python_errors():
        if out is not None:
            config = RunConfig(**(resume_options(options, out) if resume else options))
            check_output(out, overwrite=overwrite, resume=resume)
            start = steps_done(out) if resume else 0
            with training_progress(progress, config.steps, start) as callback:
                run(config, out, overwrite=overwrite, resume=resume, progress=callback, command="mfres.simulate")
            return _open(out, load=True)
        config = RunConfig(**options)
        with tempfile.TemporaryDirectory(prefix="mfres-") as tmp:
            path = os.path.join(tmp, "run.nc")
            with training_progress(progress, config.steps) as callback:
                run(config, path, progress=callback, command="mfres.simulate")
            return _open(path, load=True)


def _values(v: Any) -> tuple[Any, ...]:
    if isinstance(v, str):
        return tuple(x.strip() for x in v.split(",") if x.strip())
    if isinstance(v, Sequence):
        return tuple(v)
    return (v,)


def sweep(out: str = "sweep.nc", *, depth: int | Sequence[int] = 16, width: int | Sequence[int] = 64,
          seeds: int = 4, activation: str | Sequence[str] = "tanh", init: str | Sequence[str] = "iid",
          ds: float | Sequence[float] = 1.0, workers: int | None = None, scheduler: str | None = None,
          keep_runs: str | None = None, backend: str = "numpy", overwrite: bool = False, progress: Progress = None,
          **options: Any) -> Any:
    """Run a grid of nets over depth, width and seeds on Dask; return the sweep file as an ``xarray.Dataset``.

    ``depth``, ``width``: one value or a list; ``seeds``: initialisation seeds per grid
    point (``seed``, ``seed``+1, ...). ``activation``, ``init`` and ``ds`` sweep too when
    given a list of several values. Every other keyword is a ``simulate`` option shared
    by all runs (``steps``, ``dim``, ``samples``, ``data``, ``seed``, ...; the backend is
    NumPy). ``workers``: local Dask processes (at most one per grid point left to do; by
    default one per core, and a single one runs in this process); ``scheduler``: the
    address of a running ``dask.distributed`` scheduler instead; ``keep_runs``: a folder
    for every run's own file; ``backend``: the backend of the workers; ``overwrite``: start
    afresh on an existing ``out``. Calling again with the same arguments on the same ``out``
    completes only the missing runs.

    The result holds ``loss(<swept>, depth, width, seed, step)`` on the grid ``s(step)``,
    and ``status`` (ok, diverged, failed, missing), ``message``, ``seconds`` per run.
    Raises ``RunStopped`` if some runs are missing or failed at the end (a lost worker).
    """
    from .sweep import SweepSpec, open_sweep, run_sweep

    with python_errors():
        acts, inits = _values(activation), _values(init)
        try:
            dss = tuple(float(v) for v in _values(ds))
            depths = tuple(int(v) for v in _values(depth))
            widths = tuple(int(v) for v in _values(width))
        except (TypeError, ValueError):
            raise ConfigError("depth and width must be integers (or lists of them), ds a number (or a list)") from None
        base = {k: v for k, v in options.items() if v is not None}
        base.pop("backend", None)
        for name, values in (("activation", acts), ("init", inits), ("ds", dss)):
            if len(values) == 1:
                base[name] = values[0]
        spec = SweepSpec(depths, widths, seeds, acts if len(acts) > 1 else (), inits if len(inits) > 1 else (),
                         dss if len(dss) > 1 else (), base)
        with sweep_progress(progress, len(spec.groups())) as callback:
            counts = run_sweep(spec, out, workers=workers, scheduler=scheduler, keep_runs=keep_runs,
                               backend=backend, overwrite=overwrite, command="mfres.sweep", progress=callback)
        left = counts.get("missing", 0) + counts.get("failed", 0)
        if left:
            raise RunStopped(f"{left} runs are missing or failed (see the file's message variable); call "
                             "mfres.sweep again with the same arguments to redo them")
        return open_sweep(out)


def analyze(sweep: Any, eps: float = 1e-3, eta: float = 0.1, at_s: float | None = None,
            confidence: float = 0.95, n_boot: int = 999, out: str | None = None) -> Any:
    """Size and time to ε, the theorem's probability, convergence orders and the limit of a sweep.

    ``sweep``: a sweep ``Dataset`` (``mfres.sweep``, ``mfres.open_sweep``) or the path of a
    sweep file. ``eps``: the target loss ε; ``eta``: the failure probability η (target
    1 − η); ``at_s``: the pseudo-time of the analysis (default the last); ``confidence``
    of the Wilson and seed-bootstrap intervals, ``n_boot`` bootstrap resamples. ``out``:
    also write the result as netCDF. Returns ``mfres.analysis.analyze``'s ``Dataset``
    (``depth_order`` and ``width_order`` with ``_lo``/``_hi``, ``s_eps_median``, ``success``,
    ``near_limit``, ``min_width``, ``min_depth``, ``limit``, ...); the text table of
    ``mfres analyze`` is ``mfres.analysis.report(sweep, eps, eta, at_s, n_boot, confidence)``.
    """
    with python_errors():
        return run_analysis(sweep, eps, eta, at_s, confidence, n_boot, out)[1]


def run_analysis(sweep: Any, eps: float, eta: float, at_s: float | None, confidence: float, n_boot: int,
                 out: str | None) -> tuple[Any, Any]:
    """``(sweep, result)``: the checks, the analysis and the ``out`` file shared by ``analyze`` and the CLI
    (errors worded with the CLI's option names)."""
    from . import analysis
    from .sweep import open_sweep as _open_sweep

    if not (eps > 0 and 0 < eta < 1):
        raise ConfigError("--eps must be positive and --eta in (0, 1)")
    if not 0 < confidence < 1 or n_boot < 1:
        raise ConfigError("--confidence must be in (0, 1) and --boot positive")
    if isinstance(sweep, str | os.PathLike):
        path = os.fspath(sweep)
        sweep = _open_sweep(path)
        if "status" not in sweep or "seed" not in sweep.dims:
            raise ConfigError(f"{path} is not a sweep file (made by mfres sweep)")
    elif "status" not in sweep or "seed" not in sweep.dims:
        raise ConfigError("not a sweep (made by mfres sweep)")
    try:
        result = analysis.analyze(sweep, eps, eta, at_s, n_boot, confidence)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if out:
        try:
            result.to_netcdf(out)
        except (OSError, RuntimeError, ValueError) as e:
            raise StorageError(f"cannot write {out}: {e}") from None
    return sweep, result


def open_run(path: str, load: bool = False) -> Any:
    """Open a run file as an ``xarray.Dataset`` (lazily, unless ``load=True`` reads it into memory).

    Raises ``StorageError`` if ``path`` is missing or not a netCDF file.
    """
    from .store import open_run as _open

    with python_errors():
        return _open(os.fspath(path), load=load)


def open_sweep(path: str) -> Any:
    """Open a sweep file (``mfres sweep``) as an ``xarray.Dataset``, read into memory."""
    from .sweep import open_sweep as _open

    with python_errors():
        return _open(os.fspath(path))
