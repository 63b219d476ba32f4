"""The finite ResNet of docs/model.md: forward pass, loss, discrete adjoint, gradient.

Pure functions on arrays. Layouts (C order): ``U, W`` are ``(L, M, d)``, ``b`` is
``(L, M)``, ``x`` is ``(N, d)``, ``y`` is ``(N,)`` and the readout ``a`` is ``(d,)``.
Depth step h = 1/L. The loss is

    E = (1/N) Σ_i ½ (a·z_L(x_i) − y_i)² + (λ/2) (1/(L M)) Σ_{l,m} |θ_{l,m}|²

and the gradient is the exact gradient of E for the finite net (discrete adjoint).
A gradient-descent step of pseudo-time Δs is ``θ ← θ − Δs L M ∇E`` (``lr = L M Δs``).
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .activations import CHUNK, Activation, Scratch, value_and_derivative


@dataclass
class Particles:
    """The trained parameters θ: ``U, W`` of shape (L, M, d) and ``b`` of shape (L, M).

    A batch of B independent nets of the same size has a leading axis:
    ``U, W`` (B, L, M, d), ``b`` (B, L, M).
    """

    U: np.ndarray
    W: np.ndarray
    b: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """(L, M, d)."""
        return self.U.shape[-3:]  # type: ignore[return-value]

    @property
    def batch(self) -> tuple[int, ...]:
        """() for one net, (B,) for a batch."""
        return self.U.shape[:-3]

    def copy(self) -> Particles:
        return Particles(self.U.copy(), self.W.copy(), self.b.copy())

    def astype(self, dtype: np.dtype | type) -> Particles:
        return Particles(*(np.ascontiguousarray(v, dtype=dtype) for v in (self.U, self.W, self.b)))

    def batched(self) -> Particles:
        """Views with a batch axis (B = 1 for a single net)."""
        if self.batch:
            return self
        return Particles(self.U[None], self.W[None], self.b[None])


def learning_rate(L: int, M: int, ds: float) -> float:
    """The plain learning rate on E equivalent to a pseudo-time step Δs: ``L M Δs``."""
    return L * M * ds


def sample_block(N: int, M: int) -> int:
    """Samples per block of the passes: nb = CHUNK / M (a block's activations fill
    ``activations.CHUNK``), or 2·nb where N holds at least two blocks of 2·nb (fewer, longer
    NumPy calls: at large, 64 samples a block made a step 1.17× faster than 32).

    A function of the problem only (never of the number of cores), so that results are too."""
    nb = max(1, CHUNK // max(M, 1))
    return min(N, 2 * nb if 2 * nb <= N // 2 else nb)


def workspace_bytes(L: int, M: int, d: int, N: int, dtype: np.dtype, recompute: bool = False, B: int = 1,
                    threads: int = 1) -> int:
    """Bytes of a ``Workspace`` plus θ, its gradient and a copy of θ (what a run holds)."""
    layers = 1 if recompute else L
    nb = sample_block(N, M)
    per_process = 2 * nb * M + nb * d + M * (d + 1) + 6 * CHUNK + CHUNK // 2
    work = 2 * layers * N * M + 2 * (L + 1) * N * (d + 1) + N + threads * per_process
    particles = 7 * L * M * (2 * d + 1)  # θ, ∇E and G, [W b], [U 0], the chunk-start copy, the snapshot cast
    return int(np.dtype(dtype).itemsize * B * (work + particles))


def default_threads() -> int:
    """All the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class Workspace:
    """Buffers reused across gradient evaluations (all in the particles' dtype).

    ``Z`` holds the states z_0..z_L (L+1, B, N, d+1), each with a last entry 1 so that
    one product [z 1]·[W b]ᵀ gives the pre-activations and one product Tᵀ[z 1] gives
    both ∂E/∂W and ∂E/∂b (``Wb`` and ``U0`` hold [W b] and [U 0]); ``P`` the adjoints
    p_0..p_L in the same layout; ``S`` and ``D`` hold σ(q) and σ'(q) (L, B, N, M) — the
    adjoint overwrites σ' with T = σ'(q) (U·p_{l+1}) — or only one layer's (1, B, N, M)
    in ``recompute`` mode, where the adjoint recomputes each layer's activations from
    z_l (memory O(L N d) instead of O(L N M), one more product and activation per layer).
    B is the batch size (1 for a single net).

    The samples are cut into fixed blocks of ``sample_block(N, M)``; ``threads`` cores
    take contiguous runs of blocks (forward and adjoint: each sample's z and p are its
    own) and then of layers (the parameter gradients ``G``: one product over all N samples
    per layer). They are processes, not threads (``mfres.parallel``: NumPy's short calls
    would hand the GIL back and forth): with ``threads`` > 1 on a problem large enough
    (``parallel``), the arrays live in a shared file and ``threads`` − 1 helper processes
    run their parts. No result depends on ``threads``: a block's numbers do not depend on
    who computes them, and every sum over samples is one product in a fixed order.
    ``scratch`` holds this process's private buffers; ``attach`` (for a helper) gives
    the shared arrays to use instead of allocating them.
    """

    L: int
    M: int
    d: int
    N: int
    dtype: np.dtype
    B: int = 1
    recompute: bool = False
    threads: int = 1
    attach: dict[str, np.ndarray] | None = field(default=None, repr=False)
    Z: np.ndarray = field(init=False)
    P: np.ndarray = field(init=False)
    S: np.ndarray = field(init=False)
    D: np.ndarray = field(init=False)
    r: np.ndarray = field(init=False)
    Wb: np.ndarray = field(init=False)
    U0: np.ndarray = field(init=False)
    G: Particles = field(init=False)
    blocks: list[slice] = field(init=False)
    scratch: _Scratch = field(init=False)
    helpers: Any = field(init=False, default=None)
    _views: dict[int, _BlockViews] = field(init=False, default_factory=dict, repr=False)
    _layers: tuple[list[np.ndarray], ...] | None = field(init=False, default=None, repr=False)
    startup_seconds: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        L, M, d, N, B, dt = self.L, self.M, self.d, self.N, self.B, np.dtype(self.dtype)
        self.dtype = dt
        self.threads = max(1, int(self.threads))
        layers = 1 if self.recompute else L
        shapes = {"Z": (L + 1, B, N, d + 1), "P": (L + 1, B, N, d + 1), "S": (layers, B, N, M),
                  "D": (layers, B, N, M), "Wb": (B, L, M, d + 1), "U0": (B, L, M, d + 1),
                  "GU": (B, L, M, d), "GW": (B, L, M, d), "Gb": (B, L, M)}
        spec = {k: (v, dt.name) for k, v in shapes.items()}
        arrays, source = self.attach, None
        if arrays is None and self.threads > 1 and self.parallel:
            from . import parallel

            try:
                arrays, source = parallel.shared_arrays(spec)
            except OSError as e:
                warnings.warn(f"{e}; this run uses one core", RuntimeWarning, stacklevel=2)
        if arrays is None:
            arrays = {k: np.empty(v, dt) for k, v in shapes.items()}
        for k in ("Z", "P", "S", "D", "Wb", "U0"):
            setattr(self, k, arrays[k])
        self.G = Particles(arrays["GU"], arrays["GW"], arrays["Gb"])
        if self.attach is None:
            self.Z[..., d] = 1
            self.P[..., d] = 0  # never written again: a p's last entry only ever meets U0's zero column
            self.U0[...] = 0
        self.r = np.empty((B, N), dt)
        nb = sample_block(N, M)
        self.blocks = [slice(i, min(i + nb, N)) for i in range(0, N, nb)]
        self.scratch = _Scratch(B, nb, M, d, dt)
        if source is not None:
            from . import parallel

            t0 = time.perf_counter()
            try:
                rebuild = {"L": L, "M": M, "d": d, "N": N, "dtype": dt.name, "B": B, "recompute": self.recompute}
                self.helpers = parallel.Helpers(self.threads - 1, source, spec, rebuild)
            except OSError as e:  # the arrays stay shared, with no one to share them with
                warnings.warn(f"cannot start NumPy helper processes ({e}); this run uses one core",
                              RuntimeWarning, stacklevel=2)
            finally:
                parallel.release(source)  # every helper has mapped it (or none will)
            self.startup_seconds = time.perf_counter() - t0

    def views(self, blk: slice) -> _BlockViews:
        """The views of sample block ``blk``, made at its first pass and kept where the workspace
        has at most ``VIEW_CACHE`` block-layers (a few MiB of view objects at most); made at each
        pass otherwise, where blocks are tiny and many (M ≥ ``CHUNK``)."""
        v = self._views.get(blk.start)
        if v is None:
            v = _BlockViews(self, blk)
            if len(self.blocks) * self.L <= VIEW_CACHE:
                self._views[blk.start] = v
        return v

    def layer_views(self) -> tuple[list[np.ndarray], ...]:
        """Per layer, views of [W b]ᵀ, W, U and [U 0]ᵀ (made once; every sample block shares them)."""
        if self._layers is None:
            L, d = self.L, self.d
            self._layers = ([self.Wb[:, l].transpose(0, 2, 1) for l in range(L)],
                            [self.Wb[:, l, :, :d] for l in range(L)],
                            [self.U0[:, l, :, :d] for l in range(L)],
                            [self.U0[:, l].transpose(0, 2, 1) for l in range(L)])
        return self._layers

    def load(self, theta: Particles) -> None:
        """Copy θ (with a batch axis) into [W b] and [U 0]."""
        d = self.d
        self.Wb[..., :d] = theta.W
        self.Wb[..., d] = theta.b
        self.U0[..., :d] = theta.U

    @classmethod
    def for_problem(cls, theta: Particles, x: np.ndarray, recompute: bool = False, threads: int = 1) -> Workspace:
        L, M, d = theta.shape
        B = theta.batch[0] if theta.batch else 1
        return cls(L, M, d, x.shape[0], theta.U.dtype, B, recompute, threads)

    def fits(self, theta: Particles, x: np.ndarray) -> bool:
        B = theta.batch[0] if theta.batch else 1
        return (self.L, self.M, self.d, self.N, self.dtype, self.B) == (*theta.shape, x.shape[0], theta.U.dtype, B)

    @property
    def parallel(self) -> bool:
        """Large enough to split over processes (a property of the problem, not of ``threads``)."""
        return self.L * self.B * self.N * self.M >= PARALLEL_MIN

    def items(self, task: str, args: dict[str, Any]) -> list:
        """What ``task`` splits: the sample blocks, or (``gradient``) the layers."""
        return list(args["layers"]) if task == "gradient" else self.blocks

    def run(self, task: str, **args: Any) -> None:
        """``task`` (a name in ``TASKS``) on all its items: contiguous parts of them on ``threads`` cores."""
        items = self.items(task, args)
        n = min(self.threads, len(items))
        if n <= 1 or self.helpers is None:
            TASKS[task](self, items, **args)
            return
        self.helpers.run(task, n, args, lambda i: self.run_part(task, i, n, args),
                         lambda i: self.redo_part(task, i, n, args))

    def redo_part(self, task: str, i: int, n: int, args: dict[str, Any]) -> None:
        """Part i of n of ``task`` done here again, after a helper failed on it: the stored adjoint
        turns σ' into T in place, so its blocks' forward pass comes first."""
        if task == "adjoint" and not self.recompute:
            self.run_part("forward", i, n, {"act": args["act"]})
        self.run_part(task, i, n, args)

    def run_part(self, task: str, i: int, n: int, args: dict[str, Any]) -> None:
        """Part i of n of ``task``'s items, here: the i-th of n contiguous runs of them."""
        items = self.items(task, args)
        TASKS[task](self, items[len(items) * i // n: len(items) * (i + 1) // n], **args)

    def close(self) -> None:
        """Stop the helper processes (also done when the workspace is collected)."""
        if self.helpers is not None:
            self.helpers.close()
            self.helpers = None


VIEW_CACHE = 1 << 12
"""At most this many block-layers (sample blocks × L) have their views kept (``Workspace.views``)."""

PARALLEL_MIN = 1 << 18
"""Fewer activations per step than this (L·B·N·M) run in the calling process: a hand-over costs tens of µs,
more on a busy machine (measured with threads: at the default size, 65536, two were slower than one)."""


class _Scratch:
    """One process's buffers: one sample block's pre-activations and adjoint products."""

    def __init__(self, B: int, nb: int, M: int, d: int, dtype: np.dtype) -> None:
        self.Q = np.empty((B, nb, M), dtype)
        self.Pn = np.empty((B, nb, d), dtype)
        self.G = np.empty((B, M, d + 1), dtype)
        self.act = Scratch(dtype)


class _BlockViews:
    """One sample block's views of a workspace's arrays, made once: a step makes thousands of
    NumPy calls on them, and making a view costs about as much as a call. Per layer l: its rows
    of Z_l and P_l (``z``, ``p``: without their last entry), of S and D (``S1``, ``D1``: the
    same, with ``q1``, as 1-D arrays where all three are contiguous, so that the element-wise
    passes need not reshape them), the layer's [W b]ᵀ, W, U, [U 0]ᵀ (shared by every block:
    ``Workspace.layer_views``), and the workspace's scratch (``q``, ``pn``, ``act``). The
    products that need not carry the last column skip it: BLAS takes 8 columns faster than 9."""

    def __init__(self, work: Workspace, blk: slice) -> None:
        ts, nb = work.scratch, blk.stop - blk.start
        d = work.d
        self.q, self.pn, self.act = ts.Q[:, :nb], ts.Pn[:, :nb], ts.act
        self.Z = [work.Z[l, :, blk] for l in range(work.L + 1)]
        self.P = [work.P[l, :, blk] for l in range(work.L + 1)]
        self.z = [a[..., :d] for a in self.Z]
        self.p = [a[..., :d] for a in self.P]
        self.S = [work.S[k, :, blk] for k in range(work.S.shape[0])]
        self.D = [work.D[k, :, blk] for k in range(work.D.shape[0])]
        flat = self.q.flags.c_contiguous and self.S[0].flags.c_contiguous
        self.q1 = self.q.reshape(-1) if flat else self.q
        self.S1 = [a.reshape(-1) for a in self.S] if flat else self.S
        self.D1 = [a.reshape(-1) for a in self.D] if flat else self.D
        self.Wbt, self.W, self.U, self.U0t = work.layer_views()


def _forward_blocks(work: Workspace, blocks: list[slice], act: Activation) -> None:
    """z_1..z_L of the samples in ``blocks`` (and their σ, σ' in store mode)."""
    c = work.dtype.type(1.0 / (work.L * work.M))
    for blk in blocks:
        v = work.views(blk)
        for l in range(work.L):
            k = 0 if work.recompute else l
            np.matmul(v.Z[l], v.Wbt[l], out=v.q)
            value_and_derivative(act, v.q1, v.S1[k], v.D1[k], v.act)
            zn = v.z[l + 1]  # z_{l+1} without its constant last entry 1
            np.matmul(v.S[k], v.U[l], out=zn)
            zn *= c
            zn += v.z[l]


def _adjoint_blocks(work: Workspace, blocks: list[slice], act: Activation, layers: range) -> None:
    """p_l for l in ``layers`` (descending) of the samples in ``blocks``; D becomes T."""
    c = work.dtype.type(1.0 / (work.L * work.M))
    for blk in blocks:
        v = work.views(blk)
        q, pn = v.q, v.pn
        for l in layers:
            k = 0 if work.recompute else l
            if work.recompute:
                np.matmul(v.Z[l], v.Wbt[l], out=q)
                value_and_derivative(act, v.q1, v.S1[0], v.D1[0], v.act)
            T = v.D[k]
            np.matmul(v.P[l + 1], v.U0t[l], out=q)  # U·p_{l+1}
            np.multiply(q, T, out=T)  # T = σ'(q) (U·p_{l+1})
            np.matmul(T, v.W[l], out=pn)  # p's last entry stays 0 (it meets [U 0]'s zero column)
            pn *= c
            np.add(v.p[l + 1], pn, out=v.p[l])


def _gradient_layers(work: Workspace, part: list[int], layers: range) -> None:
    """∂E/∂U, ∂E/∂[W b] of the layers ``part`` (of ``layers``) into ``work.G``, up to the factor h/(M N):
    one product over all samples each."""
    d, gb, ts = work.d, work.G, work.scratch
    for l in part:
        k = 0 if work.recompute else l
        np.matmul(work.S[k].transpose(0, 2, 1), work.P[l + 1, ..., :d], out=gb.U[:, l])
        np.matmul(work.D[k].transpose(0, 2, 1), work.Z[l], out=ts.G)  # [∂W ∂b]
        gb.W[:, l] = ts.G[..., :d]
        gb.b[:, l] = ts.G[..., d]


TASKS = {"forward": _forward_blocks, "adjoint": _adjoint_blocks, "gradient": _gradient_layers}
"""The passes ``Workspace.run`` splits, by name (a helper process is asked for them by name)."""


def forward(theta: Particles, x: np.ndarray, act: Activation, work: Workspace) -> np.ndarray:
    """Run the ResNet on ``x``; fill ``work.Z`` (and ``S``, ``D``); return z_L (B, N, d), a view.

    ``theta`` must carry a batch axis (``Particles.batched``).
    """
    L, _M, d = theta.shape
    work.load(theta)
    work.Z[0, ..., :d] = x
    work.run("forward", act=act)
    return work.Z[L, ..., :d]


def predict(theta: Particles, x: np.ndarray, a: np.ndarray, act: Activation) -> np.ndarray:
    """The net's output ``a·z_L(x_i)`` for each sample: (N,), or (B, N) for a batch."""
    tb = theta.batched()
    work = Workspace.for_problem(tb, x, recompute=True)
    out = forward(tb, np.asarray(x, theta.U.dtype), act, work) @ a.astype(theta.U.dtype)
    return out if theta.batch else out[0]


def decay_term(theta: Particles, weight_decay: float) -> np.ndarray | float:
    """(λ/2) (1/(L M)) Σ |θ|² per net, accumulated in float64."""
    if weight_decay == 0:
        return np.zeros(theta.batch) if theta.batch else 0.0
    L, M, _ = theta.shape
    sq = sum(np.sum(np.square(v, dtype=np.float64), axis=tuple(range(len(theta.batch), v.ndim)))
             for v in (theta.U, theta.W, theta.b))
    out = 0.5 * weight_decay * sq / (L * M)
    return out if theta.batch else float(out)


def loss(theta: Particles, x: np.ndarray, y: np.ndarray, a: np.ndarray, act: Activation,
         weight_decay: float = 0.0) -> float:
    """E(θ) without the gradient."""
    r = predict(theta, x, a, act) - y
    E = 0.5 * np.mean(r.astype(np.float64) ** 2, axis=-1) + decay_term(theta, weight_decay)
    return E if theta.batch else float(E)


def loss_and_grad(theta: Particles, x: np.ndarray, y: np.ndarray, a: np.ndarray, act: Activation,
                  weight_decay: float = 0.0, work: Workspace | None = None,
                  grad: Particles | None = None, recompute: bool = False, threads: int = 1) -> tuple[Any, Particles]:
    """E(θ) and ∇_θ E by the discrete adjoint of docs/model.md.

    ``work`` and ``grad`` are optional preallocated buffers (reused when given);
    ``recompute`` and ``threads`` choose the workspace when none is given. E is a Python
    float for one net, a float64 array (B,) for a batch; the gradient has θ's dtype
    and shape.
    """
    L, M, _d = theta.shape
    N = x.shape[0]
    dt = theta.U.dtype
    tb = theta.batched()
    if work is None or not work.fits(tb, x):
        work = Workspace.for_problem(tb, x, recompute, threads)
    if grad is None:
        grad = Particles(np.empty_like(theta.U), np.empty_like(theta.W), np.empty_like(theta.b))
    zL = forward(tb, x, act, work)
    r = work.r
    np.matmul(zL, a, out=r)
    r -= y
    E = 0.5 * np.einsum("bn,bn->b", r, r, dtype=np.float64) / N
    E = E + decay_term(tb, weight_decay)

    c = 1.0 / (L * M)  # h/M
    cg = dt.type(c / N)
    P = work.P
    np.multiply(r[..., None], a, out=P[L, ..., :_d])  # p_L
    # store mode: the adjoint of every layer, then every layer's gradient; recompute mode:
    # layer by layer, since only one layer's σ and T exist at a time
    groups = [range(L - 1, -1, -1)] if not work.recompute else [range(l, l - 1, -1) for l in range(L - 1, -1, -1)]
    for layers in groups:
        work.run("adjoint", act=act, layers=layers)
        work.run("gradient", layers=layers)
    gb, G = grad.batched(), work.G
    for g, w in ((gb.U, G.U), (gb.W, G.W), (gb.b, G.b)):
        np.multiply(w, cg, out=g)
    if weight_decay:
        wd = dt.type(weight_decay * c)
        for g, v in zip((grad.U, grad.W, grad.b), (theta.U, theta.W, theta.b), strict=True):
            g += wd * v
    return (E if theta.batch else float(E[0])), grad


def velocity_rms(grad: Particles) -> Any:
    """RMS over particles of the velocity |dθ/ds| = L M |∇_θ E| (each particle's 2d+1 components).

    A float for one net, an array (B,) for a batch."""
    L, M, _ = grad.shape
    nb = len(grad.batch)
    sq = sum(np.sum(np.square(g, dtype=np.float64), axis=tuple(range(nb, g.ndim))) for g in (grad.U, grad.W, grad.b))
    out = L * M * np.sqrt(sq / (L * M))
    return out if grad.batch else float(out)


def gd_step(theta: Particles, grad: Particles, ds: float) -> None:
    """θ ← θ − Δs L M ∇E, in place."""
    L, M, _ = theta.shape
    step = theta.U.dtype.type(ds * L * M)
    for v, g in zip((theta.U, theta.W, theta.b), (grad.U, grad.W, grad.b), strict=True):
        v -= step * g
