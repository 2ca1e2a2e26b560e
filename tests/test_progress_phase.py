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


def test_session_announces_planning_once_per_shape(tmp_path, monkeypatch, capsys):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    import pyedge
    from pyedge import progress

    monkeypatch.setattr(progress.Phase, "__init__",
                        lambda self, what, stream=None, after=0.0, _i=progress.Phase.__init__:
                        _i(self, what, stream, after=0.0))  # every phase counts as slow
    w = numpy_helper.from_array(np.ones((3, 2), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2])], [w])
    s = pyedge.TrainingSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]),
                               train=["w"], loss="mse")
    capsys.readouterr()
    x = np.ones((4, 3), np.float32)
    for _ in range(2):
        s.step(x, np.zeros((4, 2), np.float32))
    s.run(x)
    s.step(np.ones((5, 3), np.float32), np.zeros((5, 2), np.float32))
    err = capsys.readouterr().err
    assert err.count("planning and running the first training step for x [4, 3]: done in") == 1
    assert err.count("first forward pass for x [4, 3]: done in") == 1
    assert err.count("first training step for x [5, 3]: done in") == 1
