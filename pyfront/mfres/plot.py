"""Figures of runs and sweeps (matplotlib). Each function returns a ``Figure``.

Axes are labelled with their quantities (pseudo-time s and depth t are
dimensionless), each figure's title says what was run, and ``save`` writes PNG or
PDF by the file's extension.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import analysis


def _plt() -> Any:
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg") and not _interactive():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _interactive() -> bool:
    import sys

    return hasattr(sys, "ps1") or "ipykernel" in sys.modules


def is_sweep(ds: Any) -> bool:
    return "seed" in ds.dims and "status" in ds


def run_title(ds: Any) -> str:
    a = ds.attrs
    return (f"L={a.get('depth')}, M={a.get('width')}, d={a.get('dim')}, N={a.get('samples')}, "
            f"data={a.get('data')}, σ={a.get('activation')}, init={a.get('init')}, Δs={a.get('ds')}, "
            f"seed={a.get('seed')}")


def sweep_title(ds: Any) -> str:
    a = ds.attrs
    depths = [int(v) for v in ds["depth"].values]
    widths = [int(v) for v in ds["width"].values]
    return (f"sweep: L ∈ {depths}, M ∈ {widths}, {ds.sizes['seed']} seeds; "
            f"data={a.get('data', 'sphere')}, d={a.get('dim', 4)}, N={a.get('samples', 64)}, "
            f"σ={a.get('activation', 'tanh')}, init={a.get('init', 'iid')}")


def save(fig: Any, path: str) -> str:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _plt().close(fig)
    return path


# -- loss ------------------------------------------------------------------------------
def loss(ds: Any, ax: Any = None, quantiles: tuple[float, float] = (0.1, 0.9)) -> Any:
    """Loss against s on a log scale: one run, or a sweep's seed median with a band per (L, M)."""
    plt = _plt()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 4.5))
    if is_sweep(ds):
        s = ds["s"].values
        loss = ds["loss"].where(analysis.trials(ds))
        extra = [d for d in loss.dims if d not in ("depth", "width", "seed", "step")]
        if extra:
            loss = loss.isel({d: 0 for d in extra})
        cmap = plt.get_cmap("viridis")
        cases = [(L, M) for L in ds["depth"].values for M in ds["width"].values]
        for j, (L, M) in enumerate(cases):
            one = loss.sel(depth=L, width=M).values  # (seed, step)
            if not np.isfinite(one).any():
                continue
            color = cmap(j / max(1, len(cases) - 1))
            with np.errstate(all="ignore"):
                med = np.nanmedian(one, axis=0)
                lo, hi = np.nanquantile(one, quantiles, axis=0)
            ax.plot(s, med, color=color, label=f"L={L}, M={M}")
            ax.fill_between(s, lo, hi, color=color, alpha=0.2, linewidth=0)
        ax.set_title(sweep_title(ds) + f"\nmedian over seeds, band {quantiles[0]:.0%}–{quantiles[1]:.0%}",
                     fontsize=9)
        ax.legend(fontsize=7, ncol=2 if len(cases) > 6 else 1)
    else:
        ax.plot(ds["s"].values, ds["loss"].values, color="C0", label="loss E")
        ax.set_title(run_title(ds), fontsize=9)
        ax.legend()
    ax.set_yscale("log")
    ax.set_xlabel("pseudo-time s (= steps · Δs)")
    ax.set_ylabel("loss E")
    ax.grid(True, which="both", alpha=0.3)
    return fig


# -- weight distributions ----------------------------------------------------------------
def _quantities(ds: Any) -> dict[str, tuple[np.ndarray, str]]:
    """Per-particle scalars (snapshot, layer, particle) to follow over training."""
    U, W, b = (ds[v].values for v in ("U", "W", "b"))
    # each layer's W projected on the layer's mean direction of W at the last snapshot
    mean_dir = W[-1].mean(axis=1)
    norms = np.linalg.norm(mean_dir, axis=-1, keepdims=True)
    mean_dir = np.where(norms > 0, mean_dir / np.where(norms > 0, norms, 1), 0)
    return {
        "|U|": (np.linalg.norm(U, axis=-1), "|U_{l,m}|"),
        "W·ŵ": (np.einsum("slmd,ld->slm", W, mean_dir), "W_{l,m} · (layer's mean W direction at the end)"),
        "b": (b, "b_{l,m}"),
    }


