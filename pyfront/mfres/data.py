"""Training data: built-in synthetic sets and readers for user files.

A data set is N samples ``x`` (N, d), labels ``y`` (N,) and the fixed readout
``a`` (d,) (default (1, …, 1)/√d). Built-in sets are drawn from
``numpy.random.default_rng(data_seed)``, independently of the initialisation seed:

- ``sphere``: x uniform on the unit sphere S^{d−1}, y = sin(ω v·x) with a random
  unit vector v and ω = 2;
- ``teacher``: x uniform on the unit sphere, y given by a random two-layer tanh
  teacher, y = (1/√J) Σ_j c_j tanh(w_j·x + β_j), J = 8, all weights N(0, 1).

Files: ``.npz`` with arrays ``x``, ``y`` and optional ``readout``; ``.nc`` with
variables of the same names (no missing values; x's sample axis is the dimension it
shares with y); ``.csv`` (UTF-8, with or without a byte-order mark) with a header
row naming columns ``x0``..``x{d-1}`` and ``y``.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

from .errors import DataError

BUILTIN = ("sphere", "teacher")
SPHERE_OMEGA = 2.0
TEACHER_WIDTH = 8
DEFAULT_DIM = 4
DEFAULT_SAMPLES = 64


@dataclass(frozen=True)
class TrainingData:
    """Samples ``x`` (N, d), labels ``y`` (N,), readout ``a`` (d,), all float64."""

    x: np.ndarray
    y: np.ndarray
    readout: np.ndarray
    source: str

    @property
    def N(self) -> int:
        return self.x.shape[0]

    @property
    def d(self) -> int:
        return self.x.shape[1]


def default_readout(d: int) -> np.ndarray:
    return np.full(d, 1.0 / np.sqrt(d))


def _sphere_points(rng: np.random.Generator, N: int, d: int) -> np.ndarray:
    x = rng.standard_normal((N, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def builtin(name: str, N: int = DEFAULT_SAMPLES, d: int = DEFAULT_DIM, data_seed: int = 0) -> TrainingData:
    """A built-in synthetic data set (see the module docstring)."""
    if name not in BUILTIN:
        raise DataError(f"unknown data set {name!r}; built-in sets are {', '.join(BUILTIN)}, or give a file path")
    rng = np.random.default_rng(data_seed)
    x = _sphere_points(rng, N, d)
    if name == "sphere":
        v = _sphere_points(rng, 1, d)[0]
        y = np.sin(SPHERE_OMEGA * (x @ v))
    else:
        w = rng.standard_normal((TEACHER_WIDTH, d))
        beta = rng.standard_normal(TEACHER_WIDTH)
        c = rng.standard_normal(TEACHER_WIDTH)
        y = np.tanh(x @ w.T + beta) @ c / np.sqrt(TEACHER_WIDTH)
    return TrainingData(x, y, default_readout(d), name)


def _read_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: np.asarray(f[k]) for k in ("x", "y", "readout") if k in f.files}


def _read_nc(path: str) -> dict[str, np.ndarray]:
    """x, y, readout of a netCDF file. Masked entries (``_FillValue``, ``missing_value``, unwritten
    values) are refused; x is read as (sample, dim), its sample axis being the dimension it shares
    with y (an x stored as (dim, sample) is transposed by name, never guessed from its shape)."""
    import netCDF4

    with netCDF4.Dataset(path, "r") as ds:
        out = {}
        dims = {}
        for k in ("x", "y", "readout"):
            if k in ds.variables:
                v = ds.variables[k]
                v.set_auto_maskandscale(True)
                a = v[...]
                if np.ma.is_masked(a):
                    n = int(np.ma.count_masked(a))
                    fill = next((f"{att} = {v.getncattr(att)}" for att in ("_FillValue", "missing_value")
                                 if att in v.ncattrs()), "the default fill value")
                    raise DataError(f"{path}: {k} has {n} missing values ({fill}); fill them in or drop "
                                    "those samples")
                out[k] = np.asarray(np.ma.getdata(a))
                dims[k] = v.dimensions
        if "x" in out and "y" in out and out["x"].ndim == 2 and len(dims["y"]) == 1:
            (xd0, xd1), (yd,) = dims["x"], dims["y"]
            if yd == xd1 and yd != xd0:
                out["x"] = out["x"].T  # stored as (dim, sample)
            elif yd != xd0 and out["x"].shape[0] == out["x"].shape[1]:
                raise DataError(f"{path}: x is square ({xd0}, {xd1}) and y's dimension {yd} names neither "
                                "axis: cannot tell samples from dimensions; give x and y a shared sample "
                                "dimension")
        return out


def _read_csv(path: str) -> dict[str, np.ndarray]:
    with open(path, newline="", encoding="utf-8-sig") as f:  # a byte-order mark is allowed
        rows = list(csv.reader(f))
    if not rows:
        raise DataError(f"{path}: empty CSV file")
    header = [h.strip() for h in rows[0]]
    if "y" not in header:
        raise DataError(f"{path}: CSV header must name columns x0..x{{d-1}} and y, got {','.join(header)}")
    d = sum(1 for h in header if h.startswith("x"))
    want = [f"x{j}" for j in range(d)]
    if d == 0 or any(h not in header for h in want) or len(header) != d + 1:
        raise DataError(f"{path}: CSV header must be x0..x{{d-1}} and y, got {','.join(header)}")
    table = np.empty((0, len(header)))
    values = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{path}: line {line}: every CSV row must have {len(header)} numbers, got {len(row)}")
        try:
            values.append([_csv_number(c) for c in row])
        except ValueError as e:
            raise DataError(f"{path}: line {line}: non-numeric CSV entry ({e})") from None
    if values:
        table = np.array(values, dtype=np.float64)
    cols = {h: i for i, h in enumerate(header)}
    return {"x": table[:, [cols[h] for h in want]], "y": table[:, cols["y"]]}


def _csv_number(text: str) -> float:
    """A CSV number: what ``float`` reads, minus its Python-only spellings (``1_000``)."""
    if "_" in text:
        raise ValueError(f"{text.strip()!r}: digit separators are not allowed")
    return float(text)


def _as_float(path: str, name: str, v: np.ndarray, ndim: int) -> np.ndarray:
    if v.dtype.kind not in "biuf":
        raise DataError(f"{path}: {name} must be numeric, got dtype {v.dtype}")
    v = np.asarray(v, dtype=np.float64)
    if v.ndim != ndim:
        raise DataError(f"{path}: {name} must have {ndim} dimension(s), got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise DataError(f"{path}: {name} contains NaN or infinite values")
    return v


def validate(x: np.ndarray, y: np.ndarray, readout: np.ndarray | None, source: str) -> TrainingData:
    """Check shapes and values and return a float64 ``TrainingData``; raise ``DataError``."""
    x = _as_float(source, "x", np.asarray(x), 2)
    y = _as_float(source, "y", np.asarray(y), 1)
    N, d = x.shape
    if N == 0 or d == 0:
        raise DataError(f"{source}: x must have at least one sample and one dimension, got shape {x.shape}")
    if y.shape[0] != N:
        raise DataError(f"{source}: x has {N} samples but y has {y.shape[0]}")
    if readout is None:
        a = default_readout(d)
    else:
        a = _as_float(source, "readout", np.asarray(readout), 1)
        if a.shape[0] != d:
            raise DataError(f"{source}: readout has length {a.shape[0]}, x has dimension {d}")
        if not np.any(a):
            raise DataError(f"{source}: readout must be non-zero")
    return TrainingData(np.ascontiguousarray(x), np.ascontiguousarray(y), np.ascontiguousarray(a), source)


def read_file(path: str) -> TrainingData:
    """Read a ``.npz``, ``.nc`` or ``.csv`` data file; raise ``DataError`` on any problem."""
    ext = os.path.splitext(path)[1].lower()
    readers = {".npz": _read_npz, ".nc": _read_nc, ".csv": _read_csv}
    if ext not in readers:
        raise DataError(f"{path}: unsupported data file type {ext or '(none)'}; use .npz, .nc or .csv")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    try:
        arrays = readers[ext](path)
    except DataError:
        raise
    except Exception as e:  # any parse failure of a foreign file is the user's data problem
        raise DataError(f"{path}: cannot read data file ({type(e).__name__}: {e})") from None
    for k in ("x", "y"):
        if k not in arrays:
            raise DataError(f"{path}: data file has no {k!r} array")
    return validate(arrays["x"], arrays["y"], arrays.get("readout"), path)


def load(spec: str, N: int | None = None, d: int | None = None, data_seed: int = 0) -> TrainingData:
    """A built-in set by name (with N, d) or a file by path (N, d must then match, if given)."""
    if spec in BUILTIN:
        return builtin(spec, N or DEFAULT_SAMPLES, d or DEFAULT_DIM, data_seed)
    if not os.path.splitext(spec)[1]:
        raise DataError(f"unknown data set {spec!r}; built-in sets are {', '.join(BUILTIN)}, "
                        "or give a .npz/.nc/.csv path")
    data = read_file(spec)
    if N is not None and N != data.N:
        raise DataError(f"{spec}: file has {data.N} samples but --samples {N} was given")
    if d is not None and d != data.d:
        raise DataError(f"{spec}: file has dimension {data.d} but --dim {d} was given")
    return data
