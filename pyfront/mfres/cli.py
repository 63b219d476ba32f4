"""The ``mfres`` command line: a thin Click layer over the Python API."""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

from . import __version__
from .errors import ConfigError, MfresError, RunStopped, StorageError

SIMULATE_EPILOG = """\b
Examples:
  mfres simulate                                  # L=16, M=64 on 'sphere', 2000 steps
  mfres simulate -L 32 -M 256 --steps 5000 --out deep.nc
  mfres simulate --data mydata.npz --activation srelu:0.1 --init smooth
"""


def _fail(e: BaseException | str, code: int) -> None:
    click.echo(f"Error: {_one_line(str(e))}", err=True)
    sys.exit(code)


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user-facing errors into one-line messages and exit codes (no traceback)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MfresError as e:
            _fail(e, e.exit_code)
        except MemoryError:
            _fail(MemoryError("out of memory: the net or the data set is too large for this machine"), 5)
        except KeyboardInterrupt:
            _fail(KeyboardInterrupt("interrupted before the run started"), 130)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class _Group(click.Group):
    """The ``mfres`` group: Click's own usage errors (a malformed or unknown option) are
    printed like every other error, on one line, with a pointer to the command's help."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        prog_name = prog_name if prog_name not in (None, "main") else "mfres"
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "mfres"
            _fail(f"{_one_line(e.format_message()).rstrip('.')}; see '{where} --help'", e.exit_code)
        except click.ClickException as e:
            _fail(_one_line(e.format_message()), e.exit_code)
        except click.Abort:
            _fail("aborted", 1)
        sys.exit(rv if isinstance(rv, int) else 0)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextlib.contextmanager
def _library_output(quiet: bool) -> Iterator[None]:
    """Keep stdout for results while a run starts and trains: what libraries print there
    (juliapkg's log lines, a Julia or other child process's output) goes to stderr, or
    nowhere with ``--quiet`` (which leaves only errors and warnings)."""
    sys.stdout.flush()
    try:
        fd, err = sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # not real files (e.g. click's CliRunner)
        fd = err = -1
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(os.devnull, "w")) if quiet else sys.stderr
        saved = os.dup(fd) if fd >= 0 and fd != err else -1
        if saved >= 0:
            sys.stderr.flush()
            os.dup2(sink.fileno(), fd)
        try:
            with contextlib.redirect_stdout(sink):
                yield
        finally:
            if saved >= 0:
                sys.stdout.flush()
                os.dup2(saved, fd)
                os.close(saved)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mfres")
def main() -> None:
    """mfres: watch a deep ResNet train in the mean-field regime.

    Simulates the finite ResNet of Ding, Chen, Li and Wright (JMLR 2022),
    z_{l+1} = z_l + (1/(L M)) Σ_m U_{l,m} σ(W_{l,m}·z_l + b_{l,m}), trained by
    gradient descent in mean-field pseudo-time s (θ ← θ − Δs·L·M·∇E), and stores
    the loss and the weight distributions as netCDF files for xarray.
    """


def simulate_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options of one run, shared by ``simulate`` and ``sweep``."""
    return _run_options(f, sweep=False)


