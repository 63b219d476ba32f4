"""Figures of runs and sweeps (matplotlib). Each function returns a ``Figure``.

Axes are labelled with their quantities (pseudo-time s and depth t are
dimensionless), each figure's title says what was run, and ``save`` writes PNG or
PDF by the file's extension.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import analysis
from .errors import ConfigError


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


def save(fig: Any, path: str, fps: float = 6.0) -> str:
    """Write a figure (PNG, PDF, SVG by the extension) or an ``animate`` animation
    (``.gif`` with Pillow, ``.mp4`` with ffmpeg where it is installed) to ``path``."""
    from matplotlib.animation import Animation

    if isinstance(fig, Animation):
        return _save_animation(fig, path, fps)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _plt().close(fig)
    return path


def _save_animation(anim: Any, path: str, fps: float) -> str:
    from matplotlib import animation

    ext = path.rsplit(".", 1)[-1].lower() if "." in path else ""
    if ext == "gif":
        writer: Any = animation.PillowWriter(fps=fps)
    elif ext == "mp4":
        if not animation.writers.is_available("ffmpeg"):
            raise ConfigError(f"cannot write {path}: .mp4 needs ffmpeg, which is not installed here; use a .gif")
        writer = animation.FFMpegWriter(fps=fps)
    else:
        raise ConfigError(f"cannot write {path}: an animation is written as .gif (or .mp4 with ffmpeg)")
    fig = anim._fig
    anim.save(path, writer=writer, dpi=100)
    _plt().close(fig)
    return path


S_LABEL = r"pseudo-time $s$"


# -- loss ------------------------------------------------------------------------------
def loss(ds: Any, ax: Any = None, quantiles: tuple[float, float] = (0.1, 0.9)) -> Any:
    """Loss E against pseudo-time s on a log scale: one run, or a sweep's seed median with a
    band per (L, M). ``ds``: a run or sweep ``Dataset``; ``ax``: draw into this ``Axes``."""
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
            ax.plot(s, med, color=color, label=f"$L={L}$, $M={M}$")
            ax.fill_between(s, lo, hi, color=color, alpha=0.2, linewidth=0)
        ax.set_title(sweep_title(ds) + f"\nmedian over seeds, band {quantiles[0]:.0%}–{quantiles[1]:.0%}",
                     fontsize=9)
        ax.legend(fontsize=7, ncol=2 if len(cases) > 6 else 1)
    else:
        ax.plot(ds["s"].values, ds["loss"].values, color="C0", label="loss $E$")
        ax.set_title(run_title(ds), fontsize=9)
        ax.legend()
    ax.set_yscale("log")
    ax.set_xlabel(S_LABEL + r" = steps $\times\ \Delta s$")
    ax.set_ylabel("loss $E$")
    ax.grid(True, which="both", alpha=0.3)
    return fig


# -- weight distributions ----------------------------------------------------------------
def _quantities(ds: Any) -> dict[str, tuple[np.ndarray, str]]:
    """Per-particle scalars (snapshot, layer, particle) to follow over training, with their
    axis labels (mathtext)."""
    U, W, b = (ds[v].values for v in ("U", "W", "b"))
    # each layer's W projected on the layer's mean direction of W at the last snapshot
    mean_dir = W[-1].mean(axis=1)
    norms = np.linalg.norm(mean_dir, axis=-1, keepdims=True)
    mean_dir = np.where(norms > 0, mean_dir / np.where(norms > 0, norms, 1), 0)
    return {
        "|U|": (np.linalg.norm(U, axis=-1), r"$|U_{l,m}|$"),
        "W·ŵ": (np.einsum("slmd,ld->slm", W, mean_dir), r"$W_{l,m}\cdot\hat w_l$"),
        "b": (b, r"$b_{l,m}$"),
    }


W_HAT = r"$\hat w_l$ = layer $l$'s mean direction of $W$ at the last snapshot"


def snapshot_s(ds: Any) -> np.ndarray:
    """The pseudo-time of every snapshot of a run ``Dataset``."""
    if "snapshot_s" in ds:
        return np.asarray(ds["snapshot_s"].values, dtype=float)
    return np.asarray(ds["snapshot_step"].values, dtype=float) * float(ds.attrs["ds"])


def check_layers(L: int, layers: Any) -> list[int]:
    """``layers`` as a sorted list of distinct layer indices of a depth-``L`` run; raises
    ``ConfigError`` for an index outside 0..L−1 (nothing is dropped)."""
    out = []
    for v in _as_list(layers):
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise ConfigError(f"--layers must be layer indices (integers), got {v!r}")
        if not 0 <= v < L:
            raise ConfigError(f"--layers {v} is not a layer of this run: it has layers 0..{L - 1} (L = {L})")
        out.append(int(v))
    if not out:
        raise ConfigError("--layers must list at least one layer")
    return sorted(set(out))


def _as_list(v: Any) -> list[Any]:
    """One value or a sequence of them, as a list (a string is one value)."""
    if isinstance(v, str) or np.ndim(v) == 0:
        return [v]
    return list(np.asarray(v).ravel()) if isinstance(v, np.ndarray) else list(v)


def _layer_choice(L: int, layers: Any) -> list[int]:
    if layers is not None:
        return check_layers(L, layers)
    return sorted({0, L // 2, L - 1})


def snapshot_indices(ds: Any, at_s: Any) -> list[int]:
    """The snapshot nearest to each pseudo-time of ``at_s``, in order; raises ``ConfigError``
    for a time outside the run's snapshots [0, last] or two times that pick the same one."""
    s = snapshot_s(ds)
    if len(s) == 0:
        raise ConfigError("the run has no complete snapshot")
    idx: list[int] = []
    for v in _as_list(at_s):
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"--at-s must be pseudo-times (numbers), got {v!r}") from None
        span = s[-1] - s[0]
        tol = 1e-9 * max(1.0, abs(span))
        if not (np.isfinite(v) and s[0] - tol <= v <= s[-1] + tol):
            raise ConfigError(f"--at-s {v:g} is outside the run's snapshots: s = {s[0]:g} to {s[-1]:g}")
        k = int(np.argmin(np.abs(s - v)))
        if k in idx:
            raise ConfigError(f"--at-s {v:g} picks the snapshot at s = {s[k]:g} again (snapshots at s = "
                              f"{', '.join(f'{x:g}' for x in s[:12])}{' ...' if len(s) > 12 else ''})")
        idx.append(k)
    if not idx:
        raise ConfigError("--at-s must list at least one pseudo-time")
    return sorted(idx)


