"""The Julia kernels: their own suite (2 threads, against a 1-thread process), conformance with the NumPy
backend, `fatou lint`, the wheel that carries them; and the executable transport (a Julia
child process): conformance, errors, a dead child, no orphans, the CLI, Ctrl-C, sweeps."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import ACTIVATIONS, JULIA, ROOT
from reference import autograd_loss_and_grad

from mfres import activations
from mfres.backends import Problem
from mfres.backends.julia_exe import JuliaExeBackend
from mfres.backends.numpy_backend import NumpyBackend
from mfres.data import builtin
from mfres.errors import BackendError
from mfres.init import initial_particles
from mfres.model import Particles

CASES = [
    # name, L, M, d, N, activation, init, weight decay, Δs, steps, dtype
    ("tanh-iid", 8, 16, 4, 32, "tanh", "iid", 0.0, 1.0, 40, "float64"),
    ("sigmoid-tied", 5, 12, 3, 20, "sigmoid", "tied", 0.01, 0.5, 30, "float64"),
    ("softplus-smooth", 6, 10, 2, 16, "softplus", "smooth", 0.0, 0.5, 30, "float64"),
    ("gelu-iid-wd", 4, 24, 5, 40, "gelu", "iid", 0.1, 0.3, 30, "float64"),
    ("srelu-smooth", 7, 9, 3, 25, "srelu:0.3", "smooth", 0.0, 0.5, 30, "float64"),
    ("relu2-iid", 3, 8, 2, 12, "relu2", "iid", 0.05, 0.02, 30, "float64"),
    ("tanh-float32", 8, 16, 4, 32, "tanh", "iid", 0.0, 1.0, 40, "float32"),
]


def write_case(root: Path, name: str, L: int, M: int, d: int, N: int, act: str, init: str, wd: float,
               ds: float, steps: int, dtype: str) -> None:
    """Inputs and the NumPy backend's results, as raw bytes in Julia's column-major layouts
    (the bytes of C-order (L, M, d) arrays), which is the bridge's own conversion."""
    case = root / name
    case.mkdir()
    data = builtin("sphere", N, d, data_seed=1)
    dt = np.dtype(dtype)
    theta = initial_particles(init, L, M, d, seed=2, dtype=dt)
    prob = Problem.from_data(data, activations.parse(act), wd, dt)
    backend = NumpyBackend()
    E, g = backend.loss_and_grad(theta, prob)
    arrays = {"U": theta.U, "W": theta.W, "b": theta.b, "X": prob.x, "y": prob.y, "a": prob.a,
              "gU": g.U, "gW": g.W, "gb": g.b}
    for k, v in arrays.items():
        (case / f"{k}.bin").write_bytes(np.ascontiguousarray(v).tobytes())
    traj = backend.advance(theta, prob, ds, steps)
    for k, v in {"Uf": theta.U, "Wf": theta.W, "bf": theta.b}.items():
        (case / f"{k}.bin").write_bytes(np.ascontiguousarray(v).tobytes())
    (case / "E.bin").write_bytes(np.array([E]).tobytes())
    (case / "losses.bin").write_bytes(traj.loss.tobytes())
    a = prob.activation
    rtol = 1e-12 if dtype == "float64" else 1e-4
    meta = dict(L=L, M=M, d=d, N=N, activation=a.name, eta=a.eta, weight_decay=wd, ds=ds, nsteps=steps,
                dtype=dtype, rtol=rtol)
    (case / "meta.txt").write_text("".join(f"{k}={v}\n" for k, v in meta.items()))


@pytest.fixture(scope="module")
def conformance_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("conformance")
    for case in CASES:
        write_case(root, *case)
    return root


