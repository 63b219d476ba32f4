"""Activations σ of the residual map ``f(z, θ) = U σ(W·z + b)`` and their derivatives.

Each activation is evaluated together with its derivative, in place, because the
forward pass needs σ(q) and the adjoint needs σ'(q) at the same pre-activations.
The formulas are the ones every backend implements (``jl/activations.jl``):

- ``tanh``;  ``sigmoid(u) = (1 + tanh(u/2)) / 2`` (overflow-free form);
- ``softplus(u) = max(u, 0) + log1p(exp(-|u|))``;
- ``gelu(u) = u/2 (1 + tanh(√(2/π) (u + 0.044715 u³)))``, the tanh form of GELU
  (Julia's Base has no ``erf``, and both backends must agree to rounding);
- ``srelu`` / ``srelu:η``: regularised ReLU, ``(u+η)²/(4η)`` on [−η, η], ``u``
  above, 0 below (default η = 0.5);
- ``relu2(u) = max(u, 0)²``.

In float64, tanh (and so sigmoid and gelu) is mfres's own (``tanh``), built from
additions, products, one division and a table look-up, except where NumPy's is faster:
NumPy's float64 ``np.tanh`` is vectorised only on CPUs with AVX-512 (2 ns per element
there) and costs 15–20 ns per element elsewhere, more than a layer's matrix work
(``OWN_TANH``; ``MFRES_TANH=own|numpy`` overrides the choice). mfres's tanh is within
3 ulp of the exact tanh (measured: ``benchmarks/tanh_accuracy.py``), odd, ±0 at ±0, ±1
beyond |u| = 20, NaN for NaN (a float32 version exists, within 3 ulp, but NumPy's float32
tanh is faster). The passes run on blocks of ``CHUNK`` elements held in per-thread
scratch buffers (``Scratch``), so that the intermediate arrays stay in the core's cache.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np

GELU_C = float(np.sqrt(2.0 / np.pi))
GELU_A = 0.044715
SRELU_DEFAULT_ETA = 0.5

NAMES = ("tanh", "sigmoid", "softplus", "gelu", "srelu", "relu2")

CHUNK = 16384
"""Elements per block of the element-wise passes: the 4 scratch arrays of tanh and its input and outputs,
128 KiB each in float64, fit in a 1 MiB L2 cache."""


@dataclass(frozen=True)
class Activation:
    """A parsed activation: its ``name`` and, for ``srelu``, the width ``eta``."""

    name: str
    eta: float = SRELU_DEFAULT_ETA

    @property
    def spec(self) -> str:
        """The canonical string, as stored in run files and accepted by ``parse``."""
        if self.name == "srelu":
            return f"srelu:{self.eta:g}"
        return self.name


def parse(spec: str) -> Activation:
    """Parse ``"tanh"``, ``"srelu"``, ``"srelu:0.1"``...; raise ``ValueError`` if unknown."""
    name, _, arg = str(spec).strip().lower().partition(":")
    if name not in NAMES:
        raise ValueError(f"unknown activation {spec!r}; choose one of {', '.join(NAMES)} (srelu:ETA sets η)")
    if name != "srelu":
        if arg:
            raise ValueError(f"activation {name!r} takes no parameter (got {spec!r})")
        return Activation(name)
    if not arg:
        return Activation(name)
    try:
        eta = float(arg)
    except ValueError:
        raise ValueError(f"srelu width η must be a number, got {arg!r}") from None
    if not (np.isfinite(eta) and eta > 0):
        raise ValueError(f"srelu width η must be positive and finite, got {arg!r}")
    return Activation(name, eta)


# ---------------------------------------------------------------------------------------------
# tanh from +, ×, ÷ and a table (why: see the module docstring)
#
# x is rounded to the nearest multiple of h = 1/128, x = k h + u with |u| ≤ 1/256 (exact: the
# rounding adds and removes a "magic" constant whose unit in the last place is h, and x − k h
# is exact by Sterbenz's lemma), and the addition theorem gives
#     tanh(x) = (tanh u + c_k) / (1 + c_k tanh u),   c_k = tanh(k h)  (a table of 2K + 1 values).
# With tanh u = A/B, A = u (15 + u²), B = 15 + 6 u² (the [3/2] Padé approximant, the continued
# fraction of tanh cut at 5: relative error ≤ 3e-18 for |u| ≤ 1/256) this is
#     tanh(x) = (A + c_k B) / (B + c_k A):  one division for the whole formula, 17 passes.
# The table holds n_k = −c_k with n_0 = +0.0 and the formula is written (A − n_k B)/(B − n_k A),
# so that tanh(−0) = −0. Beyond |x| = X (20 in float64, 10 in float32) tanh rounds to ±1: the
# input is clipped there, and c_k = ±1 makes numerator and denominator the same sum.


@dataclass(frozen=True)
class _TanhConstants:
    # 0-d arrays, not scalars: NumPy 2 converts a scalar operand on every call (~1 µs)
    lo: np.ndarray  # −X
    hi: np.ndarray  # X
    magic: np.ndarray  # 1.5 · 2^(mantissa bits) · h: x + magic rounds x to a multiple of h
    offset: np.ndarray  # bits(magic) − K: bits(x + magic) − offset is the table index k + K
    table: np.ndarray  # n_k = −tanh(k h), k = −K..K, n_0 = +0.0
    c6: np.ndarray
    c15: np.ndarray
    int_type: type


def _tanh_constants(dtype: type, x_max: int, mantissa_bits: int, int_type: type) -> _TanhConstants:
    steps = 128  # 1/h
    K = x_max * steps
    k = np.arange(-K, K + 1)
    # the table from long double (80-bit on x86-64): each entry correctly rounded, but for ties
    exact = np.tanh(k.astype(np.longdouble) / steps)
    table = (-exact).astype(dtype)
    table[K] = 0.0  # +0.0, not −0.0
    magic = np.array(1.5 * 2.0**mantissa_bits / steps, dtype)
    offset = np.array(magic.view(int_type) - K, int_type)
    c = [np.array(v, dtype) for v in (-x_max, x_max, 6, 15)]
    return _TanhConstants(c[0], c[1], magic, offset, table, c[2], c[3], int_type)


_TANH = {
    np.dtype(np.float64): _tanh_constants(np.float64, 20, 52, np.int64),
    np.dtype(np.float32): _tanh_constants(np.float32, 10, 23, np.int32),
}
_ONE = {dt: np.array(1, dt) for dt in _TANH}
TANH_VARIABLE = "MFRES_TANH"


def numpy_tanh_vectorised() -> bool:
    """Whether NumPy runs its float64 tanh with SIMD here: only the loop NumPy builds for AVX-512
    (Skylake-X subsets; "X86_V4" from NumPy 2.4 on) is vectorised, 2 ns per element against 15–20
    otherwise. Asks NumPy which loop it dispatches to (NumPy ≥ 2), else whether the CPU has that
    AVX-512."""
    try:
        from numpy.lib.introspect import opt_func_info

        info = opt_func_info(func_name="^tanh$", signature="float64")
        current = next(iter(info["tanh"].values()))["current"]
        return current == "X86_V4" or current.startswith("AVX512")
    except (ImportError, KeyError, StopIteration, TypeError, AttributeError):
        pass
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as features
    return bool(features.get("AVX512_SKX"))


def _tanh_choice() -> tuple[bool, str]:
    """Whether float64 uses mfres's tanh, and why, from ``MFRES_TANH`` and the CPU."""
    choice = os.environ.get(TANH_VARIABLE, "").strip().lower()
    if choice in ("own", "numpy"):
        return choice == "own", f"{TANH_VARIABLE}={choice}"
    if choice:
        warnings.warn(f"{TANH_VARIABLE} must be own or numpy, not {choice!r}; choosing by the CPU", stacklevel=3)
    if numpy_tanh_vectorised():
        return False, "vectorised here"
    return True, "NumPy's is not vectorised here"


