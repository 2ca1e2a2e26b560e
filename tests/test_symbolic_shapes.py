"""pyedge/symbolic_shapes.py on hand-made graphs, with the file's shapes dropped (as in
TorchScript files, which carry none) so every shape comes from the propagation pass: Split
(sizes given or equal parts), a Slice whose bounds are computed from Shape ((d + 2) / 3 · k,
TorchScript's chunk), LayerNormalization; and bounds that are not static stay unknown."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyedge.fusions import _Matcher
from pyedge.onnx_import import load_onnx
from pyedge.symbolic_shapes import _dims

B, T = (1, ("b",)), (1, ("t",))


def _i(name, v):
    return numpy_helper.from_array(np.array(v, np.int64), name)


def _graph(nodes, inits, opset=18):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", 48])
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in nodes[-1].output]
    g = load_onnx(helper.make_model(helper.make_graph(nodes, "g", [x], outs, inits),
                                    opset_imports=[helper.make_opsetid("", opset)]))
    g.value_shapes = {}  # only what the pass computes (x keeps its dim names)
    g.dim_names = {"x": g.dim_names["x"]}
    return _Matcher(g)


@pytest.mark.parametrize("opset,sizes", [(13, [16, 16, 16]), (13, [8, 24, 16]), (18, None)])
def test_split_gives_each_output_its_shape(opset, sizes):
    inputs = ["x", "split"] if sizes else ["x"]
    attrs = {} if sizes else {"num_outputs": 3}
    nodes = [helper.make_node("Split", inputs, ["q", "k", "v"], axis=-1, **attrs)]
    m = _graph(nodes, [_i("split", sizes)] if sizes else [], opset)
    for name, size in zip("qkv", sizes or [16, 16, 16]):
        assert _dims(m, name) == [B, T, (size, ())], name


@pytest.mark.parametrize("k", [0, 1, 2])
def test_slice_bounds_computed_from_the_shape(k):
    """chunk(3) as TorchScript writes it: c = (Shape(x)[2] + 2) / 3, Slice(x, c·k, c·(k+1));
    then a LayerNormalization keeps the shape."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "two"], ["d"], axis=0),
             helper.make_node("Add", ["d", "two"], ["d2"]),
             helper.make_node("Div", ["d2", "three"], ["c"]),
             helper.make_node("Mul", ["c", "k"], ["lo"]),
             helper.make_node("Mul", ["c", "k1"], ["hi"]),
             helper.make_node("Slice", ["x", "lo", "hi", "ax"], ["y"]),
             helper.make_node("LayerNormalization", ["y", "w"], ["z"], axis=-1)]
    inits = [_i("two", [2]), _i("three", [3]), _i("k", [k]), _i("k1", [k + 1]), _i("ax", [-1]),
             numpy_helper.from_array(np.ones(16, np.float32), "w")]
    m = _graph(nodes, inits)
    assert _dims(m, "y") == [B, T, (16, ())]
    assert _dims(m, "z") == [B, T, (16, ())]


def test_slice_bound_from_a_symbolic_dim_stays_unknown():
    """Slice(x, 0, Shape(x)[1]) on the last axis: the bound is the symbolic length, not a
    static size, so the sliced dim is not made up."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "one"], ["t"], axis=0),
             helper.make_node("Slice", ["x", "zero", "t", "ax"], ["y"])]
    m = _graph(nodes, [_i("one", [1]), _i("zero", [0]), _i("ax", [-1])])
    d = _dims(m, "y")
    assert d is None or d[2] not in ((16, ()), (48, ()))