@pytest.mark.slow  # the whole Julia suite, compile-bound: 3-4 min on a quiet 2-core machine
@pytest.mark.parametrize("threads", [2])
def test_julia_suite_and_conformance(julia: str, conformance_dir: Path, threads: int) -> None:
    """The kernels' own suite on 2 threads (threaded and serial paths both run: small problems stay
    below the parallel threshold; its thread-count check compares bit for bit with a 1-thread
    process), then its conformance cases read back here."""
    env = {**os.environ, "MFRES_CONFORMANCE_DIR": str(conformance_dir)}
    res = subprocess.run([julia, "-t", str(threads), "--startup-file=no", f"--project={ROOT}",
                          str(ROOT / "jl" / "test" / "runtests.jl")], capture_output=True, text=True, env=env,
                         timeout=900)
    print(res.stdout[-4000:])
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert res.stdout.count("conformance ") >= len(CASES)
    # Julia's trajectory, read back here: equal to the NumPy backend's to 1e-12 relative
    for name, *_, dtype in CASES:
        jl = np.fromfile(conformance_dir / name / "julia_losses.bin")
        ref = np.fromfile(conformance_dir / name / "losses.bin")
        tol = 1e-12 if dtype == "float64" else 1e-4
        np.testing.assert_allclose(jl, ref, rtol=tol)
    # and against an independent autograd replay of the same GD steps
    name, L, M, d, N, act, _init, wd, ds, steps, _ = CASES[3]
    case = conformance_dir / name
    U, W = (np.fromfile(case / f"{v}.bin").reshape(L, M, d) for v in "UW")
    b = np.fromfile(case / "b.bin").reshape(L, M)
    x, y, a = np.fromfile(case / "X.bin").reshape(N, d), np.fromfile(case / "y.bin"), np.fromfile(case / "a.bin")
    replay = []
    for _ in range(steps + 1):
        E, gU, gW, gb = autograd_loss_and_grad(U, W, b, x, y, a, act, wd)
        replay.append(E)
        U, W, b = U - ds * L * M * gU, W - ds * L * M * gW, b - ds * L * M * gb
    np.testing.assert_allclose(np.fromfile(case / "julia_losses.bin"), replay, rtol=1e-9)


def test_fatou_lint_clean() -> None:
    fatou = shutil.which("fatou") or str(Path(sys.executable).parent / "fatou")
    if not os.path.exists(fatou):
        pytest.skip("fatou is not installed (pip install fatou)")
    res = subprocess.run([fatou, "lint", "--color", "never", str(ROOT / "jl")], capture_output=True, text=True)
    assert res.returncode == 0 and "clean" in (res.stdout + res.stderr), res.stdout + res.stderr


def test_jl_sources_use_nothing_newer_than_julia_1_5() -> None:
    for path in (ROOT / "jl").rglob("*.jl"):
        text = path.read_text()
        for banned in ("@atomic", "\npublic ", "Base.@assume_effects", "import LinearAlgebra as"):
            assert banned not in text, f"{path}: {banned.strip()} is not available on Julia 1.5"
        for line in text.splitlines():
            assert not line.lstrip().startswith("using CUDA"), f"{path}: CUDA must load only on request"