def _layer_choice(L: int, layers: list[int] | None) -> list[int]:
    if layers:
        return [l for l in layers if 0 <= l < L]
    return sorted({0, L // 2, L - 1})


def weights(ds: Any, layers: list[int] | None = None, bins: int = 40) -> Any:
    """Histograms of |U|, W along its mean direction, and b over training (heatmaps over s),
    for a few layers, plus each quantity's distribution over depth t at the last snapshot."""
    plt = _plt()
    q = _quantities(ds)
    s = ds["snapshot_s"].values if "snapshot_s" in ds else ds["snapshot_step"].values * ds.attrs["ds"]
    L = ds.sizes["layer"]
    chosen = _layer_choice(L, layers)
    fig, axes = plt.subplots(len(q), len(chosen) + 1, figsize=(3.2 * (len(chosen) + 1), 2.6 * len(q)),
                             squeeze=False)
    for i, (name, (values, label)) in enumerate(q.items()):
        finite = values[np.isfinite(values)]
        lo, hi = (np.quantile(finite, [0.005, 0.995]) if finite.size else (0.0, 1.0))
        if hi <= lo:
            hi = lo + 1
        edges = np.linspace(lo, hi, bins + 1)
        for j, l in enumerate(chosen):
            ax = axes[i, j]
            H = np.stack([np.histogram(values[k, l], bins=edges, density=True)[0] for k in range(len(s))], axis=1)
            ax.pcolormesh(_edges_of(s), edges, H, shading="flat", cmap="magma")
            ax.set_title(f"{name}, layer l={l} (t={l / L:.2f})", fontsize=8)
            ax.set_xlabel("pseudo-time s")
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
        ax = axes[i, -1]
        t = np.arange(L) / L
        H = np.stack([np.histogram(values[-1, l], bins=edges, density=True)[0] for l in range(L)], axis=1)
        mesh = ax.pcolormesh(_edges_of(t), edges, H, shading="flat", cmap="magma")
        ax.set_title(f"{name} over depth at s={s[-1]:g}", fontsize=8)
        ax.set_xlabel("depth t = l/L")
        fig.colorbar(mesh, ax=ax, label="density")
    fig.suptitle("Particle distributions during training\n" + run_title(ds), fontsize=9)
    fig.tight_layout()
    return fig


def _edges_of(centres: np.ndarray) -> np.ndarray:
    c = np.asarray(centres, dtype=float)
    if c.size == 1:
        return np.array([c[0] - 0.5, c[0] + 0.5])
    mid = (c[1:] + c[:-1]) / 2
    return np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])