def own_tanh_dtypes() -> frozenset:
    """The dtypes whose activations use mfres's tanh: float64 unless NumPy's is vectorised here
    (``MFRES_TANH=own`` or ``numpy`` decides instead). Never float32: NumPy vectorises its
    float32 tanh with AVX2 too (4 ns per element with σ', against 6–7 for this one)."""
    return frozenset({np.dtype(np.float64)}) if _tanh_choice()[0] else frozenset()


OWN_TANH = own_tanh_dtypes()
"""The dtypes whose activations use mfres's tanh here (``own_tanh_dtypes``)."""


def tanh_in_use() -> str:
    """Which float64 tanh the activations use here, and why, in words."""
    own = np.dtype(np.float64) in OWN_TANH
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a bad MFRES_TANH was reported when OWN_TANH was made
        why = _tanh_choice()[1]
    return f"float64 tanh: {'mfres' if own else 'NumPy'}'s ({why})"


# the clip ufunc itself: np.clip's Python checks cost ~5 µs a call, as much as the pass on a block
try:
    from numpy._core.umath import clip as _clip  # NumPy ≥ 2
except ImportError:  # pragma: no cover - NumPy 1.x
    _clip = np.clip


class Scratch:
    """Buffers for the element-wise passes on blocks of up to ``n`` elements (one per thread)."""

    def __init__(self, dtype: np.dtype | type, n: int = CHUNK) -> None:
        self.dtype = np.dtype(dtype)
        self.n = n
        self.consts = _TANH.get(self.dtype)
        self.f = np.empty((6, n), self.dtype)
        self.i = np.empty(n, self.consts.int_type if self.consts else np.int64)
        self._cut = {n: self._views(n)}  # by length: a block's views are made once, not at every call (~6 µs)

    def _views(self, m: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None]:
        f = [b[:m] for b in self.f]
        return f, self.i[:m], f[1].view(self.consts.int_type) if self.consts else None

    def views(self, m: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None]:
        """The buffers cut to m elements: 6 float blocks, the index block, block 1 seen as integers."""
        cut = self._cut.get(m)
        if cut is None:
            if len(self._cut) > 8:  # lengths come from a few block sizes; never grow without bound
                self._cut = {self.n: self._cut[self.n]}
            cut = self._cut[m] = self._views(m)
        return cut

    def fits(self, dtype: np.dtype) -> bool:
        return self.dtype == dtype