def test_wheel_carries_julia_sources(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path), str(ROOT)], capture_output=True, text=True)
    if res.returncode != 0 and "hatchling" in res.stderr:
        pytest.skip("hatchling is not installed in this environment (pip install hatchling)")
    assert res.returncode == 0, res.stderr[-3000:]
    wheel = next(tmp_path.glob("mfres-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    jl_files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "jl").rglob("*.jl")}
    for f in jl_files:
        assert f"mfres/{f}" in names, f
    for f in ("mfres/Project.toml", "mfres/juliapkg.json", "mfres/cli.py", "mfres/backends/julia_backend.py"):
        assert f in names, f
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "mfres = mfres.cli:main" in entry


# --- the executable transport (mfres.backends.julia_exe) ----------------------

JULIA_ENV = {"MFRES_JULIA_TRANSPORT": "executable", "JULIA_NUM_THREADS": ""}


def _problem(act: str, L: int, M: int, d: int, N: int, wd: float, dtype: str, init: str = "iid",
             seed: int = 2) -> tuple[Particles, Problem]:
    data = builtin("sphere", N, d, data_seed=1)
    dt = np.dtype(dtype)
    theta = initial_particles(init, L, M, d, seed=seed, dtype=dt)
    return theta, Problem.from_data(data, activations.parse(act), wd, dt)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def exe_backends() -> Iterator[dict[int, JuliaExeBackend]]:
    """One Julia child per thread count, shared by the module's tests (each start compiles the kernels)."""
    if JULIA is None:
        pytest.skip("no Julia: set MFRES_JULIA or put julia on PATH (.ci/run installs one)")
    live: dict[int, JuliaExeBackend] = {}
    yield live
    for b in live.values():
        b.close()


def _backend(live: dict[int, JuliaExeBackend], threads: int) -> JuliaExeBackend:
    if threads not in live:
        live[threads] = JuliaExeBackend(JULIA, threads=threads)
    assert live[threads].threads == threads
    return live[threads]


# each activation compiles its own kernels (≈ 8 s): tanh in the default run, the others under -m slow
@pytest.mark.parametrize("act", [a if a == "tanh" else pytest.param(a, marks=pytest.mark.slow) for a in ACTIVATIONS])
def test_exe_transport_equals_numpy_every_activation(exe_backends: dict[int, JuliaExeBackend], act: str) -> None:
    """300 GD steps through the child Julia: every E, velocity and the final θ equal NumPy's to 1e-12."""
    jl = _backend(exe_backends, 1)
    theta, prob = _problem(act, 5, 12, 3, 24, 0.01, "float64", init="smooth")
    ref = theta.copy()
    steps, ds = 300, (0.02 if act == "relu2" else 0.2)
    traj = jl.advance(theta, prob, ds, steps)
    want = NumpyBackend().advance(ref, prob, ds, steps)
    assert traj.loss.shape == (steps + 1,) and traj.finite
    np.testing.assert_allclose(traj.loss, want.loss, rtol=1e-12)
    np.testing.assert_allclose(traj.grad_norm, want.grad_norm, rtol=1e-12)
    for v in "UWb":
        assert _rel(getattr(theta, v), getattr(ref, v)) < 1e-12, v
    assert want.loss[-1] < 0.9 * want.loss[0]  # the run did train


def test_exe_transport_returns_the_output_at_the_last_state(exe_backends: dict[int, JuliaExeBackend]) -> None:
    """The nets' outputs a·z_L that come back with a chunk (for the snapshots) are those of the
    state each net stopped at: one net, and a batch."""
    from mfres import model

    jl = _backend(exe_backends, 1)
    theta, prob = _problem("tanh", 5, 12, 3, 24, 0.01, "float64", init="smooth")
    traj = jl.advance(theta, prob, 0.2, 7)
    assert traj.prediction is not None and traj.prediction.shape == (24,)
    np.testing.assert_allclose(traj.prediction, model.predict(theta, prob.x, prob.a, prob.activation), rtol=1e-12)
    nets = [_problem("tanh", 5, 12, 3, 24, 0.01, "float64", seed=s)[0] for s in (3, 4)]
    batch = Particles(*(np.stack([getattr(t, v) for t in nets]) for v in "UWb"))
    key = ("float64", "tanh", float(prob.activation.eta), 3)  # a batch's warm-up is for its d
    fresh, s0 = key not in jl._warm, jl.startup_seconds  # (another test of this module may have warmed it)
    traj = jl.advance(batch, prob, 0.2, 4)
    s1 = jl.startup_seconds
    assert (s1 > s0) == fresh and key in jl._warm  # a batch's path is warmed up when a batch first comes
    assert traj.prediction.shape == (2, 24)
    np.testing.assert_allclose(traj.prediction, model.predict(batch, prob.x, prob.a, prob.activation), rtol=1e-12)
    jl.advance(batch, prob, 0.2, 1)
    assert jl.startup_seconds == s1


def test_exe_chunks_that_continue_reuse_the_gradient_with_the_same_numbers(
        exe_backends: dict[int, JuliaExeBackend]) -> None:
    """In the child too, chunks of 3 + 4 + 5 steps equal one chunk of 12 bit for bit, the later
    ones starting from the ∇E the previous chunk left; a changed θ starts afresh."""
    jl = _backend(exe_backends, 1)
    theta, prob = _problem("tanh", 5, 12, 3, 24, 0.01, "float64", init="smooth")
    ref = theta.copy()
    whole = jl.advance(ref, prob, 0.2, 12)
    parts = []
    for n, cont in ((3, False), (4, True), (5, True)):
        parts.append(jl.advance(theta, prob, 0.2, n))
        assert jl.continued is cont
    np.testing.assert_array_equal(np.concatenate([parts[0].loss, *(p.loss[1:] for p in parts[1:])]), whole.loss)
    for v in "UWb":
        np.testing.assert_array_equal(getattr(theta, v), getattr(ref, v))
    theta.W[1, 2, 0] -= 1e-3
    jl.advance(theta, prob, 0.2, 1)
    assert not jl.continued
    jl.loss_and_grad(theta, prob)  # another request: the server forgets its ∇E
    jl.advance(theta, prob, 0.2, 1)
    assert not jl.continued


def test_exe_warmup_between_chunks_keeps_the_mapped_arrays(exe_backends: dict[int, JuliaExeBackend]) -> None:
    """A warm-up compiles the requests on a file of the server's own; a chunk after it, on the
    arrays mapped before it, still trains this net on these data (equal to NumPy's)."""
    jl = _backend(exe_backends, 1)
    theta, prob = _problem("tanh", 5, 12, 3, 24, 0.0, "float64", init="smooth")
    jl.advance(theta, prob, 0.2, 3)
    mapped = jl._shared
    # the same sizes; an η of its own gives a warm-up key no other test has used
    prob2 = Problem(prob.x, prob.y, prob.a, activations.Activation("tanh", 0.4375))
    s0 = jl.startup_seconds
    ref = theta.copy()
    traj = jl.advance(theta, prob2, 0.2, 12)  # within the mapped loss buffer (cap ≥ 16)
    assert jl.startup_seconds > s0 and jl._shared is mapped  # warmed up, no new layout
    want = NumpyBackend().advance(ref, prob2, 0.2, 12)
    np.testing.assert_allclose(traj.loss, want.loss, rtol=1e-12)
    for v in "UWb":
        np.testing.assert_allclose(getattr(theta, v), getattr(ref, v), rtol=1e-12, atol=1e-14)


def test_exe_chunk_in_two_halves(exe_backends: dict[int, JuliaExeBackend]) -> None:
    """begin_advance returns while the child steps, θ still at the chunk's start; no other
    request may come before the chunk is finished; the result is ``advance``'s."""
    jl = _backend(exe_backends, 1)
    theta, prob = _problem("tanh", 5, 12, 3, 24, 0.01, "float64", init="smooth")
    start, ref = theta.copy(), theta.copy()
    want = jl.advance(ref, prob, 0.2, 40)
    finish = jl.begin_advance(theta, prob, 0.2, 40)
    np.testing.assert_array_equal(theta.U, start.U)
    with pytest.raises(BackendError, match="still running 'advance'"):
        jl.loss_and_grad(theta, prob)  # refused before it touches the arrays the child is using
    traj = finish()
    assert finish() is traj  # a second call returns the same result, without reading the pipe again
    np.testing.assert_array_equal(traj.loss, want.loss)
    for v in "UWb":
        np.testing.assert_array_equal(getattr(theta, v), getattr(ref, v))
    assert jl.kernel_seconds > 0
    jl.loss_and_grad(theta, prob)  # the protocol is in step


@pytest.mark.slow  # compiles float32 kernels; 2 threads: a second child
@pytest.mark.parametrize("threads", [1, 2])
def test_exe_transport_threads_float32_batches(exe_backends: dict[int, JuliaExeBackend], threads: int) -> None:
    """Above the kernels' parallel threshold (N·M·d ≥ 2^16), in float32, and for a batch of nets
    (one round trip per chunk), the child Julia follows the NumPy backend."""
    jl = _backend(exe_backends, threads)
    theta, prob = _problem("tanh", 3, 64, 4, 300, 0.0, "float64")
    ref = theta.copy()
    traj = jl.advance(theta, prob, 0.5, 200)
    want = NumpyBackend().advance(ref, prob, 0.5, 200)
    np.testing.assert_allclose(traj.loss, want.loss, rtol=1e-12)
    assert _rel(theta.U, ref.U) < 1e-12 and _rel(theta.W, ref.W) < 1e-12 and _rel(theta.b, ref.b) < 1e-12

    theta32, prob32 = _problem("tanh", 4, 16, 3, 32, 0.0, "float32")
    ref32 = theta32.copy()
    t32 = jl.advance(theta32, prob32, 0.5, 100)
    w32 = NumpyBackend().advance(ref32, prob32, 0.5, 100)
    assert theta32.U.dtype == np.float32
    np.testing.assert_allclose(t32.loss, w32.loss, rtol=2e-4)
    assert _rel(theta32.U, ref32.U) < 2e-4

    # 9 nets: a lane block of 8 (vectorised across the nets) and one net alone
    nets = [_problem("tanh", 4, 10, 3, 20, 0.01, "float64", seed=s)[0] for s in range(3, 12)]
    _, prob_b = _problem("tanh", 4, 10, 3, 20, 0.01, "float64")
    batch = Particles(*(np.stack([getattr(t, v) for t in nets]) for v in "UWb"))
    ref_b = batch.copy()
    tb = jl.advance(batch, prob_b, 0.3, 150)
    wb = NumpyBackend().advance(ref_b, prob_b, 0.3, 150)
    assert tb.loss.shape == (151, 9) == wb.loss.shape
    np.testing.assert_allclose(tb.loss, wb.loss, rtol=1e-12)
    np.testing.assert_allclose(tb.grad_norm, wb.grad_norm, rtol=1e-12)
    assert _rel(batch.W, ref_b.W) < 1e-12
    # each net of the batch is the single-net trajectory of its seed
    single = nets[1].copy()
    np.testing.assert_allclose(jl.advance(single, prob_b, 0.3, 150).loss, tb.loss[:, 1], rtol=1e-12)

    E, g = jl.loss_and_grad(theta, prob)
    E_ref, g_ref = NumpyBackend().loss_and_grad(theta, prob)
    assert abs(E / E_ref - 1) < 1e-13
    for v in "UWb":
        assert _rel(getattr(g, v), getattr(g_ref, v)) < 1e-11, v


@pytest.mark.parametrize("memory", ["store", "recompute"])
def test_exe_transport_memory_modes(exe_backends: dict[int, JuliaExeBackend], memory: str) -> None:
    """--memory reaches the Julia kernels: store and recompute follow NumPy (and each other) to 1e-12."""
    from mfres.backends import kernel_memory

    jl = _backend(exe_backends, 1)
    theta, prob = _problem("softplus", 4, 20, 3, 40, 0.01, "float64")
    assert kernel_memory(memory, theta, prob) == memory
    ref = theta.copy()
    jl.memory = memory
    try:
        traj = jl.advance(theta, prob, 0.3, 60)
        E, g = jl.loss_and_grad(theta, prob)
    finally:
        jl.memory = "auto"
    want = NumpyBackend(memory).advance(ref, prob, 0.3, 60)
    np.testing.assert_allclose(traj.loss, want.loss, rtol=1e-12)
    assert _rel(theta.W, ref.W) < 1e-12
    E_ref, g_ref = NumpyBackend(memory).loss_and_grad(theta, prob)
    assert abs(E / E_ref - 1) < 1e-13 and _rel(g.U, g_ref.U) < 1e-11


def test_exe_transport_stops_at_first_nonfinite_loss(exe_backends: dict[int, JuliaExeBackend]) -> None:
    jl = _backend(exe_backends, 1)
    theta, prob = _problem("tanh", 4, 12, 3, 24, 0.0, "float64")
    ref = theta.copy()
    traj = jl.advance(theta, prob, 2000.0, 400)
    want = NumpyBackend().advance(ref, prob, 2000.0, 400)
    assert not traj.finite and len(traj.loss) == len(want.loss) < 401
    np.testing.assert_allclose(traj.loss[:-1], want.loss[:-1], rtol=1e-9)
    np.testing.assert_allclose(theta.U, ref.U, rtol=1e-9)  # the state that produced the non-finite E


def test_julia_error_comes_back_as_backend_error_and_a_dead_child_is_reported(julia: str) -> None:
    jl = JuliaExeBackend(julia, threads=1)
    try:
        theta, prob = _problem("tanh", 2, 3, 2, 5, 0.0, "float64")
        bad = Problem(prob.x, prob.y, prob.a, activations.Activation("bogus"))
        with pytest.raises(BackendError, match=r"^Julia: .*unknown activation bogus"):
            jl.advance(theta, bad, 0.1, 3)
        with pytest.raises(BackendError, match="unknown request"):
            jl._request("frobnicate")
        # the protocol stays in step after an error
        assert jl._request("device cpu") == []
        os.kill(jl.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(BackendError, match=rf"Julia process \(pid {jl.pid}\) was killed by SIGKILL"):
            jl.advance(theta, prob, 0.1, 3)
        assert time.monotonic() - t0 < 10
    finally:
        jl.close()


PARENT = """
import os, sys, time, numpy as np
from mfres.backends.julia_exe import JuliaExeBackend
from mfres.backends import Problem
from mfres import activations
from mfres.data import builtin
from mfres.init import initial_particles
jl = JuliaExeBackend(sys.argv[1], threads=1)
print(jl.pid, flush=True)
data = builtin("sphere", 20, 3, data_seed=1)
theta = initial_particles("iid", 4, 8, 3, seed=2, dtype=np.dtype("float64"))
jl.advance(theta, Problem.from_data(data, activations.parse(sys.argv[2]), 0.0, np.float64), 0.1, 100000)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_no_julia_child_survives_its_parent(julia: str) -> None:
    """SIGKILL the parent while its Julia child is busy (compiling, then a long chunk): the child goes too."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, julia, "sigmoid"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, **JULIA_ENV})
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        time.sleep(1.0)
        assert _alive(child)
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), f"Julia child {child} outlived its parent"
    finally:
        parent.kill()


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mfres.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **JULIA_ENV, **(env or {})}, timeout=timeout)


