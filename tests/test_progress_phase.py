"""progress.Phase: a line only for steps that outlast the threshold (large-model import)."""
import io
import time

import pytest

from pyedge.progress import Phase


def test_fast_phase_prints_nothing():
    out = io.StringIO()
    with Phase("importing m.onnx", stream=out, after=5.0):
        pass
    assert out.getvalue() == ""


def test_slow_phase_announces_then_reports():
    out = io.StringIO()
    with Phase("importing m.onnx", stream=out, after=0.05):
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert lines[0] == "importing m.onnx ..."
    assert lines[1].startswith("importing m.onnx: done in ") and lines[1].endswith(" s")


def test_failure_is_reported_and_raised(monkeypatch):
    out = io.StringIO()
    with pytest.raises(KeyError):
        with Phase("planning", stream=out, after=0.0):
            raise KeyError("x")
    assert "planning: failed after" in out.getvalue()


def test_quiet(monkeypatch):
    monkeypatch.setenv("PYEDGE_QUIET", "1")
    out = io.StringIO()
    with Phase("planning", stream=out, after=0.0):
        time.sleep(0.05)
    assert out.getvalue() == ""
