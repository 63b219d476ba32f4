"""NumPy backend against JAX jit, interleaved: A B A B ... in fresh processes, medians.

    python benchmarks/interleaved.py SIZE [ROUNDS]

On a machine shared with other work, contenders measured minutes apart see different
loads; alternating them gives each the same mix. Prints one line per round and the
medians of ms per step and of the ratio JAX / NumPy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def one(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "pyfront")}
    res = subprocess.run([sys.executable, str(HERE / "contenders.py"), *args], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    size = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    npy, jax, ratios = [], [], []
    for k in range(rounds):
        a = one("numpy", size, "float64", "--threads", "2")["sec_per_step"]
        b = one("jax", size, "float64")["sec_per_step"]
        npy.append(a)
        jax.append(b)
        ratios.append(b / a)
        print(f"{size} round {k + 1}: NumPy {a * 1e3:.3g} ms, JAX {b * 1e3:.3g} ms, JAX / NumPy {b / a:.2f}",
              flush=True)
    print(f"{size} medians over {rounds} rounds: NumPy {np.median(npy) * 1e3:.3g} ms, JAX {np.median(jax) * 1e3:.3g} "
          f"ms, JAX / NumPy {np.median(ratios):.2f} (load average {' '.join(f'{v:.1f}' for v in os.getloadavg())})")


if __name__ == "__main__":
    main()