RUN = ["--depth", "4", "--width", "10", "--dim", "3", "--samples", "30", "--ds", "0.5", "--seed", "3",
       "--snapshot-every", "20"]


@pytest.mark.slow  # mfres processes, each compiling the kernels once
def test_cli_simulate_and_resume_through_julia(julia: str, tmp_path: Path) -> None:
    """`mfres simulate --backend julia` (Julia child, 2 threads) and its --resume write the run
    file that the NumPy backend writes, step for step: the snapshots (θ and the output, written
    while the next chunk runs in the child) included."""
    import mfres

    ref = tmp_path / "numpy.nc"
    assert _cli("simulate", *RUN, "--steps", "80", "--backend", "numpy", "--quiet", "--out", str(ref)).returncode == 0
    out = tmp_path / "julia.nc"
    res = _cli("simulate", *RUN, "--steps", "40", "--backend", "julia", "--threads", "2", "--out", str(out),
               env={"MFRES_JULIA": julia})
    assert res.returncode == 0, res.stderr
    assert "backend=julia" in res.stderr
    res = _cli("simulate", *RUN, "--steps", "80", "--backend", "julia", "--threads", "2", "--out", str(out),
               "--resume", "--quiet", env={"MFRES_JULIA": julia})
    assert res.returncode == 0, res.stderr
    with mfres.open_run(str(out), load=True) as j, mfres.open_run(str(ref), load=True) as n:
        assert j.attrs["backend"] == "julia" and j.attrs["status"] == "finished"
        np.testing.assert_allclose(j["loss"].values, n["loss"].values, rtol=1e-12)
        assert j["loss"].shape == (81,)
        assert list(j["snapshot_step"].values) == [0, 20, 40, 60, 80]
        for v in ("U", "W", "b", "prediction"):
            np.testing.assert_allclose(j[v].values, n[v].values, rtol=1e-10, atol=1e-13)


