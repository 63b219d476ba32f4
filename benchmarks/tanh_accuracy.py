"""Accuracy and speed of mfres's own tanh (``mfres.activations.tanh``) against NumPy's.

    python benchmarks/tanh_accuracy.py [--points N] [--exact K]

Errors in ulp of the exact value: against mpmath (113-bit) on K points chosen where the
formula is weakest (near the table's knots, the first knot's cancellation, tiny values,
the tails) and against ``np.tanh`` on N points (normal, uniform to ±30, log-uniform down to
the subnormals). Speed: ns per element of tanh with its derivative 1 − t², on one thread,
for a block in cache and for 2^22 elements.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "pyfront"))

from mfres import activations


def per_element(f, n: int, repeats: int = 15) -> float:
    f()
    best = []
    for _ in range(repeats):
        t0 = time.thread_time()
        f()
        best.append(time.thread_time() - t0)
    return float(np.median(best)) / n * 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=4_000_000)
    p.add_argument("--exact", type=int, default=20_000)
    a = p.parse_args()
    import mpmath

    mpmath.mp.prec = 113
    rng = np.random.default_rng(0)
    for dtype in (np.float64, np.float32):
        k = a.exact
        knots = rng.integers(-2560, 2561, k // 4) / 128
        x = np.concatenate([knots + rng.uniform(-1 / 256, 1 / 256, k // 4),
                            rng.uniform(1 / 256, 3 / 256, k // 4) * rng.choice([-1, 1], k // 4),
                            np.exp(rng.uniform(-700 if dtype is np.float64 else -85, 0, k // 8)),
                            rng.uniform(-21, 21, k // 8)]).astype(dtype)
        mine, numpy_ = activations.tanh(x), np.tanh(x)
        err_m, err_n = [], []
        for v, m, n_ in zip(x, mine, numpy_, strict=True):
            e = mpmath.tanh(mpmath.mpf(float(v)))
            ulp = mpmath.mpf(float(np.spacing(np.abs(dtype(float(e))))))
            err_m.append(float(abs(mpmath.mpf(float(m)) - e) / ulp))
            err_n.append(float(abs(mpmath.mpf(float(n_)) - e) / ulp))
        print(f"{dtype.__name__}: against mpmath on {len(x)} hard points: mfres max {max(err_m):.2f} ulp "
              f"(mean {np.mean(err_m):.3f}), np.tanh max {max(err_n):.2f} ulp")
        n = a.points
        y = np.concatenate([rng.standard_normal(n // 2) * 4, rng.uniform(-30, 30, n // 4),
                            np.exp(rng.uniform(-745 if dtype is np.float64 else -103, 3.5, n // 4))
                            * rng.choice([-1, 1], n // 4)]).astype(dtype)
        ref = np.tanh(y.astype(np.float64)) if dtype is np.float32 else np.tanh(y)
        spacing = np.spacing(np.abs(ref).astype(dtype)).astype(np.float64)
        err = np.abs(activations.tanh(y).astype(np.float64) - ref) / spacing
        print(f"{dtype.__name__}: against np.tanh{' in float64' if dtype is np.float32 else ''} on {len(y)} "
              f"points: max {err.max():.2f} ulp, mean {err.mean():.3f}")
        for size in (activations.CHUNK, 1 << 22):
            q = (rng.standard_normal(size) * 2).astype(dtype)
            s, ds = np.empty_like(q), np.empty_like(q)
            sc = activations.Scratch(dtype)
            t_mine = per_element(lambda q=q, s=s, ds=ds, sc=sc: (activations.tanh(q, s, sc), np.multiply(s, s, out=ds),
                                                                  np.subtract(1, ds, out=ds)), size)
            t_np = per_element(lambda q=q, s=s, ds=ds: (np.tanh(q, out=s), np.multiply(s, s, out=ds),
                                                        np.subtract(1, ds, out=ds)), size)
            used = "used" if np.dtype(dtype) in activations.OWN_TANH else "not used: np.tanh is faster here"
            print(f"{dtype.__name__}: tanh and 1 − t² on {size} elements: mfres {t_mine:.2f} ns/element, "
                  f"np.tanh {t_np:.2f} ns/element ({used})")


if __name__ == "__main__":
    main()
