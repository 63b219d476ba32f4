"""GD trajectories: the time scaling, agreement with independent computations, energy decay."""

from __future__ import annotations

import numpy as np
import pytest
from reference import autograd_loss_and_grad, plain_loss

from mfres import activations, model
from mfres.backends import Problem
from mfres.backends.numpy_backend import NumpyBackend
from mfres.data import builtin
from mfres.init import initial_particles


def setup(L=4, M=6, d=3, N=8, scheme="iid", act="tanh", wd=0.0, dtype=np.float64):
    data = builtin("sphere", N, d, data_seed=3)
    theta = initial_particles(scheme, L, M, d, seed=11, dtype=dtype)
    return theta, Problem.from_data(data, activations.parse(act), wd, dtype)


def test_one_step_is_lr_times_gradient() -> None:
    """docs/model.md: a step of pseudo-time Δs is plain GD on E with lr = L M Δs."""
    L, M, ds = 5, 7, 0.3
    theta, prob = setup(L=L, M=M)
    assert model.learning_rate(L, M, ds) == L * M * ds
    _, g = model.loss_and_grad(theta, prob.x, prob.y, prob.a, prob.activation)
    before = theta.copy()
    NumpyBackend().advance(theta, prob, ds, 1)
    lr = model.learning_rate(L, M, ds)
    for new, old, grad in ((theta.U, before.U, g.U), (theta.W, before.W, g.W), (theta.b, before.b, g.b)):
        np.testing.assert_allclose(new, old - lr * grad, rtol=1e-14, atol=1e-15)


def test_trajectory_matches_plain_forward_loss(activation: str) -> None:
    """Every E the backend reports equals an independent forward-only E of the same iterate."""
    theta, prob = setup(L=3, M=4, d=2, N=5, act=activation, wd=0.1)
    backend = NumpyBackend()
    act = prob.activation
    for _ in range(4):
        ref = plain_loss(theta.U, theta.W, theta.b, prob.x, prob.y, prob.a, act.name, 0.1, act.eta)
        traj = backend.advance(theta, prob, 0.2, 3)
        assert traj.loss[0] == pytest.approx(ref, rel=1e-12)
    assert len(traj.loss) == 4 and len(traj.grad_norm) == 4