@pytest.mark.slow  # its own child, compiling the kernels
@pytest.mark.julia_auto
def test_auto_picks_the_julia_executable(tmp_path: Path) -> None:
    if JULIA is None:
        pytest.skip("no Julia: set MFRES_JULIA or put julia on PATH (.ci/run installs one)")
    from mfres.backends import describe, select

    env = {"MFRES_JULIA": JULIA, "PYTHON_JULIAPKG_EXE": ""}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        text = describe(threads=2)
        assert "executable transport" in text and JULIA in text and "2 thread(s)" in text, text
        backend = select("auto", threads=1)
        try:
            assert isinstance(backend, JuliaExeBackend) and backend.threads == 1
            assert backend.version.startswith("1.") and backend.startup_seconds > 0
            assert JULIA in backend.describe()
        finally:
            backend.close()
        assert not _alive(backend.pid)


@pytest.mark.slow  # mfres processes, each compiling the kernels once
def test_ctrl_c_finishes_the_chunk_and_stops_julia(julia: str, tmp_path: Path) -> None:
    """SIGINT to mfres alone (the Julia child is in its own session): the chunk finishes, the run
    file says interrupted with the resume command, and the child is gone."""
    import mfres

    out = tmp_path / "int.nc"
    args = [*RUN[:-2], "--snapshot-every", "1000"]
    # far more steps than run in the test's seconds at any speed (about 20 µs a step here)
    proc = subprocess.Popen([sys.executable, "-m", "mfres.cli", "simulate", *args, "--steps", "100000000",
                             "--backend", "julia", "--threads", "1", "--quiet", "--out", str(out)],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **JULIA_ENV, "MFRES_JULIA": julia})
    try:
        child = None
        deadline = time.monotonic() + 120
        while (child is None or not out.exists()) and time.monotonic() < deadline:
            time.sleep(0.2)
            kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            if kids.exists() and kids.read_text().split():
                child = int(kids.read_text().split()[0])
        assert child is not None and out.exists()
        assert os.getpgid(child) != os.getpgid(proc.pid)
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    assert "interrupted by SIGINT" in err and "--resume" in err and "Traceback" not in err
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)
    with mfres.open_run(str(out), load=True) as ds:
        assert ds.attrs["status"] == "interrupted" and int(ds.attrs["steps_done"]) >= 1


