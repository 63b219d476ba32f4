"""`mfres simulate` as users run it (default snapshots), against the backend alone and JAX, in one run.

    MFRES_JULIA=/path/to/julia python benchmarks/product_check.py [--sizes medium,large] [--repeats R]

``benchmarks/run.py`` times the product with a fixed, frequent snapshot interval (every 20
steps at medium, every 2 at large: 9 MB of weights each time), which mostly measures the
durable writer. Here each `mfres simulate` keeps its default schedule (about 20 snapshots
per run, so the step-count difference (t(n2) − t(n1)) / (n2 − n1) is the cost of a step
with the file kept as a user's run keeps it), Julia's reported start-up is subtracted,
and in the same run: the NumPy backend alone and JAX jit (fresh processes,
``contenders.py``), the loop's and file's share of one run as `mfres simulate` reports it
(goal 4), the Julia kernels alone (``julia_bench.jl``), and `mfres sweep
--backend julia` batched against ``--keep-runs`` (16 seeds, small size, 100 and 40100
steps). Prints one line per size, and one for the sweep.
"""

from __future__ import annotations

import argparse

import numpy as np
from run import (
    DEFAULT,
    SIZES,
    Skipped,
    contender_seconds,
    find_julia,
    julia_run,
    load,
    product_env,
    simulate_per_step,
    simulate_split,
    sweep_throughput,
)

# n1 ≥ 20: both runs of a difference have the default 21 snapshots (below 20 steps, one per step)
STEPS = {"default": (500, 5500), "small": (1000, 81000), "medium": (100, 600), "large": (20, 60)}
KERNEL = {"default": (2000, 3), "small": (2000, 3), "medium": (30, 3), "large": (3, 3)}


def _figures(xs: list[float | None], scale: float = 1e3, unit: str = "") -> str:
    """The median over the repeats that gave a figure, and each repeat's figure (– where it failed)."""
    got = [x for x in xs if x is not None]
    if not got:
        return "failed"
    med = f"{scale * float(np.median(got)):.4g}{unit}"
    if len(xs) == 1:
        return med
    each = ", ".join("–" if x is None else f"{scale * x:.4g}{unit}" for x in xs)
    return f"{med} (repeats {each}{'' if len(got) == len(xs) else f'; {len(got)} of {len(xs)}'})"


def measure_size(key: str, julia: str | None, env: dict, repeats: int) -> None:
    """One line of figures for one size: every contender once per repeat, in turn, so that the
    machine's drift over minutes reaches them alike; medians over the repeats, and the median
    of the per-repeat ratios JAX / product (each pair from one repeat, minutes apart at most)."""
    size = DEFAULT if key == "default" else SIZES[key]
    n1, n2 = STEPS[key]
    backends = ["numpy", "julia"] if julia else ["numpy"]
    per: dict[str, list[float | None]] = {name: [] for name in ("jax", "numpy_alone", "julia_alone", *backends)}
    notes: dict[str, str] = {}
    skipped: set[str] = set()  # unusable in the first repeat: not tried again
    for r in range(repeats):
        for backend in backends:
            if backend in skipped:
                per[backend].append(None)
                continue
            try:
                per[backend].append(simulate_per_step(backend, size, key, env, 1, schedule=(n1, n2, None),
                                                      check=r == 0)["sec_per_step"])
                if r == 0:  # within one run: no drift between processes enters it
                    sp = simulate_split(backend, size, key, env, 1)
                    notes[backend] = (f"its loop and file {100 * sp['overhead']:.1f} % of its stepping "
                                      f"({sp['stepping_s']:.3g} s, one run of {sp['steps']} steps)")
            except Skipped as e:
                per[backend].append(None)
                notes.setdefault(backend, f"skipped ({e})")
                if r == 0:
                    skipped.add(backend)
        per["numpy_alone"].append(contender_seconds("numpy", key, "float64", "--threads", "2"))
        jk = julia_run(julia, 2, key, "float64", *KERNEL[key]) if julia and key in SIZES else None
        per["julia_alone"].append(jk["sec_per_step"] if jk else None)
        per["jax"].append(contender_seconds("jax", key, "float64") if key in SIZES else None)
    line = [f"{key} {size}, {repeats} repeat(s), ms per step"]
    for backend in backends:
        line.append(f"simulate --backend {backend} {_figures(per[backend])} (steps {n1}, {n2}); "
                    f"{notes.get(backend, '')}")
    for name, label in (("numpy_alone", "NumPy backend alone"), ("julia_alone", "Julia kernels alone (2 threads)"),
                        ("jax", "JAX jit")):
        if any(x is not None for x in per[name]):
            line.append(f"{label} {_figures(per[name])}")
    for name, label in [*((b, f"simulate --backend {b}") for b in backends), ("numpy_alone", "NumPy alone")]:
        ratios = [None if j is None or x is None else j / x for j, x in zip(per["jax"], per[name], strict=True)]
        if any(x is not None for x in ratios):
            line.append(f"JAX / {label}: {_figures(ratios, 1, 'x')}")
    print("; ".join(line), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="medium,large")
    ap.add_argument("--repeats", type=int, default=1, help="every contender this many times per size, in turn")
    ap.add_argument("--julia", default=None)
    ap.add_argument("--no-sweep", action="store_true", help="skip the Julia sweep")
    a = ap.parse_args()
    julia = find_julia(a.julia)
    env = product_env(julia)
    print(f"load at the start {load()}")
    for key in filter(None, a.sizes.split(",")):  # --sizes "": the sweep alone
        measure_size(key, julia, env, max(1, a.repeats))
    if julia and not a.no_sweep:
        sw = sweep_throughput(16, env, 1, "julia")
        print(f"mfres sweep --backend julia, 16 seeds, small, steps {sw['steps']}: batched {1e3 * sw['batched']:.4g} "
              f"ms per net-step, --keep-runs {1e3 * sw['separate']:.4g}, ratio {sw['separate'] / sw['batched']:.2f}x; "
              f"whole sweeps of {sw['steps'][1]} steps: batched {1e3 * sw['batched_whole']:.4g}, --keep-runs "
              f"{1e3 * sw['separate_whole']:.4g}, ratio {sw['separate_whole'] / sw['batched_whole']:.2f}x")
    print(f"load at the end {load()}")


if __name__ == "__main__":
    main()
