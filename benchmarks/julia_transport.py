"""The executable Julia transport's costs: start-up, round trip per chunk, ms/step.

    MFRES_JULIA=/path/to/julia python benchmarks/julia_transport.py [--threads 1]

Prints (one line each):
- start-up: spawn to "ready" (Julia's start and the include of jl/MFRes.jl), then the
  warm-up compilation of the kernels for float64/tanh;
- round trip: a request that does nothing (``device cpu``), and the extra time of an
  ``advance`` of 0 steps over the kernels' own E+∇E (the θ copies in and out of shared
  memory and the loss read-back) at each size;
- ms/step by step-count differencing, (t(n2) − t(n1)) / (n2 − n1): through
  ``mfres.train.run`` (the loop ``mfres simulate`` runs, with its run file, snapshots and
  chunking) on one warm backend, through ``backend.advance``, and the kernels alone
  (the server's own timing of ``gd!``; with ``--separate`` also ``gd!`` in a separate Julia).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mfres.backends import Problem
from mfres.backends.julia_exe import JuliaExeBackend, find_executable, julia_command
from mfres.config import RunConfig
from mfres.train import prepare, run

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"small": dict(depth=8, width=32, dim=4, samples=100), "medium": dict(depth=16, width=128, dim=8, samples=1000)}
STEPS = {"small": (200, 1200), "medium": (20, 120)}

KERNELS = """
include(joinpath(ARGS[1], "jl", "MFRes.jl"))
using .MFRes, Random
L, M, d, N, n1, n2 = parse.(Int, ARGS[2:7])
Random.seed!(1)
U, W, b = randn(d, M, L), randn(d, M, L) ./ sqrt(d), zeros(M, L)
X = randn(d, N); X ./= sqrt.(sum(abs2, X; dims = 1)); y = X[1, :] .* X[2, :]; a = zeros(d); a[1] = 1
ws = MFRes.Workspace(U, X)
σ = MFRes.activation(:tanh)
time_steps(n) = (ls = zeros(n + 1); t = time_ns(); MFRes.gd!(ws, U, W, b, X, y, a, 1e-3, n, σ; losses = ls);
                 (time_ns() - t) / 1e9)
time_steps(2)
t1 = minimum(time_steps(n1) for _ in 1:3)
t2 = minimum(time_steps(n2) for _ in 1:3)
println((t2 - t1) / (n2 - n1))
"""


def ms_per_step_loop(backend: JuliaExeBackend, size: dict, n1: int, n2: int, folder: str) -> float:
    times = {}
    for n in (n1, n2):
        best = np.inf
        for k in range(3):
            cfg = RunConfig(**size, steps=n, ds=1e-3, backend="julia", snapshot_every=n)
            t0 = time.perf_counter()
            run(cfg, os.path.join(folder, f"r{n}_{k}.nc"), backend=backend, overwrite=True)
            best = min(best, time.perf_counter() - t0)
        times[n] = best
    return 1e3 * (times[n2] - times[n1]) / (n2 - n1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", default="small,medium", help="comma list of: small, medium")
    ap.add_argument("--separate", action="store_true",
                    help="also time the kernels alone in a separate Julia process (compiles again)")
    args = ap.parse_args()
    args.sizes = args.sizes.split(",")
    found = find_executable()
    if found is None:
        raise SystemExit("no Julia: set MFRES_JULIA")
    exe = found[0]
    print(f"Julia {'.'.join(map(str, found[1]))} at {exe}, {args.threads} thread(s), load {os.getloadavg()}")
    t0 = time.perf_counter()
    jl = JuliaExeBackend(exe, threads=args.threads)
    ready = time.perf_counter() - t0
    cfg = RunConfig(**SIZES["small"], steps=1, backend="julia")
    _, theta, problem = prepare(cfg)
    t0 = time.perf_counter()
    jl.advance(theta, problem, 1e-3, 1)
    print(f"start-up: ready after {ready:.2f} s; first chunk (compiles float64/tanh) {time.perf_counter() - t0:.1f} s;"
          f" startup_seconds = {jl.startup_seconds:.1f} s")
    rt = []
    for _ in range(200):
        t0 = time.perf_counter()
        jl._request("device cpu")
        rt.append(time.perf_counter() - t0)
    print(f"round trip of an empty request: median {1e6 * np.median(rt):.0f} µs")
    with tempfile.TemporaryDirectory() as folder:
        for name, size in SIZES.items():
            cfg = RunConfig(**size, steps=1, backend="julia")
            _, theta, problem = prepare(cfg)
            prob = Problem(problem.x, problem.y, problem.a, problem.activation)
            jl.advance(theta, prob, 1e-3, 0)
            t_adv = min(_timed(jl.advance, theta, prob, 1e-3, 0) for _ in range(20))
            t_grad = min(_timed(jl.loss_and_grad, theta, prob) for _ in range(20))
            n1, n2 = STEPS[name]
            if name not in args.sizes:
                continue
            adv, inside = {}, {}
            for n in (n1, n2):
                runs = [(_timed(jl.advance, theta, prob, 1e-3, n), jl.kernel_seconds) for _ in range(3)]
                adv[n], inside[n] = min(runs)
            transport = 1e3 * (adv[n2] - adv[n1]) / (n2 - n1)
            in_julia = 1e3 * (inside[n2] - inside[n1]) / (n2 - n1)
            over = []
            for _ in range(10):
                wall = _timed(jl.advance, theta, prob, 1e-3, n1)
                over.append(wall - jl.kernel_seconds)
            print(f"{name}: a chunk of {n1} steps: {1e3 * jl.kernel_seconds:.2f} ms in the kernels (timed in Julia), "
                  f"transport overhead (wall − kernels) median {1e3 * np.median(over):.3f} ms")
            loop = ms_per_step_loop(jl, size, n1, n2, folder)
            L, M, d, N = size["depth"], size["width"], size["dim"], size["samples"]
            kern = in_julia
            if args.separate:
                command, env = julia_command(exe, ["-t", str(args.threads)])
                out = subprocess.run([*command, "-e", KERNELS, str(ROOT), *map(str, (L, M, d, N, n1, n2))],
                                     capture_output=True, text=True, check=True, env=env)
                kern = 1e3 * float(out.stdout.split()[-1])
                print(f"{name}: kernels in a separate Julia {kern:.4f} ms/step, timed inside the server "
                      f"{in_julia:.4f} ms/step")
            print(f"{name} (L={L} M={M} d={d} N={N}): advance(0 steps) {1e3 * t_adv:.3f} ms, loss_and_grad "
                  f"{1e3 * t_grad:.3f} ms; ms/step: kernels alone {kern:.4f}, through backend.advance "
                  f"{transport:.4f} ({100 * (transport / kern - 1):+.1f}%), through mfres.train.run {loop:.4f} "
                  f"({100 * (loop / kern - 1):+.1f}%)")
    jl.close()


def _timed(f: Callable[..., object], *args: object) -> float:
    t0 = time.perf_counter()
    f(*args)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
