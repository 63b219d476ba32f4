"""The strongest peer: docs/model.md written in JAX, as a researcher would write it today.

The forward pass is a ``lax.scan`` over the L layers, the loss and its gradient come from
``jax.jit(jax.value_and_grad(loss))`` (XLA fuses the element-wise work into the products),
float64 (``jax_enable_x64``), and the update is θ ← θ − Δs L M ∇E, jitted with the
gradient. Used only by the benchmarks (``pip install 'jax[cpu]'``, the ``bench`` extra).
"""

from __future__ import annotations

import os

import numpy as np


def _jax():
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_enable_x64", True)
    return jax


class JaxPeer:
    """GD on the finite ResNet with ``jit(value_and_grad)`` (tanh activation)."""

    name = "jax"

    def __init__(self, U: np.ndarray, W: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray,
                 a: np.ndarray, weight_decay: float = 0.0) -> None:
        jax = _jax()
        jnp = jax.numpy
        self.jax = jax
        L, M = U.shape[0], U.shape[1]
        self.L, self.M = L, M
        c = 1.0 / (L * M)  # h/M

        def loss(params, x, y, a):
            U, W, b = params

            def layer(z, theta):
                Ul, Wl, bl = theta
                return z + c * (jnp.tanh(z @ Wl.T + bl) @ Ul), None

            z, _ = jax.lax.scan(layer, x, (U, W, b))
            r = z @ a - y
            E = 0.5 * jnp.mean(r * r)
            if weight_decay:
                E = E + 0.5 * weight_decay * c * sum(jnp.sum(v * v) for v in params)
            return E

        vg = jax.value_and_grad(loss)
        lr = L * M

        @jax.jit
        def step(params, ds, x, y, a):
            E, g = vg(params, x, y, a)
            return E, tuple(p - ds * lr * gi for p, gi in zip(params, g, strict=True))

        self._vg = jax.jit(vg)
        self._step = step
        self.params = tuple(jnp.asarray(v) for v in (U, W, b))
        self.data = tuple(jnp.asarray(v) for v in (x, y, a))

    def loss_and_grad(self) -> tuple[float, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """E and ∇E at the current θ (for the correctness check against mfres)."""
        E, g = self._vg(self.params, *self.data)
        return float(E), tuple(np.asarray(v) for v in g)

    def advance(self, ds: float, n: int) -> np.ndarray:
        """n GD steps; E before each step and after the last (n + 1 values, like ``Backend.advance``)."""
        losses = []
        params = self.params
        for _ in range(n):
            E, params = self._step(params, ds, *self.data)
            losses.append(E)
        E, _ = self._vg(params, *self.data)
        losses.append(E)
        self.params = params
        return np.asarray(self.jax.device_get(losses), dtype=np.float64)