@pytest.mark.slow  # mfres processes, each compiling the kernels once
def test_sweep_through_julia_equals_numpy(julia: str, tmp_path: Path) -> None:
    """`mfres sweep --backend julia`: each Dask task's batch of seeds on the worker's Julia child."""
    import xarray as xr

    args = ["--depth", "4", "--width", "6,12", "--seeds", "3", "--dim", "2", "--samples", "12", "--steps", "30",
            "--ds", "0.2", "--init", "iid", "--workers", "1"]
    for backend in ("numpy", "julia"):
        res = _cli("sweep", *args, "--backend", backend, "--out", str(tmp_path / f"{backend}.nc"),
                   env={"MFRES_JULIA": julia})
        assert res.returncode == 0, res.stderr
        startup = re.search(r"Julia start-up and compilation: ([0-9.]+) s of this sweep", res.stderr)
        assert (startup is not None and float(startup.group(1)) > 0) == (backend == "julia"), res.stderr
    j, n = (xr.load_dataset(tmp_path / f"{b}.nc") for b in ("julia", "numpy"))
    assert set(j["status"].values.ravel()) == {"ok"}
    assert set(j["backend"].values.ravel()) == {"julia"} and set(n["backend"].values.ravel()) == {"numpy"}
    np.testing.assert_allclose(j["loss"].values, n["loss"].values, rtol=1e-9)


