"""Untrusted files: external data confined to the model's folder, sizes checked against the
file and the limits before anything is allocated, nothing unpickled, truncated data files."""
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import pyedge
from pyedge import ModelLoadError, PyedgeError
from pyedge.data import DataError, DataSpec, InputSpec, load_dataset

ROOT = Path(__file__).resolve().parents[1]


def ext_model(location, dims=(4, 4), offset=None, length=None):
    w = TensorProto()
    w.name, w.data_type = "w", TensorProto.FLOAT
    w.dims.extend(dims)
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", offset), ("length", length)):
        if v is not None:
            e = w.external_data.add()
            e.key, e.value = k, str(v)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dims[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def write(tmp_path, m, name="m.onnx"):
    p = tmp_path / name
    p.write_bytes(m.SerializeToString())
    return p


def test_external_data_inside_folder_loads(tmp_path):
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    (tmp_path / "w.bin").write_bytes(w.tobytes())
    g = pyedge.load_onnx(write(tmp_path, ext_model("w.bin")))
    np.testing.assert_array_equal(g.initializers["w"], w)


@pytest.mark.parametrize("loc", ["../w.bin", "sub/../../w.bin", "/etc/passwd", ""])
def test_external_data_path_escapes_refused(tmp_path, loc):
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (tmp_path / "w.bin").write_bytes(b"\0" * 64)
    with pytest.raises(ModelLoadError, match="external data path"):
        pyedge.load_onnx(write(d, ext_model(loc)))


def test_external_data_symlink_out_refused(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    os.symlink(tmp_path / "secret.bin", d / "w.bin")
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        pyedge.load_onnx(write(d, ext_model("w.bin")))
    os.symlink(tmp_path, d / "up")                      # a symlinked folder, too
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        pyedge.load_onnx(write(d, ext_model("up/secret.bin")))


def test_external_data_from_bytes_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="from its file path"):
        pyedge.load_onnx(ext_model("w.bin").SerializeToString())


@pytest.mark.parametrize("size,kw,needle", [
    (32, {}, "holds 32 bytes"),                          # file shorter than the tensor
    (64, {"offset": 16}, "from offset 16"),              # offset pushes it past the end
    (64, {"offset": -8}, "offset -8"),
    (64, {"length": 32}, "needs 64"),                    # length disagrees with the shape
])
def test_external_data_size_checked_against_file(tmp_path, size, kw, needle):
    (tmp_path / "w.bin").write_bytes(b"\0" * size)
    with pytest.raises(ModelLoadError, match=needle):
        pyedge.load_onnx(write(tmp_path, ext_model("w.bin", **kw)))


def test_external_data_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="missing"):
        pyedge.load_onnx(write(tmp_path, ext_model("nope.bin")))


def test_declared_huge_tensor_refused_before_allocating(tmp_path):
    # 2^40 x 2^40 floats declared, a few bytes present: refused on the declared size.
    (tmp_path / "w.bin").write_bytes(b"\0" * 64)
    with pytest.raises(ModelLoadError, match="over the limit"):
        pyedge.load_onnx(write(tmp_path, ext_model("w.bin", dims=(1 << 40, 1 << 40))))
    m = ext_model("w.bin")
    m.graph.initializer[0].data_location = TensorProto.DEFAULT
    del m.graph.initializer[0].external_data[:]
    del m.graph.initializer[0].dims[:]
    m.graph.initializer[0].dims.extend([1 << 20, 1 << 20])
    with pytest.raises(ModelLoadError, match="over the limit"):
        pyedge.load_onnx(m.SerializeToString(), max_tensor_bytes=1 << 30)
    with pytest.raises(ModelLoadError, match="over the limit"):   # configurable
        pyedge.load_onnx(write(tmp_path, ext_model("w.bin")), max_tensor_bytes=16)


def test_raw_data_size_mismatch_refused():
    m = ext_model("w.bin")
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((4, 4), np.float32), "w"))
    m.graph.initializer[0].raw_data = b"\0" * 12
    with pytest.raises(ModelLoadError, match="holds 12 bytes"):
        pyedge.load_onnx(m.SerializeToString())


