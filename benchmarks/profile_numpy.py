"""Where a NumPy GD step spends its time: each operation of one layer, timed alone.

    python benchmarks/profile_numpy.py [SIZE] [DTYPE]

Times every NumPy call that ``mfres.model.loss_and_grad`` makes for one layer
(medians of repeats), multiplies by L, and prints each one's share of the step,
with the bytes it moves and the rate it reaches, next to a measured copy rate
(the machine's memory bandwidth as NumPy sees it).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "pyfront"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from contenders import SIZES, problem

from mfres import activations, model
from mfres.backends.numpy_backend import NumpyBackend


def timed(f: Callable[[], object], repeats: int = 30) -> float:
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
    backend = NumpyBackend("store")
    step = timed(lambda: backend.advance(theta, prob, 0.0, 0), 5)
    w = model.Workspace.for_problem(theta.batched(), prob.x)
    tb = theta.batched()
    w.load(tb)
    w.Z[:] = 0.5
    act = activations.parse("tanh")
    S, D, Q, T, P, Pn, G, Z = w.S[0], w.D[0], w.Q, w.T, w.P, w.Pn, w.G, w.Z[0]
    gU = np.empty((1, M, d), dtype)
    big = N * M * dtype.itemsize
    small = N * (d + 1) * dtype.itemsize
    ops = [
        ("Q = [z 1]·[W b]ᵀ", lambda: np.matmul(Z, w.Wb[:, 0].transpose(0, 2, 1), out=Q), big + small),
        ("σ, σ' (tanh, 1 − s²)", lambda: activations.value_and_derivative(act, Q, S, D), 4 * big),
        ("z += c σ·[U 0]", lambda: np.matmul(S, w.U0[:, 0], out=w.Z[1]), big + small),
        ("T = P·[U 0]ᵀ", lambda: np.matmul(P, w.U0[:, 0].transpose(0, 2, 1), out=T), big + small),
        ("T *= σ'", lambda: np.multiply(T, D, out=T), 3 * big),
        ("∂U = σᵀ·P", lambda: np.matmul(S.transpose(0, 2, 1), P[..., :d], out=gU), big + small),
        ("[∂W ∂b] = Tᵀ·[z 1]", lambda: np.matmul(T.transpose(0, 2, 1), Z, out=G), big + small),
        ("Pn = T·[W b]", lambda: np.matmul(T, w.Wb[:, 0], out=Pn), big + small),
    ]
    a = np.ones(N * M, dtype)
    b = np.empty_like(a)
    copy_rate = 2 * a.nbytes / timed(lambda: np.copyto(b, a))
    total = 0.0
    rows = []
    for name, f, nbytes in ops:
        t = timed(f) * L
        total += t
        rows.append((name, t, nbytes * L / t))
    print(f"{size} (L={L}, M={M}, d={d}, N={N}), {dtype.name}: one GD step {step * 1e3:.1f} ms; "
          f"copy rate {copy_rate / 1e9:.1f} GB/s")
    print(f"{'operation (×L layers)':<26} {'ms':>8} {'share':>7} {'GB/s':>7}")
    for name, t, rate in rows:
        print(f"{name:<26} {t * 1e3:>8.2f} {100 * t / step:>6.1f}% {rate / 1e9:>7.1f}")
    print(f"{'sum of the above':<26} {total * 1e3:>8.2f} {100 * total / step:>6.1f}%")
    print(f"{'rest (Python, small ops)':<26} {(step - total) * 1e3:>8.2f} {100 * (step - total) / step:>6.1f}%")


if __name__ == "__main__":
    main()
