"""`mfres simulate` as users run it (default snapshots), against the backend alone and JAX, in one run.

    MFRES_JULIA=/path/to/julia python benchmarks/product_check.py [--sizes medium,large]

``benchmarks/run.py`` times the product with a fixed, frequent snapshot interval (every 20
steps at medium, every 2 at large: 9 MB of weights each time), which mostly measures the
durable writer. Here each `mfres simulate` keeps its default schedule (about 20 snapshots
per run, so the step-count difference (t(n2) − t(n1)) / (n2 − n1) is the cost of a step
with the file kept as a user's run keeps it), Julia's reported start-up is subtracted,
and in the same run: the NumPy backend alone and JAX jit (fresh processes,
``contenders.py``), the loop's and file's share of one run as `mfres simulate` reports it
(goal 4), the Julia kernels alone (``julia_bench.jl``), and `mfres sweep
--backend julia` batched against ``--keep-runs`` (16 seeds, small size, 100 and 40100
steps). Prints one line per figure.
"""

from __future__ import annotations

import argparse

from run import (
    DEFAULT,
    SIZES,
    Skipped,
    contender,
    find_julia,
    julia_run,
    load,
    product_env,
    simulate_per_step,
    simulate_split,
    sweep_throughput,
)

# n1 ≥ 20: both runs of a difference have the default 21 snapshots (below 20 steps, one per step)
STEPS = {"default": (500, 5500), "small": (1000, 21000), "medium": (100, 600), "large": (20, 60)}
KERNEL = {"default": (2000, 3), "small": (2000, 3), "medium": (30, 3), "large": (3, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="medium,large")
    ap.add_argument("--julia", default=None)
    ap.add_argument("--no-sweep", action="store_true", help="skip the Julia sweep")
    a = ap.parse_args()
    julia = find_julia(a.julia)
    env = product_env(julia)
    print(f"load at the start {load()}")
    for key in filter(None, a.sizes.split(",")):  # --sizes "": the sweep alone
        size = DEFAULT if key == "default" else SIZES[key]
        n1, n2 = STEPS[key]
        line = [f"{key} {size}:"]
        for backend in ("numpy", "julia") if julia else ("numpy",):
            try:
                per = simulate_per_step(backend, size, key, env, 1, schedule=(n1, n2, None))["sec_per_step"]
                line.append(f"simulate --backend {backend} {1e3 * per:.4g} ms/step (steps {n1}, {n2})")
                sp = simulate_split(backend, size, key, env, 1)
                line.append(f"its loop and file {100 * sp['overhead']:.1f} % of its stepping "
                            f"({sp['stepping_s']:.3g} s, one run of {sp['steps']} steps)")
            except Skipped as e:
                line.append(f"simulate --backend {backend}: skipped ({e})")
        alone = contender("numpy", key, "float64", "--threads", "2")
        line.append(f"NumPy backend alone {1e3 * alone['sec_per_step']:.4g} ms/step" if alone else "NumPy alone failed")
        if julia:
            steps, reps = KERNEL[key]
            jk = julia_run(julia, 2, key, "float64", steps, reps) if key in SIZES else None
            line.append(f"Julia kernels alone (2 threads) {1e3 * jk['sec_per_step']:.4g} ms/step" if jk else "")
        jx = contender("jax", key, "float64") if key in SIZES else None
        line.append(f"JAX jit {1e3 * jx['sec_per_step']:.4g} ms/step" if jx else "JAX: not run")
        print("; ".join(x for x in line if x), flush=True)
    if julia and not a.no_sweep:
        sw = sweep_throughput(16, env, 1, "julia")
        print(f"mfres sweep --backend julia, 16 seeds, small, steps {sw['steps']}: batched {1e3 * sw['batched']:.4g} "
              f"ms per net-step, --keep-runs {1e3 * sw['separate']:.4g}, ratio {sw['separate'] / sw['batched']:.2f}x; "
              f"whole sweeps of {sw['steps'][1]} steps: batched {1e3 * sw['batched_whole']:.4g}, --keep-runs "
              f"{1e3 * sw['separate_whole']:.4g}, ratio {sw['separate_whole'] / sw['batched_whole']:.2f}x")
    print(f"load at the end {load()}")


if __name__ == "__main__":
    main()