def test_trajectory_matches_autograd_replay() -> None:
    """n GD steps by the backend = n steps driven by an independent autograd gradient."""
    L, M, ds, n = 4, 5, 0.5, 25
    theta, prob = setup(L=L, M=M, scheme="smooth", act="gelu", wd=0.05)
    U, W, b = theta.U.copy(), theta.W.copy(), theta.b.copy()
    traj = NumpyBackend().advance(theta, prob, ds, n)
    losses = []
    for _ in range(n + 1):
        E, gU, gW, gb = autograd_loss_and_grad(U, W, b, prob.x, prob.y, prob.a, "gelu", 0.05)
        losses.append(E)
        U, W, b = U - ds * L * M * gU, W - ds * L * M * gW, b - ds * L * M * gb
    np.testing.assert_allclose(traj.loss, losses, rtol=1e-11)
    # the last autograd update went one step further; compare the state after n steps
    U, W, b = U + ds * L * M * gU, W + ds * L * M * gW, b + ds * L * M * gb
    np.testing.assert_allclose(theta.U, U, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(theta.b, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("scheme", ["iid", "tied", "smooth"])
def test_energy_decreases_for_small_ds(scheme: str) -> None:
    theta, prob = setup(L=8, M=16, d=3, N=16, scheme=scheme)
    traj = NumpyBackend().advance(theta, prob, 0.05, 200)
    assert np.all(np.diff(traj.loss) <= 1e-15), "E increased along a small-step GD run"
    assert traj.loss[-1] < 0.5 * traj.loss[0]


def test_energy_dissipation_matches_velocity() -> None:
    """dE/ds = −mean over particles of |velocity|² / (LM)·LM ... checked as the GD identity
    E(s+Δs) − E(s) ≈ −Δs · grad_norm² for small Δs (grad_norm is the RMS velocity)."""
    theta, prob = setup(L=6, M=10, d=3, N=12)
    ds = 1e-4
    traj = NumpyBackend().advance(theta, prob, ds, 2)
    dE = traj.loss[1] - traj.loss[0]
    assert dE == pytest.approx(-ds * traj.grad_norm[0] ** 2, rel=1e-3)


def test_advance_stops_at_first_nonfinite_loss() -> None:
    # with weight decay λ, each step multiplies θ by about (1 − Δs λ): |1 − 1e5| blows up
    theta, prob = setup(L=2, M=3, d=2, N=4, wd=10.0)
    traj = NumpyBackend().advance(theta, prob, 1e4, 500)
    assert not traj.finite
    assert len(traj.loss) < 501
    assert np.all(np.isfinite(traj.loss[:-1]))


def test_float32_run_tracks_float64() -> None:
    t64, p64 = setup(L=8, M=16, d=4, N=32)
    t32, p32 = setup(L=8, M=16, d=4, N=32, dtype=np.float32)
    l64 = NumpyBackend().advance(t64, p64, 0.5, 100).loss
    l32 = NumpyBackend().advance(t32, p32, 0.5, 100).loss
    assert t32.U.dtype == np.float32
    np.testing.assert_allclose(l32, l64, rtol=1e-4)


def test_recompute_mode_equals_stored_activations(activation: str) -> None:
    theta, prob = setup(L=6, M=10, d=3, N=12, act=activation, wd=0.02)
    t2 = theta.copy()
    a = NumpyBackend(memory="store").advance(theta, prob, 0.3, 15)
    b = NumpyBackend(memory="recompute").advance(t2, prob, 0.3, 15)
    np.testing.assert_array_equal(a.loss, b.loss)
    np.testing.assert_array_equal(theta.U, t2.U)
    w = model.Workspace.for_problem(theta.batched(), prob.x, recompute=True)
    assert w.S.shape == (1, 1, 12, 10)


def test_batch_of_nets_equals_separate_runs() -> None:
    """B nets advanced in one batched call follow exactly their separate trajectories."""
    nets = [setup(L=5, M=7, d=3, N=9, scheme=s)[0] for s in ("iid", "tied", "smooth")]
    _, prob = setup(L=5, M=7, d=3, N=9)
    batch = model.Particles(*(np.stack([getattr(t, v) for t in nets]) for v in "UWb"))
    traj = NumpyBackend().advance(batch, prob, 0.4, 12)
    assert traj.loss.shape == (13, 3) and traj.grad_norm.shape == (13, 3)
    for j, t in enumerate(nets):
        single = NumpyBackend().advance(t, prob, 0.4, 12)
        np.testing.assert_allclose(traj.loss[:, j], single.loss, rtol=1e-13)
        np.testing.assert_allclose(traj.grad_norm[:, j], single.grad_norm, rtol=1e-12)
        np.testing.assert_allclose(batch.U[j], t.U, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("threads", [1, 2])
def test_trajectory_returns_the_output_at_its_last_state(threads: int) -> None:
    """The output a·z_L the backend hands to the snapshots is the net's at the state it stopped
    at (a separate forward pass, one net and a batch), above the threaded size too."""
    for L, M, d, N in ((4, 6, 3, 8), (8, 64, 4, 600)):
        theta, prob = setup(L=L, M=M, d=d, N=N, act="gelu", wd=0.01)
        traj = NumpyBackend(threads=threads).advance(theta, prob, 0.3, 5)
        want = model.predict(theta, prob.x, prob.a, prob.activation)
        assert traj.prediction is not None and traj.prediction.dtype == theta.U.dtype
        np.testing.assert_allclose(traj.prediction, want, rtol=1e-13, atol=1e-15)
        r = traj.prediction - prob.y  # and it is the output whose residual gave the last E
        E = 0.5 * np.mean(r**2) + model.decay_term(theta, 0.01)
        assert E == pytest.approx(traj.loss[-1], rel=1e-13)
    nets = [setup(L=5, M=7, d=3, N=9, scheme=s)[0] for s in ("iid", "smooth")]
    batch = model.Particles(*(np.stack([getattr(t, v) for t in nets]) for v in "UWb"))
    traj = NumpyBackend(threads=threads).advance(batch, prob := setup(L=5, M=7, d=3, N=9)[1], 0.4, 3)
    assert traj.prediction.shape == (2, 9)
    np.testing.assert_allclose(traj.prediction, model.predict(batch, prob.x, prob.a, prob.activation),
                               rtol=1e-13, atol=1e-15)


def test_a_chunk_that_continues_the_last_reuses_its_gradient_with_the_same_numbers() -> None:
    """Chunks of 3 + 4 + 5 steps give bit for bit the E, velocities and θ of one chunk of 12; the
    later chunks start from the previous chunk's last ∇E, and a changed θ or new data do not."""
    theta, prob = setup(L=5, M=7, d=3, N=9, act="softplus", wd=0.01)
    ref = theta.copy()
    whole = NumpyBackend().advance(ref, prob, 0.3, 12)
    be = NumpyBackend()
    parts = []
    for n, cont in ((3, False), (4, True), (5, True)):
        parts.append(be.advance(theta, prob, 0.3, n))
        assert be.continued is cont
    np.testing.assert_array_equal(np.concatenate([parts[0].loss, *(p.loss[1:] for p in parts[1:])]), whole.loss)
    np.testing.assert_array_equal(np.concatenate([parts[0].grad_norm, *(p.grad_norm[1:] for p in parts[1:])]),
                                  whole.grad_norm)
    for v in "UWb":
        np.testing.assert_array_equal(getattr(theta, v), getattr(ref, v))
    theta.U[0, 0, 0] += 1e-3
    moved = be.advance(theta, prob, 0.3, 1)
    assert not be.continued and moved.loss[0] != whole.loss[-1]
    _, other = setup(L=5, M=7, d=3, N=9, act="softplus", wd=0.01)  # equal data, another Problem
    be.advance(theta, other, 0.3, 1)
    assert not be.continued


def test_batch_keeps_going_when_one_member_diverges() -> None:
    good, prob = setup(L=2, M=3, d=2, N=4, wd=10.0)
    bad = good.copy()
    bad.U *= 1e200
    batch = model.Particles(*(np.stack([getattr(t, v) for t in (good, bad)]) for v in "UWb"))
    with np.errstate(all="ignore"):
        traj = NumpyBackend().advance(batch, prob, 1e-3, 5)
    assert len(traj.loss) == 6
    assert np.all(np.isfinite(traj.loss[:, 0])) and not np.isfinite(traj.loss[-1, 1])
