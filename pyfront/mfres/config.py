"""The options of one run, validated once into an immutable ``RunConfig``.

Field names are the CLI's option names (``--depth`` → ``depth``) and the run
file's global attributes; they are a contract shared with sweeps and other tools.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from . import activations
from .data import BUILTIN, DEFAULT_DIM, DEFAULT_SAMPLES
from .errors import ConfigError
from .init import DEFAULT_LENGTH_SCALE, SCHEMES

BACKENDS = ("auto", "numpy", "julia")
DTYPES = ("float64", "float32")
DEVICES = ("cpu", "cuda")
MEMORY_MODES = ("auto", "store", "recompute")


@dataclass(frozen=True)
class RunConfig:
    """One simulation: net size, data, initialisation, training schedule, backend.

    ``ds`` is the pseudo-time step Δs (GD step ``θ ← θ − Δs L M ∇E``); after
    ``steps`` steps the run has reached s = steps·Δs. ``dim``/``samples`` of
    ``None`` mean the built-in defaults (4, 64), or the data file's own sizes.
    ``snapshot_every`` of ``None`` means about 20 snapshots per run;
    ``snapshot_particles`` K stores K sampled particles per layer in each snapshot
    (``None``: all M); the full state is always kept for ``--resume``.
    """

    depth: int = 16
    width: int = 64
    dim: int | None = None
    samples: int | None = None
    data: str = "sphere"
    data_seed: int = 0
    activation: str = "tanh"
    init: str = "iid"
    init_scale: float = 1.0
    length_scale: float = DEFAULT_LENGTH_SCALE
    steps: int = 2000
    ds: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    snapshot_every: int | None = None
    snapshot_particles: int | None = None
    backend: str = "auto"
    dtype: str = "float64"
    threads: int | None = None
    device: str = "cpu"
    memory: str = "auto"
    snapshot_every_auto: bool = field(default=False, init=False, compare=False)
    """True when ``snapshot_every`` was left to its default (it then follows ``steps`` on ``--resume``)."""

    def __post_init__(self) -> None:
        _positive_int(self, "depth")
        _positive_int(self, "width")
        _positive_int(self, "dim", optional=True)
        _positive_int(self, "samples", optional=True)
        _positive_int(self, "steps", zero_ok=True)
        _positive_int(self, "snapshot_every", optional=True)
        _positive_int(self, "snapshot_particles", optional=True)
        if self.snapshot_particles is not None and self.snapshot_particles > self.width:
            raise ConfigError(f"--snapshot-particles {self.snapshot_particles} exceeds --width {self.width}")
        _positive_int(self, "threads", optional=True)
        _nonneg_int(self, "seed", below=2**64)
        _nonneg_int(self, "data_seed", below=2**64)
        _positive_float(self, "ds")
        _positive_float(self, "init_scale")
        _positive_float(self, "length_scale")
        wd = _float(self, "weight_decay")
        if wd < 0:
            raise ConfigError(f"--weight-decay must be ≥ 0, got {wd:g}")
        try:
            spec = activations.parse(self.activation).spec
        except ValueError as e:
            raise ConfigError(str(e)) from None
        object.__setattr__(self, "activation", spec)
        _choice(self, "init", SCHEMES)
        _choice(self, "backend", BACKENDS)
        _choice(self, "dtype", DTYPES)
        _choice(self, "device", DEVICES)
        _choice(self, "memory", MEMORY_MODES)
        if self.device == "cuda" and self.backend == "numpy":
            raise ConfigError("--device cuda needs the Julia backend (--backend julia)")
        if not isinstance(self.data, str) or not self.data:
            raise ConfigError("--data must be a built-in data set name or a file path")
        if self.data in BUILTIN:
            for name, default in (("dim", DEFAULT_DIM), ("samples", DEFAULT_SAMPLES)):
                if getattr(self, name) is None:
                    object.__setattr__(self, name, default)
        if self.snapshot_every is None:
            object.__setattr__(self, "snapshot_every", max(1, math.ceil(self.steps / 20)))
            object.__setattr__(self, "snapshot_every_auto", True)

    @property
    def act(self) -> activations.Activation:
        return activations.parse(self.activation)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some options changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """The options (not ``snapshot_every_auto``, which the run file records on its own)."""
        out = dataclasses.asdict(self)
        out.pop("snapshot_every_auto")
        return out

    # Options that change the numbers a run produces (not how fast or where).
    NUMERIC_FIELDS = ("depth", "width", "dim", "samples", "data", "data_seed", "activation", "init",
                      "init_scale", "length_scale", "ds", "weight_decay", "seed", "dtype", "snapshot_particles")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _positive_int(cfg: RunConfig, name: str, optional: bool = False, zero_ok: bool = False) -> None:
    v = getattr(cfg, name)
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        try:
            iv = int(v)
            if iv != v:
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"{_option(name)} must be an integer, got {v!r}") from None
        object.__setattr__(cfg, name, iv)
        v = iv
    if v < 0 or (v == 0 and not zero_ok):
        raise ConfigError(f"{_option(name)} must be {'≥ 0' if zero_ok else 'positive'}, got {v}")


def _nonneg_int(cfg: RunConfig, name: str, below: int | None = None) -> None:
    _positive_int(cfg, name, zero_ok=True)
    if below is not None and getattr(cfg, name) >= below:
        raise ConfigError(f"{_option(name)} must be below 2^64, got {getattr(cfg, name)}")


def _float(cfg: RunConfig, name: str) -> float:
    v = getattr(cfg, name)
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{_option(name)} must be a number, got {v!r}") from None
    if not math.isfinite(f):
        raise ConfigError(f"{_option(name)} must be finite, got {v!r}")
    object.__setattr__(cfg, name, f)
    return f


def _positive_float(cfg: RunConfig, name: str) -> None:
    if _float(cfg, name) <= 0:
        raise ConfigError(f"{_option(name)} must be positive, got {getattr(cfg, name):g}")


def _choice(cfg: RunConfig, name: str, choices: tuple[str, ...]) -> None:
    v = getattr(cfg, name)
    if v not in choices:
        raise ConfigError(f"{_option(name)} must be one of {', '.join(choices)}, got {v!r}")
