"""Analysis of sweeps: the mean-field theorems measured as stated, with seed-bootstrap intervals.

All public functions take a sweep ``xarray.Dataset`` (``mfres.sweep.open_sweep``:
``loss(<swept>, depth, width, seed, step)``, ``status``, coordinate ``s``) and
return ``xarray`` objects; extra swept dimensions (activation, init, ds) are kept.
Only runs with status ``ok`` or ``diverged`` are trials (a diverged run never
reaches ε); ``failed`` and ``missing`` runs are left out.

What is measured (docs/model.md), at one pseudo-time s (``s=None``: the last grid point):

- **depth order** p, E_L − E_∞ ~ a L^−p (theory p = 1), from successive differences
  of the seed-mean, D_j = Ē(L_j) − Ē(L_{j+1}) = a (L_j^−p − L_{j+1}^−p): no limit is
  assumed. With a constant ratio r = L_{j+1}/L_j (e.g. 2) this is the log-log fit of
  |D_j| against L_j (slope −p); on other grids p minimises the same least squares with
  the exact factor (1 − r_j^−p) kept. Needs three depths. Seeds are shared across depths:
  with a nested initialisation (``tied``, ``smooth``) the seed noise cancels in D_j.
- **width order**: the exponent of the seed-to-seed standard deviation against M
  (theory −1/2), per depth and pooled over depths (common slope, one intercept per depth).
- **width bias order** q, Ē(M) − Ē(∞) ~ M^−q (theory q = 1), by the same successive
  differences along M; **iid law**: for ``iid`` the spread against L·M (theory −1/2).
- **limit** E_∞(s): Richardson extrapolation (orders 1, the theory's) in 1/L at the widest
  M (``limit_depth``), in 1/M at the deepest L (``limit_width``), and in both on the
  corner of the grid (``limit``, the estimate used below).
- **the theorem's probability** P(|E_{L,M}(s) − E_∞(s)| ≤ ε) per (L, M) beside
  P(E_{L,M}(s) < ε); the smallest sizes judged by the Wilson lower bound; the ε reached
  with (empirical) probability 1 − η per (L, M) and its log-log fits, M_min(ε) ~ ε^a
  (theory a = −2) and L_min(ε) ~ ε^c (theory c = −1).
- **time to ε**: the first grid s ≤ s_max with E < ε, +inf if never, the median over all
  trials (+inf when half or more never get there).

Every slope and the limit carry a ``CONFIDENCE`` (95 %) percentile interval from
``scipy.stats.bootstrap`` over seeds: the seed indices are resampled with replacement,
jointly for every grid point, and the estimate recomputed (``N_BOOT`` resamples, fixed
RNG seed ``BOOT_SEED``, so an analysis is reproducible).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95
N_BOOT = 999
BOOT_SEED = 20220531
THEORY_DEPTH_ORDER = 1.0  # E_L − E_∞ ~ L^−1
THEORY_DEPTH_SLOPE = -1.0  # slope of |E_L − E_2L| against L
THEORY_WIDTH_SLOPE = -0.5  # seed spread ~ M^−1/2
THEORY_BIAS_ORDER = 1.0  # Ē(M) − Ē(∞) ~ M^−1
THEORY_IID_SLOPE = -0.5  # iid: spread ~ (L M)^−1/2
THEORY_SIZE_WIDTH = -2.0  # M_min ~ ε^−2
THEORY_SIZE_DEPTH = -1.0  # L_min ~ ε^−1
_TOL = 1e-9  # for comparisons of fractions and ratios


# -- basic statistics (scipy) --------------------------------------------------------------
def t_quantile(dof: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided ``confidence`` quantile of Student's t with ``dof`` degrees of freedom (NaN if dof < 1)."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, dof)) if dof >= 1 else float("nan")


def wilson(k: Any, n: Any, confidence: float = CONFIDENCE) -> tuple[Any, Any]:
    """Wilson score interval for k successes in n trials (``scipy.stats.binomtest``); arrays broadcast, NaN if n = 0."""
    from scipy import stats

    k, n = np.broadcast_arrays(np.asarray(k, dtype=np.int64), np.asarray(n, dtype=np.int64))
    lo, hi = np.full(k.shape, np.nan), np.full(k.shape, np.nan)
    for i in np.ndindex(k.shape):
        if n[i] > 0:
            ci = stats.binomtest(int(k[i]), int(n[i])).proportion_ci(confidence_level=confidence, method="wilson")
            lo[i], hi[i] = ci.low, ci.high
    return (lo, hi) if k.shape else (float(lo), float(hi))


@dataclass(frozen=True)
class Fit:
    """A least-squares line log y = slope · log x + intercept (``scipy.stats.linregress``), 95 % t interval."""

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
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 2 or np.ptp(np.log(x[ok])) == 0:
        return Fit(float("nan"), float("nan"), float("nan"), n)
    lx, ly = np.log(x[ok]), np.log(y[ok])
    r = stats.linregress(lx, ly)
    if n == 2:
        return Fit(float(r.slope), float(r.intercept), float("nan"), n)
    # the slope's standard error from the residuals (linregress's 1 − r² form loses digits near a perfect fit)
    resid = ly - (r.intercept + r.slope * lx)
    stderr = float(np.sqrt(resid @ resid / (n - 2) / np.sum((lx - lx.mean()) ** 2)))
    return Fit(float(r.slope), float(r.intercept), stderr, n)


def ols_slope(x: Any, y: Any) -> Any:
    """Least-squares slope of y against x along axis 0 (other axes are independent columns; ``x`` is (n,) or
    shaped like ``y``).

    Non-finite entries of ``y`` are left out column by column (NaN slope with fewer than two points).
    Vectorised so that bootstrap resamples fit at once; equal to ``scipy.stats.linregress``'s slope
    (tested)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    xb = x.reshape((-1,) + (1,) * (y.ndim - 1)) if x.ndim == 1 else x  # x: (n,) or per column like y
    ok = np.isfinite(y) & np.isfinite(xb)
    w = ok.astype(float)
    n = w.sum(axis=0)
    with np.errstate(all="ignore"):
        mx = (w * xb).sum(axis=0) / n
        my = np.where(ok, y, 0.0).sum(axis=0) / n
        dx = np.where(ok, xb - mx, 0.0)
        sxx = (dx**2).sum(axis=0)
        sxy = (dx * np.where(ok, y - my, 0.0)).sum(axis=0)
        slope = sxy / sxx
    return np.where((n >= 2) & (sxx > 0), slope, np.nan)


