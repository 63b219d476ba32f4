"""The peer: docs/model.md written with PyTorch autograd, as a researcher would write it.

Same forward pass, loss and update (θ ← θ − Δs L M ∇E), gradients by
``torch.autograd``. Each layer's U, W, b is its own leaf tensor (indexing one
(L, M, d) tensor would make autograd scatter L full-size gradients per step).
Used only by the benchmarks (``pip install torch==2.13.0``).
"""

from __future__ import annotations

import numpy as np


class TorchPeer:
    """GD on the finite ResNet with PyTorch autograd (tanh activation)."""

    name = "pytorch"

    def __init__(self, U: np.ndarray, W: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray,
                 a: np.ndarray, threads: int = 2) -> None:
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        self.L, self.M = U.shape[0], U.shape[1]
        self.params = [torch.tensor(v[l], requires_grad=True) for l in range(self.L) for v in (U, W, b)]
        self.x, self.y, self.a = (torch.tensor(v) for v in (x, y, a))

    def loss(self):
        c = 1.0 / (self.L * self.M)
        z = self.x
        for l in range(self.L):
            U, W, b = self.params[3 * l: 3 * l + 3]
            z = z + c * (self.torch.tanh(z @ W.T + b) @ U)
        r = z @ self.a - self.y
        return 0.5 * (r * r).mean()

    def advance(self, ds: float, n: int) -> np.ndarray:
        lr = ds * self.L * self.M
        losses = np.empty(n + 1)
        for k in range(n + 1):
            E = self.loss()
            losses[k] = E.item()
            if k == n:
                break
            grads = self.torch.autograd.grad(E, self.params)
            with self.torch.no_grad():
                for p, g in zip(self.params, grads, strict=True):
                    p.sub_(lr * g)
        return losses

    def state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        U = np.stack([p.detach().numpy() for p in self.params[0::3]])
        W = np.stack([p.detach().numpy() for p in self.params[1::3]])
        b = np.stack([p.detach().numpy() for p in self.params[2::3]])
        return U, W, b
