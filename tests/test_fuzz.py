"""Hostile input: fuzzed CLI options and data files give a clean message or a valid run."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mfres.cli import main
from mfres.data import TrainingData, read_file
from mfres.errors import DataError

garbage = st.text(min_size=0, max_size=12)
small_int = st.integers(min_value=-3, max_value=12)
huge_int = st.sampled_from([10**12, -(10**12), 2**63, 0])
floats = st.floats(allow_nan=True, allow_infinity=True, width=64)

OPTIONS = {
    "--depth": st.one_of(small_int, huge_int, garbage),
    "--width": st.one_of(small_int, huge_int, garbage),
    "--dim": st.one_of(small_int, garbage),
    "--samples": st.one_of(st.integers(-2, 30), garbage),
    "--steps": st.one_of(st.integers(-5, 40), garbage),
    "--ds": st.one_of(floats, garbage),
    "--weight-decay": st.one_of(floats, garbage),
    "--init-scale": st.one_of(floats, garbage),
    "--length-scale": st.one_of(floats, garbage),
    "--seed": st.one_of(st.integers(-5, 2**64), garbage),
    "--data-seed": st.one_of(st.integers(-5, 2**40), garbage),
    "--snapshot-every": st.one_of(st.integers(-2, 50), garbage),
    "--snapshot-particles": st.one_of(st.integers(-2, 20), garbage),
    "--activation": st.one_of(st.sampled_from(["tanh", "srelu:0.1", "srelu:x", "srelu:-1", "relu2", "gelu",
                                               "softplus:1", "TANH", ""]), garbage),
    "--init": st.one_of(st.sampled_from(["iid", "tied", "smooth"]), garbage),
    "--data": st.one_of(st.sampled_from(["sphere", "teacher", "nofile.npz", "x.csv", "/", ""]), garbage),
    "--dtype": st.sampled_from(["float64", "float32", "float16", ""]),
    "--backend": st.sampled_from(["numpy", "auto", "cuda"]),
}


@pytest.mark.slow  # 80 CLI runs: the slowest case of the suite after the examples and the Julia suite
@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.none(), max_size=8).flatmap(
    lambda keys: st.fixed_dictionaries({k: OPTIONS[k] for k in keys})))
def test_fuzzed_options_never_traceback(options: dict[str, object]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        args = ["simulate", "--quiet", "--out", str(Path(tmp) / "f.nc")]
        for k, v in options.items():
            args += [k, str(v)]
        res = CliRunner().invoke(main, args)
        assert isinstance(res.exception, SystemExit) or res.exception is None, (args, res.exception)
        assert res.exit_code in (0, 1, 2, 3, 4), (args, res.exit_code, res.output)
        assert "Traceback" not in res.output, (args, res.output)
        if res.exit_code != 0:
            assert "Error" in res.output or "Usage" in res.output, (args, res.output)


def check_reader(path: Path) -> None:
    try:
        data = read_file(str(path))
    except DataError as e:
        assert str(e).startswith(str(path)), e
        return
    assert isinstance(data, TrainingData)
    assert data.x.ndim == 2 and data.y.shape == (data.x.shape[0],) and data.readout.shape == (data.x.shape[1],)
    assert np.all(np.isfinite(data.x)) and np.all(np.isfinite(data.y)) and np.any(data.readout)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.binary(max_size=400), st.sampled_from([".npz", ".nc", ".csv"]))
def test_random_bytes_in_data_files(content: bytes, ext: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{ext}"
        path.write_bytes(content)
        check_reader(path)


arrays = st.one_of(
    st.lists(st.lists(floats, min_size=0, max_size=4), min_size=0, max_size=5).map(
        lambda rows: np.array(rows, dtype=object) if len({len(r) for r in rows}) > 1 else np.array(rows)),
    st.lists(floats, max_size=6).map(np.array),
    st.sampled_from([np.array("text"), np.array([True, False]), np.array([1 + 2j, 3j]), np.zeros((2, 0)),
                     np.ones((3, 2, 2)), np.array([[1, 2], [3, 4]], dtype=np.int8)]),
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.dictionaries(st.sampled_from(["x", "y", "readout", "other"]), arrays, max_size=4))
def test_structured_npz_files(contents: dict[str, np.ndarray]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.npz"
        buf = io.BytesIO()
        np.savez(buf, **contents)
        path.write_bytes(buf.getvalue())
        check_reader(path)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.lists(st.one_of(floats.map(repr), garbage), max_size=4), max_size=5),
       st.sampled_from(["x0,x1,y", "x0,y", "y,x0", "x1,x0,y", "", "x0,x1,x2,y"]))
def test_fuzzed_csv(rows: list[list[str]], header: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.csv"
        text = header + "\n" + "\n".join(",".join(r) for r in rows)
        path.write_text(text, encoding="utf-8")
        check_reader(path)
