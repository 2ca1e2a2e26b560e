"""Import limits (pyedge/onnx_import.py): an ai.onnx opset newer than the installed onnx
package knows is refused with the opset named; external-data offset/length problems give
messages with the numbers that disagree (file size, offset, declared length, needed bytes)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import pyedge
from pyedge import ModelLoadError


def relu_model(opset, domain=""):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid(domain, opset)])


def test_opset_newer_than_onnx_knows_is_refused():
    known = onnx.defs.onnx_opset_version()
    for domain in ("", "ai.onnx"):
        with pytest.raises(ModelLoadError, match=rf"opset {known + 1} \(ai\.onnx\), newer than "
                                                 rf"the installed onnx .* \(up to opset {known}\)"):
            pyedge.load_onnx(relu_model(known + 1, domain).SerializeToString())


def test_known_opset_loads_and_runs():
    g = pyedge.load_onnx(relu_model(onnx.defs.onnx_opset_version()).SerializeToString())
    s = pyedge.TrainingSession(g, loss=None)
    x = np.array([-1.0, 2.0], np.float32)
    assert np.array_equal(s.run({"x": x})["y"], np.maximum(x, 0))


def ext_model(dims=(4, 4), **kv):
    w = TensorProto()
    w.name, w.data_type = "w", TensorProto.FLOAT
    w.dims.extend(dims)
    w.data_location = TensorProto.EXTERNAL
    for k, v in {"location": "w.bin", **kv}.items():
        e = w.external_data.add()
        e.key, e.value = k, str(v)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dims[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


# (file size, external_data keys, the message) -- a 4x4 float32 tensor needs 64 bytes
@pytest.mark.parametrize("size,kv,msg", [
    (64, {"length": 128}, "external data 'w.bin' holds 64 bytes; the tensor declares length 128 "
                          "bytes from offset 0 (to byte 128), 64 bytes past the end of the file"),
    (80, {"offset": 32, "length": 64}, "holds 80 bytes; the tensor declares length 64 bytes from "
                                       "offset 32 (to byte 96), 16 bytes past the end"),
    (40, {}, "holds 40 bytes; the tensor needs 64 bytes from offset 0 (to byte 64), 24 bytes "
             "past the end"),
    (100, {"offset": 200}, "holds 100 bytes; the tensor needs 64 bytes from offset 200 (to byte "
                           "264), 164 bytes past the end"),
    (128, {"length": 32}, "declares length 32 bytes, the tensor's shape [4, 4] of float32 "
                          "needs 64"),
    (128, {"offset": "x"}, "offset 'x' / length None are not integers"),
    (128, {"length": -4}, "negative length -4"),
    (128, {"offset": -8}, "negative offset -8"),
])
def test_external_data_range_messages(tmp_path, size, kv, msg):
    (tmp_path / "w.bin").write_bytes(b"\0" * size)
    (tmp_path / "m.onnx").write_bytes(ext_model(**kv).SerializeToString())
    with pytest.raises(ModelLoadError) as e:
        pyedge.load_onnx(tmp_path / "m.onnx")
    assert msg in str(e.value) and "initializer 'w'" in str(e.value), str(e.value)


def test_external_data_in_range_loads(tmp_path):
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    (tmp_path / "w.bin").write_bytes(b"\0" * 32 + w.tobytes() + b"\0" * 8)
    (tmp_path / "m.onnx").write_bytes(ext_model(offset=32, length=64).SerializeToString())
    assert np.array_equal(pyedge.load_onnx(tmp_path / "m.onnx").initializers["w"], w)
