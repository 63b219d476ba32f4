"""The hand-written adjoint gradient equals the exact gradient of the finite net."""

from __future__ import annotations

import numpy as np
import pytest
from reference import autograd_loss_and_grad, plain_loss

from mfres import activations, model
from mfres.data import builtin
from mfres.init import initial_particles


def problem(scheme: str, L: int = 3, M: int = 4, d: int = 3, N: int = 5, seed: int = 7):
    data = builtin("teacher", N, d, data_seed=seed)
    theta = initial_particles(scheme, L, M, d, seed, scale=0.9)
    return theta, data


def flat(p: model.Particles) -> np.ndarray:
    return np.concatenate([p.U.ravel(), p.W.ravel(), p.b.ravel()])


def unflat(v: np.ndarray, like: model.Particles) -> model.Particles:
    nU = like.U.size
    return model.Particles(v[:nU].reshape(like.U.shape), v[nU:2 * nU].reshape(like.W.shape),
                           v[2 * nU:].reshape(like.b.shape))


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_gradient_matches_central_differences(activation: str, scheme: str, weight_decay: float) -> None:
    theta, data = problem(scheme)
    act = activations.parse(activation)
    E, g = model.loss_and_grad(theta, data.x, data.y, data.readout, act, weight_decay)
    v0 = flat(theta)
    h = 1e-6
    fd = np.empty_like(v0)
    for j in range(v0.size):
        vp, vm = v0.copy(), v0.copy()
        vp[j] += h
        vm[j] -= h
        Ep = model.loss(unflat(vp, theta), data.x, data.y, data.readout, act, weight_decay)
        Em = model.loss(unflat(vm, theta), data.x, data.y, data.readout, act, weight_decay)
        fd[j] = (Ep - Em) / (2 * h)
    np.testing.assert_allclose(flat(g), fd, rtol=1e-5, atol=2e-9)  # FD rounding ~ eps E / h
    assert E == pytest.approx(model.loss(theta, data.x, data.y, data.readout, act, weight_decay), rel=1e-14)


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_gradient_equals_autograd_to_rounding(activation: str, scheme: str, weight_decay: float) -> None:
    theta, data = problem(scheme, L=4, M=5, d=2, N=6)
    act = activations.parse(activation)
    E, g = model.loss_and_grad(theta, data.x, data.y, data.readout, act, weight_decay)
    E_ref, gU, gW, gb = autograd_loss_and_grad(theta.U, theta.W, theta.b, data.x, data.y, data.readout,
                                               act.name, weight_decay, act.eta)
    assert E == pytest.approx(E_ref, rel=1e-13)
    scale = max(np.abs(gU).max(), np.abs(gW).max(), np.abs(gb).max())
    for mine, ref in ((g.U, gU), (g.W, gW), (g.b, gb)):
        np.testing.assert_allclose(mine, ref, rtol=1e-10, atol=1e-13 * scale)


def test_loss_matches_plain_forward(activation: str) -> None:
    theta, data = problem("iid", L=3, M=4, d=3, N=4)
    act = activations.parse(activation)
    E = model.loss(theta, data.x, data.y, data.readout, act, 0.2)
    ref = plain_loss(theta.U, theta.W, theta.b, data.x, data.y, data.readout, act.name, 0.2, act.eta)
    assert E == pytest.approx(ref, rel=1e-13)


def test_activation_derivative_is_derivative(activation: str) -> None:
    act = activations.parse(activation)
    q = np.linspace(-3, 3, 601) + 1e-3  # avoid srelu/relu2 kinks at exactly ±η, 0
    s, ds = np.empty_like(q), np.empty_like(q)
    activations.value_and_derivative(act, q.copy(), s, ds)
    h = 1e-6
    fd = (activations.sigma(act, q + h) - activations.sigma(act, q - h)) / (2 * h)
    np.testing.assert_allclose(ds, fd, atol=1e-7)


def test_float32_gradient_close_to_float64() -> None:
    theta, data = problem("smooth", L=6, M=8, d=3, N=10)
    act = activations.parse("tanh")
    E64, g64 = model.loss_and_grad(theta, data.x, data.y, data.readout, act)
    t32 = theta.astype(np.float32)
    x, y, a = (v.astype(np.float32) for v in (data.x, data.y, data.readout))
    E32, g32 = model.loss_and_grad(t32, x, y, a, act)
    assert g32.U.dtype == np.float32
    assert E32 == pytest.approx(E64, rel=1e-5)
    np.testing.assert_allclose(g32.W, g64.W, rtol=1e-3, atol=1e-6 * np.abs(g64.W).max())