def test_device_cuda_without_cuda_jl_is_an_error_saying_why(julia: str, tmp_path: Path) -> None:
    """--device cuda through the executable without CUDA.jl: a one-line error, no CPU run, no child left."""
    pytest.importorskip("netCDF4")
    out = tmp_path / "cuda.nc"
    res = _cli("simulate", *RUN, "--steps", "5", "--backend", "auto", "--device", "cuda", "--quiet", "--out", str(out),
               env={"MFRES_JULIA": julia, "JULIA_DEPOT_PATH": str(tmp_path / "depot")}, timeout=300)
    assert res.returncode == 3, res.stderr
    assert res.stderr.startswith("Error: Julia: CUDA.jl is not installed for this Julia"), res.stderr
    assert "--device cpu" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_exe_threads_from_option_or_the_users_julia_num_threads(julia: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """--threads wins; without it the user's JULIA_NUM_THREADS is respected (no -t given)."""
    monkeypatch.setenv("JULIA_NUM_THREADS", "2")
    with JuliaExeBackend(julia) as jl:
        assert (jl.threads, jl.threads_from) == (2, "JULIA_NUM_THREADS")
    with JuliaExeBackend(julia, threads=1) as jl:
        assert (jl.threads, jl.threads_from) == (1, "--threads")
    monkeypatch.delenv("JULIA_NUM_THREADS")
    with JuliaExeBackend(julia) as jl:
        assert (jl.threads, jl.threads_from) == (os.cpu_count(), "all cores")


def test_blas_kernels_chosen_for_the_cpu_reach_the_child(julia: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child's OpenBLAS runs its AVX2 kernels on an AVX2 CPU and its AVX-512 ones on a CPU with
    Skylake-X's AVX-512 (an OpenBLAS older than the CPU would fall back to SSE3 ones); the user's
    own OPENBLAS_CORETYPE wins."""
    from mfres.backends import blas_environment

    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    assert blas_environment({"avx2", "fma", "sse3"}) == {"OPENBLAS_CORETYPE": "Haswell"}
    skylakex = {"avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
    assert blas_environment(skylakex) == {"OPENBLAS_CORETYPE": "SkylakeX"}
    assert blas_environment({"avx2", "fma", "avx512f"}) == {"OPENBLAS_CORETYPE": "Haswell"}
    assert blas_environment({"sse3"}) == {}
    want = blas_environment().get("OPENBLAS_CORETYPE")
    with JuliaExeBackend(julia, threads=1) as jl:
        if want:
            assert jl.blas == want, jl.describe()
        assert jl.blas in jl.describe()
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Sandybridge")
    assert blas_environment({"avx2", "fma"}) == {}
    with JuliaExeBackend(julia, threads=1) as jl:
        assert jl.blas == "Sandybridge"


def test_a_julia_that_does_not_know_the_cpu_gets_a_named_target(julia: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Where Julia takes the CPU for "generic", its code generator is told a CPU that the flags admit
    (skylake-avx512 for Skylake-X's AVX-512 subsets, haswell for AVX2 and FMA, sandybridge for AVX),
    and the child reports the target it runs with;
    a Julia that knows the CPU keeps its own choice; MFRES_JULIA_CPU_TARGET decides instead."""
    from mfres.backends import julia_exe

    monkeypatch.delenv(julia_exe.CPU_TARGET_VARIABLE, raising=False)
    avx2 = {"avx", "avx2", "fma", "sse4_2"}
    monkeypatch.setattr(julia_exe, "julia_cpu_name", lambda exe: "generic")
    assert julia_exe.cpu_target_option("j", avx2) == ["-C", "haswell"]
    assert julia_exe.cpu_target_option("j", avx2 | julia_exe.SKYLAKEX_FLAGS) == ["-C", "skylake-avx512"]
    assert julia_exe.cpu_target_option("j", avx2 | {"avx512f", "avx512cd"}) == ["-C", "haswell"]
    assert julia_exe.cpu_target_option("j", {"avx", "sse4_2"}) == ["-C", "sandybridge"]
    assert julia_exe.cpu_target_option("j", {"sse4_2"}) == []
    monkeypatch.setattr(julia_exe, "julia_cpu_name", lambda exe: "znver2")
    assert julia_exe.cpu_target_option("j", avx2) == []
    monkeypatch.setenv(julia_exe.CPU_TARGET_VARIABLE, "native")
    assert julia_exe.cpu_target_option("j", avx2) == []
    monkeypatch.undo()
    monkeypatch.delenv(julia_exe.CPU_TARGET_VARIABLE, raising=False)
    assert julia_exe.julia_cpu_name(julia)  # this Julia's own name for the CPU
    want = julia_exe.cpu_target_option(julia)
    with JuliaExeBackend(julia, threads=1) as jl:
        assert jl.cpu_target == (want[1] if want else "native"), jl.describe()
        assert f"CPU target {jl.cpu_target}" in jl.describe()
    monkeypatch.setenv(julia_exe.CPU_TARGET_VARIABLE, "sandybridge")
    with JuliaExeBackend(julia, threads=1) as jl:
        assert jl.cpu_target == "sandybridge"
        theta, prob = _problem("tanh", 3, 5, 2, 7, 0.0, "float64")
        E, grad = jl.loss_and_grad(theta, prob)
        E_ref, grad_ref = NumpyBackend().loss_and_grad(theta, prob)
        assert E == pytest.approx(E_ref, rel=1e-12)
        np.testing.assert_allclose(grad.U, grad_ref.U, rtol=1e-10, atol=1e-14)
