"""Example 4: how deep and wide a net must be to reach loss ε with probability 1 − η.

A sweep on a local Dask cluster over L ∈ {2, 4, 8, 16}, M ∈ {4, 16, 64, 256} with
8 seeds each, trained to s = 2000 on the sphere data; then the fraction of seeds
below ε = 3e-5 (Wilson intervals in the table), the smallest sizes reaching
1 − η = 0.9, and the median time to ε. Writes figures/size_for_eps.png and the
sweep file (about 2 minutes on 2 cores).

    python examples/size_for_eps.py [--out examples/figures] [--workers 2]
"""

from __future__ import annotations

import argparse
import os

import mfres.analysis as analysis
from mfres import plot
from mfres.sweep import SweepSpec, open_sweep, run_sweep

EPS, ETA = 3e-5, 0.1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "figures"))
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    spec = SweepSpec(depths=(2, 4, 8, 16), widths=(4, 16, 64, 256), seeds=8,
                     base={"steps": 2000, "ds": 1.0, "data": "sphere"})
    path = os.path.join(a.out, "size_for_eps.nc")
    if os.path.exists(path):  # a fresh sweep, not the completion of an old one
        os.remove(path)
    counts = run_sweep(spec, path, workers=a.workers)
    print(counts)
    sweep = open_sweep(path)
    print(analysis.report(sweep, EPS, ETA))
    fig_path = os.path.join(a.out, "size_for_eps.png")
    plot.save(plot.success(sweep, EPS, ETA), fig_path)
    print(f"wrote {fig_path}")


if __name__ == "__main__":
    main()
