"""Plain-text reports for ``mfres info``: the backends here, or one run file."""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from . import __version__


def backend_report() -> str:
    """Which backends can run here, without starting Julia."""
    from .activations import tanh_in_use
    from .backends import describe
    from .backends import julia_backend as jb

    lines = [f"mfres {__version__}",
             f"numpy backend: available (NumPy {np.__version__}, {os.cpu_count()} cores; {tanh_in_use()})"]
    has_juliacall = importlib.util.find_spec("juliacall") is not None
    found = jb.find_julia()
    if found:
        julia = f"Julia {'.'.join(map(str, found[1]))} at {found[0]}"
    else:
        julia = "no Julia >= 1.10.3 for it (PYTHON_JULIAPKG_EXE, juliapkg's own install, PATH)"
    lines.append(f"juliacall: {'installed' if has_juliacall else 'not installed'}; {julia}")
    lines.append(describe())
    try:
        src = jb.julia_source_dir()
        lines.append(f"Julia sources: {src}")
    except Exception as e:
        lines.append(f"Julia sources: {e}")
    return "\n".join(lines)


def summarise_run(path: str) -> str:
    """Status, options and loss summary of a run file."""
    from .errors import StorageError
    from .store import open_run
    from .store.reader import status_of

    with open_run(path) as ds:
        a = ds.attrs
        if "loss" not in ds or "snapshot_step" not in ds:
            raise StorageError(f"{path} is not a run file (made by mfres simulate)")
        loss = ds["loss"].values
        finite = np.isfinite(loss)
        note = status_of(path, a)
        lines = [
            f"{path}: {a.get('title', 'mfres run')}",
            f"status: {a.get('status', '?')}" + (f" ({a['status_message']})" if a.get("status_message") else "")
            + (f"; {note}" if note else ""),
            f"steps done: {a.get('steps_done', '?')} of {a.get('steps', '?')} (Δs = {a.get('ds', '?')}, "
            f"s = {float(a.get('steps_done', 0)) * float(a.get('ds', 0)):g})",
            f"backend: {a.get('backend', '?')}, dtype {a.get('dtype', '?')}, seed {a.get('seed', '?')}, "
            f"data {a.get('data', '?')} (seed {a.get('data_seed', '?')})",
            f"snapshots: {ds.sizes.get('snapshot', 0)} at steps "
            f"{', '.join(str(int(s)) for s in ds['snapshot_step'].values[:8])}"
            + (" ..." if ds.sizes.get("snapshot", 0) > 8 else ""),
        ]
        if finite.any():
            first = loss[finite][0]
            last = loss[finite][-1]
            lines.append(f"loss: {first:.6g} at step 0 → {last:.6g} at step {int(np.flatnonzero(finite)[-1])} "
                         f"(factor {first / last:.3g})" if last > 0 else f"loss: {first:.6g} → {last:.6g}")
        if "rise_count" in a:
            lines.append(f"health: E rose in {int(a['rise_count'])} steps (largest rise {float(a['max_rise']):.3g}), "
                         f"energy identity residual {float(a['energy_residual']):.3g}")
            from .health import warnings_for

            for w in warnings_for({k: a[k] for k in ("rise_count", "max_rise", "energy_residual")},
                                  int(a.get("steps_done", 0))):
                lines.append(f"warning: {w}")
        lines.append(f"created {a.get('created', '?')} by mfres {a.get('mfres_version', '?')}: {a.get('command', '')}")
    return "\n".join(lines)
