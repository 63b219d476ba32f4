"""mfres: simulate deep ResNets in the mean-field regime (Ding, Chen, Li, Wright, JMLR 2022).

The Python API, for scripts and notebooks. ``import mfres`` is cheap: NumPy,
xarray, matplotlib, Dask and juliacall load on first use.

Runs and sweeps (``mfres.api``):

- ``simulate(out=None, *, overwrite, resume, progress, **options)``: train one net,
  return its run file as an ``xarray.Dataset``; the options are those of
  ``mfres simulate`` as keywords (``depth``, ``width``, ``steps``, ``ds``, ...);
- ``sweep(out, *, depth, width, seeds, ..., workers, progress)``: a grid of runs on Dask,
  returned as the sweep ``Dataset``;
- ``analyze(sweep, eps, eta, at_s, reference)``: size to ε and convergence rates;
- ``open_run(path)``, ``open_sweep(path)``: open existing files with xarray;
- ``RunConfig``: the validated options of one run.

Figures (``mfres.plot``; each returns a matplotlib ``Figure``): ``plot_loss``,
``plot_weights``, ``plot_clouds``, ``animate_clouds`` (a matplotlib ``Animation``),
``plot_success``, ``plot_rates``, ``plot_size``, and ``save_figure(fig, path)``.

``progress=True`` shows a ``tqdm.auto`` progress bar (terminal or Jupyter). Errors
are ``mfres.errors`` exceptions (``ConfigError``, ``DataError``, ``BackendError``,
``StorageError``, ``RunStopped``) whose messages name the keywords, e.g.
"run.nc exists; pass overwrite=True to replace it". The model is documented in
``docs/model.md``.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from . import api as _api

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from .config import RunConfig

_API = ("simulate", "analyze", "open_run", "open_sweep")
# public name -> function of mfres.plot
_FIGURES = {"plot_loss": "loss", "plot_weights": "weights", "plot_clouds": "clouds", "animate_clouds": "animate",
            "plot_success": "success", "plot_rates": "rates", "plot_size": "size", "save_figure": "save"}

__all__ = ["RunConfig", "__version__", *_API, "sweep", *_FIGURES]


class _Sweep:
    """``mfres.sweep``: the function ``mfres.api.sweep``; the names of the module
    ``mfres.sweep`` (``SweepSpec``, ``run_sweep``, ...) stay reachable through it."""

    __doc__ = _api.sweep.__doc__
    __wrapped__ = staticmethod(_api.sweep)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _api.sweep(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        import importlib

        return getattr(importlib.import_module(".sweep", __name__), name)

    def __repr__(self) -> str:
        return "<function mfres.sweep>"


class _Package(types.ModuleType):
    """The package's module type: keeps ``mfres.sweep`` the API function although importing
    the submodule ``mfres.sweep`` binds that name on the package."""

    @property
    def sweep(self) -> _Sweep:
        return _SWEEP

    @sweep.setter
    def sweep(self, module: Any) -> None:
        pass  # the import system binding the submodule (reachable as sys.modules["mfres.sweep"])


_SWEEP = _Sweep()
sys.modules[__name__].__class__ = _Package


def _figure_function(name: str) -> Any:
    import functools

    from . import plot

    fn = getattr(plot, _FIGURES[name])

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _api.python_errors():
            return fn(*args, **kwargs)

    wrapper.__name__ = name
    return wrapper


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(_api, name)
    elif name in _FIGURES:
        value = _figure_function(name)
    elif name == "RunConfig":
        from .config import RunConfig as value
    elif name in ("plot", "analysis", "errors", "api", "store"):
        import importlib

        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'mfres' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "plot", "analysis", "errors"])
