"""One benchmark measurement in a fresh process, printed as one JSON line.

    python benchmarks/contenders.py CONTENDER SIZE DTYPE [--memory store|recompute] [--batch B] [--threads T]

CONTENDER is ``numpy``, ``pytorch`` or ``jax``. Reports the median seconds per GD step
over repeats, the peak resident memory above the process's baseline (taken after the
inputs exist, before any buffer of the contender is allocated), the bytes of the
arrays the contender keeps, and E at the first and last step. The peers also report
how far their E and ∇E at the initial θ are from mfres's (``check``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "pyfront"))

SIZES = {
    "default": (16, 64, 4, 64),  # mfres simulate's defaults
    "small": (8, 16, 4, 32),
    "medium": (32, 128, 8, 256),
    "large": (64, 512, 16, 1024),
}
# GD steps per repeat and repeats, so that each measurement takes a second or more
SCHEDULE = {"default": (50, 3), "small": (100, 3), "medium": (10, 3), "large": (2, 3)}


def warm_blas() -> None:
    """One small product first: OpenBLAS allocates its per-thread buffers (tens of MiB) at its
    first call; they belong to the library, not to the contender's arrays."""
    a = np.ones((64, 64))
    a @ a
    a.astype(np.float32) @ a.astype(np.float32)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak() -> None:
    """Start the peak-RSS count afresh (Linux: 5 > /proc/self/clear_refs resets VmHWM), so that
    transient allocations before the baseline (imports, set-up) do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def problem(size: str, dtype: str, batch: int = 0):
    from mfres import activations
    from mfres.backends import Problem
    from mfres.data import builtin
    from mfres.init import initial_particles
    from mfres.model import Particles

    L, M, d, N = SIZES[size]
    dt = np.dtype(dtype)
    data = builtin("sphere", N, d, data_seed=0)
    if batch:
        nets = [initial_particles("iid", L, M, d, seed=s, dtype=dt) for s in range(batch)]
        theta = Particles(*(np.stack([getattr(t, v) for t in nets]) for v in "UWb"))
    else:
        theta = initial_particles("iid", L, M, d, seed=0, dtype=dt)
    return theta, Problem.from_data(data, activations.parse("tanh"), 0.0, dt)


WARM_CALLS = 3
CPU: list[float] = []  # CPU seconds per step of the last measure(), all threads of the process


def measure(advance, steps: int, repeats: int, evaluations=lambda n: n + 1,
            helpers=lambda: 0.0) -> tuple[float, list[float]]:
    """Median seconds per gradient evaluation (with its GD step) of ``advance(steps)``, which
    evaluates ``evaluations(steps)`` times: n + 1 (E after the last step too), or n for a
    backend that carries the last ∇E over from the previous call. CPU time: this process's
    and ``helpers()``, the CPU seconds of its helper processes so far."""
    # warm-up: buffers, caches, first-call costs, and the NumPy helper processes' first passes (about
    # twice as slow for the first 3-4 evaluations, seen at medium); a fixed count, so that every
    # contender's E after the timed steps is at the same iterate (the peers' correctness check)
    for _ in range(WARM_CALLS):
        advance(1)
    times, cpu = [], []
    losses: list[float] = []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time() + helpers()
        out = advance(steps)
        k = evaluations(steps)
        times.append((time.perf_counter() - t0) / k)
        cpu.append((time.process_time() + helpers() - c0) / k)
        losses = out
    CPU[:] = [float(np.median(cpu))]
    return float(np.median(times)), losses


def helper_cpu(backend) -> float:
    """CPU seconds (user + system) of the NumPy backend's helper processes so far (Linux /proc)."""
    helpers = getattr(backend._work, "helpers", None)
    total = 0.0
    for p in helpers.procs if helpers is not None else []:
        try:
            with open(f"/proc/{p.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def run_numpy(size: str, dtype: str, memory: str, batch: int, steps: int | None, threads: int | None) -> dict:
    from mfres import model
    from mfres.backends.numpy_backend import NumpyBackend, choose_recompute

    theta, prob = problem(size, dtype, batch)
    L, M, d, N = SIZES[size]
    warm_blas()
    base = rss_bytes()
    reset_peak()
    backend = NumpyBackend(memory, threads)
    n, repeats = SCHEDULE[size]
    if steps:
        n, repeats = steps, 1
    sec, losses = measure(lambda k: np.atleast_1d(backend.advance(theta, prob, 0.1, k).loss[:, ...]).tolist(), n,
                          repeats, lambda k: k if backend.continued else k + 1, lambda: helper_cpu(backend))
    recompute = choose_recompute(memory, L, M, N, np.dtype(dtype), max(batch, 1))
    kept = model.workspace_bytes(L, M, d, N, np.dtype(dtype), recompute, max(batch, 1), backend.threads)
    return {"sec_per_step": sec, "peak_bytes": peak_rss_bytes() - base, "kept_bytes": kept,
            "recompute": recompute, "loss_first": losses[0], "loss_last": losses[-1]}


def run_pytorch(size: str, dtype: str, steps: int | None) -> dict:
    from torch_peer import TorchPeer

    theta, prob = problem(size, dtype)
    base = rss_bytes()
    reset_peak()
    peer = TorchPeer(theta.U, theta.W, theta.b, prob.x, prob.y, prob.a, threads=2)
    n, repeats = SCHEDULE[size]
    if steps:
        n, repeats = steps, 1
    sec, losses = measure(lambda k: peer.advance(0.1, k).tolist(), n, repeats)
    return {"sec_per_step": sec, "peak_bytes": peak_rss_bytes() - base, "kept_bytes": None,
            "loss_first": losses[0], "loss_last": losses[-1]}


def mfres_reference(theta, prob) -> tuple[float, list[np.ndarray]]:
    """mfres's E and ∇E (NumPy backend) at θ, for the peers' correctness check."""
    from mfres.backends.numpy_backend import NumpyBackend

    E, g = NumpyBackend("store").loss_and_grad(theta, prob)
    return E, [g.U, g.W, g.b]


def check(E_ref: float, g_ref: list[np.ndarray], E: float, g: list[np.ndarray]) -> dict:
    """Relative differences: |ΔE|/|E| and max |Δ∇E| / max |∇E| over U, W, b."""
    scale = max(float(np.abs(v).max()) for v in g_ref)
    dg = max(float(np.abs(np.asarray(a, np.float64) - b).max()) for a, b in zip(g, g_ref, strict=True))
    return {"loss_rel": abs(E - E_ref) / abs(E_ref), "grad_rel": dg / scale}


def run_jax(size: str, dtype: str, steps: int | None) -> dict:
    from jax_peer import JaxPeer

    theta, prob = problem(size, dtype)
    E_ref, g_ref = mfres_reference(theta.copy(), prob)
    base = rss_bytes()
    reset_peak()
    peer = JaxPeer(theta.U, theta.W, theta.b, prob.x, prob.y, prob.a)
    E, g = peer.loss_and_grad()
    n, repeats = SCHEDULE[size]
    if steps:
        n, repeats = steps, 1
    sec, losses = measure(lambda k: peer.advance(0.1, k).tolist(), n, repeats)
    import jax

    return {"sec_per_step": sec, "peak_bytes": peak_rss_bytes() - base, "kept_bytes": None,
            "loss_first": losses[0], "loss_last": losses[-1], "check": check(E_ref, g_ref, E, list(g)),
            "version": jax.__version__, "x64": bool(jax.config.jax_enable_x64)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("contender", choices=["numpy", "pytorch", "jax"])
    p.add_argument("size", choices=sorted(SIZES))
    p.add_argument("dtype", choices=["float64", "float32"])
    p.add_argument("--memory", default="store")
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="one repeat of this many steps")
    p.add_argument("--threads", type=int, default=None, help="NumPy backend threads [default: all cores]")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    if a.contender == "numpy":
        out = run_numpy(a.size, a.dtype, a.memory, a.batch, a.steps, a.threads)
    elif a.contender == "jax":
        out = run_jax(a.size, a.dtype, a.steps)
    else:
        out = run_pytorch(a.size, a.dtype, a.steps)
    out["cpu_per_step"] = CPU[0] if CPU else None
    print(json.dumps(out))


if __name__ == "__main__":
    main()
