"""Shared fixtures: small problems, the Julia executable, a CLI runner."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mfres.activations import NAMES  # noqa: E402
from mfres.init import SCHEMES  # noqa: E402

ACTIVATIONS = [n if n != "srelu" else "srelu:0.7" for n in NAMES]


def julia_executable() -> str | None:
    """Julia for the jl/ tests: $MFRES_JULIA, else `julia` on PATH."""
    exe = os.environ.get("MFRES_JULIA") or shutil.which("julia")
    return exe if exe and os.access(exe, os.X_OK) else None


JULIA = julia_executable()


@pytest.fixture
def julia() -> str:
    if JULIA is None:
        pytest.skip("no Julia: set MFRES_JULIA or put julia on PATH (.ci/run installs one)")
    return JULIA


@pytest.fixture(autouse=True)
def _auto_means_numpy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a Julia around (MFRES_JULIA in CI), ``--backend auto`` now picks Julia, and each
    process pays Julia's start-up and compilation. Tests that do not ask for Julia (the
    ``julia`` fixture or the ``julia_auto`` marker) run with Julia hidden from ``auto``."""
    if "julia" not in request.fixturenames and request.node.get_closest_marker("julia_auto") is None:
        monkeypatch.setenv("MFRES_JULIA_TRANSPORT", "none")


@pytest.fixture(params=ACTIVATIONS)
def activation(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=SCHEMES)
def scheme(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