def _run_options(f: Callable[..., Any], sweep: bool) -> Callable[..., Any]:
    listable = " A comma list sweeps over it." if sweep else ""
    options = [
        click.option("--dim", "-d", type=int, default=None, help="Input dimension d [default: 4, or the data file's]."),
        click.option("--samples", "-N", type=int, default=None,
                     help="Number of samples N [default: 64, or the file's]."),
        click.option("--data", default="sphere", show_default=True,
                     help="Built-in data set (sphere, teacher) or a .npz/.nc/.csv file."),
        click.option("--data-seed", type=int, default=0, show_default=True, help="Seed of the built-in data set."),
        click.option("--activation", default="tanh", show_default=True,
                     help="tanh, sigmoid, softplus, gelu, srelu[:ETA], relu2." + listable),
        click.option("--init", type=str if sweep else click.Choice(["iid", "tied", "smooth"]), default="iid",
                     show_default=True, help="iid, tied or smooth: how particles are correlated across depth."
                     + listable),
        click.option("--init-scale", type=float, default=1.0, show_default=True,
                     help="Standard deviation of U, W, b at s = 0."),
        click.option("--length-scale", type=float, default=0.2, show_default=True,
                     help="Depth correlation length of --init smooth."),
        click.option("--steps", type=int, default=2000, show_default=True, help="Number of GD steps."),
        click.option("--ds", type=str if sweep else float, default="1.0" if sweep else 1.0, show_default=True,
                     help="Pseudo-time step Δs (learning rate L·M·Δs)." + listable),
        click.option("--weight-decay", type=float, default=0.0, show_default=True, help="Weight decay λ ≥ 0."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the initial particles" + (" (runs use seed, seed+1, ...)." if sweep else ".")),
        click.option("--snapshot-every", type=int, default=None,
                     help="Steps between snapshots of the particles [default: steps/20]."),
        click.option("--snapshot-particles", type=int, default=None,
                     help="Store K sampled particles per layer in snapshots [default: all M]."),
        click.option("--backend", type=click.Choice(["auto", "numpy", "julia"]), default="numpy" if sweep else "auto",
                     show_default=True, help="auto = Julia where it is usable without downloads, else NumPy."
                     + (" Chosen in each Dask worker." if sweep else "")),
        click.option("--dtype", type=click.Choice(["float64", "float32"]), default="float64", show_default=True),
        click.option("--threads", type=int, default=None,
                     help="Threads of the backend (NumPy or Julia) [default: all cores]."),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                     help="cuda: run the Julia kernels on a GPU (CUDA.jl)."),
        click.option("--memory", type=click.Choice(["auto", "store", "recompute"]), default="auto",
                     show_default=True,
                     help="store: keep every layer's activations (fastest); recompute: O(L·N·d) memory; "
                          "auto: store if they fit in a quarter of RAM (NumPy backend)."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


@main.command(epilog=SIMULATE_EPILOG)
@click.option("--depth", "-L", type=int, default=16, show_default=True, help="Depth L (number of residual layers).")
@click.option("--width", "-M", type=int, default=64, show_default=True, help="Width M (particles per layer).")
@simulate_options
@click.option("--out", "-o", default="run.nc", show_default=True, type=click.Path(dir_okay=False),
              help="The run file (netCDF4) to write.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--resume", is_flag=True,
              help="Continue --out from its last saved state (same options, --steps may grow); "
                   "starts afresh if --out does not exist.")
@_guarded
def simulate(quiet: bool, out: str, overwrite: bool, resume: bool, **options: Any) -> None:
    """Train one net by gradient descent and write its trajectory to a netCDF file."""
    from .api import check_output
    from .backends import select
    from .config import RunConfig
    from .train import resume_options, run, stop_on_signals

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    # SIGINT/SIGTERM from here on stop the run cleanly (after its first durable point)
    with stop_on_signals() as stop:
        config = RunConfig(**(resume_options(options, out) if resume else options))
        check_output(out, overwrite=overwrite, resume=resume)
        command = _command_line()
        with _library_output(quiet):
            backend = select(config.backend, config.threads, config.device, config.memory)
            if not quiet:
                click.echo(f"mfres {__version__}: L={config.depth} M={config.width} data={config.data} "
                           f"activation={config.activation} init={config.init} Δs={config.ds:g} "
                           f"backend={backend.name} dtype={config.dtype}", err=True)
                if backend.name == "julia":
                    click.echo(f"{backend.describe()}; the first chunk compiles the kernels (once per process)",
                               err=True)
            with _training_bar(quiet, config.steps, out if resume else None) as progress:
                result = run(config, out, backend=backend, command=command, overwrite=overwrite, resume=resume,
                             progress=progress, stop=stop, warn=False)
    if not quiet:
        if config.steps == 0:
            click.echo(f"no steps (--steps 0): the initial net's loss is {result.loss:.6g}; wrote {out}", err=True)
        else:
            click.echo(f"{result.steps_done} steps, s = {result.steps_done * config.ds:g}, "
                       f"final loss {result.loss:.6g}; wrote {out}", err=True)
            t = result.timing
            share = f" ({100 * t.overhead:.1f} % of the stepping)" if math.isfinite(t.overhead) else ""
            click.echo(f"time: {t.backend:.3g} s stepping in the backend, {t.rest:.3g} s in the loop, snapshots "
                       f"and file{share}", err=True)
        startup = backend.startup_seconds
        if startup:
            click.echo(f"{_startup_label(backend.name)}: {startup:.1f} s of this run", err=True)
    for w in result.warnings:
        click.echo(f"Warning: {w}", err=True)


def _startup_label(backend: str) -> str:
    """What a backend's ``startup_seconds`` were spent on."""
    return "NumPy helper processes' start" if backend == "numpy" else "Julia start-up and compilation"


@contextlib.contextmanager
def _training_bar(quiet: bool, steps: int, resumed: str | None = None) -> Iterator[Any]:
    """The run's progress bar (``tqdm``, on stderr; none with ``--quiet``)."""
    from .api import steps_done, training_progress

    start = steps_done(resumed) if resumed else 0
    with training_progress(not quiet and steps > 0, steps, start, file=sys.stderr) as progress:
        yield progress


def _command_line() -> str:
    """This process's command line, as the run and sweep files record it."""
    return " ".join(shlex.quote(a) for a in ["mfres", *sys.argv[1:]])


def _int_list(name: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a comma list of integers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{name} must list at least one value")
    return values


def _list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in str(text).split(",") if v.strip())


@main.command(epilog="""\b
Example:
  mfres sweep --depth 8 --width 8,32,128,512 --seeds 8 --dim 2 --samples 16 \\
              --steps 40 --ds 0.05 --init iid --workers 2 --out sweep.nc
\b
Re-running the same command completes a stopped sweep: it redoes exactly the
runs that are missing or failed. Swept Δs values must divide the largest one.
""")
@click.option("--depth", "-L", default="16", show_default=True, help="Depths L, a comma list.")
@click.option("--width", "-M", default="64", show_default=True, help="Widths M, a comma list.")
@click.option("--seeds", type=int, default=4, show_default=True,
              help="Initialisation seeds per grid point (trained together as one batch).")
@click.option("--workers", type=int, default=None,
              help="Local Dask worker processes, at most one per grid point left to do, sharing the cores "
                   "unless --threads is given [default: one per core; a single one runs in this process, "
                   "without a cluster].")
@click.option("--scheduler", default=None,
              help="Address of a running dask.distributed scheduler to use instead, or 'synchronous' "
                   "(run the tasks in this process).")
@click.option("--keep-runs", type=click.Path(file_okay=False), default=None,
              help="Also write every run's own file (with snapshots) into this folder.")
@click.option("--out", "-o", default="sweep.nc", show_default=True, type=click.Path(dir_okay=False),
              help="The sweep file; re-running the same sweep on it completes the missing and failed runs.")
@click.option("--overwrite", is_flag=True, help="Start afresh: remove --out and its folder --out.parts first.")
@lambda f: _run_options(f, sweep=True)
@_guarded
def sweep(depth: str, width: str, seeds: int, workers: int | None, scheduler: str | None, keep_runs: str | None,
          out: str, overwrite: bool, quiet: bool, activation: str, init: str, ds: str, backend: str,
          **options: Any) -> None:
    """Run a grid of nets over depth, width and seeds on Dask; write one sweep file."""
    from .sweep import SweepSpec

    acts, inits = _list(activation), _list(init)
    try:
        dss = tuple(float(v) for v in _list(ds))
    except ValueError:
        raise ConfigError(f"--ds must be a comma list of numbers, got {ds!r}") from None
    base = {k: v for k, v in options.items() if v is not None}
    for name, values in (("activation", acts), ("init", inits), ("ds", dss)):
        if len(values) == 1:
            base[name] = values[0]
    spec = SweepSpec(_int_list("--depth", depth), _int_list("--width", width), seeds,
                     acts if len(acts) > 1 else (), inits if len(inits) > 1 else (), dss if len(dss) > 1 else (),
                     base)
    kwargs: dict[str, Any] = {"workers": workers, "scheduler": scheduler, "backend": backend,
                              "keep_runs": keep_runs, "overwrite": overwrite, "command": _command_line()}
    try:
        counts, startup = _sweep_with_progress(spec, out, quiet, kwargs)
    except KeyboardInterrupt:
        raise RunStopped(f"interrupted; every finished run is kept in {out}; run the same command again "
                         "to complete the sweep") from None
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    click.echo(f"{summary}; wrote {out}", err=True)
    for name, seconds in startup.items():
        if seconds and not quiet:
            click.echo(f"{_startup_label(name)}: {seconds:.1f} s of this sweep's worker time", err=True)
    left = counts.get("missing", 0) + counts.get("failed", 0)
    if left:
        raise RunStopped(f"{left} runs are missing or failed (see the file's message variable); "
                         "run the same command again to redo them")


def _sweep_with_progress(spec: Any, out: str, quiet: bool,
                         kwargs: dict[str, Any]) -> tuple[dict[str, int], dict[str, float]]:
    """``run_sweep`` with a ``tqdm`` bar over the grid points on stderr (none with ``--quiet``);
    returns its counts and, by backend, the seconds its workers spent starting it."""
    from .api import sweep_progress
    from .sweep import run_sweep

    startup: dict[str, float] = {}
    with _library_output(quiet), sweep_progress(not quiet, len(spec.groups()), file=sys.stderr) as bar:
        def progress(done: int, total: int, info: dict[str, Any]) -> None:
            name = str(info.get("backend", ""))
            startup[name] = startup.get(name, 0.0) + float(info.get("startup_seconds", 0.0))
            if bar is not None:
                bar(done, total, info)

        counts = run_sweep(spec, out, progress=progress, **kwargs)
    return counts, startup


@main.command()
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@click.option("--eps", type=float, default=1e-3, show_default=True, help="Target loss ε.")
@click.option("--eta", type=float, default=0.1, show_default=True, help="Failure probability η (target 1 − η).")
@click.option("--at-s", "at_s", type=float, default=None, help="Pseudo-time of the analysis [default: the last].")
@click.option("--confidence", type=float, default=0.95, show_default=True,
              help="Confidence of the Wilson and bootstrap intervals.")
@click.option("--boot", "n_boot", type=int, default=999, show_default=True, help="Seed-bootstrap resamples.")
@click.option("--out", "-o", default=None, type=click.Path(dir_okay=False),
              help="Also write the results as a netCDF file.")
@_guarded
def analyze(sweep_file: str, eps: float, eta: float, at_s: float | None, confidence: float, n_boot: int,
            out: str | None) -> None:
    """Size and time to ε, the theorem's probability, convergence orders and the limit, of a sweep file."""
    from . import analysis
    from .api import run_analysis

    sweep, result = run_analysis(sweep_file, eps, eta, at_s, confidence, n_boot, out)
    try:
        click.echo(analysis.report(sweep, eps, eta, at_s, n_boot, confidence, result=result))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if out:
        click.echo(f"wrote {out}", err=True)


PLOT_EPILOG = """\b
Examples:
  mfres plot run.nc                                   # loss against s: run_loss.png
  mfres plot run.nc --kind weights --layers 0,8,15
  mfres plot run.nc --kind clouds --at-s 0,100,2000
  mfres plot run.nc --kind clouds --layers 0,15 --animate clouds.gif
  mfres plot sweep.nc --kind success --eps 1e-3
"""


@main.command(epilog=PLOT_EPILOG)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--kind", "-k", type=click.Choice(["loss", "weights", "clouds", "success", "rates", "size"]),
              default="loss", show_default=True,
              help="loss (run or sweep); weights, clouds (run); success, rates, size (sweep).")
@click.option("--out", "-o", default=None, type=click.Path(dir_okay=False),
              help="Figure file, .png, .pdf or .svg [default: FILE's name + _KIND.png].")
@click.option("--layers", default=None,
              help="weights, clouds: comma list of layer indices 0..L-1 "
                   "[default: weights first, middle, last; clouds all; --animate first, middle, last].")
@click.option("--at-s", "at_s", default=None,
              help="clouds: comma list of pseudo-times within the run; success, rates: one pseudo-time "
                   "[default: the last].")
@click.option("--animate", default=None, type=click.Path(dir_okay=False),
              help="clouds: write an animation over all snapshots to this .gif (or .mp4, with ffmpeg).")
@click.option("--fps", type=float, default=6.0, show_default=True, help="--animate: frames per second.")
@click.option("--eps", type=float, default=1e-3, show_default=True, help="success: target loss ε.")
@click.option("--eta", type=float, default=0.1, show_default=True, help="success, size: failure probability η.")
@_guarded
def plot(file: str, kind: str, out: str | None, layers: str | None, at_s: str | None, animate: str | None,
         fps: float, eps: float, eta: float) -> None:
    """Draw a figure of a run file or a sweep file (or an animation of a run's particle clouds)."""
    from . import plot as figures
    from .store import open_run, valid_snapshots

    # options that do not apply to --kind are refused rather than ignored
    if layers is not None and kind not in ("weights", "clouds"):
        raise ConfigError(f"--layers applies to --kind weights and clouds, not {kind}")
    if at_s is not None and kind not in ("clouds", "success", "rates", "size"):
        raise ConfigError(f"--at-s applies to --kind clouds, success, rates and size, not {kind}")
    if animate is not None and kind != "clouds":
        raise ConfigError(f"--animate applies to --kind clouds, not {kind}")
    if animate is not None and at_s is not None:
        raise ConfigError("--animate shows every snapshot; leave out --at-s")
    if animate is not None and out is not None:
        raise ConfigError("--animate names the animation's file; leave out --out")
    if not (fps > 0 and fps < 1000):
        raise ConfigError(f"--fps must be in (0, 1000), got {fps:g}")
    chosen = list(_int_list("--layers", layers)) if layers is not None else None
    times = list(_float_list("--at-s", at_s)) if at_s is not None else None
    if times is not None and kind in ("success", "rates", "size") and len(times) != 1:
        raise ConfigError(f"--kind {kind} takes one --at-s pseudo-time, got {len(times)}")
    target = animate or out or f"{os.path.splitext(file)[0]}_{kind}.png"
    _check_figure_path(target, animation=animate is not None)

    ds = open_run(file, load=True)
    sweep = figures.is_sweep(ds)
    if kind in ("weights", "clouds") and sweep:
        raise ConfigError(f"--kind {kind} needs a run file (mfres simulate), {file} is a sweep")
    if kind in ("success", "rates", "size") and not sweep:
        raise ConfigError(f"--kind {kind} needs a sweep file (mfres sweep), {file} is a single run")
    try:
        if kind == "loss":
            fig = figures.loss(ds)
        elif kind == "weights":
            fig = figures.weights(valid_snapshots(ds), chosen)
        elif kind == "clouds" and animate:
            fig = figures.animate(valid_snapshots(ds), chosen)
        elif kind == "clouds":
            fig = figures.clouds(valid_snapshots(ds), times, chosen)
        elif kind == "success":
            fig = figures.success(ds, eps, eta, times[0] if times else None)
        elif kind == "rates":
            fig = figures.rates(ds, times[0] if times else None)
        else:
            fig = figures.size(ds, eta, times[0] if times else None)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        figures.save(fig, target, fps=fps) if animate else figures.save(fig, target)
    except ConfigError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        raise StorageError(f"cannot write {target}: {_one_line(str(e))}") from None
    click.echo(f"wrote {target}", err=True)


FIGURE_TYPES = (".png", ".pdf", ".svg")
ANIMATION_TYPES = (".gif", ".mp4")


def _check_figure_path(path: str, animation: bool) -> None:
    """Refuse, before any drawing, a figure file of an unknown type or in a missing folder."""
    ext = os.path.splitext(path)[1].lower()
    allowed = ANIMATION_TYPES if animation else FIGURE_TYPES
    if ext not in allowed:
        what = "--animate" if animation else "--out"
        raise ConfigError(f"{what} {path}: the file type must be {', '.join(allowed)}")
    if ext == ".mp4":
        from matplotlib import animation as anim

        if not anim.writers.is_available("ffmpeg"):
            raise ConfigError(f"--animate {path}: .mp4 needs ffmpeg, which is not installed here; use a .gif")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StorageError(f"cannot write {path}: directory {directory} does not exist")


def _float_list(name: str, text: str) -> tuple[float, ...]:
    import math

    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a comma list of numbers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{name} must list at least one value")
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{name} must be finite numbers, got {text!r}")
    return values


@main.command()
@click.argument("run_file", required=False, type=click.Path(dir_okay=False))
@_guarded
def info(run_file: str | None) -> None:
    """Report the backends available here, or summarise RUN_FILE."""
    if run_file:
        from .report import summarise_run
        from .sweep import describe, is_sweep_file

        click.echo(describe(run_file) if is_sweep_file(run_file) else summarise_run(run_file))
    else:
        from .report import backend_report

        click.echo(backend_report())


if __name__ == "__main__":  # pragma: no cover
    main()