def _log(v: Any) -> Any:
    with np.errstate(all="ignore"):
        v = np.asarray(v, dtype=float)
        return np.where((v > 0) & np.isfinite(v), np.log(np.where(v > 0, v, 1.0)), np.nan)


def order_from_differences(x: Any, mean: Any) -> Any:
    """The order p of ``mean(x) = c + a x^−p`` from successive differences along axis 0 (x increasing).

    D_j = mean_j − mean_{j+1} = a (x_j^−p − x_{j+1}^−p). Constant ratio x_{j+1}/x_j: p is −(slope of
    log|D_j| against log x_j). Otherwise p minimises Σ_j (log|D_j| − log|a| − log|x_j^−p − x_{j+1}^−p|)²
    (log|a| profiled out) over p ∈ [−2, 12]: a grid of step 0.05, then golden-section refinement.
    Other axes of ``mean`` are independent columns. NaN with fewer than two nonzero differences.
    """
    x = np.asarray(x, dtype=float)
    mean = np.asarray(mean, dtype=float)
    if x.size < 3:
        return np.full(mean.shape[1:], np.nan)[()]
    ld = _log(np.abs(np.diff(mean, axis=0)))  # (n − 1, ...)
    ratios = x[1:] / x[:-1]
    if np.ptp(ratios) <= _TOL * ratios.max():
        return (-ols_slope(np.log(x[:-1]), ld))[()]
    ok = np.isfinite(ld)
    cnt = ok.sum(axis=0)
    shape = (-1,) + (1,) * (ld.ndim - 1)

    def sse(p: np.ndarray) -> np.ndarray:  # p (...) -> (...)
        g = np.log(np.abs(x[:-1].reshape(shape) ** -p - x[1:].reshape(shape) ** -p) + 1e-300)
        r = np.where(ok, ld - g, 0.0)
        mr = r.sum(axis=0) / np.maximum(cnt, 1)
        return (np.where(ok, r - mr, 0.0) ** 2).sum(axis=0)

    grid = np.arange(-2.0, 12.0 + 1e-9, 0.05)
    vals = np.stack([sse(np.full(ld.shape[1:], q)) for q in grid])
    best = grid[np.argmin(vals, axis=0)]
    lo, hi = best - 0.05, best + 0.05
    g = (np.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        left = sse(a) < sse(b)
        hi, lo = np.where(left, b, hi), np.where(left, lo, a)
    return np.where(cnt >= 2, (lo + hi) / 2, np.nan)[()]


def richardson(x: Any, mean: Any, order: float = 1.0) -> Any:
    """The limit x → ∞ of ``mean = c + a x^−order`` through the two largest x (axis 0 of ``mean`` is x, increasing)."""
    x = np.asarray(x, dtype=float)
    mean = np.asarray(mean, dtype=float)
    if x.size < 2:
        return mean[-1]
    r = (x[-1] / x[-2]) ** order
    return mean[-1] + (mean[-1] - mean[-2]) / (r - 1)


def bootstrap(stat: Any, K: int, n_boot: int = N_BOOT, confidence: float = CONFIDENCE
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(estimate, lo, hi) of ``stat(idx)`` with a seed-bootstrap percentile interval (``scipy.stats.bootstrap``).

    ``stat`` maps seed indices, shape (K,) or (B, K) for B resamples, to estimates of shape (n,) or
    (n, B); all grid points are resampled with the same seeds. Resamples where ``stat`` is NaN are
    dropped from the quantiles.
    """
    from scipy import stats

    idx = np.arange(K)

    def vstat(i: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.asarray(stat(i), dtype=float)  # i: (K,) or (batch, K); result (..., batch)

    est = np.asarray(stat(idx), dtype=float)
    if K < 2:
        return est, np.full(est.shape, np.nan), np.full(est.shape, np.nan)
    with np.errstate(all="ignore"):
        import warnings

        warnings.simplefilter("ignore")
        with warnings.catch_warnings():
            res = stats.bootstrap((idx,), vstat, vectorized=True, n_resamples=n_boot, method="percentile",
                                  confidence_level=confidence, rng=np.random.default_rng(BOOT_SEED))
        dist = np.asarray(res.bootstrap_distribution, dtype=float)
        a = (1 - confidence) / 2
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN bounds
        lo = np.nanquantile(dist, a, axis=-1) if dist.size else np.nan
        hi = np.nanquantile(dist, 1 - a, axis=-1) if dist.size else np.nan
    return est, np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)


# -- sweep access ------------------------------------------------------------------------------
def trials(sweep: Any) -> Any:
    """Boolean mask of the runs that count as trials (status ok or diverged)."""
    st = sweep["status"].astype(str)
    return (st == "ok") | (st == "diverged")


def s_of(sweep: Any, s: float | None) -> float:
    """The grid pseudo-time an analysis at ``s`` uses (nearest grid point; default the last); checks the range."""
    svals = sweep["s"].values
    if s is None:
        return float(svals[-1])
    if not (svals[0] - 1e-12 <= s <= svals[-1] + 1e-12 * max(1.0, abs(svals[-1]))):
        raise ValueError(f"s = {s:g} is outside the sweep's pseudo-time grid [0, {svals[-1]:g}]")
    return float(svals[int(np.argmin(np.abs(svals - s)))])


def _step_of(sweep: Any, s: float) -> int:
    return int(np.argmin(np.abs(sweep["s"].values - s_of(sweep, s))))


def loss_at(sweep: Any, s: float | None = None) -> Any:
    """The loss at pseudo-time ``s`` (default: the last grid point), NaN for non-trials."""
    at = sweep["loss"].isel(step=-1) if s is None else sweep["loss"].isel(step=_step_of(sweep, s))
    return at.where(trials(sweep))


def _extra_dims(da: Any) -> list[str]:
    return [d for d in da.dims if d not in ("depth", "width", "seed", "step")]


def _cases(sweep: Any) -> list[tuple[dict[str, Any], Any]]:
    """(labels, sub-sweep) per combination of the extra swept dimensions (one case if there are none)."""
    extra = _extra_dims(sweep["loss"])
    if not extra:
        return [({}, sweep)]
    import itertools

    out = []
    for values in itertools.product(*(sweep[d].values for d in extra)):
        labels = dict(zip(extra, values, strict=True))
        out.append((labels, sweep.sel(labels)))
    return out


def _sorted_grid(sub: Any, s: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(depths, widths, Y(depth, width, seed)) at s, sorted by depth and width; NaN for non-trials."""
    y = loss_at(sub, s).transpose("depth", "width", "seed")
    L = y["depth"].values.astype(float)
    M = y["width"].values.astype(float)
    oL, oM = np.argsort(L), np.argsort(M)
    return L[oL], M[oM], y.values[oL][:, oM]


def _unsort(values: np.ndarray, order: np.ndarray, axis: int) -> np.ndarray:
    out = np.empty_like(values)
    idx = [slice(None)] * values.ndim
    idx[axis] = order
    out[tuple(idx)] = values
    return out


def _assemble(sweep: Any, per_case: list[tuple[dict[str, Any], dict[str, tuple[tuple[str, ...], Any]]]]) -> Any:
    """Stack per-case result dicts {name: (dims, values)} into a Dataset over the extra dimensions."""
    import xarray as xr

    parts = []
    for labels, res in per_case:
        ds = xr.Dataset({k: (dims, np.asarray(v)) for k, (dims, v) in res.items()},
                        coords={"depth": sweep["depth"].values, "width": sweep["width"].values})
        if labels:
            ds = ds.expand_dims({k: [v] for k, v in labels.items()})
        parts.append(ds)
    return parts[0] if len(parts) == 1 else xr.combine_by_coords(parts)


# -- time to ε and success -----------------------------------------------------------------------
def time_to_eps(sweep: Any, eps: float, s: float | None = None) -> Any:
    """s_ε per run: the first grid pseudo-time ≤ s (default: the last) with loss < ε; +inf if never, NaN: no trial."""
    import xarray as xr

    s_max = s_of(sweep, s)
    svals = sweep["s"].values
    upto = svals <= s_max + 1e-12 * max(1.0, abs(s_max))
    loss = sweep["loss"].values[..., upto]
    with np.errstate(invalid="ignore"):
        below = loss < eps
    first = np.argmax(below, axis=-1)
    values = np.where(below.any(axis=-1), svals[upto][first], np.inf)
    dims = sweep["loss"].dims[:-1]
    out = xr.DataArray(values, dims=dims, coords={k: sweep.coords[k] for k in dims if k in sweep.coords})
    out = out.where(trials(sweep)).rename("s_eps")
    out.attrs = {"long_name": f"first pseudo-time s <= {s_max:g} with loss < {eps:g} (inf: never)", "units": "1"}
    return out


def median_time(t_eps: Any) -> Any:
    """Median over all trials (NaN = not a trial is skipped, +inf = never is kept): +inf when half or more never."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # grid points without trials: NaN
        med = t_eps.median("seed", skipna=True)
    return med.rename("s_eps_median")


def _reaches(lo: Any, target: float) -> Any:
    return lo >= target - _TOL


def size_to_eps(sweep: Any, eps: float, eta: float, s: float | None = None, confidence: float = CONFIDENCE) -> Any:
    """Per (L, M): successes k of n trials with loss(s) < ε, the fraction, its Wilson interval, the median
    time to ε; the smallest width (per depth) and depth (per width) whose Wilson lower bound reaches
    1 − η (``min_width``, ``min_depth``) and those the raw fraction reaches (``*_raw``)."""
    import xarray as xr

    at = loss_at(sweep, s)
    n = trials(sweep).sum("seed")
    k = (at < eps).sum("seed")
    frac = (k / n).where(n > 0)
    lo, hi = wilson(k.values, n.values, confidence)
    t_eps = time_to_eps(sweep, eps, s)
    out = xr.Dataset({
        "success": frac.rename("success"),
        "success_lo": (frac.dims, lo),
        "success_hi": (frac.dims, hi),
        "successes": k,
        "trials": n,
        "s_eps": t_eps,
        "s_eps_median": median_time(t_eps),
    })
    target = 1 - eta
    wil = xr.DataArray(_reaches(lo, target), dims=frac.dims, coords=frac.coords) & (n > 0)
    raw = (k >= target * n - _TOL * np.maximum(n, 1)) & (n > 0)
    for name, ok in (("", wil), ("_raw", raw)):
        for dim, values in (("width", sweep["width"].values), ("depth", sweep["depth"].values)):
            smallest = xr.DataArray(values, dims=dim).where(ok).min(dim)
            out[f"min_{dim}{name}"] = xr.where(ok.any(dim), smallest, np.nan)
            how = "Wilson lower bound" if not name else "raw fraction"
            out[f"min_{dim}{name}"].attrs = {"long_name": f"smallest {dim} whose {how} of P(loss < {eps:g}) "
                                             f">= {target:g}", "units": "1"}
    out["success"].attrs = {"long_name": f"fraction of seeds with loss < {eps:g}", "units": "1"}
    out["success_lo"].attrs = {"long_name": f"{confidence:.0%} Wilson lower bound of success", "units": "1"}
    out["success_hi"].attrs = {"long_name": f"{confidence:.0%} Wilson upper bound of success", "units": "1"}
    out["s_eps_median"].attrs = {"long_name": f"median over all seeds of the first s with loss < {eps:g} "
                                 "(inf: more than half never)", "units": "1"}
    out.attrs.update(eps=eps, eta=eta, s=s_of(sweep, s), confidence=confidence)
    return out


# -- convergence orders and the limit ---------------------------------------------------------------
def _seed_means(Y: np.ndarray, idx: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(Y[..., idx], axis=-1)


def _seed_std(Y: np.ndarray, idx: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanstd(Y[..., idx], axis=-1, ddof=1)


def _limit(L: np.ndarray, M: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """[corner, in 1/L at the widest M, in 1/M at the deepest L] Richardson limits of mean(depth, width, ...)."""
    by_depth = richardson(L, mean[:, -1])
    by_width = richardson(M, mean[-1])
    corner = richardson(L, richardson(M, np.swapaxes(mean, 0, 1))) if L.size >= 2 else by_width
    return np.stack([corner, by_depth, by_width])


def _pooled_width_slope(M: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """Common slope of log spread against log M with one intercept per depth (axis 0 of ``spread``, M axis 1)."""
    ly = _log(spread)
    ok = np.isfinite(ly)
    x = np.log(M).reshape((1, -1) + (1,) * (spread.ndim - 2))
    w = ok.astype(float)
    n = w.sum(axis=1, keepdims=True)
    with np.errstate(all="ignore"):
        mx = (w * x).sum(axis=1, keepdims=True) / n
        my = np.where(ok, ly, 0).sum(axis=1, keepdims=True) / n
        use = ok & (n >= 2)
        dx = np.where(use, x - mx, 0.0)
        num = (dx * np.where(use, ly - my, 0.0)).sum(axis=(0, 1))
        den = (dx**2).sum(axis=(0, 1))
        return np.where(den > 0, num / den, np.nan)


def convergence_rates(sweep: Any, s: float | None = None, n_boot: int = N_BOOT,
                      confidence: float = CONFIDENCE) -> Any:
    """Depth order, width orders, the iid law and the limit E_∞(s), each with a seed-bootstrap interval.

    Variables (per case of the extra swept dimensions): ``depth_order(width)`` (+ ``_lo``, ``_hi``),
    ``depth_difference(depth, width)`` = |Ē(L_j) − Ē(L_{j+1})| at L_j; ``width_spread(depth, width)``,
    ``width_slope(depth)`` (per depth) and the pooled ``width_order``; ``width_bias_order(depth)``;
    ``iid_slope`` (spread against L·M); ``limit``, ``limit_depth``, ``limit_width``; ``mean(depth, width)``.
    """
    s_used = s_of(sweep, s)
    per_case = []
    for labels, sub in _cases(sweep):
        L, M, Y = _sorted_grid(sub, s)
        oL = np.argsort(sub["depth"].values.astype(float))
        oM = np.argsort(sub["width"].values.astype(float))
        K = Y.shape[-1]
        nL, nM = L.size, M.size

        def stat(idx: np.ndarray, Y: np.ndarray = Y, L: np.ndarray = L, M: np.ndarray = M) -> np.ndarray:
            mean = _seed_means(Y, idx)  # (depth, width[, B])
            spread = _seed_std(Y, idx)
            dord = np.atleast_1d(order_from_differences(L, mean))  # (width[, B])
            lspread = _log(spread)
            wsl = ols_slope(np.log(M), np.swapaxes(lspread, 0, 1))  # (depth[, B])
            bord = np.atleast_1d(order_from_differences(M, np.swapaxes(mean, 0, 1)))
            flat = lspread.reshape((L.size * M.size, *lspread.shape[2:]))
            iid = ols_slope(np.log(np.outer(L, M).ravel()), flat)
            lim = _limit(L, M, mean)
            return np.concatenate([dord, wsl, bord, _pooled_width_slope(M, spread)[None], iid[None], lim])

        est, lo, hi = bootstrap(stat, K, n_boot, confidence)
        mean, spread = _seed_means(Y, np.arange(K)), _seed_std(Y, np.arange(K))
        diff = np.full((nL, nM), np.nan)
        diff[:-1] = np.abs(np.diff(mean, axis=0))
        res: dict[str, tuple[tuple[str, ...], Any]] = {}
        pieces = (("depth_order", ("width",), nM, oM), ("width_slope", ("depth",), nL, oL),
                  ("width_bias_order", ("depth",), nL, oL), ("width_order", (), 1, None), ("iid_slope", (), 1, None),
                  ("limit", (), 1, None), ("limit_depth", (), 1, None), ("limit_width", (), 1, None))
        at = 0
        for name, dims, size, order in pieces:
            for suffix, arr in (("", est), ("_lo", lo), ("_hi", hi)):
                v = np.asarray(arr[at:at + size])
                v = _unsort(v, order, 0) if order is not None else v[0]
                res[name + suffix] = (dims, v)
            at += size
        for name, arr in (("mean", mean), ("width_spread", spread), ("depth_difference", diff)):
            res[name] = (("depth", "width"), _unsort(_unsort(arr, oL, 0), oM, 1))
        n_trials = np.sum(np.isfinite(Y), axis=-1)
        res["finite_trials"] = (("depth", "width"), _unsort(_unsort(n_trials, oL, 0), oM, 1))
        per_case.append((labels, res))
    out = _assemble(sweep, per_case)
    attrs = {
        "depth_order": f"order p of E_L - E_inf ~ L^-p from successive differences of the seed-mean "
                       f"(theory {THEORY_DEPTH_ORDER:g})",
        "depth_difference": "|seed-mean E(L_j) - seed-mean E(L_j+1)|, at L_j",
        "width_slope": f"slope of the seed std of E against M, per depth (theory {THEORY_WIDTH_SLOPE:g})",
        "width_order": f"slope of the seed std of E against M, pooled over depths (theory {THEORY_WIDTH_SLOPE:g})",
        "width_bias_order": f"order q of E_M - E_inf ~ M^-q from successive differences (theory {THEORY_BIAS_ORDER:g})",
        "iid_slope": f"slope of the seed std of E against L*M (theory for iid {THEORY_IID_SLOPE:g})",
        "limit": "E_inf(s): Richardson extrapolation in 1/L and 1/M on the grid's corner",
        "limit_depth": "Richardson extrapolation in 1/L at the widest M",
        "limit_width": "Richardson extrapolation in 1/M at the deepest L",
        "mean": "seed-mean loss at s", "width_spread": "seed std (ddof=1) of the loss at s",
        "finite_trials": "trials with a finite loss at s",
    }
    for k, text in attrs.items():
        out[k].attrs = {"long_name": text, "units": "1"}
        for suffix in ("_lo", "_hi"):
            if k + suffix in out:
                out[k + suffix].attrs = {"long_name": f"{confidence:.0%} seed-bootstrap bound of {k}", "units": "1"}
    out.attrs.update(s=s_used, confidence=confidence, n_boot=n_boot, bootstrap="percentile, seeds resampled jointly",
                     theory_depth_order=THEORY_DEPTH_ORDER, theory_width_slope=THEORY_WIDTH_SLOPE,
                     theory_bias_order=THEORY_BIAS_ORDER, theory_iid_slope=THEORY_IID_SLOPE)
    return out


# -- the theorem's statement --------------------------------------------------------------------------
def _eps_quantile(dev: np.ndarray, eta: float) -> np.ndarray:
    """The smallest ε with a fraction ≥ 1 − η of finite deviations ≤ ε (the ⌈(1−η)n⌉-th order statistic)."""
    dev = np.sort(np.where(np.isfinite(dev), dev, np.inf), axis=-1)
    n = np.sum(~np.isnan(dev), axis=-1)
    kneed = np.maximum(np.ceil((1 - eta) * n - _TOL), 1).astype(int)
    return np.take_along_axis(dev, (kneed - 1)[..., None], axis=-1)[..., 0]


def limit_probability(sweep: Any, eps: float, eta: float, s: float | None = None, n_boot: int = N_BOOT,
                      confidence: float = CONFIDENCE, rates: Any = None) -> Any:
    """The theorem's statement at s: P(|E_{L,M}(s) − E_∞(s)| ≤ ε) per (L, M) with Wilson bounds, the smallest
    sizes reaching 1 − η by the Wilson lower bound, the ε reached with empirical probability 1 − η per
    (L, M), ``eps_reached(depth, width)``, and the size exponents with seed-bootstrap intervals:
    ``size_width_slope`` (log M against log ε_reached at the deepest L; theory −2) and ``size_depth_slope``
    (log L against log ε_reached at the widest M; theory −1)."""
    import xarray as xr

    rates = convergence_rates(sweep, s, n_boot, confidence) if rates is None else rates
    per_case = []
    for labels, sub in _cases(sweep):
        L, M, Y = _sorted_grid(sub, s)
        oL = np.argsort(sub["depth"].values.astype(float))
        oM = np.argsort(sub["width"].values.astype(float))
        lim = float(rates["limit"].sel(labels)) if labels else float(rates["limit"])
        dev = np.abs(Y - lim)
        n = np.sum(np.isfinite(Y), axis=-1)
        k = np.sum(dev <= eps, axis=-1)
        lo, hi = wilson(k, n, confidence)

        def stat(idx: np.ndarray, Y: np.ndarray = Y, L: np.ndarray = L, M: np.ndarray = M) -> np.ndarray:
            li = _limit(L, M, _seed_means(Y, idx))[0]  # () or (B,)
            q = _eps_quantile(np.abs(Y[..., idx] - li[..., None]), eta)  # (depth, width[, B])
            lq = _log(q)
            w = ols_slope(lq[-1], np.broadcast_to(np.log(M).reshape((-1,) + (1,) * (lq.ndim - 2)), lq[-1].shape))
            d = ols_slope(lq[:, -1], np.broadcast_to(np.log(L).reshape((-1,) + (1,) * (lq.ndim - 2)), lq[:, -1].shape))
            return np.stack([w, d])

        est, blo, bhi = bootstrap(stat, Y.shape[-1], n_boot, confidence)
        q = _eps_quantile(dev, eta)

        def back(a: np.ndarray, oL: np.ndarray = oL, oM: np.ndarray = oM) -> np.ndarray:
            return _unsort(_unsort(a, oL, 0), oM, 1)

        with np.errstate(invalid="ignore"):
            frac = np.where(n > 0, k / np.maximum(n, 1), np.nan)
        res: dict[str, tuple[tuple[str, ...], Any]] = {
            "near_limit": (("depth", "width"), back(frac)),
            "near_limit_lo": (("depth", "width"), back(lo)),
            "near_limit_hi": (("depth", "width"), back(hi)),
            "eps_reached": (("depth", "width"), back(q)),
            "size_width_slope": ((), est[0]), "size_width_slope_lo": ((), blo[0]), "size_width_slope_hi": ((), bhi[0]),
            "size_depth_slope": ((), est[1]), "size_depth_slope_lo": ((), blo[1]), "size_depth_slope_hi": ((), bhi[1]),
        }
        per_case.append((labels, res))
    out = _assemble(sweep, per_case)
    ok = xr.DataArray(_reaches(out["near_limit_lo"].values, 1 - eta), dims=out["near_limit_lo"].dims,
                      coords=out["near_limit_lo"].coords)
    for dim in ("width", "depth"):
        smallest = xr.DataArray(sweep[dim].values, dims=dim).where(ok).min(dim)
        out[f"near_min_{dim}"] = xr.where(ok.any(dim), smallest, np.nan)
        out[f"near_min_{dim}"].attrs = {"long_name": f"smallest {dim} whose Wilson lower bound of "
                                        f"P(|E - E_inf| <= {eps:g}) >= {1 - eta:g}", "units": "1"}
    out["near_limit"].attrs = {"long_name": f"fraction of seeds with |E - E_inf| <= {eps:g}", "units": "1"}
    out["eps_reached"].attrs = {"long_name": f"smallest eps with |E - E_inf| <= eps for a fraction >= {1 - eta:g} "
                                "of seeds", "units": "1"}
    out["size_width_slope"].attrs = {"long_name": f"slope of log M_min against log eps at the deepest L "
                                     f"(theory {THEORY_SIZE_WIDTH:g})", "units": "1"}
    out["size_depth_slope"].attrs = {"long_name": f"slope of log L_min against log eps at the widest M "
                                     f"(theory {THEORY_SIZE_DEPTH:g})", "units": "1"}
    out.attrs.update(eps=eps, eta=eta, s=s_of(sweep, s), confidence=confidence)
    return out


# -- health -----------------------------------------------------------------------------------------------
def health(sweep: Any) -> Any:
    """Per (L, M): runs by status, runs whose E rose on the sweep's s-grid (``mfres.health.rises``), the
    largest rise, and runaway runs (E > RUNAWAY_FACTOR · E(0) or non-finite: ``first_bad_step``)."""
    import xarray as xr

    from . import health as h

    loss = sweep["loss"]
    dims = loss.dims[:-1]
    arr = np.moveaxis(loss.values, -1, 0).reshape(loss.shape[-1], -1)  # (step, runs)
    count, biggest = h.rises(arr)
    bad = h.first_bad_step(arr)
    shape = loss.shape[:-1]
    coords = {k: sweep.coords[k] for k in dims if k in sweep.coords}
    st = sweep["status"].astype(str)
    tri = trials(sweep)
    out = xr.Dataset({
        "rose": (xr.DataArray(count.reshape(shape) > 0, dims=dims, coords=coords) & tri).sum("seed"),
        "max_rise": xr.DataArray(np.where(tri.values, biggest.reshape(shape), 0.0), dims=dims,
                                 coords=coords).max("seed"),
        "runaway": (xr.DataArray(bad.reshape(shape) >= 0, dims=dims, coords=coords) & tri).sum("seed"),
        "diverged": (st == "diverged").sum("seed"),
        "failed": (st == "failed").sum("seed"),
        "missing": (st == "missing").sum("seed"),
    })
    out["rose"].attrs = {"long_name": "trials whose loss rose between grid points"}
    out["runaway"].attrs = {"long_name": "trials with a non-finite loss or one above 1e6 E(0)"}
    return out


def _flags(hp: Any) -> str:
    parts = []
    for key, word in (("diverged", "div"), ("failed", "fail"), ("missing", "miss"), ("runaway", "runaway"),
                      ("rose", "E↑")):
        v = int(hp[key])
        if v:
            parts.append(f"{v} {word}")
    return ", ".join(parts) or "ok"


# -- particle measures -----------------------------------------------------------------------------------
def sliced_wasserstein(x: np.ndarray, y: np.ndarray, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between the empirical measures of the rows of ``x`` (n, k) and ``y`` (m, k).

    SW₂² = mean over ``projections`` fixed unit directions ω (drawn from ``seed``) of the exact 1-D W₂²
    between the projected samples (quantile functions compared on the union of their breakpoints, so
    n ≠ m is exact). Zero for equal measures; for y = x + μ it is √(mean_ω (ω·μ)²) ≈ |μ|/√k.
    """
    x, y = np.atleast_2d(np.asarray(x, dtype=float)), np.atleast_2d(np.asarray(y, dtype=float))
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"particles of dimension {x.shape[1]} and {y.shape[1]} cannot be compared")
    k = x.shape[1]
    omega = np.random.default_rng(seed).standard_normal((projections, k))
    omega /= np.linalg.norm(omega, axis=1, keepdims=True)
    px, py = np.sort(x @ omega.T, axis=0), np.sort(y @ omega.T, axis=0)  # (n, P), (m, P)
    n, m = px.shape[0], py.shape[0]
    cuts = np.union1d(np.arange(n + 1) / n, np.arange(m + 1) / m)
    mid, width = (cuts[1:] + cuts[:-1]) / 2, np.diff(cuts)
    qx = px[np.minimum((mid * n).astype(int), n - 1)]
    qy = py[np.minimum((mid * m).astype(int), m - 1)]
    return float(np.sqrt(np.mean(np.sum(width[:, None] * (qx - qy) ** 2, axis=0))))


def particles_at(run: Any, s: float, layer: int | None = None, t: float | None = None) -> np.ndarray:
    """The particles θ = (U, W, b) of one layer (index ``layer``, or depth ``t``: layer ⌊tL⌋) at the snapshot
    nearest to pseudo-time ``s``, as an (M, 2d + 1) array; ``run``: a run file's path or Dataset."""
    from .store import open_run, valid_snapshots

    ds = open_run(run, load=True) if isinstance(run, str) else run
    ds = valid_snapshots(ds)
    snap_s = ds["snapshot_s"].values
    if snap_s.size == 0:
        raise ValueError("the run has no snapshots (simulate with --snapshot-every)")
    i = int(np.argmin(np.abs(snap_s - s)))
    if abs(snap_s[i] - s) > 1e-9 * max(1.0, abs(s)):
        raise ValueError(f"no snapshot at s = {s:g}; snapshots at s = {', '.join(f'{v:g}' for v in snap_s)}")
    L = ds.sizes["layer"]
    if (layer is None) == (t is None):
        raise ValueError("give exactly one of layer and t")
    l = int(layer) if layer is not None else min(math.floor(float(t) * L + 1e-9), L - 1)
    if not 0 <= l < L:
        raise ValueError(f"layer {l} is outside 0..{L - 1}")
    U, W, b = (ds[v].values[i, l] for v in ("U", "W", "b"))
    return np.concatenate([U, W, b[:, None]], axis=1)


def particle_distance(run_a: Any, run_b: Any, s: float, layer: int | None = None, t: float | None = None,
                      projections: int = 256) -> float:
    """Sliced W₂ between the particle measures of two runs at the same (s, layer or depth t).

    Runs of different depth compare best by ``t`` (the same depth in [0, 1)); of different widths
    it shows ρ_{L,M} settle as M grows."""
    return sliced_wasserstein(particles_at(run_a, s, layer, t), particles_at(run_b, s, layer, t), projections)


def decay_fit(s: Any, loss: Any, start: float | None = None) -> dict[str, float]:
    """Fits of E(s) for s ≥ ``start`` (default: half the last s): a power law E ≈ C s^−α and an exponential
    E ≈ C e^−λs, each with its residual standard deviation in log E (the smaller fits better)."""
    s, loss = np.asarray(s, dtype=float), np.asarray(loss, dtype=float)
    start = s[-1] / 2 if start is None else start
    ok = (s >= start) & (s > 0) & np.isfinite(loss) & (loss > 0)
    if ok.sum() < 3:
        return {"alpha": np.nan, "alpha_resid": np.nan, "rate": np.nan, "rate_resid": np.nan}
    from scipy import stats

    ls, le = s[ok], np.log(loss[ok])
    p = stats.linregress(np.log(ls), le)
    e = stats.linregress(ls, le)
    rp = float(np.std(le - (p.intercept + p.slope * np.log(ls))))
    re = float(np.std(le - (e.intercept + e.slope * ls)))
    return {"alpha": -float(p.slope), "alpha_resid": rp, "rate": -float(e.slope), "rate_resid": re}


# -- the contract and the report --------------------------------------------------------------------------
def analyze(sweep: Any, eps: float, eta: float, s: float | None = None, n_boot: int = N_BOOT,
            confidence: float = CONFIDENCE) -> Any:
    """Everything ``mfres analyze`` writes: ``size_to_eps``, ``convergence_rates``, ``limit_probability`` and
    ``health`` merged (the contract: ``depth_order[_lo,_hi](width)``, ``width_order[_lo,_hi]``,
    ``s_eps_median(depth, width)``)."""
    import xarray as xr

    size = size_to_eps(sweep, eps, eta, s, confidence)
    rates = convergence_rates(sweep, s, n_boot, confidence)
    near = limit_probability(sweep, eps, eta, s, n_boot, confidence, rates)
    out = xr.merge([size, rates, near, health(sweep)], compat="override", combine_attrs="drop_conflicts")
    out.attrs.update(eps=eps, eta=eta, s=s_of(sweep, s), confidence=confidence, n_boot=n_boot)
    return out


def _fmt_time(v: float, s_max: float) -> str:
    if np.isnan(v):
        return "–"
    return f"> {s_max:g}" if np.isinf(v) else f"{v:.4g}"


def _iv(v: float, lo: float, hi: float, fmt: str = ".3f") -> str:
    if not np.isfinite(v):
        return "n/a"
    return f"{format(v, fmt)} [{format(float(lo), fmt)}, {format(float(hi), fmt)}]"


def report(sweep: Any, eps: float, eta: float, s: float | None = None, n_boot: int = N_BOOT,
           confidence: float = CONFIDENCE, result: Any = None) -> str:
    """The terminal text of ``mfres analyze`` (``result``: a precomputed ``analyze``)."""
    res = analyze(sweep, eps, eta, s, n_boot, confidence) if result is None else result
    s_used = res.attrs["s"]
    c = f"{confidence:.0%}"
    lines = [f"analysis at s = {s_used:g} (grid to {float(sweep['s'].values[-1]):g}); ε = {eps:g}, "
             f"1 − η = {1 - eta:g}; intervals: {c} (Wilson for probabilities, seed bootstrap with "
             f"{n_boot} resamples for slopes and limits)"]
    for labels, _ in _cases(sweep):
        g = res.sel(labels) if labels else res
        if labels:
            lines += ["", "== " + ", ".join(f"{k} = {v}" for k, v in labels.items())]
        lim = float(g["limit"])
        lines += ["", f"limit E_∞(s) = {_iv(lim, g['limit_lo'], g['limit_hi'], '.6g')}   "
                  f"(in 1/L at the widest M: {float(g['limit_depth']):.6g}; in 1/M at the deepest L: "
                  f"{float(g['limit_width']):.6g})", ""]
        lines.append(f"  {'L':>5} {'M':>6} {'n':>3}  {'P(E<ε)':>6} {'Wilson ' + c:>15}  "
                     f"{'P(|E−E_∞|≤ε)':>13} {'Wilson ' + c:>15}  {'median s_ε':>10}  {'ε at 1−η':>9}  health")
        for L in g["depth"].values:
            for M in g["width"].values:
                pt = g.sel(depth=L, width=M)
                lines.append(
                    f"  {L:>5} {M:>6} {int(pt['trials']):>3}  {float(pt['success']):>6.2f} "
                    f"{_pair(pt['success_lo'], pt['success_hi']):>15}  "
                    f"{float(pt['near_limit']):>13.2f} "
                    f"{_pair(pt['near_limit_lo'], pt['near_limit_hi']):>15}  "
                    f"{_fmt_time(float(pt['s_eps_median']), s_used):>10}  {float(pt['eps_reached']):>9.3g}  "
                    f"{_flags(pt)}")
        lines.append("")
        lines.append(f"  smallest sizes with the {c} Wilson lower bound ≥ {1 - eta:g} (raw fraction in brackets):")
        for L in g["depth"].values:
            mw, mr, nw = (float(g[v].sel(depth=L)) for v in ("min_width", "min_width_raw", "near_min_width"))
            lines.append(f"    L = {L:>4}: P(E<ε): M ≥ {_opt(mw)} ({_opt(mr)});  P(|E−E_∞|≤ε): M ≥ {_opt(nw)}")
        for M in g["width"].values:
            md, mr, nd = (float(g[v].sel(width=M)) for v in ("min_depth", "min_depth_raw", "near_min_depth"))
            lines.append(f"    M = {M:>4}: P(E<ε): L ≥ {_opt(md)} ({_opt(mr)});  P(|E−E_∞|≤ε): L ≥ {_opt(nd)}")
        lines += ["", "  convergence to the mean-field limit (estimate [" + c + " seed-bootstrap interval]):"]
        nL, nM = sweep.sizes["depth"], sweep.sizes["width"]
        if nL >= 3:
            for M in g["width"].values:
                pt = g.sel(width=M)
                steps = np.diff(pt["mean"].sortby("depth").values)
                warn = "" if (np.all(steps > 0) or np.all(steps < 0)) else \
                    "   (the seed-mean is not monotone in L: the order is ill-defined here)"
                lines.append(f"    depth order p (E_L − E_∞ ~ L^-p), M = {M}: "
                             f"{_iv(float(pt['depth_order']), pt['depth_order_lo'], pt['depth_order_hi'])}"
                             f"   theory {THEORY_DEPTH_ORDER:g}{warn}")
        else:
            lines.append(f"    depth order: needs ≥ 3 depths (has {nL})")
        if nM >= 2:
            for L in g["depth"].values:
                pt = g.sel(depth=L)
                lines.append(f"    seed spread vs M, L = {L}: slope "
                             f"{_iv(float(pt['width_slope']), pt['width_slope_lo'], pt['width_slope_hi'])}"
                             f"   theory {THEORY_WIDTH_SLOPE:g}")
            lines.append(f"    seed spread vs M, pooled over depths (width_order): "
                         f"{_iv(float(g['width_order']), g['width_order_lo'], g['width_order_hi'])}"
                         f"   theory {THEORY_WIDTH_SLOPE:g}")
        if nM >= 3:
            for L in g["depth"].values:
                pt = g.sel(depth=L)
                q = _iv(float(pt["width_bias_order"]), pt["width_bias_order_lo"], pt["width_bias_order_hi"])
                lines.append(f"    width bias order q (Ē_M − Ē_∞ ~ M^-q), L = {L}: {q}   theory {THEORY_BIAS_ORDER:g}")
        init = labels.get("init", sweep.attrs.get("init", "iid"))
        if init == "iid" and nL * nM >= 3 and nL >= 2:
            lines.append(f"    iid: seed spread vs L·M: slope "
                         f"{_iv(float(g['iid_slope']), g['iid_slope_lo'], g['iid_slope_hi'])}"
                         f"   theory {THEORY_IID_SLOPE:g}")
        if nM >= 2:
            lines.append(f"    size: M_min(ε) ~ ε^a at L = {int(sweep['depth'].max())}: a = "
                         f"{_iv(float(g['size_width_slope']), g['size_width_slope_lo'], g['size_width_slope_hi'])}"
                         f"   theory {THEORY_SIZE_WIDTH:g}")
        if nL >= 2:
            lines.append(f"    size: L_min(ε) ~ ε^c at M = {int(sweep['width'].max())}: c = "
                         f"{_iv(float(g['size_depth_slope']), g['size_depth_slope_lo'], g['size_depth_slope_hi'])}"
                         f"   theory {THEORY_SIZE_DEPTH:g}")
        Lx, Mx = int(sweep["depth"].max()), int(sweep["width"].max())
        sub = sub_of(sweep, labels)
        one = sub["loss"].where(trials(sub)).sel(depth=Lx, width=Mx)
        svals = sweep["s"].values
        keep = svals <= s_used + 1e-12 * max(1.0, s_used)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(one.transpose("seed", "step").values, axis=0)
        fit = decay_fit(svals[keep], med[keep])
        if np.isfinite(fit["alpha"]):
            better = "power law" if fit["alpha_resid"] < fit["rate_resid"] else "exponential"
            lines.append(f"    decay of the seed-median E(s) at L = {Lx}, M = {Mx}, s ∈ [{s_used / 2:g}, {s_used:g}]: "
                         f"E ~ s^-{fit['alpha']:.3g} (log-residual {fit['alpha_resid']:.2g}) or "
                         f"E ~ exp(-{fit['rate']:.3g} s) (log-residual {fit['rate_resid']:.2g}); {better} fits better")
    lines += ["", "health: div = diverged, fail = failed, miss = missing, runaway = E > 1e6·E(0) or not finite, "
              "E↑ = runs whose E rose between grid points"]
    return "\n".join(lines)


def sub_of(sweep: Any, labels: dict[str, Any]) -> Any:
    """The sub-sweep of one case of the extra swept dimensions."""
    return sweep.sel(labels) if labels else sweep


def _pair(lo: Any, hi: Any) -> str:
    return f"[{float(lo):.2f}, {float(hi):.2f}]"


def _opt(v: float) -> str:
    return "none" if not np.isfinite(v) else f"{v:g}"
