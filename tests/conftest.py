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


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: a worker per available core, at most 4 (a worker may start Julia children,
    each near 1 GB while it compiles)."""
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 4))


@pytest.fixture
def julia() -> str:
    if JULIA is None:
        pytest.skip("no Julia: set MFRES_JULIA or put julia on PATH (.ci/run installs one)")
    return JULIA


# Hidden from the start (not only inside each test), so that environments copied at
# import time, e.g. a module's ``dict(os.environ, ...)`` for subprocesses, hide it too.
# The user's value is kept in the environment too: pytest-xdist's workers inherit the
# hidden one from the controlling process, which imported this file first.
_KEPT = "MFRES_TESTS_USER_TRANSPORT"
if "PYTEST_XDIST_WORKER" not in os.environ:
    os.environ[_KEPT] = os.environ.get("MFRES_JULIA_TRANSPORT", "")
_USER_TRANSPORT = os.environ.get(_KEPT) or None
os.environ["MFRES_JULIA_TRANSPORT"] = "none"


@pytest.fixture(autouse=True)
def _auto_means_numpy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a Julia around (MFRES_JULIA in CI), ``--backend auto`` picks Julia, and each
    process pays Julia's start-up and compilation. Only tests that ask for Julia (the
    ``julia`` fixture or the ``julia_auto`` marker) see it; the others run with Julia
    hidden from ``auto`` (MFRES_JULIA_TRANSPORT=none)."""
    if "julia" in request.fixturenames or request.node.get_closest_marker("julia_auto") is not None:
        if _USER_TRANSPORT is None:
            monkeypatch.delenv("MFRES_JULIA_TRANSPORT", raising=False)
        else:
            monkeypatch.setenv("MFRES_JULIA_TRANSPORT", _USER_TRANSPORT)
    else:
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
