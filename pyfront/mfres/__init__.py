"""mfres: simulate deep ResNets in the mean-field regime (Ding, Chen, Li, Wright, JMLR 2022).

The public API, cheap to import (NumPy, xarray and juliacall load on first use):

- ``simulate(**options)``: train one net, write its run file, return it as an
  ``xarray.Dataset``; the options are those of ``mfres simulate``;
- ``open_run(path)``: open a run file with xarray;
- ``RunConfig``: the validated options of one run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from .config import RunConfig

__all__ = ["RunConfig", "__version__", "open_run", "simulate"]


def simulate(out: str | None = None, *, overwrite: bool = False, resume: bool = False, progress: Any = None,
             **options: Any) -> Any:
    """Train one net and return its run file as an ``xarray.Dataset`` (loaded in memory).

    ``options`` are ``RunConfig`` fields (``depth``, ``width``, ``steps``, ``ds``, ...).
    With ``out=None`` the file is written to a temporary folder and removed.
    With ``resume``, an existing ``out`` is continued from its last saved state.
    Raises ``mfres.errors.RunStopped`` if the run diverges or is interrupted
    (the file at ``out`` then keeps everything computed).
    """
    import os
    import tempfile

    from .config import RunConfig
    from .store import open_run as _open
    from .train import resume_options, run

    if out is not None:
        config = RunConfig(**(resume_options(options, out) if resume else options))
        run(config, out, overwrite=overwrite, resume=resume, progress=progress, command="mfres.simulate")
        return _open(out, load=True)
    config = RunConfig(**options)
    with tempfile.TemporaryDirectory(prefix="mfres-") as tmp:
        path = os.path.join(tmp, "run.nc")
        run(config, path, progress=progress, command="mfres.simulate")
        return _open(path, load=True)


def open_run(path: str, load: bool = False) -> Any:
    """Open a run file as an ``xarray.Dataset`` (lazily unless ``load``)."""
    from .store import open_run as _open

    return _open(path, load=load)


def __getattr__(name: str) -> Any:
    if name == "RunConfig":
        from .config import RunConfig

        return RunConfig
    raise AttributeError(f"module 'mfres' has no attribute {name!r}")
