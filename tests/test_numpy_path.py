"""The NumPy path's own tanh and its step on several cores (helper processes): accuracy, special values,
reproducibility, helpers that fail or are orphaned."""

from __future__ import annotations

import errno
import gc
import glob
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from mfres import activations, model
from mfres.backends import Problem
from mfres.backends.numpy_backend import NumpyBackend
from mfres.children import shm_dir
from mfres.data import builtin
from mfres.init import initial_particles

mpmath = pytest.importorskip("mpmath")


def ulps(mine: np.ndarray, exact: list, dtype: type) -> np.ndarray:
    """|mine − exact| in units of the last place of the exact value rounded to ``dtype``."""
    out = []
    for m, e in zip(mine, exact, strict=True):
        spacing = np.spacing(np.abs(dtype(float(e))))
        out.append(float(abs(mpmath.mpf(float(m)) - e) / mpmath.mpf(float(spacing))))
    return np.array(out)


def hard_points(dtype: type, n: int = 4000) -> np.ndarray:
    """Where cancellation and rounding are worst: near the table's knots, tiny values, the tails."""
    rng = np.random.default_rng(3)
    knots = rng.integers(-2560, 2561, n // 4) / 128
    x = np.concatenate([
        knots + rng.uniform(-1 / 256, 1 / 256, n // 4),  # |u| up to h/2
        rng.uniform(1 / 256, 3 / 256, n // 8) * rng.choice([-1, 1], n // 8),  # k = 1: most cancellation
        rng.standard_normal(n // 8) * 3,
        np.exp(rng.uniform(-700 if dtype is np.float64 else -85, 0, n // 8)),
        rng.uniform(-21, 21, n // 8),
    ])
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_tanh_within_3_ulp_of_exact(dtype: type) -> None:
    x = hard_points(dtype)
    mpmath.mp.prec = 113
    exact = [mpmath.tanh(mpmath.mpf(float(v))) for v in x]
    err = ulps(activations.tanh(x), exact, dtype)
    assert err.max() <= 3.0, (err.max(), x[err.argmax()])
    assert err.mean() < 0.5


def test_tanh_close_to_numpy_on_millions_of_points() -> None:
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.standard_normal(1 << 20) * 4, rng.uniform(-30, 30, 1 << 19),
                        np.exp(rng.uniform(-745, 3.5, 1 << 19)) * rng.choice([-1, 1], 1 << 19)])
    ref = np.tanh(x)
    err = np.abs(activations.tanh(x) - ref) / np.spacing(np.abs(ref))
    assert err.max() <= 4.0  # ours ≤ 3 ulp, NumPy's (libm's) ≤ 1
    mine = activations.tanh(x)
    np.testing.assert_array_equal(activations.tanh(-x), -mine)  # odd, bit for bit
    assert np.all(np.abs(mine) <= 1)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_tanh_special_values(dtype: type) -> None:
    tiny = np.finfo(dtype).smallest_subnormal
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, tiny, -tiny, 1e-30, 25.0, -25.0, 1e30, -1e30], dtype)
    t = activations.tanh(x)
    assert t.dtype == dtype
    assert t[0] == 0 and not np.signbit(t[0]) and t[1] == 0 and np.signbit(t[1])
    assert t[2] == 1 and t[3] == -1 and np.isnan(t[4])
    assert t[5] == tiny and t[6] == -tiny and t[7] == dtype(1e-30)
    np.testing.assert_array_equal(t[8:], [1, -1, 1, -1])


def test_tanh_of_strided_and_other_dtypes() -> None:
    x = np.linspace(-5, 5, 3000).reshape(30, 100)[:, ::3]  # not contiguous
    np.testing.assert_allclose(activations.tanh(x), np.tanh(x), rtol=4e-16, atol=0)
    h = np.linspace(-3, 3, 50, dtype=np.float16)
    np.testing.assert_array_equal(activations.tanh(h), np.tanh(h))  # NumPy's own for other dtypes


def test_tanh_choice_follows_the_cpu_and_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """float64 uses mfres's tanh unless NumPy's is vectorised here; MFRES_TANH decides instead."""
    f64 = np.dtype(np.float64)
    monkeypatch.delenv(activations.TANH_VARIABLE, raising=False)
    assert (f64 in activations.own_tanh_dtypes()) == (not activations.numpy_tanh_vectorised())
    for choice, own in (("own", True), ("numpy", False), (" Own ", True)):
        monkeypatch.setenv(activations.TANH_VARIABLE, choice)
        assert (f64 in activations.own_tanh_dtypes()) == own
    import numpy.lib.introspect as introspect

    for current, vectorised in (("X86_V4", True), ("AVX512_SKX", True), ("X86_V3", False), ("FMA3__AVX2", False)):
        monkeypatch.setattr(introspect, "opt_func_info",
                            lambda func_name, signature, c=current: {"tanh": {"dd": {"current": c}}})
        assert activations.numpy_tanh_vectorised() == vectorised, current
    monkeypatch.undo()
    monkeypatch.setenv(activations.TANH_VARIABLE, "fast")
    with pytest.warns(UserWarning, match="MFRES_TANH must be own or numpy, not 'fast'"):
        chosen = activations.own_tanh_dtypes()
    assert (f64 in chosen) == (not activations.numpy_tanh_vectorised())
    assert np.dtype(np.float32) not in chosen


@pytest.mark.parametrize("own", [True, False])
def test_numpy_step_agrees_with_either_tanh(own: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step with mfres's tanh and with NumPy's: the same numbers to rounding, and each one
    the tanh it says it uses."""
    chosen = frozenset({np.dtype(np.float64)}) if own else frozenset()
    monkeypatch.setattr(activations, "OWN_TANH", chosen)
    q = np.random.default_rng(6).standard_normal((2, 3, 500)) * 3
    s, ds = np.empty_like(q), np.empty_like(q)
    activations.value_and_derivative(activations.parse("tanh"), q.copy(), s, ds)
    np.testing.assert_array_equal(s, activations.tanh(q) if own else np.tanh(q))
    theta, p = setup(4, 16, 3, 40)
    E, grad = model.loss_and_grad(theta, p.x, p.y, p.a, p.activation)
    monkeypatch.setattr(activations, "OWN_TANH", frozenset({np.dtype(np.float64)}) - chosen)
    E2, grad2 = model.loss_and_grad(theta, p.x, p.y, p.a, p.activation)
    pairs = [(getattr(grad, v), getattr(grad2, v)) for v in "UWb"]
    assert E != E2 or any(np.any(g != g2) for g, g2 in pairs)  # the other tanh ran
    assert E == pytest.approx(E2, rel=1e-14)
    for g, g2 in pairs:
        np.testing.assert_allclose(g, g2, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("own", [True, False])
@pytest.mark.parametrize("name", ["tanh", "sigmoid", "gelu"])
def test_blocked_activation_equals_one_block(name: str, own: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunking (and the scratch reuse between chunks) changes no number, with either tanh."""
    monkeypatch.setattr(activations, "OWN_TANH", frozenset({np.dtype(np.float64)}) if own else frozenset())
    act = activations.parse(name)
    q = np.random.default_rng(5).standard_normal((3, 7, 1111)) * 3
    outs = []
    for n in (activations.CHUNK, 1000, 64):
        s, ds = np.empty_like(q), np.empty_like(q)
        activations.value_and_derivative(act, q.copy(), s, ds, activations.Scratch(q.dtype, n))
        outs.append((s, ds))
    for s, ds in outs[1:]:
        np.testing.assert_array_equal(s, outs[0][0])
        np.testing.assert_array_equal(ds, outs[0][1])
    if name == "tanh":
        np.testing.assert_array_equal(outs[0][0], activations.tanh(q) if own else np.tanh(q))
        np.testing.assert_array_equal(outs[0][1], 1 - outs[0][0] ** 2)


def setup(L: int, M: int, d: int, N: int, act: str = "tanh", B: int = 0, recompute: bool = False):
    data = builtin("teacher", N, d, data_seed=1)
    if B:
        nets = [initial_particles("iid", L, M, d, seed=s) for s in range(B)]
        theta = model.Particles(*(np.stack([getattr(t, v) for t in nets]) for v in "UWb"))
    else:
        theta = initial_particles("smooth", L, M, d, seed=2)
    return theta, Problem.from_data(data, activations.parse(act), 0.01, np.float64)


@pytest.mark.parametrize("memory", ["store", "recompute"])
@pytest.mark.parametrize("act", ["tanh", "softplus"])
def test_results_do_not_depend_on_the_thread_count(memory: str, act: str) -> None:
    """Several sample blocks (N = 300 > CHUNK / M), run on 1, 2 and 3 threads: the same bits."""
    M, d, N = 90, 3, 300
    L = -(-model.PARALLEL_MIN // (N * M))  # just large enough to be split over threads
    assert model.sample_block(N, M) < N and L * N * M >= model.PARALLEL_MIN
    runs = []
    for threads in (1, 2, 3, 2):
        theta, prob = setup(L, M, d, N, act)
        traj = NumpyBackend(memory, threads=threads).advance(theta, prob, 0.2, 4)
        runs.append((traj.loss, traj.grad_norm, theta))
    for loss, norm, theta in runs[1:]:
        np.testing.assert_array_equal(loss, runs[0][0])
        np.testing.assert_array_equal(norm, runs[0][1])
        for v in "UWb":
            np.testing.assert_array_equal(getattr(theta, v), getattr(runs[0][2], v))


def test_threaded_blocked_gradient_equals_the_plain_adjoint() -> None:
    """The blocked, threaded gradient against a straightforward one-array adjoint (np.tanh)."""
    L, M, d, N = 16, 70, 2, 250
    assert L * N * M >= model.PARALLEL_MIN and model.sample_block(N, M) < N
    theta, prob = setup(L, M, d, N)
    E, g = NumpyBackend("store", threads=2).loss_and_grad(theta, prob)
    x, y, a = prob.x, prob.y, prob.a
    h, c = 1.0 / L, 1.0 / (L * M)
    zs, ss = [x], []
    for l in range(L):
        s = np.tanh(zs[-1] @ theta.W[l].T + theta.b[l])
        ss.append(s)
        zs.append(zs[-1] + c * s @ theta.U[l])
    r = zs[-1] @ a - y
    p = np.outer(r, a)
    gU, gW, gb = np.empty_like(theta.U), np.empty_like(theta.W), np.empty_like(theta.b)
    for l in range(L - 1, -1, -1):
        T = (1 - ss[l] ** 2) * (p @ theta.U[l].T)
        gU[l] = h / M * ss[l].T @ p / N
        gW[l] = h / M * T.T @ zs[l] / N
        gb[l] = h / M * T.sum(axis=0) / N
        p = p + c * T @ theta.W[l]
    wd = prob.weight_decay / (L * M)
    E_ref = 0.5 * np.mean(r**2) + 0.5 * prob.weight_decay / (L * M) * sum(np.sum(v**2) for v in
                                                                             (theta.U, theta.W, theta.b))
    assert E == pytest.approx(E_ref, rel=1e-13)
    for mine, ref, v in ((g.U, gU, theta.U), (g.W, gW, theta.W), (g.b, gb, theta.b)):
        np.testing.assert_allclose(mine, ref + wd * v, rtol=1e-11, atol=1e-15)


def test_batch_with_several_blocks_equals_separate_runs() -> None:
    L, M, d, N = 8, 60, 2, 300
    assert 3 * L * N * M >= model.PARALLEL_MIN and model.sample_block(N, M) < N
    batch, prob = setup(L, M, d, N, B=3)
    nets = [model.Particles(batch.U[j].copy(), batch.W[j].copy(), batch.b[j].copy()) for j in range(3)]
    traj = NumpyBackend(threads=2).advance(batch, prob, 0.3, 3)
    for j, t in enumerate(nets):
        single = NumpyBackend(threads=1).advance(t, prob, 0.3, 3)
        np.testing.assert_allclose(traj.loss[:, j], single.loss, rtol=1e-13)
        np.testing.assert_allclose(batch.U[j], t.U, rtol=1e-12, atol=1e-15)


def _parallel_problem() -> tuple[model.Particles, Problem]:
    """Just large enough for helper processes, with several sample blocks."""
    M, d, N = 90, 3, 300
    return setup(-(-model.PARALLEL_MIN // (N * M)), M, d, N)


def test_numpy_error_state_reaches_the_helper_processes(capfd: pytest.CaptureFixture[str]) -> None:
    """A diverging net warns nothing, here or in a helper process, inside ``advance`` (it ignores
    overflow), and no helper fails (a failure would warn here)."""
    theta, prob = _parallel_problem()
    theta.U *= 1e200
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        backend = NumpyBackend(threads=2)
        traj = backend.advance(theta, prob, 1.0, 3)
    assert backend._work is not None and backend._work.helpers is not None and not backend._work.helpers.broken
    assert not traj.finite
    assert "Warning" not in capfd.readouterr().err


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("kind", ["memfd", "file"])
def test_helper_processes_leave_nothing_open_and_stop_with_their_workspace(monkeypatch: pytest.MonkeyPatch,
                                                                            kind: str) -> None:
    """The shared file is closed (an anonymous one, Linux) or unlinked (a named one, elsewhere) once
    the helpers have mapped it; they stop with their workspace."""
    if kind == "file":
        monkeypatch.delattr(os, "memfd_create", raising=False)
    theta, prob = _parallel_problem()
    mine = os.path.join(shm_dir(), f"mfres-numpy-{os.getpid()}-*")  # (other test workers have their own)
    files, fds = set(glob.glob(mine)), _open_fds()
    backend = NumpyBackend(threads=3)
    backend.advance(theta, prob, 0.2, 1)
    work = backend._work
    assert work is not None and work.helpers is not None
    procs = list(work.helpers.procs)
    assert len(procs) == 2 and all(p.poll() is None for p in procs)
    assert set(glob.glob(mine)) == files
    work.close()
    assert all(p.poll() is not None for p in procs)
    del work, backend
    gc.collect()
    assert _open_fds() <= fds  # nor a descriptor once the arrays are gone (the mapping holds one)


def test_a_helper_that_dies_leaves_its_part_to_the_main_process() -> None:
    """The step goes on with the same numbers (the same parts, computed here), and says so."""
    theta, prob = _parallel_problem()
    ref = theta.copy()
    want = NumpyBackend(threads=1).advance(ref, prob, 0.2, 3)
    backend = NumpyBackend(threads=2)
    first = backend.advance(theta, prob, 0.2, 1)
    assert backend._work is not None and backend._work.helpers is not None
    helper = backend._work.helpers.procs[0]
    helper.kill()
    helper.wait()
    with pytest.warns(RuntimeWarning, match="helper process failed"):
        rest = backend.advance(theta, prob, 0.2, 2)
    np.testing.assert_array_equal(np.concatenate([first.loss, rest.loss[1:]]), want.loss)
    for v in "UWb":
        np.testing.assert_array_equal(getattr(theta, v), getattr(ref, v))


@pytest.mark.parametrize("broken", ["posix_fallocate", "popen"])
def test_without_room_or_helpers_a_run_uses_one_core(monkeypatch: pytest.MonkeyPatch, broken: str) -> None:
    """No room for the shared arrays (a container's small /dev/shm), or no helper starting: a warning,
    and the same numbers on one core."""
    from mfres import parallel

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device") if broken == "posix_fallocate" else OSError("no")

    theta, prob = _parallel_problem()
    ref = theta.copy()
    want = NumpyBackend(threads=1).advance(ref, prob, 0.2, 2)
    monkeypatch.setattr(parallel.os if broken == "posix_fallocate" else parallel, broken, fail)
    backend = NumpyBackend(threads=2)
    with pytest.warns(RuntimeWarning, match="uses one core"):
        traj = backend.advance(theta, prob, 0.2, 2)
    assert backend._work is not None and backend._work.helpers is None
    np.testing.assert_array_equal(traj.loss, want.loss)
    np.testing.assert_array_equal(theta.W, ref.W)


def test_a_part_done_again_after_a_helper_failed_on_it_gives_the_same_numbers() -> None:
    """A helper may fail halfway through its part of the stored adjoint, which turns σ' into T in
    place: the part done again here (``redo_part``) still gives the gradient of a plain run, bit for bit."""
    theta, prob = _parallel_problem()
    L = theta.shape[0]
    work = model.Workspace.for_problem(theta.batched(), prob.x)  # one process: the reference
    model.loss_and_grad(theta, prob.x, prob.y, prob.a, prob.activation, prob.weight_decay, work)
    want = [g.copy() for g in (work.G.U, work.G.W, work.G.b)]
    args = {"act": prob.activation, "layers": range(L - 1, -1, -1)}
    assert len(work.blocks) >= 2
    work.run_part("adjoint", 1, 2, args)  # a second pass over blocks whose σ' is already T: wrong
    work.run("gradient", layers=args["layers"])
    assert not np.array_equal(work.G.W, want[1])
    work.redo_part("adjoint", 1, 2, args)
    work.run("gradient", layers=args["layers"])
    for got, ref in zip((work.G.U, work.G.W, work.G.b), want, strict=True):
        np.testing.assert_array_equal(got, ref)


def test_helper_processes_die_with_their_parent(tmp_path: Path) -> None:
    """SIGKILL of the process that started them takes the helpers with it (no orphans)."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_numpy_path import _parallel_problem
        from mfres.backends.numpy_backend import NumpyBackend
        theta, prob = _parallel_problem()
        backend = NumpyBackend(threads=2)
        backend.advance(theta, prob, 0.2, 1)
        print(backend._work.helpers.procs[0].pid, flush=True)
        time.sleep(60)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())  # type: ignore[union-attr]
        os.kill(pid, 0)  # alive
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead, not yet reaped
    except FileNotFoundError:
        return False