def shape_model(op, shape):
    s = numpy_helper.from_array(np.array(shape, np.int64), "s")
    if op == "ConstantOfShape":
        node, inputs = helper.make_node(op, ["s"], ["y"]), []
    else:
        node = helper.make_node(op, ["x", "s"], ["y"])
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])]
    g = helper.make_graph([node], "g", inputs,
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [s])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("op,shape", [
    ("ConstantOfShape", [1_000_000, 1_000_000]),     # 4 TB
    ("ConstantOfShape", [100_000, 100_000]),         # 40 GB: would overcommit, then OOM
    ("Expand", [1_000_000, 1_000_000]),
    ("Expand", [1 << 40, 1 << 40]),                  # element count overflows int64
    ("Reshape", [-3, 4]),
    ("Tile", [1 << 40, 1 << 40]),
])
def test_plan_refuses_absurd_shapes(op, shape, monkeypatch):
    monkeypatch.setenv("PYEDGE_MAX_MEMORY", "1G")
    m = shape_model(op, shape)
    with pytest.raises(PyedgeError):
        s = pyedge.TrainingSession(m, loss=None)
        s.run({"x": np.ones((1, 1), np.float32)} if op != "ConstantOfShape" else {})


def test_memory_limit_env(monkeypatch):
    m = shape_model("ConstantOfShape", [1024, 1024])         # 4 MiB
    monkeypatch.setenv("PYEDGE_MAX_MEMORY", "1M")
    with pytest.raises(PyedgeError, match="memory limit"):
        pyedge.TrainingSession(m, loss=None).run({})
    monkeypatch.setenv("PYEDGE_MAX_MEMORY", "64M")
    assert pyedge.TrainingSession(m, loss=None).run({})["y"].shape == (1024, 1024)
    monkeypatch.setenv("PYEDGE_MAX_MEMORY", "lots")
    with pytest.raises(PyedgeError, match="PYEDGE_MAX_MEMORY"):
        pyedge.TrainingSession(m, loss=None).run({})


def test_activation_arena_over_limit_refused(monkeypatch):
    # Small model, big batch: the arena (not one constant) is over the limit.
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1024])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    monkeypatch.setenv("PYEDGE_MAX_MEMORY", "2M")
    s = pyedge.TrainingSession(m, loss=None)
    assert s.run({"x": np.ones((4, 1024), np.float32)})["y"].shape == (4, 1024)
    with pytest.raises(PyedgeError, match="memory limit"):
        s.plan_stats(shapes={"x": [1024, 1024]}, training=False)


def test_nothing_is_unpickled_anywhere():
    """No pickle, no np.load without allow_pickle=False, no torch.load in the device code."""
    for p in sorted((ROOT / "pyedge").rglob("*.py")):
        src = p.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib|shelve)\b", src, re.M), p
        assert "allow_pickle=True" not in src, p
        assert not re.search(r"torch\.load\(", src), p
        for call in re.findall(r"np\.load\([^)]*\)", src):
            assert "allow_pickle=False" in call, (p, call)


def test_adapters_load_only_safetensors_and_json(tmp_path):
    src = (ROOT / "pyedge" / "adapters").rglob("*.py")
    for p in src:
        text = p.read_text()
        assert "pickle" not in text and "np.load(" not in text and "torch.load" not in text, p


# ------------------------------------------------------------------------- truncated data files
def cls_spec():
    return DataSpec([InputSpec("x", "float32", [-1, 8])], InputSpec("labels", "int64", [-1]),
                    "cross_entropy", 4, "logits")


def test_truncated_npz(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((50, 8), np.float32), labels=np.zeros(50, np.int64))
    data = p.read_bytes()
    for cut in (len(data) // 3, len(data) - 30):
        (tmp_path / "t.npz").write_bytes(data[:cut])
        with pytest.raises(DataError):
            load_dataset(str(tmp_path / "t.npz"), cls_spec())


def test_truncated_npy_directory(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    np.save(d / "x.npy", np.zeros((50, 8), np.float32))
    np.save(d / "labels.npy", np.zeros(50, np.int64))
    data = (d / "x.npy").read_bytes()
    (d / "x.npy").write_bytes(data[:-20])               # ends mid-record
    with pytest.raises(DataError):
        load_dataset(str(d), cls_spec())


def test_csv_ending_mid_record(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text(",".join([f"f{i}" for i in range(8)] + ["labels"]) + "\n"
                 + "0,1,2,3,4,5,6,7,1\n" + "0,1,2,3")
    with pytest.raises(DataError):
        load_dataset(str(p), cls_spec())


def test_jsonl_ending_mid_record(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"input_ids": [1, 2], "labels": 0}\n{"input_ids": [1, ')
    spec = DataSpec([InputSpec("input_ids", "int64", [-1, -1])], InputSpec("labels", "int64", [-1]),
                    "cross_entropy", 3, "logits")
    with pytest.raises(DataError, match="d.jsonl:2"):
        load_dataset(str(p), spec)
