"""Example 3: how the weight distribution moves during training.

One run (L = 16, M = 256, sphere data, 3000 steps, 31 snapshots); draws the
per-layer histograms of |U|, W along its mean direction and b over pseudo-time and
depth, the particle clouds (W·ŵ, b) at four times, and an animation of the clouds
of layers 0, 8 and 15 over the 31 snapshots. Writes figures/weights.png,
figures/clouds.png and figures/clouds.gif, and prints its own run time. Measured:
55 s of CPU time; 501 s wall on a 2-core AMD EPYC shared with other jobs (load 9),
where an idle machine needs far less.

    python examples/weight_distribution.py [--out examples/figures]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import mfres
from mfres import plot


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "figures"))
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = mfres.simulate(os.path.join(tmp, "run.nc"), depth=16, width=256, steps=3000, ds=1.0,
                             snapshot_every=100, init="smooth", backend="numpy", progress=True)
    print(f"loss {float(run['loss'][0]):.3e} -> {float(run['loss'][-1]):.3e}; {run.sizes['snapshot']} snapshots")
    figures = (("weights.png", plot.weights(run)), ("clouds.png", plot.clouds(run, [0, 300, 1000, 3000])),
               ("clouds.gif", plot.animate(run, layers=[0, 8, 15])))
    for name, fig in figures:
        path = os.path.join(a.out, name)
        plot.save(fig, path)
        print(f"wrote {path}")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
