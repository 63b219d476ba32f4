"""Training health: pure functions on a run's (or a batch's) loss and velocity series.

Conventions: ``loss[k]`` is E after k GD steps of pseudo-time Δs and
``velocity[k]`` the RMS particle velocity |dθ/ds| at the same iterate
(``Trajectory.grad_norm``). Along the particle gradient flow

    dE/ds = −(1/(L M)) Σ_{l,m} |dθ_{l,m}/ds|² = −velocity²,

so E never rises and the energy identity holds up to O(Δs) for GD. Series may
carry a trailing batch axis (shape (n + 1, B)); results then have shape (B,).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

RUNAWAY_FACTOR = 1e6
"""A run whose E exceeds RUNAWAY_FACTOR · E(0) is ``diverged``, even while E is finite."""


def first_bad_step(loss: np.ndarray, start: Any = None, factor: float = RUNAWAY_FACTOR) -> Any:
    """Index of the first E that is not finite or exceeds ``factor · start`` (default start: ``loss[0]``), else −1.

    ``start`` lets a chunked run compare with its true E(0) rather than the chunk's first value.
    """
    loss = np.asarray(loss, dtype=np.float64)
    ref = loss[0] if start is None else np.asarray(start, dtype=np.float64)
    if loss.ndim == 1 and loss.size and ref.ndim == 0:  # the usual answer from two reductions: after every chunk
        lo, hi = float(loss.min()), float(loss.max())
        if math.isfinite(lo) and math.isfinite(hi) and hi <= factor * abs(float(ref)):
            return np.intp(-1)
    with np.errstate(invalid="ignore", over="ignore"):
        bad = ~np.isfinite(loss) | (loss > factor * np.abs(ref))
    hit = bad.any(axis=0)
    return np.where(hit, bad.argmax(axis=0), -1)


def rises(loss: np.ndarray) -> tuple[Any, Any]:
    """(how many steps raised E, the largest single-step rise E_{k+1} − E_k, 0 if none); NaN steps ignored."""
    with np.errstate(invalid="ignore"):
        step = np.diff(np.asarray(loss, dtype=np.float64), axis=0)
        up = np.where(np.isfinite(step) & (step > 0), step, 0.0)
    return np.count_nonzero(up > 0, axis=0), up.max(axis=0, initial=0.0)


def energy_residual(loss: np.ndarray, velocity: np.ndarray, ds: float) -> Any:
    """Relative residual of the energy identity, ``max_k |ΔE_k/Δs + v̄_k²| / max_k v̄_k²`` (NaN-free steps only).

    v̄_k² is the trapezoidal mean of velocity² over step k; the residual is O(Δs) for GD
    and grows where steps overshoot.
    """
    loss = np.asarray(loss, dtype=np.float64)
    v2 = np.square(np.asarray(velocity, dtype=np.float64))
    with np.errstate(invalid="ignore", over="ignore"):
        mean_v2 = 0.5 * (v2[1:] + v2[:-1])
        res = np.abs(np.diff(loss, axis=0) / ds + mean_v2)
        ok = np.isfinite(res)
        scale = np.where(ok, mean_v2, 0.0).max(axis=0, initial=0.0)
        worst = np.where(ok, res, 0.0).max(axis=0, initial=0.0)
        return np.where(scale > 0, worst / np.where(scale > 0, scale, 1.0), 0.0)


def summary(loss: np.ndarray, velocity: np.ndarray, ds: float) -> dict[str, Any]:
    """The health figures a run file records: ``rise_count``, ``max_rise``, ``energy_residual``."""
    count, biggest = rises(loss)
    return {"rise_count": count, "max_rise": biggest, "energy_residual": energy_residual(loss, velocity, ds)}


def warnings_for(figures: dict[str, Any], steps: int) -> list[str]:
    """Plain-language warnings for one run's ``summary`` figures (empty when the run looks healthy)."""
    out = []
    count, biggest = int(np.max(figures["rise_count"])), float(np.max(figures["max_rise"]))
    if count:
        out.append(f"E rose in {count} of {steps} steps (largest rise {biggest:.3g}); a smaller Δs follows the flow "
                   "more closely")
    res = float(np.max(figures["energy_residual"]))
    if res > 0.1:
        out.append(f"energy identity dE/ds = -|v|^2 off by {res:.0%} of |v|^2: Δs is too large to follow the flow")
    return out
