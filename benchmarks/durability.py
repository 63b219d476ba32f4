"""What durable run files cost: the default ``mfres simulate`` run with and without fsync.

    python benchmarks/durability.py [--repeats 3] [--steps 2000] [--dir DIR]

Each repeat runs, in this process and back to back, the default run (L=16, M=64, d=4,
N=64, 2000 steps, NumPy backend) twice: as shipped (durable points, fsync of every
file and folder) and with ``os.fsync`` made a no-op (written, not durable). In the
durable run the time spent inside the writer (buffering, segments, publishing the
netCDF file, fsync) is clocked separately: the overhead is that time over the rest
of the run. Medians are printed; the output is the figure quoted in the README (Durability).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "pyfront"))

from mfres.config import RunConfig
from mfres.store import writer as writer_mod
from mfres.train import run

WRITER_METHODS = ("__init__", "write_steps", "write_snapshot", "commit", "finish", "close")


def instrument() -> dict[str, float]:
    """Clock every public writer method (cumulative seconds, by name)."""
    clock: dict[str, float] = dict.fromkeys(WRITER_METHODS, 0.0)
    for name in WRITER_METHODS:
        fn = getattr(writer_mod.RunWriter, name)

        @functools.wraps(fn)
        def timed(*args, _fn=fn, _name=name, **kwargs):
            t0 = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                clock[_name] += time.perf_counter() - t0

        setattr(writer_mod.RunWriter, name, timed)
    return clock


def one_run(config: RunConfig, folder: str, clock: dict[str, float], fsync: bool) -> tuple[float, float, int]:
    for k in clock:
        clock[k] = 0.0
    path = os.path.join(folder, f"bench-{time.monotonic_ns()}.nc")
    real_fsync = os.fsync
    fsyncs = [0]

    def counted(fd: int) -> None:
        fsyncs[0] += 1
        if fsync:
            real_fsync(fd)

    os.fsync = counted
    try:
        t0 = time.perf_counter()
        run(config, path, warn=False)
        total = time.perf_counter() - t0
    finally:
        os.fsync = real_fsync
    return total, sum(clock.values()), fsyncs[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--dir", default=None, help="where to write the run files [default: a temporary folder]")
    args = ap.parse_args()
    config = RunConfig(steps=args.steps, backend="numpy")
    clock = instrument()
    rows = {True: [], False: []}
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        run(RunConfig(steps=20, backend="numpy"), os.path.join(folder, "warm.nc"), warn=False)
        for _ in range(args.repeats):
            for fsync in (True, False):
                rows[fsync].append(one_run(config, folder, clock, fsync))
    print(f"default run: L={config.depth} M={config.width} d=4 N=64, {config.steps} steps, NumPy backend, "
          f"{args.repeats} repeats, files in {args.dir or tempfile.gettempdir()}, "
          f"durable interval {writer_mod.DURABLE_SECONDS:g} s")
    for fsync, label in ((True, "durable (fsync)"), (False, "fsync disabled")):
        total = statistics.median(r[0] for r in rows[fsync])
        inside = statistics.median(r[1] for r in rows[fsync])
        share = statistics.median(r[1] / (r[0] - r[1]) for r in rows[fsync])
        print(f"{label:16s}: run {total:6.2f} s, in the writer {inside * 1e3:7.1f} ms "
              f"= {share:6.2%} of the rest, {rows[fsync][0][2]} fsync calls")
    d = statistics.median(r[0] for r in rows[True])
    n = statistics.median(r[0] for r in rows[False])
    print(f"durable vs fsync disabled, whole run: {d / n - 1:+.2%}")


if __name__ == "__main__":
    main()
