"""Where a NumPy GD step spends its time: each operation of one layer, timed alone.

    python benchmarks/profile_numpy.py [SIZE] [DTYPE]

Times every NumPy call that ``mfres.model.loss_and_grad`` makes for one layer, on one
thread (medians of repeats): the per-block operations on every sample block, the two
parameter-gradient products over all samples; multiplies by L and prints each one's
share of a one-thread step, with the bytes it moves and the rate it reaches.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "pyfront"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from contenders import SIZES, problem

from mfres import activations, model
from mfres.backends.numpy_backend import NumpyBackend, one_blas_thread


def timed(f: Callable[[], object], repeats: int = 20, warm: int = 1) -> float:
    for _ in range(warm):
        f()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        out.append(time.perf_counter() - t0)
    return float(np.median(out))


def main() -> None:
    size = sys.argv[1] if len(sys.argv) > 1 else "large"
    dtype = np.dtype(sys.argv[2] if len(sys.argv) > 2 else "float64")
    L, M, d, N = SIZES[size]
    theta, prob = problem(size, dtype.name)
    steps = {}
    for threads in (1, 2):
        backend = NumpyBackend("store", threads=threads)
        # 4 warm-up calls: a NumPy helper process's first 3-4 evaluations run about twice as slow
        steps[threads] = timed(lambda b=backend: b.advance(theta, prob, 0.0, 0), 5, warm=4)
    w = model.Workspace.for_problem(theta.batched(), prob.x)
    w.load(theta.batched())
    w.Z[:] = 0.5
    w.P[:] = 0.5
    act = activations.parse("tanh")
    nb = model.sample_block(N, M)
    blocks = len(w.blocks)
    blk = slice(0, nb)
    ts = w.scratch
    q, pn = ts.Q[:, :nb], ts.Pn[:, :nb]
    S, D, Z, P = w.S[0, :, blk], w.D[0, :, blk], w.Z[0, :, blk], w.P[1, :, blk]
    gU = np.empty((1, M, d), dtype)
    z, z1, p, p0 = Z[..., :d], w.Z[1, :, blk, :d], P[..., :d], w.P[0, :, blk, :d]
    c = dtype.type(0.5)
    isz = dtype.itemsize
    big, small = nb * M * isz, nb * (d + 1) * isz
    own = dtype in activations.OWN_TANH
    per_block = [
        ("Q = [z 1]·[W b]ᵀ", lambda: np.matmul(Z, w.Wb[:, 0].transpose(0, 2, 1), out=q), big + small),
        (f"σ, σ' ({'mfres ' if own else 'np.'}tanh, 1 − s²)",
         lambda: activations.value_and_derivative(act, q, S, D, ts.act), 3 * big),
        ("z' = z + c σ·U", lambda: (np.matmul(S, w.U0[:, 0, :, :d], out=z1), np.multiply(z1, c, out=z1),
                                    np.add(z1, z, out=z1)), big + 3 * small),
        ("U·p", lambda: np.matmul(P, w.U0[:, 0].transpose(0, 2, 1), out=q), big + small),
        ("T = σ' (U·p)", lambda: np.multiply(q, D, out=D), 3 * big),
        ("p' = p + c T·W", lambda: (np.matmul(D, w.Wb[:, 0, :, :d], out=pn), np.multiply(pn, c, out=pn),
                                    np.add(p, pn, out=p0)), big + 3 * small),
    ]
    whole = [
        ("∂U = σᵀ·P (all N)", lambda: np.matmul(w.S[0].transpose(0, 2, 1), w.P[1, ..., :d], out=gU),
         N * M * isz + N * d * isz),
        ("[∂W ∂b] = Tᵀ·[z 1] (all N)", lambda: np.matmul(w.D[0].transpose(0, 2, 1), w.Z[0], out=ts.G),
         N * M * isz + N * (d + 1) * isz),
    ]
    other = np.tanh if own else functools.partial(activations.tanh, scratch=ts.act)
    ref = (f"{'np.' if own else 'mfres '}tanh, 1 − s² (not used)",
           lambda: (other(q, out=S), np.multiply(S, S, out=D), np.subtract(1, D, out=D)))
    rows = []
    total = 0.0
    with one_blas_thread():
        for name, f, nbytes in per_block:
            t = timed(f) * blocks * L
            total += t
            rows.append((name, t, nbytes * blocks * L / t))
        for name, f, nbytes in whole:
            t = timed(f) * L
            total += t
            rows.append((name, t, nbytes * L / t))
        t_ref = timed(ref[1]) * blocks * L
    print(f"{size} (L={L}, M={M}, d={d}, N={N}), {dtype.name}, {blocks} sample blocks of {nb}: one GD step "
          f"{steps[1] * 1e3:.1f} ms on 1 thread, {steps[2] * 1e3:.1f} ms on 2")
    print(f"{'operation (×blocks×L or ×L)':<30} {'ms':>8} {'share':>7} {'GB/s':>7}")
    for name, t, rate in rows:
        print(f"{name:<30} {t * 1e3:>8.2f} {100 * t / steps[1]:>6.1f}% {rate / 1e9:>7.1f}")
    print(f"{'sum of the above':<30} {total * 1e3:>8.2f} {100 * total / steps[1]:>6.1f}%")
    rest = steps[1] - total
    print(f"{'rest (Python, small ops)':<30} {rest * 1e3:>8.2f} {100 * rest / steps[1]:>6.1f}%")
    print(f"{ref[0]:<30} {t_ref * 1e3:>8.2f} {100 * t_ref / steps[1]:>6.1f}%")


if __name__ == "__main__":
    main()