def weights(ds: Any, layers: Any = None, bins: int = 40) -> Any:
    """Histograms of |U|, W along its layer's mean direction ŵ and b over training (density
    against pseudo-time s) for a few layers, and each quantity's distribution over depth t
    at the last snapshot. ``layers``: layer indices 0..L−1 [default: first, middle, last]."""
    plt = _plt()
    q = _quantities(ds)
    s = snapshot_s(ds)
    L = ds.sizes["layer"]
    chosen = _layer_choice(L, layers)
    fig, axes = plt.subplots(len(q), len(chosen) + 1, figsize=(3.2 * (len(chosen) + 1), 2.6 * len(q)),
                             squeeze=False, layout="constrained")
    for i, (values, label) in enumerate(q.values()):
        finite = values[np.isfinite(values)]
        lo, hi = (np.quantile(finite, [0.005, 0.995]) if finite.size else (0.0, 1.0))
        if hi <= lo:
            hi = lo + 1
        edges = np.linspace(lo, hi, bins + 1)
        for j, l in enumerate(chosen):
            ax = axes[i, j]
            H = np.stack([np.histogram(values[k, l], bins=edges, density=True)[0] for k in range(len(s))], axis=1)
            ax.pcolormesh(_edges_of(s), edges, H, shading="flat", cmap="magma")
            ax.set_title(f"{label}, layer $l={l}$ ($t={l / L:.2f}$)", fontsize=8)
            ax.set_xlabel(S_LABEL)
            if j == 0:
                ax.set_ylabel(label)
        ax = axes[i, -1]
        t = np.arange(L) / L
        H = np.stack([np.histogram(values[-1, l], bins=edges, density=True)[0] for l in range(L)], axis=1)
        mesh = ax.pcolormesh(_edges_of(t), edges, H, shading="flat", cmap="magma")
        ax.set_title(f"{label} over depth at $s={s[-1]:g}$", fontsize=8)
        ax.set_xlabel("depth $t = l/L$")
        fig.colorbar(mesh, ax=ax, label="density")
    fig.suptitle("Particle distributions during training (" + W_HAT + ")\n" + run_title(ds), fontsize=9)
    return fig


def _edges_of(centres: np.ndarray) -> np.ndarray:
    c = np.asarray(centres, dtype=float)
    if c.size == 1:
        return np.array([c[0] - 0.5, c[0] + 0.5])
    mid = (c[1:] + c[:-1]) / 2
    return np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])


MAX_LEGEND_LAYERS = 8


