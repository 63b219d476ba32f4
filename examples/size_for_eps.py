"""Example 4: how deep and wide a net must be to reach loss ε with probability 1 − η, and the theorem's own statement.

A sweep on a local Dask cluster over L ∈ {2, 4, 8, 16}, M ∈ {4, 16, 64, 256} with 20 seeds
each (``smooth`` initialisation), trained to s = 200 (200 steps of Δs = 1) on the sphere data
(d = 2, N = 16). At s = 200 it reports, per (L, M): the fraction of seeds with E < ε = 2.5e-4
and with |E − E_∞| ≤ ε (the probability the theorem bounds), each with its 95 % Wilson
interval; the smallest sizes whose Wilson lower bound reaches 1 − η = 0.75 (20 seeds: 19 of
20 needed), beside the raw fraction's answer; the median over all seeds of the time to ε
(never = +inf, "> 200"); the limit E_∞(200) with a seed-bootstrap band; the ε reached with
probability 1 − η and the exponents of M_min(ε) and L_min(ε) (theory −2 and −1).
Writes figures/size_for_eps.png (success), figures/size_for_eps_size.png and the sweep file.

    python examples/size_for_eps.py [--out examples/figures] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import time

import mfres.analysis as analysis
from mfres import plot
from mfres.sweep import SweepSpec, open_sweep, run_sweep

EPS, ETA = 2.5e-4, 0.25


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "figures"))
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()
    spec = SweepSpec(depths=(2, 4, 8, 16), widths=(4, 16, 64, 256), seeds=20,
                     base={"steps": 200, "ds": 1.0, "data": "sphere", "dim": 2, "samples": 16, "init": "smooth"})
    path = os.path.join(a.out, "size_for_eps.nc")
    if os.path.exists(path):  # a fresh sweep, not the completion of an old one
        os.remove(path)
    counts = run_sweep(spec, path, workers=a.workers)
    print("runs: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    sweep = open_sweep(path)
    result = analysis.analyze(sweep, EPS, ETA)
    print(analysis.report(sweep, EPS, ETA, result=result))
    figures = ((plot.success(sweep, EPS, ETA), "size_for_eps.png"), (plot.size(sweep, ETA), "size_for_eps_size.png"))
    for fig, name in figures:
        fig_path = os.path.join(a.out, name)
        plot.save(fig, fig_path)
        print(f"wrote {fig_path}")
    print(f"run time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