def _tanh_block(x: np.ndarray, out: np.ndarray, f: list[np.ndarray], ix: np.ndarray, f2_bits: np.ndarray,
                c: _TanhConstants) -> None:
    """tanh of the 1-D block ``x`` into ``out`` (which may be ``x``); ``f``: 4 scratch blocks."""
    f1, f2, f3, f4 = f[:4]
    _clip(x, c.lo, c.hi, out=f1)  # NaN stays NaN
    np.add(f1, c.magic, out=f2)  # k h + magic
    np.subtract(f2_bits, c.offset, out=ix)  # k + K
    np.subtract(f2, c.magic, out=f2)  # k h
    np.subtract(f1, f2, out=f1)  # u, exactly
    c.table.take(ix, out=f2, mode="clip")  # n_k
    np.square(f1, out=f3)  # z = u²
    np.add(f3, c.c15, out=f4)
    np.multiply(f4, f1, out=f4)  # A = u (15 + z)
    np.multiply(f3, c.c6, out=f3)
    np.add(f3, c.c15, out=f3)  # B = 15 + 6 z
    np.multiply(f2, f3, out=f1)
    np.subtract(f4, f1, out=f1)  # A − n_k B
    np.multiply(f2, f4, out=f2)
    np.subtract(f3, f2, out=f2)  # B − n_k A
    np.divide(f1, f2, out=out)


def _pieces(*arrays: np.ndarray):
    """Yield 1-D views covering same-shaped arrays element by element (each C-contiguous piece)."""
    if all(a.flags.c_contiguous for a in arrays):
        yield tuple(a.reshape(-1) for a in arrays)
    elif arrays[0].ndim <= 1:
        raise ValueError("element-wise pass over a strided 1-D array")
    else:
        for i in range(arrays[0].shape[0]):
            yield from _pieces(*(a[i] for a in arrays))


def _blocks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def tanh(x: np.ndarray, out: np.ndarray | None = None, scratch: Scratch | None = None) -> np.ndarray:
    """mfres's tanh of a float64 or float32 array (``np.tanh`` for other dtypes); see the module docstring."""
    x = np.asarray(x)
    if out is None:
        out = np.empty_like(x, order="C")
    consts = _TANH.get(x.dtype)
    if consts is None:
        return np.tanh(x, out=out)
    if scratch is None or not scratch.fits(x.dtype):
        scratch = Scratch(x.dtype)
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    for xv, ov in _pieces(x, out):
        for sl in _blocks(xv.shape[0], scratch.n):
            f, ix, bits = scratch.views(sl.stop - sl.start)
            _tanh_block(xv[sl], ov[sl], f, ix, bits, consts)
    return out


