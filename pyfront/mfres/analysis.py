"""Analysis of sweeps: size needed for loss ε, time to ε, convergence rates to the mean-field limit.

All functions take a sweep ``xarray.Dataset`` (``mfres.sweep``) and return
``xarray`` objects; extra swept dimensions (activation, init, ds) are kept.
Only runs with status ``ok`` or ``diverged`` count as trials (a diverged run has
not reached ε); ``failed`` and ``missing`` runs are left out.

Theory (docs/model.md): at fixed s the finite net's loss differs from the limit's by
O(1/L) in depth and O(1/√M) (seed-to-seed fluctuation) in width, so on log-log
axes the depth bias has slope −1 and the spread over seeds slope −1/2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)
THEORY_DEPTH_SLOPE = -1.0
THEORY_WIDTH_SLOPE = -0.5


def t_quantile(dof: int) -> float:
    """The 97.5 % quantile of Student's t (95 % two-sided intervals)."""
    if dof < 1:
        return float("nan")
    return T975[dof - 1] if dof <= len(T975) else 1.96 + 2.4 / dof


def wilson(k: Any, n: Any, z: float = 1.96) -> tuple[Any, Any]:
    """Wilson score interval for k successes in n trials (arrays broadcast); NaN where n = 0."""
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1 + z**2 / n
        centre = (p + z**2 / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return centre - half, centre + half


@dataclass(frozen=True)
class Fit:
    """A least-squares line log y = slope · log x + intercept, with a 95 % interval for the slope."""

    slope: float
    intercept: float
    stderr: float
    n: int

    @property
    def ci(self) -> tuple[float, float]:
        h = t_quantile(self.n - 2) * self.stderr
        return self.slope - h, self.slope + h

    def predict(self, x: Any) -> Any:
        return np.exp(self.intercept) * np.asarray(x, dtype=float) ** self.slope


def fit_loglog(x: Any, y: Any) -> Fit:
    """Fit log y against log x over the points where both are positive and finite."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    lx, ly = np.log(x[ok]), np.log(y[ok])
    n = int(ok.sum())
    if n < 2:
        return Fit(float("nan"), float("nan"), float("nan"), n)
    A = np.vstack([lx, np.ones(n)]).T
    coef, *_ = np.linalg.lstsq(A, ly, rcond=None)
    slope, intercept = float(coef[0]), float(coef[1])
    if n > 2:
        resid = ly - A @ coef
        s2 = float(resid @ resid) / (n - 2)
        stderr = float(np.sqrt(s2 / np.sum((lx - lx.mean()) ** 2)))
    else:
        stderr = float("nan")
    return Fit(slope, intercept, stderr, n)


def trials(sweep: Any) -> Any:
    """Boolean mask of the runs that count as trials (status ok or diverged)."""
    st = sweep["status"].astype(str)
    return (st == "ok") | (st == "diverged")


def loss_at(sweep: Any, s: float | None = None) -> Any:
    """The loss at pseudo-time ``s`` (default: the last grid point), NaN for non-trials."""
    at = sweep["loss"].isel(step=-1) if s is None else sweep["loss"].sel(step=_step_of(sweep, s))
    return at.where(trials(sweep))


def _step_of(sweep: Any, s: float) -> int:
    svals = sweep["s"].values
    if not (svals[0] - 1e-12 <= s <= svals[-1] + 1e-12):
        raise ValueError(f"s = {s:g} is outside the sweep's pseudo-time grid [0, {svals[-1]:g}]")
    return int(np.argmin(np.abs(svals - s)))


def time_to_eps(sweep: Any, eps: float) -> Any:
    """s_ε per run: the first grid pseudo-time with loss < ε (NaN if never, or not a trial)."""
    import xarray as xr

    below = (sweep["loss"] < eps).values
    first = np.argmax(below, axis=-1)
    reached = below.any(axis=-1)
    s = sweep["s"].values
    values = np.where(reached, s[first], np.nan)
    out = xr.DataArray(values, dims=sweep["loss"].dims[:-1], coords={k: sweep.coords[k] for k in
                                                                     sweep["loss"].dims[:-1] if k in sweep.coords})
    return out.where(trials(sweep)).rename("s_eps")


def size_to_eps(sweep: Any, eps: float, eta: float, s: float | None = None) -> Any:
    """For each (L, M): the fraction of seeds with loss(s) < ε, its Wilson interval, the seed
    median of s_ε; and the smallest width (per depth) and depth (per width) whose fraction
    reaches 1 − η."""
    import xarray as xr

    at = loss_at(sweep, s)
    n = trials(sweep).sum("seed")
    k = (at < eps).sum("seed")
    frac = (k / n).where(n > 0)
    lo, hi = wilson(k.values, n.values)
    t_eps = time_to_eps(sweep, eps)
    out = xr.Dataset({
        "success": frac.rename("success"),
        "success_lo": (frac.dims, lo),
        "success_hi": (frac.dims, hi),
        "trials": n,
        "s_eps": t_eps,
        "s_eps_median": t_eps.median("seed"),
    })
    ok = frac >= 1 - eta
    widths = sweep["width"].values
    depths = sweep["depth"].values
    out["min_width"] = xr.where(ok.any("width"), xr.DataArray(widths, dims="width").where(ok).min("width"), np.nan)
    out["min_depth"] = xr.where(ok.any("depth"), xr.DataArray(depths, dims="depth").where(ok).min("depth"), np.nan)
    out["success"].attrs = {"long_name": f"fraction of seeds with loss < {eps:g}", "units": "1"}
    out["s_eps"].attrs = {"long_name": f"first pseudo-time with loss < {eps:g}", "units": "1"}
    out["min_width"].attrs = {"long_name": f"smallest width with success >= {1 - eta:g}", "units": "1"}
    out["min_depth"].attrs = {"long_name": f"smallest depth with success >= {1 - eta:g}", "units": "1"}
    out.attrs.update(eps=eps, eta=eta, s=float(sweep["s"].values[-1] if s is None else s))
    return out


def depth_bias(sweep: Any, s: float | None = None, reference: str = "deepest") -> Any:
    """|seed-mean loss(L) − E_ref| at s, per width: E_ref is the deepest run's mean
    (``deepest``, which then drops out) or the Richardson extrapolation of the two deepest
    in 1/L (``richardson``)."""
    mean = loss_at(sweep, s).mean("seed")
    depths = sweep["depth"].values.astype(float)
    order = np.argsort(depths)
    deepest = mean.isel(depth=order[-1])
    if reference == "deepest":
        bias = abs(mean - deepest).where(mean["depth"] != depths[order[-1]])
    elif reference == "richardson":
        if len(depths) < 2:
            raise ValueError("Richardson extrapolation needs at least two depths")
        L1, L2 = depths[order[-2]], depths[order[-1]]
        E1, E2 = mean.isel(depth=order[-2]), deepest
        limit = (L2 * E2 - L1 * E1) / (L2 - L1)
        bias = abs(mean - limit)
    else:
        raise ValueError(f"reference must be 'deepest' or 'richardson', got {reference!r}")
    return bias.rename("depth_bias")


def width_spread(sweep: Any, s: float | None = None) -> Any:
    """Seed-to-seed standard deviation of the loss at s (ddof = 1), per (L, M)."""
    return loss_at(sweep, s).std("seed", ddof=1).rename("width_spread")


def convergence_rates(sweep: Any, s: float | None = None, reference: str = "deepest") -> Any:
    """Depth bias against L and seed spread against M, with fitted log-log slopes and 95 % intervals."""
    import xarray as xr

    bias = depth_bias(sweep, s, reference)
    spread = width_spread(sweep, s)
    out = xr.Dataset({"depth_bias": bias, "width_spread": spread})
    out["depth_bias"].attrs = {"long_name": f"|mean loss - limit| ({reference})", "units": "1"}
    out["width_spread"].attrs = {"long_name": "std of the loss over seeds", "units": "1"}

    def fits(da: Any, along: str) -> Any:
        other = [d for d in da.dims if d != along]
        stacked = da.stack(_case=other) if other else da.expand_dims(_case=[0])
        rows = [fit_loglog(stacked[along].values, stacked.isel(_case=j).values) for j in range(stacked.sizes["_case"])]
        res = xr.Dataset({
            "slope": ("_case", [f.slope for f in rows]),
            "slope_lo": ("_case", [f.ci[0] for f in rows]),
            "slope_hi": ("_case", [f.ci[1] for f in rows]),
            "intercept": ("_case", [f.intercept for f in rows]),
            "points": ("_case", [f.n for f in rows]),
        }, coords={"_case": stacked["_case"]})
        return res.unstack("_case") if other else res.isel(_case=0, drop=True)

    d = fits(bias, "depth")
    w = fits(spread, "width")
    for k in d.data_vars:
        out[f"depth_{k}"] = d[k]
        out[f"width_{k}"] = w[k]
    out.attrs.update(s=float(sweep["s"].values[-1] if s is None else s), reference=reference,
                     theory_depth_slope=THEORY_DEPTH_SLOPE, theory_width_slope=THEORY_WIDTH_SLOPE)
    return out


def report(sweep: Any, eps: float, eta: float, s: float | None = None, reference: str = "deepest") -> str:
    """The terminal table of ``mfres analyze``."""
    size = size_to_eps(sweep, eps, eta, s)
    lines = [f"size to ε = {eps:g} at s = {size.attrs['s']:g} (success = fraction of seeds with loss < ε, "
             f"95 % Wilson interval; target 1 − η = {1 - eta:g})"]
    extra = [d for d in size["success"].dims if d not in ("depth", "width")]
    groups = [({}, size)] if not extra else [(dict(zip(extra, key if isinstance(key, tuple) else (key,),
                                                       strict=True)), g)
                                             for key, g in size.groupby(extra[0] if len(extra) == 1 else extra)]
    for labels, g in groups:
        if labels:
            lines.append("  " + ", ".join(f"{k} = {v}" for k, v in labels.items()))
        lines.append(f"  {'L':>6} {'M':>6} {'success':>8} {'interval':>17} {'median s_ε':>11}")
        for L in g["depth"].values:
            for M in g["width"].values:
                pt = g.sel(depth=L, width=M).squeeze()
                lines.append(f"  {L:>6} {M:>6} {float(pt['success']):>8.2f} "
                             f"[{float(pt['success_lo']):.2f}, {float(pt['success_hi']):.2f}]".ljust(35)
                             + f" {float(pt['s_eps_median']):>11.4g}")
    if sweep.sizes["depth"] >= 2 or sweep.sizes["width"] >= 3:
        rates = convergence_rates(sweep, s, reference)
        lines.append("")
        lines.append(f"convergence to the mean-field limit at s = {rates.attrs['s']:g}")
        if sweep.sizes["depth"] >= 3:
            for label, sl in _per_case(rates, "depth_slope"):
                lo, hi = float(sl["depth_slope_lo"]), float(sl["depth_slope_hi"])
                lines.append(f"  depth bias vs L ({reference}){label}: slope {float(sl['depth_slope']):.3f} "
                             f"[{lo:.3f}, {hi:.3f}]   theory {THEORY_DEPTH_SLOPE:g}")
        if sweep.sizes["width"] >= 3:
            for label, sl in _per_case(rates, "width_slope"):
                lo, hi = float(sl["width_slope_lo"]), float(sl["width_slope_hi"])
                lines.append(f"  seed spread vs M{label}: slope {float(sl['width_slope']):.3f} "
                             f"[{lo:.3f}, {hi:.3f}]   theory {THEORY_WIDTH_SLOPE:g}")
    return "\n".join(lines)


def _per_case(rates: Any, var: str) -> list[tuple[str, Any]]:
    da = rates[var]
    if not da.dims:
        return [("", rates)]
    stacked = rates.stack(_c=da.dims)
    out = []
    for j in range(stacked.sizes["_c"]):
        one = stacked.isel(_c=j)
        label = ", ".join(f"{d} = {one[d].item()}" for d in da.dims)
        out.append((f" at {label}", one))
    return out
