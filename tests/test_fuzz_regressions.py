"""Inputs found by the fuzz harnesses (fuzz/): each must fail with a documented exception."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fuzz import common  # noqa: E402

DATA = Path(__file__).parent / "data" / "fuzz"
CASES = sorted(p.name for p in DATA.glob("*.onnx"))


@pytest.mark.parametrize("name", CASES)
def test_saved_input(name):
    # import_node_without_outputs.onnx: a MatMul with no outputs -> IndexError in param_names.
    # graph_constant_undefined_tensor.onnx: Constant with an UNDEFINED tensor -> TypeError.
    # import_bytes_name.onnx: an initializer name with invalid UTF-8 came back from protobuf
    # as bytes and raised TypeError deep in param_names; now a ModelLoadError at import.
    # graph_absent_required_input.onnx: Add('', b1): the kernel read a null tensor and the
    # process died (SIGSEGV); absent inputs are now checked against the ONNX schema at import.
    # import_no_outputs.onnx: a graph without outputs -> IndexError; now a ModelLoadError.
    # graph_squeeze_scalar_axis.onnx: Squeeze(scalar, axes=[0]) read shape[0] of a rank-0
    # tensor (SIGSEGV); axes are now checked against the rank.
    # import_dims_overflow.onnx: dims whose product overflowed float64 -> OverflowError.
    # graph_invalid_opset_absent_input.onnx: opset -1 hid the schema check of Add('', b)
    # (SIGSEGV); invalid opsets are refused and unknown versions use the newest schema.
    # graph_transpose_float_perm.onnx: a Transpose whose perm is a float (found by the CI
    # fuzz run) -> TypeError in fusions._swaps_last_two; now the core's clean error.
    # graph_matmul_without_outputs.onnx: a MatMul listing no output -> IndexError in the
    # fusions; now a ModelLoadError at import (outputs checked against the schema's minimum).
    # graph_softmax_list_axis.onnx: Softmax with an INTS axis -> TypeError in the fusions;
    # attribute types are now checked against the ONNX schema at import.
    # graph_negative_input_dim.onnx: a graph input of shape [1, -4]: onnx's shape inference
    # aborted the process (SIGABRT); negative declared dimensions are refused first.
    # graph_tile_huge_repeats.onnx: Tile(64x64, repeats [2^20, 2^10]) allocated 8 GB of
    # per-tile offsets while planning (OOM kill); the output is checked against the limit.
    common.checked((DATA / name).read_bytes())


def test_seed_models_run():
    for name, m in common.seed_models().items():
        common.run_model(m)


@pytest.mark.parametrize("name", ["graph_absent_required_input.onnx", "import_no_outputs.onnx",
                                  "graph_invalid_opset_absent_input.onnx"])
def test_broken_graphs_are_refused_at_import(name):
    import pyedge
    with pytest.raises(pyedge.ModelLoadError):
        pyedge.load_onnx((DATA / name).read_bytes())


def test_squeeze_of_a_scalar_is_an_error_not_a_crash():
    import numpy as np
    from pyedge import _core
    with pytest.raises(_core.PyedgeError, match="axis"):
        _core.run_op("Squeeze", [np.array(0.0, np.float32), np.array([0])], opset=17)
