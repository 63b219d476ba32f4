"""The run file's schema: every name, dimension, dtype and CF attribute, in one place.

A run file is one netCDF4 file read with xarray. Dimensions: ``step`` (n + 1 GD
iterates), ``snapshot``, ``layer`` (L), ``particle`` (K stored per layer), ``dim`` (d),
``sample`` (N), ``state_particle`` (M). Coordinates (xarray sees them as such):
``step``, ``snapshot``, ``layer`` (index coordinates, int64) with ``s`` beside ``step``,
``snapshot_step``/``snapshot_s`` beside ``snapshot``, ``t`` beside ``layer`` and
``particle_index`` on ``particle``. Integers have no fill value; nothing is masked.

``long_name`` is short (it labels plots); the formula is in ``description``. Pseudo-time
and all weights are dimensionless (``units = "1"``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

CONVENTIONS = "CF-1.8"
STATUSES = ("running", "finished", "interrupted", "diverged", "failed")
HEALTH_ATTRS = ("rise_count", "max_rise", "energy_residual")

# the role of a variable decides how the writer fills it and the reader merges it
STEP, SNAPSHOT, STATIC, STATE = "step", "snapshot", "static", "state"


@dataclass(frozen=True)
class Var:
    """One variable: dimensions, dtype (``"run"``: the run's dtype), role and CF attributes."""

    dims: tuple[str, ...]
    dtype: str
    role: str
    long_name: str
    description: str = ""
    coordinates: str = ""
    units: str = "1"


_SNAP = "snapshot_step snapshot_s"
_SNAP_LAYER = "snapshot_step snapshot_s t"
_SNAP_PARTICLE = "snapshot_step snapshot_s t particle_index"

VARIABLES: dict[str, Var] = {
    # per step
    "step": Var(("step",), "i8", STEP, "GD step", "number of gradient-descent steps taken"),
    "s": Var(("step",), "f8", STEP, "pseudo-time s", "s = step * ds (mean-field gradient-flow time)"),
    "loss": Var(("step",), "f8", STEP, "loss E",
                "E = mean_i (a.z_L(x_i) - y_i)^2 / 2 + weight_decay / (2 L M) * sum_{l,m} |theta_{l,m}|^2",
                coordinates="s"),
    "grad_norm": Var(("step",), "f8", STEP, "RMS velocity",
                     "RMS particle velocity |d theta_{l,m}/ds| = L M |grad_{theta_{l,m}} E| over the L M particles",
                     coordinates="s"),
    # per snapshot
    "snapshot": Var(("snapshot",), "i8", SNAPSHOT, "snapshot", "index of the snapshot"),
    "snapshot_step": Var(("snapshot",), "i8", SNAPSHOT, "snapshot step", "GD step at which the snapshot was taken"),
    "snapshot_s": Var(("snapshot",), "f8", SNAPSHOT, "pseudo-time s", "s = snapshot_step * ds"),
    "U": Var(("snapshot", "layer", "particle", "dim"), "run", SNAPSHOT, "outer weight U",
             "outer weights U_{l,m} of the residual map z -> z + (1/(L M)) sum_m U_{l,m} sigma(W_{l,m}.z + b_{l,m})",
             _SNAP_PARTICLE),
    "W": Var(("snapshot", "layer", "particle", "dim"), "run", SNAPSHOT, "inner weight W",
             "inner weights W_{l,m} of the residual map", _SNAP_PARTICLE),
    "b": Var(("snapshot", "layer", "particle"), "run", SNAPSHOT, "bias b", "biases b_{l,m} of the residual map",
             _SNAP_PARTICLE),
    "prediction": Var(("snapshot", "sample"), "f8", SNAPSHOT, "prediction", "net output a.z_L(x_i)", _SNAP),
    "U_mean": Var(("snapshot", "layer", "dim"), "f8", SNAPSHOT, "mean U", "mean of U_{l,m} over all M particles",
                  _SNAP_LAYER),
    "W_mean": Var(("snapshot", "layer", "dim"), "f8", SNAPSHOT, "mean W", "mean of W_{l,m} over all M particles",
                  _SNAP_LAYER),
    "U_sq": Var(("snapshot", "layer"), "f8", SNAPSHOT, "mean |U|^2", "mean of |U_{l,m}|^2 over all M particles",
                _SNAP_LAYER),
    "W_sq": Var(("snapshot", "layer"), "f8", SNAPSHOT, "mean |W|^2", "mean of |W_{l,m}|^2 over all M particles",
                _SNAP_LAYER),
    "b_mean": Var(("snapshot", "layer"), "f8", SNAPSHOT, "mean b", "mean of b_{l,m} over all M particles",
                  _SNAP_LAYER),
    "b_sq": Var(("snapshot", "layer"), "f8", SNAPSHOT, "mean b^2", "mean of b_{l,m}^2 over all M particles",
                _SNAP_LAYER),
    # fixed
    "layer": Var(("layer",), "i8", STATIC, "layer l", "index l = 0..L-1 of the residual layer"),
    "t": Var(("layer",), "f8", STATIC, "depth t", "t = l / L"),
    "particle_index": Var(("particle",), "i8", STATIC, "particle index m",
                          "index m of the stored particle among the layer's M"),
    "x": Var(("sample", "dim"), "f8", STATIC, "input x", "input samples x_i"),
    "y": Var(("sample",), "f8", STATIC, "label y", "labels y_i"),
    "readout": Var(("dim",), "f8", STATIC, "readout a", "fixed readout vector a"),
    # the full state at step ``state_step`` (= steps_done), for --resume
    "state_U": Var(("layer", "state_particle", "dim"), "run", STATE, "state U",
                   "all M outer weights at step state_step, for resuming", "t"),
    "state_W": Var(("layer", "state_particle", "dim"), "run", STATE, "state W",
                   "all M inner weights at step state_step, for resuming", "t"),
    "state_b": Var(("layer", "state_particle"), "run", STATE, "state b",
                   "all M biases at step state_step, for resuming", "t"),
}

#: what a writer supplies per step / per snapshot (the rest is derived from them)
STEP_DATA = ("loss", "grad_norm")
SNAPSHOT_DATA = ("snapshot_step", "U", "W", "b", "prediction", "U_mean", "W_mean", "U_sq", "W_sq", "b_mean", "b_sq")
STATE_DATA = ("state_U", "state_W", "state_b")


def dtype_of(name: str, run_dtype: str) -> np.dtype:
    v = VARIABLES[name].dtype
    return np.dtype(run_dtype if v == "run" else v)


def cf_attributes(name: str) -> dict[str, str]:
    """The attributes written on variable ``name``."""
    v = VARIABLES[name]
    attrs = {"long_name": v.long_name, "units": v.units}
    if v.description:
        attrs["description"] = v.description
    if v.coordinates:
        attrs["coordinates"] = v.coordinates
    return attrs


def particle_subset(M: int, K: int | None, seed: int) -> np.ndarray:
    """The sorted indices of the K particles per layer that snapshots store (all if K is None)."""
    if K is None or K >= M:
        return np.arange(M)
    return np.sort(np.random.default_rng([seed, 0x5A4D]).choice(M, size=K, replace=False))


def snapshot_moments(U: np.ndarray, W: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """Per-layer moments over all M particles of one state (L, M, ...), in float64."""
    out = {}
    M = U.shape[1]
    for name, v in (("U", U), ("W", W)):
        v64 = np.asarray(v, dtype=np.float64)  # no copy of a float64 state: a snapshot's cost is its bytes
        out[f"{name}_mean"] = v64.mean(axis=1)
        out[f"{name}_sq"] = np.einsum("lmk,lmk->l", v64, v64) / M
    b64 = np.asarray(b, dtype=np.float64)
    out["b_mean"] = b64.mean(axis=1)
    out["b_sq"] = np.einsum("lm,lm->l", b64, b64) / M
    return out


def data_sha256(x: np.ndarray, y: np.ndarray, readout: np.ndarray) -> str:
    """The content hash that identifies a data set: sha256 of x, y, readout as C-ordered little-endian float64."""
    h = hashlib.sha256()
    for a in (x, y, readout):
        a = np.ascontiguousarray(a, dtype="<f8")
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def attr_value(v: Any) -> Any:
    """A netCDF-storable attribute value (no None, no bool; ints beyond int64 as uint64)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int) and v >= 2**63:
        return np.uint64(v)
    if isinstance(v, str):  # a non-UTF-8 path in the command line: keep its bytes visible as escapes
        return v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return v


def global_attributes(config: Any, data: Any, backend: str, command: str, run_id: str,
                      version: str) -> dict[str, Any]:
    """The global attributes of a new run: the options (named like ``RunConfig`` fields) and the run's state.

    ``status`` is one of ``STATUSES``; ``steps_done`` = ``state_step`` is the last step in the
    file; ``data_sha256`` identifies the data by content; ``run_id`` ties the file to its
    pending segments; ``rise_count``, ``max_rise``, ``energy_residual`` are ``mfres.health``'s
    figures over the whole series.
    """
    now = _dt.datetime.now(_dt.timezone.utc)
    attrs: dict[str, Any] = {
        "Conventions": CONVENTIONS,
        "title": (f"mfres run: mean-field ResNet L={config.depth} M={config.width} "
                  f"d={data.d} N={data.N}, {config.activation}, init {config.init}"),
        "source": f"mfres {version}",
        "mfres_version": version,
        "created": now.isoformat(timespec="seconds"),
        "command": command,
        "history": f"{now:%Y-%m-%dT%H:%M:%SZ} {command or 'mfres.simulate'}",
        "references": "Ding, Chen, Li, Wright, JMLR 23 (2022), arXiv:2105.14417",
    }
    for k, v in config.as_dict().items():
        attrs[k] = attr_value(v)
    attrs.update(dim=data.d, samples=data.N, data=config.data, data_source=data.source,
                 data_sha256=data_sha256(data.x, data.y, data.readout), backend=backend,
                 status="running", status_message="", steps_done=0, state_step=0, run_id=run_id, segment_seq=0,
                 rise_count=0, max_rise=0.0, energy_residual=0.0)
    return attrs