class _Clouds:
    """Draws the (W·ŵ, b) clouds of some layers at one snapshot into an ``Axes``.

    With up to ``MAX_LEGEND_LAYERS`` chosen layers each gets its own colour and a legend
    entry; otherwise points are coloured by depth t. Points are drawn in one shuffled
    order (fixed seed), so that no layer is systematically hidden under another.
    """

    def __init__(self, ds: Any, layers: Any = None) -> None:
        q = _quantities(ds)
        self.x, self.y = q["W·ŵ"][0], q["b"][0]
        self.xlabel, self.ylabel = q["W·ŵ"][1], q["b"][1]
        self.s = snapshot_s(ds)
        self.L = L = ds.sizes["layer"]
        self.layers = check_layers(L, layers) if layers is not None else list(range(L))
        K = self.x.shape[2]
        layer_of = np.repeat(np.array(self.layers), K)
        self.order = np.random.default_rng(0).permutation(layer_of.size)
        self.layer_of = layer_of[self.order]
        self.legend = len(self.layers) <= MAX_LEGEND_LAYERS and layers is not None
        if self.legend:
            self.colors = np.array([_plt().get_cmap("tab10")(j % 10) for j in range(len(self.layers))])
            self.point_colors = self.colors[np.searchsorted(self.layers, self.layer_of)]
        finite = lambda v: v[np.isfinite(v)]  # noqa: E731
        xs, ys = finite(self.x[:, self.layers]), finite(self.y[:, self.layers])
        pad = lambda lo, hi: (lo - 0.05 * (hi - lo + 1e-12), hi + 0.05 * (hi - lo + 1e-12))  # noqa: E731
        self.xlim = pad(*np.quantile(xs, [0.001, 0.999])) if xs.size else (-1, 1)
        self.ylim = pad(*np.quantile(ys, [0.001, 0.999])) if ys.size else (-1, 1)

    def points(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        return (self.x[k, self.layers].ravel()[self.order], self.y[k, self.layers].ravel()[self.order])

    def draw(self, ax: Any, k: int) -> Any:
        from matplotlib.ticker import MaxNLocator

        px, py = self.points(k)
        size = 6 if px.size < 3000 else 3
        if self.legend:
            sc = ax.scatter(px, py, c=self.point_colors, s=size, alpha=0.6, linewidths=0)
            for l, color in zip(self.layers, self.colors, strict=True):
                ax.scatter([], [], color=color, s=12, label=f"$l={l}$ ($t={l / self.L:.2f}$)")
        else:
            sc = ax.scatter(px, py, c=self.layer_of / self.L, s=size, cmap="viridis", vmin=0, vmax=1, alpha=0.6,
                            linewidths=0)
        ax.set_xlim(*self.xlim)
        ax.set_ylim(*self.ylim)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.set_title(f"$s = {self.s[k]:g}$", fontsize=9)
        ax.set_xlabel(self.xlabel)
        ax.grid(True, alpha=0.3)
        return sc

    def finish(self, fig: Any, axes: list[Any], sc: Any) -> None:
        axes[0].set_ylabel(self.ylabel)
        if self.legend:
            axes[-1].legend(fontsize=7, loc="upper right", markerscale=1.5, framealpha=0.8)
        else:
            fig.colorbar(sc, ax=axes, label="depth $t = l/L$", shrink=0.9)


def clouds(ds: Any, at_s: Any = None, layers: Any = None) -> Any:
    """Particle clouds (W·ŵ, b) at chosen pseudo-times, one panel per time.

    ``at_s``: pseudo-times, each within the run's snapshots (the nearest snapshot is
    drawn) [default: 0, about s/4, s/2 and the end]; ``layers``: layer indices
    [default: all, coloured by depth t; up to 8 chosen layers get a legend]."""
    plt = _plt()
    s = snapshot_s(ds)
    idx = snapshot_indices(ds, at_s) if at_s is not None else sorted({0, len(s) // 4, len(s) // 2, len(s) - 1})
    cl = _Clouds(ds, layers)
    fig, axes = plt.subplots(1, len(idx), figsize=(3.3 * len(idx) + 1.0, 3.6), squeeze=False, sharex=True,
                             sharey=True, layout="constrained")
    sc = None
    for ax, k in zip(axes[0], idx, strict=True):
        sc = cl.draw(ax, k)
    cl.finish(fig, list(axes[0]), sc)
    which = "all layers" if layers is None else f"layers {', '.join(map(str, cl.layers))}"
    fig.suptitle(f"Particle clouds $(W\\cdot\\hat w_l,\\ b)$ of {which} ({W_HAT})\n" + run_title(ds), fontsize=9)
    return fig


def animate(ds: Any, layers: Any = None, interval: float = 150) -> Any:
    """An animation of the particle clouds (W·ŵ, b) over the run's snapshots, one frame per
    snapshot (a matplotlib ``FuncAnimation``; write it with ``save(anim, "clouds.gif")``).
    ``layers``: layer indices [default: first, middle, last]; ``interval``: ms per frame
    when shown interactively."""
    from matplotlib.animation import FuncAnimation

    plt = _plt()
    L = ds.sizes["layer"]
    cl = _Clouds(ds, _layer_choice(L, layers))
    fig, ax = plt.subplots(figsize=(5.6, 4.6), layout="constrained")
    sc = cl.draw(ax, 0)
    cl.finish(fig, [ax], sc)
    fig.suptitle("Particle clouds over training\n" + run_title(ds), fontsize=8)

    def frame(k: int) -> tuple[Any]:
        px, py = cl.points(k)
        sc.set_offsets(np.column_stack([px, py]))
        ax.set_title(f"$s = {cl.s[k]:g}$  (snapshot {k + 1} of {len(cl.s)})", fontsize=9)
        return (sc,)

    return FuncAnimation(fig, frame, frames=len(cl.s), interval=interval, blit=False)


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


def rates(sweep: Any, at_s: float | None = None) -> Any:
    """Convergence to the mean-field limit, log-log: |Ē_L − Ē_L'| of successive depths against L (slope −p,
    theory −1) and the seed spread against M (theory −1/2), with fits, seed-bootstrap intervals and the
    theory's slopes. Only the panels the grid supports are drawn."""
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
RUN_KINDS = ("loss", "weights", "clouds")