def value_and_derivative(act: Activation, q: np.ndarray, s: np.ndarray, ds: np.ndarray,
                         scratch: Scratch | None = None) -> None:
    """Write σ(q) into ``s`` and σ'(q) into ``ds`` (same shape and dtype as ``q``).

    ``q`` may be overwritten: callers pass pre-activations they no longer need.
    ``scratch`` (optional) holds the buffers of the tanh-based activations; pass one
    per thread when calling from several threads.
    """
    name = act.name
    if name in ("tanh", "sigmoid", "gelu"):
        consts = _TANH[q.dtype] if q.dtype in OWN_TANH else None
        if scratch is None or not scratch.fits(q.dtype):
            scratch = Scratch(q.dtype)
        for qv, sv, dv in _pieces(q, s, ds):
            n = qv.shape[0]
            if n <= scratch.n:
                _tanh_based(name, qv, sv, dv, *scratch.views(n), consts)
                continue
            for sl in _blocks(n, scratch.n):
                _tanh_based(name, qv[sl], sv[sl], dv[sl], *scratch.views(sl.stop - sl.start), consts)
    elif name == "softplus":
        # σ' = sigmoid(q); σ = max(q, 0) + log1p(exp(-|q|))
        np.multiply(q, 0.5, out=ds)
        tanh(ds, out=ds, scratch=scratch)
        np.add(ds, 1, out=ds)
        np.multiply(ds, 0.5, out=ds)
        np.abs(q, out=s)
        np.negative(s, out=s)
        np.exp(s, out=s)
        np.log1p(s, out=s)
        np.maximum(q, 0, out=q)
        np.add(s, q, out=s)
    elif name == "srelu":
        eta = act.eta
        np.clip(q, -eta, eta, out=ds)
        np.add(ds, eta, out=ds)  # ds = clip(q) + η ∈ [0, 2η]
        np.square(ds, out=s)
        np.multiply(s, 1 / (4 * eta), out=s)
        np.multiply(ds, 1 / (2 * eta), out=ds)
        above = q > eta
        s[above] = q[above]
    elif name == "relu2":
        np.maximum(q, 0, out=ds)
        np.square(ds, out=s)
        np.multiply(ds, 2, out=ds)
    else:  # pragma: no cover - parse() admits only NAMES
        raise ValueError(f"unknown activation {name!r}")


def _tanh_of(x: np.ndarray, out: np.ndarray, f: list[np.ndarray], ix: np.ndarray, bits: np.ndarray | None,
             consts: _TanhConstants | None) -> None:
    if consts is None:
        np.tanh(x, out=out)
    else:
        _tanh_block(x, out, f, ix, bits, consts)


def _tanh_based(name: str, q: np.ndarray, s: np.ndarray, ds: np.ndarray, f: list[np.ndarray], ix: np.ndarray,
                bits: np.ndarray | None, consts: _TanhConstants | None) -> None:
    """tanh, sigmoid or gelu and its derivative on one 1-D block (``f``: 6 scratch blocks)."""
    if name == "tanh":
        _tanh_of(q, s, f, ix, bits, consts)
        np.square(s, out=ds)
        np.subtract(_ONE.get(s.dtype, 1), ds, out=ds)
    elif name == "sigmoid":
        np.multiply(q, 0.5, out=s)
        _tanh_of(s, s, f, ix, bits, consts)
        np.add(s, 1, out=s)
        np.multiply(s, 0.5, out=s)
        np.subtract(1, s, out=ds)
        np.multiply(ds, s, out=ds)
    else:  # gelu: k = c (q + a q³), t = tanh(k)
        q2, k = f[4], f[5]
        np.square(q, out=q2)
        np.multiply(q2, GELU_A, out=k)
        np.add(k, 1, out=k)
        np.multiply(k, q, out=k)
        np.multiply(k, GELU_C, out=k)
        _tanh_of(k, s, f, ix, bits, consts)  # s = t
        # σ' = (1 + t)/2 + q/2 (1 − t²) c (1 + 3 a q²)
        np.multiply(q2, 3 * GELU_A, out=q2)
        np.add(q2, 1, out=q2)
        np.multiply(q2, GELU_C, out=q2)
        np.square(s, out=ds)
        np.subtract(1, ds, out=ds)
        np.multiply(ds, q2, out=ds)
        np.multiply(ds, q, out=ds)
        np.add(ds, s, out=ds)
        np.add(ds, 1, out=ds)
        np.multiply(ds, 0.5, out=ds)
        np.add(s, 1, out=s)
        np.multiply(s, q, out=s)
        np.multiply(s, 0.5, out=s)


def sigma(act: Activation, q: np.ndarray) -> np.ndarray:
    """σ(q) in a new array (convenience for tests and analysis)."""
    q = np.array(q, copy=True)
    s, ds = np.empty_like(q), np.empty_like(q)
    value_and_derivative(act, q, s, ds)
    return s
