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
def _grid_heatmap(ax: Any, da: Any, fmt: str, cmap: str, label: str, vmin: float | None = None,
                  vmax: float | None = None) -> Any:
    depths, widths = da["depth"].values, da["width"].values
    vals = da.transpose("depth", "width").values
    mesh = ax.imshow(vals, origin="lower", aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(widths)), [str(w) for w in widths])
    ax.set_yticks(range(len(depths)), [str(d) for d in depths])
    ax.set_xlabel("width M")
    ax.set_ylabel("depth L")
    for i in range(len(depths)):
        for j in range(len(widths)):
            v = vals[i, j]
            r, g, b_, _ = mesh.cmap(mesh.norm(v)) if np.isfinite(v) else (1, 1, 1, 1)
            dark = 0.299 * r + 0.587 * g + 0.114 * b_ < 0.5
            ax.text(j, i, "–" if not np.isfinite(v) else format(v, fmt), ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    ax.figure.colorbar(mesh, ax=ax, label=label)
    return mesh


def _first_case(da: Any) -> Any:
    extra = [d for d in da.dims if d not in ("depth", "width", "seed", "step")]
    return da.isel({d: 0 for d in extra}) if extra else da


def success(sweep: Any, eps: float, eta: float, at_s: float | None = None) -> Any:
    """Fraction of seeds reaching loss < ε over the (L, M) grid, and the median time to ε."""
    plt = _plt()
    res = analysis.size_to_eps(sweep, eps, eta, at_s)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    _grid_heatmap(axes[0], _first_case(res["success"]), ".2f", "viridis", f"P(loss < {eps:g})", 0, 1)
    axes[0].set_title(f"success probability at s = {res.attrs['s']:g} (target 1 − η = {1 - eta:g})", fontsize=9)
    med = _first_case(res["s_eps_median"])
    finite = med.values[np.isfinite(med.values)]
    _grid_heatmap(axes[1], med, ".4g", "viridis_r", "median s_ε", 0,
                  float(finite.max()) if finite.size else 1.0)
    axes[1].set_title(f"median pseudo-time to reach loss {eps:g}", fontsize=9)
    fig.suptitle(sweep_title(sweep), fontsize=9)
    fig.tight_layout()
    return fig


def _points_and_fit(ax: Any, x: np.ndarray, y: np.ndarray, color: Any, label: str) -> None:
    """Points on log-log axes and their fitted power law, labelled with slope and 95 % interval."""
    ax.loglog(x, y, "o", color=color, label=label)
    fit = analysis.fit_loglog(x, y)
    if np.isfinite(fit.slope):
        xs = np.array([x.min(), x.max()])
        lo, hi = fit.ci
        ax.loglog(xs, fit.predict(xs), "-", color=color, alpha=0.7,
                  label=f"fit slope {fit.slope:.2f} [{lo:.2f}, {hi:.2f}]")


def rates(sweep: Any, at_s: float | None = None, reference: str = "deepest") -> Any:
    """Convergence to the mean-field limit: depth bias against L and seed spread against M,
    log-log, with fitted lines and the theory's slopes −1 and −1/2."""
    plt = _plt()
    r = analysis.convergence_rates(sweep, at_s, reference)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    bias = _first_case(r["depth_bias"])
    spread = _first_case(r["width_spread"])
    depths = sweep["depth"].values.astype(float)
    widths = sweep["width"].values.astype(float)
    cmap = plt.get_cmap("viridis")
    depth_study = len(depths) >= (3 if reference == "deepest" else 2)
    for j, M in enumerate(bias["width"].values if depth_study else []):
        _points_and_fit(axes[0], depths, bias.sel(width=M).values, cmap(j / max(1, len(widths) - 1)), f"M={M}")
    if not depth_study:
        axes[0].text(0.5, 0.5, f"{len(depths)} depth(s): too few for a depth study", ha="center", va="center",
                     transform=axes[0].transAxes)
    axes[0].set_xlabel("depth L")
    axes[0].set_ylabel(f"|mean loss − limit| ({reference})")
    axes[0].set_title(f"depth bias at s = {r.attrs['s']:g} (theory slope −1)", fontsize=9)
    for j, L in enumerate(spread["depth"].values if len(widths) >= 2 else []):
        _points_and_fit(axes[1], widths, spread.sel(depth=L).values, cmap(j / max(1, len(depths) - 1)), f"L={L}")
    if len(widths) >= 2:
        ref_y = np.nanmax(spread.values) if np.isfinite(spread.values).any() else 1.0
        axes[1].loglog(widths, ref_y * (widths / widths.min()) ** -0.5, "k--", alpha=0.5, label="slope −1/2")
    else:
        axes[1].text(0.5, 0.5, "one width: too few for a width study", ha="center", va="center",
                     transform=axes[1].transAxes)
    axes[1].set_xlabel("width M")
    axes[1].set_ylabel("std of the loss over seeds")
    axes[1].set_title(f"seed-to-seed spread at s = {r.attrs['s']:g} (theory slope −1/2)", fontsize=9)
    from matplotlib.ticker import NullFormatter

    for ax, ticks in ((axes[0], depths), (axes[1], widths)):
        ax.grid(True, which="both", alpha=0.3)
        if len(ticks):
            ax.set_xticks(ticks, [str(int(v)) for v in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
        if ax.get_lines():
            ax.legend(fontsize=7)
    fig.suptitle(sweep_title(sweep), fontsize=9)
    fig.tight_layout()
    return fig


KINDS = ("loss", "weights", "clouds", "success", "rates")
