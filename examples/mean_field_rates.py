"""Example 2: the rates at which the finite net approaches its mean-field limit.

Two sweeps on a local Dask cluster, both stopped at pseudo-time s = 2:
- depth: L ∈ {2, 4, 8, 16, 32, 64}, M = 64, 8 seeds, `tied` initialisation (each
  particle's profile constant in depth, so that a seed gives the same M profiles at
  every L and the width fluctuation cancels between depths); the bias of the
  seed-averaged loss against its Richardson extrapolation in 1/L (theory: slope −1);
- width: L = 8, M ∈ {8, ..., 2048}, 16 seeds; the seed-to-seed spread of the loss
  (theory: slope −1/2).
Writes figures/rates_depth.png, figures/rates_width.png (about 3 minutes on 2 cores).

    python examples/mean_field_rates.py [--out examples/figures] [--workers 2]
"""

from __future__ import annotations

import argparse
import os

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
    studies = {
        "depth": (SweepSpec(depths=(2, 4, 8, 16, 32, 64), widths=(64,), seeds=8, base={**COMMON, "init": "tied"}),
                  "richardson"),
        "width": (SweepSpec(depths=(8,), widths=(8, 32, 128, 512, 2048), seeds=16, base={**COMMON, "init": "iid"}),
                  "deepest"),
    }
    for name, (spec, reference) in studies.items():
        path = os.path.join(a.out, f"rates_{name}.nc")
        if os.path.exists(path):  # a fresh sweep, not the completion of an old one
            os.remove(path)
        run_sweep(spec, path, workers=a.workers)
        sweep = open_sweep(path)
        print(analysis.report(sweep, 1e-3, 0.1, reference=reference).split("\n\n")[-1])
        fig_path = os.path.join(a.out, f"rates_{name}.png")
        plot.save(plot.rates(sweep, reference=reference), fig_path)
        print(f"wrote {fig_path}")


if __name__ == "__main__":
    main()
