"""Example 2: the rates at which the finite net approaches its mean-field limit, measured without assuming them.

Two sweeps on a local Dask cluster, both analysed at pseudo-time s = 2:
- depth: L ∈ {2, 4, ..., 64} (ratio 2), M = 64, 16 seeds, the nested admissible `smooth`
  initialisation (a seed's profiles θ_m(t) are one function of depth, read at t = l/L by
  every L, so the nets of one seed discretise one continuous-depth net). The depth order p
  of E_L − E_∞ ~ L^−p comes from the successive differences Ē_L − Ē_2L of the seed-mean
  (theory p = 1), with a 95 % seed-bootstrap interval, on all depths and on L ≥ 4; no limit
  is assumed;
- width: L = 8, M ∈ {8, ..., 2048}, 16 seeds, `iid`; the seed-to-seed spread of the loss
  against M (theory slope −1/2) and the seed-mean's approach in M (theory order 1).
Writes figures/rates_depth.png, figures/rates_width.png and the two sweep files.

    python examples/mean_field_rates.py [--out examples/figures] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import time

import mfres.analysis as analysis
from mfres import plot
from mfres.sweep import SweepSpec, open_sweep, run_sweep

COMMON = {"dim": 2, "samples": 16, "steps": 40, "ds": 0.05, "data": "sphere"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "figures"))
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()
    studies = {
        "depth": SweepSpec(depths=(2, 4, 8, 16, 32, 64), widths=(64,), seeds=16, base={**COMMON, "init": "smooth"}),
        "width": SweepSpec(depths=(8,), widths=(8, 32, 128, 512, 2048), seeds=16, base={**COMMON, "init": "iid"}),
    }
    for name, spec in studies.items():
        path = os.path.join(a.out, f"rates_{name}.nc")
        if os.path.exists(path):  # a fresh sweep, not the completion of an old one
            os.remove(path)
        run_sweep(spec, path, workers=a.workers)
        sweep = open_sweep(path)
        r = analysis.convergence_rates(sweep)
        print(f"{name} study ({spec.base['init']} init, s = {r.attrs['s']:g}, 95 % seed-bootstrap intervals):")
        if name == "depth":
            pt = r.sel(width=64)
            print(f"  depth order p (E_L - E_inf ~ L^-p) at M = 64: {float(pt['depth_order']):.3f} "
                  f"[{float(pt['depth_order_lo']):.3f}, {float(pt['depth_order_hi']):.3f}]   theory 1 "
                  f"(slope of |E_L - E_2L| against L: theory -1)")
            deep = analysis.convergence_rates(sweep.sel(depth=[L for L in spec.depths if L >= 4])).sel(width=64)
            print(f"  the same on L >= 4 (the pair L = 2, 4 is pre-asymptotic): {float(deep['depth_order']):.3f} "
                  f"[{float(deep['depth_order_lo']):.3f}, {float(deep['depth_order_hi']):.3f}]   theory 1")
            diffs = pt["depth_difference"].values[:-1]
            print("  |E_L - E_2L| (seed mean) at L = 2, 4, ..., 32: " + ", ".join(f"{v:.3g}" for v in diffs))
            print(f"  limit E_inf(s) by Richardson in 1/L at M = 64: {float(r['limit_depth']):.6f} "
                  f"[{float(r['limit_depth_lo']):.6f}, {float(r['limit_depth_hi']):.6f}]")
        else:
            pt = r.sel(depth=8)
            print(f"  seed spread vs M at L = 8: slope {float(pt['width_slope']):.3f} "
                  f"[{float(pt['width_slope_lo']):.3f}, {float(pt['width_slope_hi']):.3f}]   theory -0.5")
            print(f"  width bias order q (E_M - E_inf ~ M^-q) at L = 8: {float(pt['width_bias_order']):.3f} "
                  f"[{float(pt['width_bias_order_lo']):.3f}, {float(pt['width_bias_order_hi']):.3f}]   theory 1")
        fig_path = os.path.join(a.out, f"rates_{name}.png")
        plot.save(plot.rates(sweep), fig_path)
        print(f"wrote {fig_path}")
    print(f"run time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