def clouds(ds: Any, at_s: list[float] | None = None) -> Any:
    """Particle clouds (W·ŵ, b) of every layer at chosen pseudo-times, coloured by depth t."""
    plt = _plt()
    q = _quantities(ds)
    s = ds["snapshot_s"].values if "snapshot_s" in ds else ds["snapshot_step"].values * ds.attrs["ds"]
    if at_s:
        idx = sorted({int(np.argmin(np.abs(s - v))) for v in at_s})
    else:
        idx = sorted({0, len(s) // 4, len(s) // 2, len(s) - 1})
    L = ds.sizes["layer"]
    fig, axes = plt.subplots(1, len(idx), figsize=(3.4 * len(idx), 3.4), squeeze=False, sharex=True, sharey=True)
    x, y = q["W·ŵ"][0], q["b"][0]
    t = np.broadcast_to((np.arange(L) / L)[:, None], x.shape[1:])
    for ax, k in zip(axes[0], idx, strict=True):
        sc = ax.scatter(x[k].ravel(), y[k].ravel(), c=t.ravel(), s=4, cmap="viridis", vmin=0, vmax=1, alpha=0.7)
        ax.set_title(f"s = {s[k]:g}", fontsize=9)
        ax.set_xlabel("W · ŵ (mean direction)")
        ax.grid(True, alpha=0.3)
    axes[0, 0].set_ylabel("b")
    fig.colorbar(sc, ax=axes[0, -1], label="depth t = l/L")
    fig.suptitle("Particle clouds (W·ŵ, b) of all layers\n" + run_title(ds), fontsize=9, y=1.04)
    return fig


# -- sweeps ---------------------------------------------------------------------------------
def _grid_heatmap(ax: Any, da: Any, text: Any, cmap: str, label: str, norm: Any = None,
                  special: Any = None) -> Any:
    """A (depth, width) heatmap; ``text(i, j, v)`` labels each cell; ``special`` marks cells drawn hatched grey."""
    plt = _plt()
    depths, widths = da["depth"].values, da["width"].values
    vals = da.transpose("depth", "width").values.astype(float)
    shown = np.where(np.isfinite(vals), vals, np.nan)
    cm = plt.get_cmap(cmap).copy()
    cm.set_bad("white")
    mesh = ax.imshow(np.ma.masked_invalid(shown), origin="lower", aspect="auto", cmap=cm, norm=norm)
    if special is not None:
        for i, j in zip(*np.nonzero(special), strict=True):
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.6", edgecolor="0.3", hatch="//",
                                       linewidth=0))
    ax.set_xlim(-0.5, len(widths) - 0.5)
    ax.set_ylim(-0.5, len(depths) - 0.5)
    ax.set_xticks(range(len(widths)), [str(w) for w in widths])
    ax.set_yticks(range(len(depths)), [str(d) for d in depths])
    ax.set_xlabel(r"width $M$")
    ax.set_ylabel(r"depth $L$")
    for i in range(len(depths)):
        for j in range(len(widths)):
            v = vals[i, j]
            if np.isfinite(v):
                r, g, b_, _ = mesh.cmap(mesh.norm(v))
                dark = 0.299 * r + 0.587 * g + 0.114 * b_ < 0.5
            else:
                dark = False
            ax.text(j, i, text(i, j, v), ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.figure.colorbar(mesh, ax=ax, label=label)
    return mesh


def _first_case(da: Any) -> Any:
    extra = [d for d in da.dims if d not in ("depth", "width", "seed", "step")]
    return da.isel({d: 0 for d in extra}) if extra else da


def _case_note(sweep: Any) -> str:
    extra = analysis._extra_dims(sweep["loss"])
    return "" if not extra else " (first " + ", ".join(f"{d} = {sweep[d].values[0]}" for d in extra) + ")"


def success(sweep: Any, eps: float, eta: float, at_s: float | None = None) -> Any:
    """Three (L, M) heatmaps at s: P(E < ε) and the theorem's P(|E − E_∞| ≤ ε) (fraction, and the Wilson
    lower bound judged against 1 − η), and the median time to ε over all seeds ("never" hatched)."""
    from matplotlib.colors import LogNorm, Normalize

    plt = _plt()
    res = analysis.analyze(sweep, eps, eta, at_s, n_boot=199)
    conf = res.attrs["confidence"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for ax, key, title in ((axes[0], "success", r"$P(E_{L,M}(s) < \varepsilon)$"),
                           (axes[1], "near_limit", r"$P(|E_{L,M}(s) - E_\infty(s)| \leq \varepsilon)$")):
        frac, lo = _first_case(res[key]), _first_case(res[key + "_lo"]).transpose("depth", "width").values
        n = _first_case(res["trials"]).transpose("depth", "width").values

        def text(i: int, j: int, v: float, lo: np.ndarray = lo, n: np.ndarray = n) -> str:
            if not np.isfinite(v):
                return "no trials"
            mark = " ✓" if lo[i, j] >= 1 - eta - 1e-9 else ""
            return f"{v:.2f} (n={int(n[i, j])})\n≥ {lo[i, j]:.2f}{mark}"

        _grid_heatmap(ax, frac, text, "viridis", title, Normalize(0, 1))
        ax.set_title(f"{title} at $s$ = {res.attrs['s']:g}, $\\varepsilon$ = {eps:g}\n"
                     f"fraction, {conf:.0%} Wilson lower bound; ✓: bound ≥ 1 − η = {1 - eta:g}", fontsize=8)
    med = _first_case(res["s_eps_median"])
    vals = med.values
    finite = vals[np.isfinite(vals) & (vals > 0)]
    if finite.size and finite.max() / finite.min() > 10:
        norm = LogNorm(finite.min(), finite.max())
    else:
        lo_, hi_ = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        norm = Normalize(lo_, hi_ if hi_ > lo_ else lo_ + 1)
    s_max = res.attrs["s"]
    raw = med.transpose("depth", "width").values
    never = np.isinf(raw)

    def ttext(i: int, j: int, v: float) -> str:
        v = raw[i, j]
        return f"> {s_max:g}\n(never)" if np.isinf(v) else ("–" if np.isnan(v) else f"{v:.3g}")

    _grid_heatmap(axes[2], med.where(np.isfinite(med)), ttext, "viridis_r", r"median $s_\varepsilon$", norm,
                  special=never)
    axes[2].set_title(f"median over all seeds of the first $s$ with $E < \\varepsilon$\n"
                      f"hatched: half or more never by $s$ = {s_max:g}", fontsize=8)
    fig.suptitle(sweep_title(sweep) + _case_note(sweep), fontsize=9)
    fig.tight_layout()
    return fig


def _guide(ax: Any, x: np.ndarray, x0: float, y0: float, slope: float, label: str) -> None:
    xs = np.array([x.min(), x.max()], dtype=float)
    ax.loglog(xs, y0 * (xs / x0) ** slope, "k--", alpha=0.5, label=label)


def _log_ticks(ax: Any, ticks: np.ndarray) -> None:
    from matplotlib.ticker import NullFormatter

    ax.grid(True, which="both", alpha=0.3)
    if len(ticks):
        ax.set_xticks(ticks, [str(int(v)) for v in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    if ax.get_lines():
        ax.legend(fontsize=7)


def rates(sweep: Any, at_s: float | None = None, reference: str | None = None) -> Any:
    """Convergence to the mean-field limit, log-log: |Ē_L − Ē_L'| of successive depths against L (slope −p,
    theory −1) and the seed spread against M (theory −1/2), with fits, seed-bootstrap intervals and the
    theory's slopes. Only the panels the grid supports are drawn. (``reference`` is ignored: the depth
    order needs no limit.)"""
    plt = _plt()
    r = analysis.convergence_rates(sweep, at_s)
    conf = r.attrs["confidence"]
    depths = np.sort(sweep["depth"].values.astype(float))
    widths = np.sort(sweep["width"].values.astype(float))
    panels = (["depth"] if len(depths) >= 3 else []) + (["width"] if len(widths) >= 2 else [])
    if not panels:
        raise ValueError("a rates figure needs at least 3 depths or 2 widths")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.4), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, kind in zip(axes[0], panels, strict=True):
        if kind == "depth":
            diff = _first_case(r["depth_difference"])
            for j, M in enumerate(np.sort(diff["width"].values)):
                y = diff.sel(width=M).sortby("depth").values[:-1]
                x = depths[:-1]
                pt = _first_case(r).sel(width=M)
                color = cmap(j / max(1, len(widths) - 1))
                ax.loglog(x, y, "o", color=color)
                fit = analysis.fit_loglog(x, y)
                if np.isfinite(fit.slope):
                    ax.loglog(x, fit.predict(x), "-", color=color, alpha=0.7,
                              label=f"$M$={M}: $p$ = {float(pt['depth_order']):.2f} "
                                    f"[{float(pt['depth_order_lo']):.2f}, {float(pt['depth_order_hi']):.2f}]")
            ref = _first_case(r["depth_difference"]).sel(width=widths.max()).sortby("depth").values[:-1]
            if np.isfinite(ref).any():  # through the deepest pair: the asymptotic end
                k = int(np.flatnonzero(np.isfinite(ref))[-1])
                _guide(ax, depths[:-1], depths[k], ref[k], analysis.THEORY_DEPTH_SLOPE, "theory slope −1")
            ax.set_xlabel(r"depth $L$ (pairs $L_j, L_{j+1}$ at $L_j$)")
            ax.set_ylabel(r"$|\bar E_{L_j} - \bar E_{L_{j+1}}|$ (seed mean)")
            ax.set_title(f"depth order at $s$ = {r.attrs['s']:g}: $E_L - E_\\infty \\sim L^{{-p}}$, theory $p$ = 1\n"
                         f"{conf:.0%} seed-bootstrap intervals", fontsize=8)
            _log_ticks(ax, depths[:-1])
        else:
            spread = _first_case(r["width_spread"])
            for j, L in enumerate(np.sort(spread["depth"].values)):
                y = spread.sel(depth=L).sortby("width").values
                pt = _first_case(r).sel(depth=L)
                color = cmap(j / max(1, len(depths) - 1))
                ax.loglog(widths, y, "o", color=color)
                fit = analysis.fit_loglog(widths, y)
                if np.isfinite(fit.slope):
                    ax.loglog(widths, fit.predict(widths), "-", color=color, alpha=0.7,
                              label=f"fit slope {float(pt['width_slope']):.2f} "
                                    f"[{float(pt['width_slope_lo']):.2f}, {float(pt['width_slope_hi']):.2f}], $L$={L}")
            top = spread.sel(depth=spread["depth"].values.max()).sortby("width").values
            if np.isfinite(top).any():
                k = int(np.flatnonzero(np.isfinite(top))[0])
                _guide(ax, widths, widths[k], top[k], analysis.THEORY_WIDTH_SLOPE, "slope −1/2")
            ax.set_xlabel(r"width $M$")
            ax.set_ylabel(r"std of $E_{L,M}(s)$ over seeds")
            w = _first_case(r)
            ax.set_title(f"seed spread at $s$ = {r.attrs['s']:g} (theory slope −1/2); pooled slope "
                         f"{float(w['width_order']):.2f} [{float(w['width_order_lo']):.2f}, "
                         f"{float(w['width_order_hi']):.2f}]", fontsize=8)
            _log_ticks(ax, widths)
    fig.suptitle(sweep_title(sweep) + _case_note(sweep), fontsize=9)
    fig.tight_layout()
    return fig


def size(sweep: Any, eta: float, at_s: float | None = None) -> Any:
    """The size the theorem needs, log-log: the ε reached with (empirical) probability 1 − η,
    |E_{L,M}(s) − E_∞(s)| ≤ ε, against M at the deepest L (M_min ~ ε^−2) and against L at the widest M
    (L_min ~ ε^−1), with fitted exponents, seed-bootstrap intervals and the theory's slopes."""
    plt = _plt()
    res = analysis.limit_probability(sweep, 1.0, eta, at_s)
    conf = res.attrs["confidence"]
    q = _first_case(res["eps_reached"])
    g = _first_case(res)
    panels = [("width", q.sel(depth=q["depth"].values.max()).sortby("width"), "size_width_slope",
               analysis.THEORY_SIZE_WIDTH, r"$M$", f"deepest $L$ = {int(q['depth'].values.max())}"),
              ("depth", q.sel(width=q["width"].values.max()).sortby("depth"), "size_depth_slope",
               analysis.THEORY_SIZE_DEPTH, r"$L$", f"widest $M$ = {int(q['width'].values.max())}")]
    panels = [p for p in panels if p[1].sizes[p[0]] >= 2]
    if not panels:
        raise ValueError("a size figure needs at least 2 depths or 2 widths")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.4), squeeze=False)
    for ax, (dim, eps_q, key, theory, sym, where) in zip(axes[0], panels, strict=True):
        sizes = eps_q[dim].values.astype(float)
        e = eps_q.values
        ax.loglog(e, sizes, "o", color="C0", label="grid points")
        fit = analysis.fit_loglog(e, sizes)
        if np.isfinite(fit.slope):
            xs = np.sort(e[np.isfinite(e) & (e > 0)])
            ax.loglog(xs, fit.predict(xs), "-", color="C0", alpha=0.7,
                      label=f"fit exponent {float(g[key]):.2f} [{float(g[key + '_lo']):.2f}, "
                            f"{float(g[key + '_hi']):.2f}]")
            k = int(np.argmax(sizes * np.isfinite(e)))
            _guide(ax, xs, e[k], sizes[k], theory, f"theory exponent {theory:g}")
        ax.set_xlabel(r"$\varepsilon$ reached: $|E_{L,M}(s) - E_\infty(s)| \leq \varepsilon$ w.p. "
                      f"$1-\\eta$ = {1 - eta:g}")
        ax.set_ylabel(sym + r"$_{\min}(\varepsilon)$")
        ax.set_title(f"{sym}$_{{\\min}}(\\varepsilon)$ at {where}, $s$ = {res.attrs['s']:g}\n"
                     f"{conf:.0%} seed-bootstrap interval", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(sweep_title(sweep) + _case_note(sweep), fontsize=9)
    fig.tight_layout()
    return fig


KINDS = ("loss", "weights", "clouds", "success", "rates")
