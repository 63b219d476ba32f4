"""The example scripts run as a user runs them and write their figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("script,args,figures", [
    ("zero_loss.py", ["--steps", "100"], ["zero_loss.png"]),
    ("weight_distribution.py", [], ["weights.png", "clouds.png"]),
    ("mean_field_rates.py", ["--workers", "2"], ["rates_depth.png", "rates_width.png"]),
])
def test_example_writes_figures(tmp_path: Path, script: str, args: list[str], figures: list[str]) -> None:
    res = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--out", str(tmp_path), *args],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in figures:
        assert (tmp_path / name).read_bytes()[:8] == PNG, name
    if script == "mean_field_rates.py":
        assert "theory -1" in res.stdout and "theory -0.5" in res.stdout
