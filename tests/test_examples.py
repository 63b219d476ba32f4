"""The example scripts run as a user runs them and write their figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PNG = b"\x89PNG\r\n\x1a\n"
GIF = b"GIF89a"


@pytest.mark.parametrize("script,args,figures", [
    ("zero_loss.py", ["--steps", "100"], ["zero_loss.png"]),
    pytest.param("weight_distribution.py", [], ["weights.png", "clouds.png", "clouds.gif"], marks=pytest.mark.slow),
    pytest.param("mean_field_rates.py", ["--workers", "2"], ["rates_depth.png", "rates_width.png"],
                 marks=pytest.mark.slow),
])
def test_example_writes_figures(tmp_path: Path, script: str, args: list[str], figures: list[str]) -> None:
    res = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--out", str(tmp_path), *args],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in figures:
        head = (tmp_path / name).read_bytes()
        assert head[:8] == PNG if name.endswith(".png") else head[:6] == GIF, name
    if script == "mean_field_rates.py":
        assert "theory -1" in res.stdout and "theory -0.5" in res.stdout
