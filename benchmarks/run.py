"""The benchmark: every contender, same model and sizes, back to back; writes RESULTS.md.

    python benchmarks/run.py [--julia PATH] [--quick] [--repeats R] [--no-avx512]

Contenders (each measured in a fresh process, medians over repeats, 2 threads unless
named otherwise): the NumPy backend (2 threads, 1 thread, activations recomputed), the
Julia kernels with 1 and 2 threads (Julia from --julia, $MFRES_JULIA or PATH), and the
peers, PyTorch autograd (benchmarks/torch_peer.py) and JAX jit (benchmarks/jax_peer.py),
where installed (``pip install -e '.[bench]'``). Through the product: ``mfres simulate``
per step, start-up excluded by step-count differencing, for ``--backend numpy`` and
``--backend julia`` (skipped, with the reason, where Julia cannot run), and batched
seeds (``mfres sweep``) against separate runs. Also measured: the machine's dgemm rate,
the Julia activation's rate, float32 against float64. ``--no-avx512`` runs it all with every
contender kept to AVX2 code (``no_avx512_env``), for the figures of a CPU without AVX-512.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from contenders import SIZES  # noqa: E402

THREADS = 2
DEFAULT = (16, 64, 4, 64)  # mfres simulate's default L, M, d, N
# (n1, n2) GD steps for step-count differencing through the product, and the snapshot interval.
# The Julia start-up subtracted from each run (12-14 s as the runs report it) and the process's
# own start vary by a few tenths of a second: small takes 160000 steps between the two (~4 s;
# with 80000 three repeats gave 22.5, 27.1 and 33.4 µs a step), large 40 with a snapshot every
# 10 steps, as its 200-step split run has (with 10 steps and a snapshot every 2, 176, 262 and
# 226 ms a step against 139 for the kernels alone).
PRODUCT_STEPS = {"default": (500, 5500, 250), "small": (1000, 161000, 1000), "medium": (20, 320, 20),
                 "large": (10, 50, 10)}
# steps of one run for the in-run split of goal 4 (the default job's 2000 at the default size).
# A run's file costs grow with its snapshots (about 20 by default, 9 MB of weights each at
# large), not with its steps; large gets 200 steps (a snapshot every 10, 1-3 min per backend),
# where 40 steps put a snapshot at every other step, a schedule no one trains a large net with.
SPLIT_STEPS = {"default": 2000, "small": 20000, "medium": 600, "large": 200}


NO_AVX512_FLAG = "MFRES_BENCH_NO_AVX512"


def no_avx512_env() -> dict[str, str]:
    """The environment that keeps every contender to AVX2 code on a CPU with AVX-512, as on one
    without: NumPy's dispatch (its AVX-512 targets disabled), OpenBLAS's kernels (Haswell's),
    XLA's code generation, PyTorch's own kernels and its MKL and oneDNN, and the Julia child's
    code target (haswell; the executable transport, as juliacall takes no target)."""
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__ as dispatch
    except ImportError:  # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_dispatch__ as dispatch
    wide = [f for f in dispatch if f.startswith("AVX512") or f == "X86_V4"]
    return {NO_AVX512_FLAG: "1", "NPY_DISABLE_CPU_FEATURES": " ".join(wide), "OPENBLAS_CORETYPE": "Haswell",
            "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_max_isa=AVX2").strip(),
            "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "DNNL_MAX_CPU_ISA": "AVX2", "MFRES_JULIA_CPU_TARGET": "haswell", "MFRES_JULIA_TRANSPORT": "executable"}


class Skipped(Exception):
    """A contender that cannot run here; the message says why."""


def julia_command(julia: str, threads: int) -> tuple[list[str], dict[str, str]]:
    """``julia -t T`` as the product starts its Julia child (mfres.backends.julia_exe.julia_command:
    the same code generator's target and BLAS kernels), and its environment."""
    from mfres.backends.julia_exe import julia_command as product_command  # contenders put pyfront/ on sys.path

    return product_command(julia, ["-t", str(threads)])


def product_env(julia: str | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "pyfront")}
    if julia:
        env["MFRES_JULIA"] = julia
    return env


def contender(*args: str) -> dict | None:
    res = subprocess.run([sys.executable, str(HERE / "contenders.py"), *args], capture_output=True, text=True,
                         env=product_env(None))
    try:
        if res.returncode == 0:
            return json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):  # no JSON line: reported as a failure below
        pass
    print(f"contenders.py {' '.join(args)} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
    return None


def contender_seconds(*args: str) -> float | None:
    """``contender``'s seconds per step, or None where it failed."""
    r = contender(*args)
    return r and r["sec_per_step"]


def julia_run(julia: str, threads: int, size: str, dtype: str, steps: int, repeats: int) -> dict | None:
    L, M, d, N = SIZES[size]
    command, env = julia_command(julia, threads)
    res = subprocess.run([*command, f"--project={ROOT}",
                          str(HERE / "julia_bench.jl"), str(L), str(M), str(d), str(N), dtype, str(steps),
                          str(repeats)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        print(f"julia_bench.jl failed:\n{res.stderr[-2000:]}", file=sys.stderr)
        return None
    med, _, first, last, rss, kept = res.stdout.split()[-6:]
    return {"sec_per_step": float(med), "loss_first": float(first), "loss_last": float(last),
            "peak_bytes": int(rss), "kept_bytes": int(kept)}


def julia_activation_rate(julia: str, threads: int, n: int) -> float | None:
    command, env = julia_command(julia, threads)
    res = subprocess.run([*command, str(HERE / "julia_act_rate.jl"), str(n)], capture_output=True, text=True,
                         env=env)
    if res.returncode != 0:
        print(f"julia_act_rate.jl failed:\n{res.stderr[-2000:]}", file=sys.stderr)
        return None
    return float(res.stdout.split()[-1])


def matmul_peak(dtype: str, n: int = 2048) -> float:
    """GFLOP/s of NumPy's dense n×n matmul (best of 5), the machine's reachable peak."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(dtype)
    b = a.copy()
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * n**3 / best / 1e9


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def flops_per_step(L: int, M: int, d: int, N: int) -> float:
    return 12.0 * N * M * d * L


def limit_parts(size: str, dgemm_gflops: float, act_sec: float) -> tuple[float, float]:
    """Goal 2's machine limit of a step at ``size``, in seconds: the step's flops at the dgemm
    rate, and its N·M·L activations at ``act_sec`` each."""
    L, M, d, N = SIZES[size]
    return flops_per_step(L, M, d, N) / (dgemm_gflops * 1e9), N * M * L * act_sec


# --- through the product ----------------------------------------------------------------------


def _run_command(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds and stderr of one command; ``Skipped`` with its last error line if it fails."""
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        lines = res.stderr.strip().splitlines() or [f"exit code {res.returncode}"]
        raise Skipped(lines[-1])
    return seconds, res.stderr


def _timed_command(cmd: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one command, less the Julia start-up and compilation it reports (the
    kernels compile in the first chunk, in 30 s give or take a few: left in, that noise would
    swamp the step-count difference)."""
    seconds, err = _run_command(cmd, env)
    startup = re.search(r"Julia start-up and compilation: ([0-9.]+) s", err)
    return seconds - (float(startup.group(1)) if startup else 0.0)


def _simulate_cmd(backend: str, size: tuple[int, int, int, int], steps: int, every: int | None, out: str) -> list[str]:
    """``mfres simulate`` at ``size``; ``every = None``: the default snapshots (about 20 per run).
    Not --quiet: its summary says how long Julia took to start and where the time went."""
    L, M, d, N = size
    cmd = [sys.executable, "-m", "mfres.cli", "simulate", "-L", str(L), "-M", str(M), "-d", str(d), "-N", str(N),
           "--steps", str(steps), "--ds", "0.1", "--backend", backend, "--overwrite", "--out", out]
    return cmd + (["--snapshot-every", str(every)] if every is not None else [])


def _simulate_seconds(backend: str, size: tuple[int, int, int, int], steps: int, every: int | None, env: dict,
                      folder: str) -> float:
    return _timed_command(_simulate_cmd(backend, size, steps, every, os.path.join(folder, f"r{steps}.nc")), env)


def simulate_per_step(backend: str, size: tuple[int, int, int, int], key: str, env: dict, repeats: int,
                      schedule: tuple[int, int, int | None] | None = None, check: bool = True,
                      beside: Callable[[], float | None] | None = None) -> dict:
    """Seconds per step of ``mfres simulate`` by step-count differencing, (t(n2) − t(n1)) / (n2 − n1);
    ``schedule`` = (n1, n2, snapshot interval or None for the default), else ``PRODUCT_STEPS[key]``;
    ``check``: a one-step run first, which fails fast, with the reason, if the backend is unusable;
    ``beside``: a peer's seconds per step, measured once in each repeat, right after it (``beside``
    in the result, one figure per repeat, None where the peer failed)."""
    n1, n2, every = schedule or PRODUCT_STEPS[key]
    with tempfile.TemporaryDirectory() as folder:
        if check:
            _simulate_seconds(backend, size, 1, 1, env, folder)
        per, peer = [], []
        for _ in range(repeats):
            t1 = _simulate_seconds(backend, size, n1, every, env, folder)
            t2 = _simulate_seconds(backend, size, n2, every, env, folder)
            per.append((t2 - t1) / (n2 - n1))
            if beside is not None:
                peer.append(beside())
    out = {"sec_per_step": float(np.median(per)), "all": per, "steps": (n1, n2), "every": every}
    return {**out, "beside": peer} if beside is not None else out


def paired_ratio(peer: list[float | None], ours: list[float | None]) -> tuple[float | None, list[float]]:
    """The median over repeats of peer / ours, each pair measured back to back (the machine's drift
    over the minutes between repeats, up to 2x here, then reaches both alike), and the ratios."""
    ratios = [p / o for p, o in zip(peer, ours, strict=True) if (p or 0) > 0 and (o or 0) > 0]
    return (float(np.median(ratios)) if ratios else None), ratios


def peer_pairs(size: str, repeats: int) -> dict:
    """The NumPy backend alone and JAX jit at ``size``, ``repeats`` times in turn (fresh processes)."""
    out: dict[str, list[float | None]] = {"numpy": [], "jax": []}
    for _ in range(repeats):
        for name, args in (("numpy", ("--memory", "store", "--threads", str(THREADS))), ("jax", ())):
            out[name].append(contender_seconds(name, size, "float64", *args))
    return out


LIMIT_STEP_REPEATS = 3  # timings of the step in each pair of limit_pairs (their median)


def limit_pairs(julia: str, size: str, repeats: int, steps: int) -> list[dict]:
    """Goal 2, ``repeats`` times in turn: the dgemm rate (this process, NumPy's BLAS), the Julia
    kernels' activation rate and their step at ``size`` (fresh processes), back to back, so each
    step is set against the limit the machine had at that moment."""
    _, M, _, N = SIZES[size]
    out = []
    for _ in range(repeats):
        peak = matmul_peak("float64")
        act = julia_activation_rate(julia, THREADS, N * M)
        step = julia_run(julia, THREADS, size, "float64", steps, LIMIT_STEP_REPEATS)
        out.append({"dgemm_gflops": peak, "act_sec": act, "sec_per_step": step and step["sec_per_step"]})
    return out


def simulate_split(backend: str, size: tuple[int, int, int, int], key: str, env: dict, repeats: int) -> dict:
    """Goal 4, within one run: `mfres simulate` (default snapshots, ``SPLIT_STEPS[key]`` steps)
    reports the seconds it spent stepping in the backend and the rest (loop, snapshots, file);
    both come from the same run, so no drift of the machine between two processes enters the
    fraction. Median over repeats."""
    steps = SPLIT_STEPS[key]
    fractions, stepping = [], []
    with tempfile.TemporaryDirectory() as folder:
        cmd = _simulate_cmd(backend, size, steps, None, os.path.join(folder, "split.nc"))
        for _ in range(repeats):
            _, err = _run_command(cmd, env)
            m = re.search(r"time: ([0-9.e+-]+) s stepping in the backend, ([0-9.e+-]+) s in the loop", err)
            if m is None:
                raise Skipped("mfres simulate did not report its time split")
            stepping.append(float(m.group(1)))
            fractions.append(float(m.group(2)) / float(m.group(1)))
    return {"overhead": float(np.median(fractions)), "all": fractions, "stepping_s": float(np.median(stepping)),
            "steps": steps}


def _sweep_seconds(seeds: int, steps: int, env: dict, folder: str, separate: bool, backend: str | None) -> float:
    L, M, d, N = SIZES["small"]
    out = os.path.join(folder, f"s{steps}{separate}.nc")
    cmd = [sys.executable, "-m", "mfres.cli", "sweep", "-L", str(L), "-M", str(M), "-d", str(d), "-N", str(N),
           "--seeds", str(seeds), "--steps", str(steps), "--ds", "0.1", "--out", out]
    # (not --quiet: the sweep says how long its worker spent starting Julia, which _timed_command subtracts)
    if backend:
        cmd += ["--backend", backend]
    if separate:
        cmd += ["--keep-runs", os.path.join(folder, f"runs{steps}")]
    if os.path.exists(out):
        os.remove(out)
    seconds = _timed_command(cmd, env)
    shutil.rmtree(os.path.join(folder, f"runs{steps}"), ignore_errors=True)
    return seconds


def sweep_throughput(seeds: int, env: dict, repeats: int, backend: str | None) -> dict:
    """Seconds per net-step of ``mfres sweep`` over ``seeds`` seeds at the small size, batched
    (one call advances all seeds) and separate (``--keep-runs``: one run, one file per seed):
    by step-count differencing (``batched``, ``separate``: the steps alone), and whole sweeps
    of n2 steps (``batched_whole``, ``separate_whole``: with each run's own file, as a user's
    separate runs pay it, and the sweep's fixed start of Python and its imports, the same in
    both, which pulls that ratio towards 1), the Julia start-up and compilation the sweep
    reports subtracted from both. The sweep places its one grid point as a user's command
    without ``--workers`` does (``mfres.sweep.placement``: in the mfres process)."""
    # enough steps between the two that the difference (~10-20 s of 16 small nets) stands above the
    # seconds by which two processes' start-ups differ (with 400 NumPy steps it once came out negative)
    n1, n2 = (100, 40100) if backend == "julia" else (100, 2100)
    out: dict = {}
    with tempfile.TemporaryDirectory() as folder:
        for mode, separate in (("batched", False), ("separate", True)):
            per, whole = [], []
            for _ in range(repeats):
                t1 = _sweep_seconds(seeds, n1, env, folder, separate, backend)
                t2 = _sweep_seconds(seeds, n2, env, folder, separate, backend)
                per.append((t2 - t1) / (n2 - n1) / seeds)
                whole.append(t2 / n2 / seeds)
            out[mode] = float(np.median(per))
            out[mode + "_whole"] = float(np.median(whole))
    out["steps"] = [n1, n2]
    return out


# --- the machine --------------------------------------------------------------------------------

def cpu_description() -> dict:
    info = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                info["model"] = value.strip()
            if key.strip() == "Flags":
                info["flags"] = [f for f in value.split() if f == "avx2" or f == "fma" or f.startswith("avx512")]
    except OSError:
        pass
    return info


def blas_description() -> str:
    try:
        from threadpoolctl import threadpool_info

        libs = [f"{i['internal_api']} {i['version']} ({i.get('architecture', '?')} kernels, "
                f"{i['num_threads']} threads)" for i in threadpool_info() if i["user_api"] == "blas"]
        desc = ", ".join(libs) or "none found"
    except ImportError:
        desc = "unknown (threadpoolctl missing)"
    if os.environ.get("OPENBLAS_CORETYPE"):
        desc += f"; OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']}"
    return desc


def isa_note() -> str:
    """What --no-avx512 limited, as measured in this process (NumPy's tanh loop) and set for the others."""
    if not os.environ.get(NO_AVX512_FLAG):
        return ""
    try:
        from numpy.lib.introspect import opt_func_info

        tanh = next(iter(opt_func_info(func_name="^tanh$", signature="float64")["tanh"].values()))["current"]
    except (ImportError, KeyError, StopIteration):  # NumPy 1.x
        tanh = "?"
    env = {k: os.environ.get(k, "(unset)") for k in no_avx512_env()}
    return (f"AVX-512 disabled in every contender, as on a CPU without it (emulated on this one): NumPy dispatch "
            f"without {env['NPY_DISABLE_CPU_FEATURES']} (its float64 tanh loop here: {tanh}), "
            f"OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']}, XLA_FLAGS={env['XLA_FLAGS']}, PyTorch with "
            f"ATEN_CPU_CAPABILITY={env['ATEN_CPU_CAPABILITY']}, MKL_ENABLE_INSTRUCTIONS="
            f"{env['MKL_ENABLE_INSTRUCTIONS']} and ONEDNN_MAX_CPU_ISA={env['ONEDNN_MAX_CPU_ISA']}, Julia through "
            f"the executable with -C {env['MFRES_JULIA_CPU_TARGET']}. Cache sizes and clock are this CPU's, not "
            "an AVX2-only one's.")


def load() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "?"


def find_julia(given: str | None) -> str | None:
    return given or os.environ.get("MFRES_JULIA") or shutil.which("julia")


def have(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:
        return False


def version_of(module: str) -> str:
    res = subprocess.run([sys.executable, "-c", f"import {module}; print({module}.__version__)"],
                         capture_output=True, text=True)
    return res.stdout.strip() or "?"


def fmt_ms(x: float | None) -> str:
    return "–" if x is None else f"{x * 1e3:.3g}"


def fmt_mb(x: float | None) -> str:
    return "–" if x is None else f"{x / 2**20:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None else f"{a / b:.2f}×"


def get(r: dict, key: str, field: str = "sec_per_step"):
    v = r.get(key)
    return None if not isinstance(v, dict) else v.get(field)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--julia", default=None)
    p.add_argument("--quick", action="store_true", help="small and medium sizes only, one repeat through the product")
    p.add_argument("--repeats", type=int, default=3, help="repeats through the product (medians)")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    p.add_argument("--from-json", default=None, help="only rewrite --out from a saved results.json")
    p.add_argument("--no-avx512", action="store_true",
                   help="keep every contender to AVX2 code (a CPU without AVX-512, emulated); default --out "
                        "RESULTS-no-avx512.md")
    a = p.parse_args()
    if a.no_avx512 and not os.environ.get(NO_AVX512_FLAG):  # again, with this process's NumPy limited too
        if not {"avx2", "fma"} <= set(cpu_description()["flags"]):
            sys.exit("--no-avx512 keeps the contenders to AVX2 and FMA code, which this CPU lacks")
        argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
        if a.out == str(HERE / "RESULTS.md"):
            argv += ["--out", str(HERE / "RESULTS-no-avx512.md")]
        os.execve(sys.executable, argv, {**os.environ, **no_avx512_env()})
    if a.from_json:
        res = load_saved(a.from_json)
        out = HERE / "RESULTS-no-avx512.md" if res.get("isa") and a.out == str(HERE / "RESULTS.md") else a.out
        write_results(str(out), res, res["sizes"])
        return
    julia = find_julia(a.julia)
    peers = [name for name, mod in (("torch", "torch"), ("jax", "jax")) if have(mod)]
    sizes = ["small", "medium"] if a.quick else ["small", "medium", "large"]
    repeats = 1 if a.quick else a.repeats
    sched = {"small": (100, 3), "medium": (10, 3), "large": (2, 3)}
    started = time.time()
    res: dict = {"load_start": load(), "cpu": cpu_description(), "blas": blas_description(), "isa": isa_note(),
                 "peaks": {t: matmul_peak(t) for t in ("float64", "float32")}, "rows": [], "product": {}, "split": {},
                 "skipped": {}, "versions": {m: version_of(m) for m in peers}}
    res["versions"]["julia"] = (subprocess.run([julia, "--version"], capture_output=True, text=True).stdout.strip()
                                if julia else "not found")
    for size in sizes:
        for dtype in ("float64", "float32"):
            print(f"{size} {dtype} ...", file=sys.stderr, flush=True)
            r: dict = {"size": size, "dtype": dtype}
            r["numpy"] = contender("numpy", size, dtype, "--memory", "store", "--threads", str(THREADS))
            if dtype == "float64":
                r["numpy1"] = contender("numpy", size, dtype, "--memory", "store", "--threads", "1")
                r["numpy_re"] = contender("numpy", size, dtype, "--memory", "recompute", "--threads", str(THREADS))
            if julia:
                steps, reps = sched[size]
                if dtype == "float64":
                    r["julia1"] = julia_run(julia, 1, size, dtype, steps, reps)
                r["julia2"] = julia_run(julia, THREADS, size, dtype, steps, reps)
            if dtype == "float64":
                if "torch" in peers:
                    r["torch"] = contender("pytorch", size, dtype)
                if "jax" in peers:
                    r["jax"] = contender("jax", size, dtype)
            res["rows"].append(r)
    # goal 3, the backend alone: NumPy and JAX in turn, paired by repeat
    res["pairs"] = {size: peer_pairs(size, repeats) for size in sizes if size != "small" and "jax" in peers}
    # through the product
    env = product_env(julia)
    product_sizes = [("default", DEFAULT)] + [(s, SIZES[s]) for s in sizes]
    for backend in ("numpy", "julia"):
        for key, size in product_sizes:
            print(f"mfres simulate --backend {backend}, {key} ...", file=sys.stderr, flush=True)
            jax_beside = None
            if "jax" in peers and key in SIZES:
                def jax_beside(size_key: str = key) -> float | None:
                    return contender_seconds("jax", size_key, "float64")
            try:
                res["product"][(backend, key)] = simulate_per_step(backend, size, key, env, repeats,
                                                                   beside=jax_beside)
                res["split"][(backend, key)] = simulate_split(backend, size, key, env, repeats)
            except (Skipped, subprocess.TimeoutExpired) as e:
                res["skipped"][f"mfres simulate --backend {backend}"] = str(e)
                break
    # the backend alone at the default size (the other sizes are in the contender rows)
    res["numpy_default"] = contender("numpy", "default", "float64", "--threads", str(THREADS))
    # goal 2: the Julia machine limit
    if julia:
        _, M, _, N = SIZES[sizes[-1]]
        res["julia_act"] = julia_activation_rate(julia, THREADS, N * M)
        res["limit_pairs"] = limit_pairs(julia, sizes[-1], repeats, sched[sizes[-1]][0])
    # goal 5: many small runs
    res["batched_numpy"] = {"single": contender("numpy", "small", "float64"),
                            **{B: contender("numpy", "small", "float64", "--batch", str(B)) for B in (16, 64)}}
    res["sweeps"] = {}
    res["sweep_placement"] = "placed as without `--workers` (one task: in the mfres process, no Dask cluster)"
    julia_ok = any(b == "julia" for b, _ in res["product"])
    if not julia_ok:
        res["skipped"]["mfres sweep --backend julia"] = "Julia does not run through the product here (above)"
    for backend in (None, "julia") if julia_ok else (None,):
        print(f"mfres sweep {backend or ''} batched vs separate ...", file=sys.stderr, flush=True)
        try:
            res["sweeps"][backend or "default"] = sweep_throughput(16, env, repeats, backend)
        except (Skipped, subprocess.TimeoutExpired) as e:
            res["skipped"][f"mfres sweep --backend {backend or '(default)'}"] = str(e)
    res["profiles"] = numpy_profiles(sizes)
    res["load_end"] = load()
    res["seconds"] = time.time() - started
    res["finished"] = f"{dt.datetime.now():%Y-%m-%d %H:%M}"
    res["sizes"] = sizes
    save(res, HERE / ("results-no-avx512.json" if os.environ.get(NO_AVX512_FLAG) else "results.json"))
    write_results(a.out, res, sizes)
    print(f"wrote {a.out}", file=sys.stderr)


def save(res: dict, path: Path) -> None:
    """The raw measurements (``--from-json`` rewrites RESULTS.md from them)."""
    out = {**res, "product": [[b, k, v] for (b, k), v in res["product"].items()],
           "split": [[b, k, v] for (b, k), v in res.get("split", {}).items()],
           "batched_numpy": {str(k): v for k, v in res["batched_numpy"].items()}}
    path.write_text(json.dumps(out, indent=1))


def load_saved(path: str) -> dict:
    res = json.loads(Path(path).read_text())
    res["product"] = {(b, k): v for b, k, v in res["product"]}
    res["split"] = {(b, k): v for b, k, v in res.get("split", [])}
    res["batched_numpy"] = {(k if k == "single" else int(k)): v for k, v in res["batched_numpy"].items()}
    return res


def write_results(path: str, res: dict, sizes: list[str]) -> None:
    rows, peaks, prod = res["rows"], res["peaks"], res["product"]
    cpu = res["cpu"]
    avx512 = [f for f in cpu["flags"] if f.startswith("avx512")]
    vers = res["versions"]
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `python benchmarks/run.py{' --no-avx512' if res.get('isa') else ''}` on "
        f"{res.get('finished') or dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, in {res['seconds']:.0f} s.",
        "",
        f"- CPU: {cpu['model']}, {os.cpu_count()} cores; vector extensions: "
        f"{' '.join(cpu['flags']) or 'none listed'}{'' if avx512 else ' (no AVX-512)'}.",
        f"- NumPy {np.__version__}, BLAS: {res['blas']}.",
        *([f"- {res['isa']}"] if res.get("isa") else []),
        f"- Measured dgemm rate (dense 2048×2048 through NumPy's BLAS, best of 5): {peaks['float64']:.1f} GFLOP/s "
        f"float64, {peaks['float32']:.1f} GFLOP/s float32.",
        f"- Python {platform.python_version()}, {vers.get('julia')}, PyTorch {vers.get('torch', 'not installed')}, "
        f"JAX {vers.get('jax', 'not installed')} (float64 enabled).",
        (f"- The machine's 2 cores were shared with other work while this ran (load average "
         f"{res['load_start']} at the start, {res['load_end']} at the end, 1/5/15 min): absolute times are "
         "inflated and noisy; every figure is a median over repeats, each contender in a fresh process, "
         "and the contenders of one row ran back to back, so their ratios are the figures to read."
         if busy(res) else
         f"- The machine was quiet while this ran (load average {res['load_start']} at the start, "
         f"{res['load_end']} at the end, 1/5/15 min; about 1 is this benchmark itself); every figure is a "
         "median over repeats, each contender in a fresh process, the contenders of one row back to back."),
        "",
        f"Model: docs/model.md with tanh, GD steps of Δs = 0.1, {THREADS} threads for every contender unless said "
        "otherwise. Sizes (L, M, d, N): "
        + "; ".join(f"{k} {v}" for k, v in SIZES.items() if k != "default") + f"; default {DEFAULT}.",
        "",
        "## Milliseconds per GD step (E, ∇E and the update), float64",
        "",
        "| size | NumPy | NumPy 1 thread | NumPy recompute | Julia kernels 1 thread | Julia kernels 2 threads "
        "| PyTorch | JAX jit | JAX / NumPy | JAX / Julia | % dgemm peak NumPy | % dgemm peak Julia "
        "| CPU ms per step NumPy / JAX |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["dtype"] != "float64":
            continue
        npy, jl2, jx = get(r, "numpy"), get(r, "julia2"), get(r, "jax")
        fl = flops_per_step(*SIZES[r["size"]]) / 1e9
        pk = peaks["float64"]
        lines.append(
            f"| {r['size']} | {fmt_ms(npy)} | {fmt_ms(get(r, 'numpy1'))} | {fmt_ms(get(r, 'numpy_re'))} | "
            f"{fmt_ms(get(r, 'julia1'))} | {fmt_ms(jl2)} | {fmt_ms(get(r, 'torch'))} | {fmt_ms(jx)} | "
            f"{ratio(jx, npy)} | {ratio(jx, jl2)} | "
            + (f"{100 * fl / npy / pk:.1f}" if npy else "–") + " | "
            + (f"{100 * fl / jl2 / pk:.1f} |" if jl2 else "– |")
            + f" {fmt_ms(get(r, 'numpy', 'cpu_per_step'))} / {fmt_ms(get(r, 'jax', 'cpu_per_step'))} |")
    lines += ["", "CPU ms per step: CPU time of all the contender's threads per step (a measure of work that "
              "the other processes on the machine inflate less than the wall-clock time).", "",
              "Correctness of the peers (E and ∇E at the initial θ against mfres's NumPy backend, relative: "
              "|ΔE|/|E|, max |Δ∇E| / max |∇E|):", ""]
    for r in rows:
        for peer in ("jax",):
            chk = get(r, peer, "check")
            if chk:
                lines.append(f"- {peer} at {r['size']}: E {chk['loss_rel']:.1e}, ∇E {chk['grad_rel']:.1e}")
        t, n = get(r, "torch", "loss_last"), get(r, "numpy", "loss_last")
        if t is not None and n is not None and r["dtype"] == "float64":
            lines.append(f"- torch at {r['size']}: E after the timed steps {abs(t - n) / abs(n):.1e} from NumPy's")

    lines += ["", "## float32 (ms per GD step)", "", "| size | NumPy float32 | NumPy float64 | speed-up | "
              "Julia 2 threads float32 | Julia float64 | speed-up |", "|---|---|---|---|---|---|---|"]
    by = {(r["size"], r["dtype"]): r for r in rows}
    for size in sizes:
        r32, r64 = by.get((size, "float32"), {}), by.get((size, "float64"), {})
        lines.append(f"| {size} | {fmt_ms(get(r32, 'numpy'))} | {fmt_ms(get(r64, 'numpy'))} | "
                     f"{ratio(get(r64, 'numpy'), get(r32, 'numpy'))} | {fmt_ms(get(r32, 'julia2'))} | "
                     f"{fmt_ms(get(r64, 'julia2'))} | {ratio(get(r64, 'julia2'), get(r32, 'julia2'))} |")

    split = res.get("split", {})
    lines += ["", "## Through the product: `mfres simulate`, ms per step", "",
              "Start-up (Python, imports, Julia's start and compilation, the first file writes) is excluded by "
              "step-count differencing: (t(n2) − t(n1)) / (n2 − n1) of two whole `mfres simulate` commands with "
              "the same snapshot interval; medians over repeats. 'backend alone' is `NumpyBackend.advance` in a "
              "fresh process (the table above). The loop and file overhead is what `mfres simulate` itself "
              "reports at the end of a run with its default snapshots (`time: … s stepping in the backend, "
              "… s in the loop, snapshots and file`, steps in the column's header), as a fraction of the "
              "stepping, median over repeats: both times come from one process, so the machine's drift "
              "between processes (±10 % here) does not enter it. JAX jit ran once in each repeat of each "
              "backend, right after it (a fresh process): its column is the median of those runs, and the "
              "ratios are medians of the per-repeat ratios, each from a pair measured back to back.", "",
              "| size | steps n1, n2 (snapshot every) | `--backend numpy` | NumPy backend alone | "
              "`--backend julia` | JAX jit | JAX / `--backend numpy` | JAX / `--backend julia` | "
              "overhead numpy, julia (steps) |",
              "|---|---|---|---|---|---|---|---|---|"]
    alone = {"default": get(res, "numpy_default")} | {r["size"]: get(r, "numpy") for r in rows
                                                      if r["dtype"] == "float64"}
    jax_ms = {r["size"]: get(r, "jax") for r in rows if r["dtype"] == "float64"}
    overheads = {(b, k): v["overhead"] for (b, k), v in split.items()}
    for key in ["default", *sizes]:
        pn, pj = prod.get(("numpy", key)), prod.get(("julia", key))
        base = alone.get(key)
        steps = pn or pj
        lines.append(f"| {key} | {steps['steps'][0]}, {steps['steps'][1]} ({steps['every']}) | " if steps else
                     f"| {key} | – | ")
        ov = [overheads.get((b, key)) for b in ("numpy", "julia")]
        sp = split.get(("numpy", key)) or split.get(("julia", key))
        peer = [x for e in (pn, pj) if e for x in e.get("beside", []) if x]
        jx = float(np.median(peer)) if peer else jax_ms.get(key)
        lines[-1] += (f"{fmt_ms(pn and pn['sec_per_step'])} | {fmt_ms(base)} | "
                      f"{fmt_ms(pj and pj['sec_per_step'])} | {fmt_ms(jx)} | "
                      f"{product_ratio(pn, jax_ms.get(key))[1]} | {product_ratio(pj, jax_ms.get(key))[1]} | "
                      + ", ".join("–" if v is None else f"{100 * v:.1f} %" for v in ov)
                      + (f" ({sp['steps']})" if sp else "") + " |")
    for what, why in res["skipped"].items():
        lines.append(f"\n`{what}` was not measured: {why}")

    # goal 2
    big = sizes[-1]
    rb = by.get((big, "float64"), {})
    jl2 = get(rb, "julia2")
    act = res.get("julia_act")
    limit = None
    lines += ["", f"## The Julia step against the machine limit ({big} size, float64)", ""]
    if jl2 and act:
        t_flops, t_act = limit_parts(big, peaks["float64"], act)
        limit = t_flops + t_act
        lines += [f"Limit = 12·N·M·d·L flops at the measured dgemm rate ({fmt_ms(t_flops)} ms) + N·M·L "
                  f"activations at the Julia kernels' own rate of {act * 1e9:.2f} ns per element on {THREADS} "
                  f"threads ({fmt_ms(t_act)} ms) = {fmt_ms(limit)} ms. The Julia kernels' step: {fmt_ms(jl2)} ms, "
                  f"{jl2 / limit:.2f}× the limit."]
    else:
        lines.append("Not measured (no Julia).")
    lpairs = [p for p in res.get("limit_pairs") or [] if p.get("act_sec") and p.get("sec_per_step")]
    limit_ratio = None if limit is None or jl2 is None else jl2 / limit
    if lpairs:
        lines += ["", "The same, measured in turn (this machine's speed drifts between minutes, and the "
                  "dgemm rate above was taken at the start of the run): each row the dgemm rate, the "
                  f"activation rate and the step (median of {LIMIT_STEP_REPEATS}) back to back.", "",
                  "| pair | dgemm GFLOP/s | ns per activation | limit ms | step ms | step / limit |",
                  "|---|---|---|---|---|---|"]
        ratios = []
        for i, p in enumerate(lpairs, 1):
            lim = sum(limit_parts(big, p["dgemm_gflops"], p["act_sec"]))
            ratios.append(p["sec_per_step"] / lim)
            lines.append(f"| {i} | {p['dgemm_gflops']:.1f} | {p['act_sec'] * 1e9:.2f} | {fmt_ms(lim)} | "
                         f"{fmt_ms(p['sec_per_step'])} | {ratios[-1]:.2f}× |")
        limit_ratio = float(np.median(ratios))
        lines += ["", f"Median of the pairs: {limit_ratio:.2f}× the limit."]

    # goal 5
    bn = res["batched_numpy"]
    lines += ["", "## Many small runs (small size, float64)", "",
              "A batch of nets in one backend call (NumPy backend alone):", "",
              "| runs per call | ms per call-step | ms per net-step | throughput vs separate runs |",
              "|---|---|---|---|"]
    single = get(bn, "single")
    best_batch = None
    if single:
        lines.append(f"| 1 (separate runs) | {fmt_ms(single)} | {fmt_ms(single)} | 1.00× |")
        for B in (16, 64):
            if get(bn, B):
                per = get(bn, B) / B
                best_batch = max(best_batch or 0, single / per)
                lines.append(f"| {B} | {fmt_ms(get(bn, B))} | {fmt_ms(per)} | {single / per:.2f}× |")
    placed = res.get("sweep_placement", "one Dask worker (`--workers 1`)")
    lines += ["", f"Through the product (medians over repeats): `mfres sweep` over 16 seeds at one grid point, "
              f"{placed}, batched (the default) against "
              "`--keep-runs` (one run and one run file per seed), ms per net-step: the steps alone by step-count "
              "differencing (t(n2) − t(n1)) / (n2 − n1), and whole sweeps of n2 steps t(n2) / n2 (with the files "
              "that separate runs each write, and the sweep's fixed start of Python and its imports); the Julia "
              "start-up and compilation the sweep reports is subtracted from every t.", "",
              "| sweep | steps n1, n2 | batched | separate | ratio | whole: batched | separate | ratio |",
              "|---|---|---|---|---|---|---|---|"]
    for name, sw in res["sweeps"].items():
        label = "numpy (the sweep's backend)" if name == "default" else name
        n1, n2 = sw.get("steps", (100, 500))  # older results.json: 100, 500 for every sweep
        bw, spw = sw.get("batched_whole"), sw.get("separate_whole")
        lines.append(f"| `--backend {label}` | {n1}, {n2} | {fmt_ms(sw['batched'])} | {fmt_ms(sw['separate'])} | "
                     f"{sw['separate'] / sw['batched']:.2f}× | {fmt_ms(bw)} | {fmt_ms(spw)} | {ratio(spw, bw)} |")

    # memory
    lines += ["", "## Memory (MiB): peak resident memory above the baseline, against the arrays kept", "",
              "The NumPy baseline is taken once the inputs exist; Julia's once its code is compiled (on a tiny "
              "problem). 'kept' is θ plus the workspace: for 'store' the L·N·M activations σ(q), σ'(q); for "
              "'recompute' the L·N·d states and adjoints and one layer.", "",
              "| size | NumPy peak | NumPy kept | ratio | recompute peak | recompute kept | ratio | "
              "recompute / store time | Julia 2 threads | Julia kept | JAX peak | PyTorch peak |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["dtype"] != "float64" or not r.get("numpy") or not r.get("numpy_re"):
            continue
        n, re_ = r["numpy"], r["numpy_re"]
        lines.append(
            f"| {r['size']} | {fmt_mb(n['peak_bytes'])} | {fmt_mb(n['kept_bytes'])} | "
            f"{n['peak_bytes'] / n['kept_bytes']:.2f} | {fmt_mb(re_['peak_bytes'])} | {fmt_mb(re_['kept_bytes'])} | "
            f"{re_['peak_bytes'] / re_['kept_bytes']:.2f} | {ratio(re_['sec_per_step'], n['sec_per_step'])} | "
            f"{fmt_mb(get(r, 'julia2', 'peak_bytes'))} | {fmt_mb(get(r, 'julia2', 'kept_bytes'))} | "
            f"{fmt_mb(get(r, 'jax', 'peak_bytes'))} | {fmt_mb(get(r, 'torch', 'peak_bytes'))} |")

    lines += ["", "## Targets (issue 13), from this run", ""]
    pairs_note = (f", median of {len(lpairs)} pairs measured in turn" if lpairs else
                  ", against the dgemm rate taken at the start of the run" if limit_ratio is not None else "")
    lines += targets(by, prod, overheads, limit_ratio, res["sweeps"], best_batch, sizes, res.get("pairs"), pairs_note)
    lines += ["", "## Where the NumPy step's time goes", "", PROFILE_TEXT, ""]
    profiles = res.get("profiles") or numpy_profiles(sizes)
    for size in [s for s in sizes if s != "small"]:
        lines += ["```", profiles[size], "```", ""]
    Path(path).write_text("\n".join(lines) + "\n")


def numpy_profiles(sizes: list[str]) -> dict[str, str]:
    """benchmarks/profile_numpy.py's table at each size but small (a fresh process each)."""
    out = {}
    for size in [s for s in sizes if s != "small"]:
        prof = subprocess.run([sys.executable, str(HERE / "profile_numpy.py"), size, "float64"], capture_output=True,
                              text=True, env=product_env(None))
        out[size] = (prof.stdout or prof.stderr[-1500:]).strip()
    return out


PROFILE_TEXT = """\
`python benchmarks/profile_numpy.py SIZE` times each operation of one layer alone, on one
thread, times L, as the backend runs it: per sample block (`activations.CHUNK` elements
of N·M), the products with the d + 1 wide state and the activation in the block's
cache, then the two parameter-gradient products over all N samples per layer. Every
product has one dimension of only d + 1: BLAS runs these skinny shapes far below its
dense peak. The activation is mfres's own float64 tanh (a table and a [3/2] Padé
approximant, 17 NumPy passes on a block in cache) where NumPy's `np.tanh` is not
vectorised, else NumPy's; the line marked "not used" shows what the other would cost."""


def busy(res: dict) -> bool:
    """Whether other work shared the machine: a 1-minute load average above 1.5 at either end."""
    def first(load: object) -> float:
        try:
            return float(str(load).split()[0])
        except (ValueError, IndexError):
            return float("inf")
    return max(first(res.get("load_start")), first(res.get("load_end"))) > 1.5


def product_ratio(entry: dict | None, jax_row: float | None) -> tuple[float | None, str]:
    """JAX / `mfres simulate` for one product entry: the median of the per-repeat ratios where JAX ran
    beside each repeat, else the JAX row's figure over the product's median; and how to print it."""
    if not entry:
        return None, "–"
    med, ratios = paired_ratio(entry.get("beside") or [None] * len(entry["all"]), entry["all"])
    if med is not None:
        return med, f"{med:.2f}× (repeats {', '.join(f'{x:.2f}' for x in ratios)})"
    ours = entry["sec_per_step"]
    return (jax_row / ours if jax_row and ours else None), ratio(jax_row, ours)


def targets(by: dict, prod: dict, overheads: dict, limit_ratio: float | None, sweeps: dict,
            best_batch: float | None, sizes: list[str], pairs: dict | None = None, pairs_note: str = "") -> list[str]:
    out = []
    pairs = pairs or {}

    def check(ok: bool | None, text: str) -> None:
        mark = "not measured" if ok is None else ("met" if ok else "NOT met")
        out.append(f"- {text}: **{mark}**")

    for size, need in (("small", 3.0), ("medium", 2.0), ("large", 2.0)):
        if size not in sizes:
            continue
        r, text = product_ratio(prod.get(("julia", size)), get(by.get((size, "float64"), {}), "jax"))
        check(None if r is None else r >= need,
              f"1. `mfres simulate --backend julia` ≥ {need:g}× JAX jit at {size} ({text})")
    check(None if limit_ratio is None else limit_ratio <= 2,
          "2. Julia step within 2× of the machine limit at large"
          + ("" if limit_ratio is None else f" ({limit_ratio:.2f}× the limit{pairs_note})"))
    for size in ("medium", "large"):
        if size not in sizes:
            continue
        row = by.get((size, "float64"), {})
        jx, n = get(row, "jax"), get(row, "numpy")
        if size in pairs:  # NumPy and JAX in turn, paired by repeat
            med, ratios = paired_ratio(pairs[size]["jax"], pairs[size]["numpy"])
            text = "–" if med is None else (f"JAX / NumPy {med:.2f}×, median of {len(ratios)} pairs run in "
                                            f"turn: {', '.join(f'{x:.2f}' for x in ratios)}")
        else:
            med, text = (jx / n if jx and n else None), f"JAX / NumPy {ratio(jx, n)}"
        check(None if med is None else med >= 1, f"3. NumPy backend at least as fast as JAX jit at {size} ({text})")
        r, text = product_ratio(prod.get(("numpy", size)), jx)
        check(None if r is None else r >= 1,
              f"3. `mfres simulate --backend numpy` at least as fast as JAX jit at {size} ({text})")
    known = {k: v for k, v in overheads.items() if v is not None and k[1] != "small"}
    worst = max(known.values()) if known else None
    check(None if worst is None else worst < 0.05,
          "4. loop and file overhead of `mfres simulate` < 5 % of the backend's stepping, default size and above"
          + ("" if worst is None else " (" + ", ".join(f"{b} {k} {100 * v:.1f} %" for (b, k), v in known.items())
                                         + ")"))
    jsw = sweeps.get("julia")
    check(None if jsw is None else jsw["separate"] / jsw["batched"] >= 3,
          "5. batched seeds on Julia ≥ 3× the throughput of separate runs, the steps alone"
          + ("" if jsw is None else f" ({jsw['separate'] / jsw['batched']:.2f}×)"))
    whole = jsw and jsw.get("batched_whole") and jsw["separate_whole"] / jsw["batched_whole"]
    check(None if not whole else whole >= 3,
          "5. batched seeds on Julia ≥ 3× the throughput of separate runs, whole sweeps"
          + ("" if not whole else f" ({whole:.2f}×)"))
    dsw = sweeps.get("default")
    check(None if dsw is None else dsw["separate"] / dsw["batched"] >= 3,
          "5. (NumPy) batched seeds through `mfres sweep` ≥ 3× separate runs"
          + ("" if dsw is None else f" ({dsw['separate'] / dsw['batched']:.2f}×)"))
    check(None if best_batch is None else best_batch >= 3,
          "5. (NumPy) a batch of nets in one backend call ≥ 3× separate calls"
          + ("" if best_batch is None else f" ({best_batch:.2f}×)"))
    return out


if __name__ == "__main__":
    main()
