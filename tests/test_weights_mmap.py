"""Initializers used in place: onnx_wire's aligned writer, views on the model file's memory map,
and the anonymous memory a ~1 GB single-file model costs to load (subprocess, /proc)."""
import json
import mmap
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyedge.onnx_import import ModelLoadError, load_onnx
from pyedge.onnx_wire import MappedWeights, encode_varint, map_model, save_aligned

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _chain_model(sizes=(37, 38, 39, 40, 41, 42), seed=0, extra=True):
    """x[2, sizes[0]] -> MatMul chain; plus an int64 and a float16 initializer (converted on
    load) and a Constant node, so every kind of tensor is on the path."""
    rng = np.random.default_rng(seed)
    ws = [rng.standard_normal((a, b)).astype(np.float32) for a, b in zip(sizes, sizes[1:])]
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)]
    nodes, x = [], "x"
    for i in range(len(ws)):
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"], name=f"mm{i}"))
        x = f"y{i}"
    if extra:
        inits.append(numpy_helper.from_array(np.array([2, sizes[-1]], np.int64), "shape"))
        inits.append(numpy_helper.from_array(
            rng.standard_normal(sizes[-1]).astype(np.float16), "bias16"))
        nodes.append(helper.make_node("Reshape", [x, "shape"], ["r"], name="reshape"))
        nodes.append(helper.make_node("Constant", [], ["c"], name="const",
                                      value=numpy_helper.from_array(np.float32(0.5), "c")))
        nodes.append(helper.make_node("Mul", ["r", "c"], ["out"], name="mul"))
        x = "out"
    g = helper.make_graph(nodes, "chain",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, sizes[0]])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [2, sizes[-1]])],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.metadata_props.add(key="k", value="v")
    return m, ws


def _base_is_mmap(a):
    while isinstance(a, np.ndarray):
        a = a.base
    if isinstance(a, memoryview):  # np.frombuffer(mmap) keeps a memoryview of the map
        a = a.obj
    return isinstance(a, mmap.mmap)


def test_varint_encoding_overlong_parses():
    assert encode_varint(300) == b"\xac\x02"
    assert encode_varint(3, width=3) == b"\x83\x80\x00"
    m = onnx.ModelProto()
    m.ParseFromString(b"\x08" + encode_varint(8, width=4))
    assert m.ir_version == 8


def test_save_aligned_offsets_values_and_onnxruntime(tmp_path):
    m, ws = _chain_model()
    path = tmp_path / "a.onnx"
    save_aligned(m, path)
    onnx.checker.check_model(str(path))
    assert os.listdir(tmp_path) == ["a.onnx"]  # no temp file left
    _, mapped = map_model(path)
    offsets = [r[0] for r in mapped.ranges if r is not None]
    assert len(offsets) == len(m.graph.initializer)
    assert all(o % 64 == 0 for o in offsets), offsets
    back = onnx.load(str(path))
    assert back.metadata_props[0].key == "k"
    for a, b in zip(m.graph.initializer, back.graph.initializer):
        assert a.name == b.name
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    ort = pytest.importorskip("onnxruntime")
    x = np.random.default_rng(1).standard_normal((2, 37)).astype(np.float32)
    got = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    ref = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, ref)


def test_mapped_weights_are_read_only_views(tmp_path):
    m, ws = _chain_model()
    path = tmp_path / "a.onnx"
    save_aligned(m, path)
    g = load_onnx(path)
    for i, w in enumerate(ws):
        a = g.initializers[f"w{i}"]
        np.testing.assert_array_equal(a, w)
        assert not a.flags.writeable and _base_is_mmap(a), f"w{i} is not a view on the map"
        with pytest.raises(ValueError):
            a[0, 0] = 1.0
    assert g.initializers["shape"].tolist() == [2, 42]
    assert g.initializers["bias16"].dtype == np.float32  # widened: a copy, as before
    assert float(g.initializers["c"]) == 0.5
    assert g.metadata == {"k": "v"}


def test_foreign_file_misaligned_tensors_copied_with_same_values(tmp_path):
    """onnx.save puts raw_data wherever the framing ends: misaligned tensors are copied (the
    core takes float*), aligned ones mapped; the values are the file's either way."""
    m, ws = _chain_model(sizes=tuple(range(30, 45)))
    path = tmp_path / "plain.onnx"
    onnx.save(m, str(path))
    _, mapped = map_model(path)
    mis = [r[0] % 4 != 0 for r in mapped.ranges[:len(ws)]]
    assert any(mis) and not all(mis), mis  # both kinds occur in this file
    g = load_onnx(path)
    for i, w in enumerate(ws):
        a = g.initializers[f"w{i}"]
        np.testing.assert_array_equal(a, w)
        assert a.ctypes.data % 4 == 0
        assert _base_is_mmap(a) == (not mis[i])


def _mapped_rss_kib(path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's line
                inside = len(head) >= 6 and os.path.realpath(head[-1]) == os.path.realpath(path)
            elif inside and head[:1] == ["Rss:"]:
                total += int(head[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_copied_tensors_leave_no_file_pages_resident(tmp_path):
    """A misaligned tensor is copied; the file pages that copy read must not stay in the
    process's resident set as well (they were: W1's MiniLM export cost 76 MiB twice)."""
    rng = np.random.default_rng(0)
    big = rng.standard_normal((1024, 1024)).astype(np.float32)  # 4 MiB
    tiny = helper.make_tensor("tiny", TensorProto.UINT8, [3], b"abc", raw=True)  # pushes big off 4
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1024])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "big"], ["y"])], "g", [x], [y],
                          [tiny, numpy_helper.from_array(big, "big")])
    path = tmp_path / "misaligned.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    _, mapped = map_model(path)
    assert mapped.ranges[1][0] % 4 != 0  # the layout this test is about
    del mapped
    graph = load_onnx(path)
    w = graph.initializers["big"]
    assert not _base_is_mmap(w)  # copied
    np.testing.assert_array_equal(w, big)
    # at most the two pages the copy shares with its neighbours stay mapped in
    assert _mapped_rss_kib(path) <= 2 * mmap.PAGESIZE // 1024 + 8, _mapped_rss_kib(path)


def test_same_graph_as_protobuf_parse(tmp_path):
    m, _ = _chain_model()
    path = tmp_path / "a.onnx"
    save_aligned(m, path)
    a, b = load_onnx(path), load_onnx(m.SerializeToString())
    assert [(n.op_type, n.inputs, n.outputs, n.name) for n in a.nodes] == \
        [(n.op_type, n.inputs, n.outputs, n.name) for n in b.nodes]
    assert set(a.initializers) == set(b.initializers)
    for k in a.initializers:
        np.testing.assert_array_equal(a.initializers[k], b.initializers[k])


def test_training_on_mapped_weights_matches_and_leaves_file_untouched(tmp_path):
    import pyedge

    m, ws = _chain_model(extra=False)
    path = tmp_path / "a.onnx"
    save_aligned(m, path)
    before = path.read_bytes()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 37)).astype(np.float32)
    y = rng.standard_normal((2, 42)).astype(np.float32)
    losses = {}
    for src in ("file", "bytes"):
        model = str(path) if src == "file" else before
        s = pyedge.TrainingSession(model, lora=pyedge.LoraConfig(r=2, target_modules=["re:.*"]),
                                   train=["w4"], loss="mse", optimizer=pyedge.AdamW(lr=1e-2))
        losses[src] = [s.step(x, y) for _ in range(3)]
        if src == "file":
            assert not s.graph.initializers["w4"].flags.writeable
            np.testing.assert_array_equal(s.graph.initializers["w4"], ws[4])  # trained copy
            assert not np.array_equal(s.trainable_parameters()["w4"], ws[4])
    assert losses["file"] == losses["bytes"]
    assert path.read_bytes() == before


def test_bad_files_still_give_load_errors(tmp_path):
    m, _ = _chain_model()
    path = tmp_path / "a.onnx"
    save_aligned(m, path)
    data = path.read_bytes()
    for i, bad in enumerate([data[: len(data) // 2], b"\xff" * 64, b""]):
        p = tmp_path / f"bad{i}.onnx"
        p.write_bytes(bad)
        with pytest.raises(ModelLoadError):
            load_onnx(p)
    # a raw_data shorter than its shape: refused by size, not read past
    t = m.graph.initializer[0]
    t.raw_data = t.raw_data[:-4]
    p = tmp_path / "short.onnx"
    save_aligned(m, p)
    with pytest.raises(ModelLoadError, match="holds"):
        load_onnx(p)


def test_mapped_weights_reject_wrong_length():
    buf = mmap.mmap(-1, 4096)
    mw = MappedWeights(buf, [(64, 16)])
    assert mw.array(0, "t", np.dtype("float32"), [4]).shape == (4,)
    with pytest.raises(ModelLoadError):
        mw.array(0, "t", np.dtype("float32"), [5])


# ------------------------------------------------------------------------- anonymous memory
_MAKE = r"""
import sys, numpy as np
from onnx import TensorProto, helper, numpy_helper
from pyedge.onnx_wire import save_aligned
path, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
inits, nodes, x = [], [], "x"
for i in range(n):
    t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[d, d],
                    raw_data=np.full((d, d), 1.0 / d, np.float32).tobytes())
    inits.append(t)
    nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"], name=f"mm{i}"))
    x = f"y{i}"
g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d])],
                      [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, d])], inits)
save_aligned(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)
"""

_MEASURE = r"""
import json, sys, numpy as np
def anon():
    with open("/proc/self/status") as f:
        return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f
                if l.startswith(("RssAnon", "RssFile"))}
import pyedge
from pyedge import onnx_wire
if sys.argv[2] == "protobuf":  # the old path, for comparison: parse the whole file
    def no_map(path):
        raise onnx_wire.WireError("mapping turned off")
    onnx_wire.map_model = no_map
before = anon()
s = pyedge.TrainingSession(sys.argv[1], loss=None)
d = s.graph.inputs[0].shape[1]
out = s.run({"x": np.ones((1, d), np.float32)})  # every weight read once
after = anon()
print(json.dumps({"before": before, "after": after,
                  "out": float(next(iter(out.values())).ravel()[0])}))
"""


def _measure(path, how):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYEDGE_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", _MEASURE, str(path), how], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_loading_a_1gb_model_adds_little_anonymous_memory(tmp_path):
    n, d = 16, 4096  # 16 x 64 MiB = 1 GiB of float32 weights in one file
    path = tmp_path / "big.onnx"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", _MAKE, str(path), str(n), str(d)], env=env,
                   check=True, timeout=600)
    size = path.stat().st_size
    assert size > 2 ** 30
    r = _measure(path, "mapped")
    grown = r["after"]["RssAnon"] - r["before"]["RssAnon"]
    print(f"\nfile {size / 2**20:.0f} MiB; mapped load + one run: RssAnon "
          f"+{grown / 2**20:.1f} MiB, RssFile +"
          f"{(r['after']['RssFile'] - r['before']['RssFile']) / 2**20:.0f} MiB")
    assert r["out"] == pytest.approx(1.0, rel=1e-4)  # the weights were read
    assert grown < 0.15 * size, f"anonymous memory grew by {grown / 2**20:.0f} MiB"


def test_external_data_misaligned_tensor_copied(tmp_path):
    """External data at an offset that is no multiple of the element size (a 1-byte tensor
    before it): copied, so the core never sees a misaligned float*; values as written."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    (tmp_path / "m.onnx.data").write_bytes(b"\x01" + w.tobytes())
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[5, 3],
                    data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "m.onnx.data"), ("offset", "1"), ("length", str(w.nbytes))):
        t.external_data.add(key=k, value=v)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [t])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]),
              str(tmp_path / "m.onnx"))
    a = load_onnx(tmp_path / "m.onnx").initializers["w"]
    np.testing.assert_array_equal(a, w)
    assert a.ctypes.data % 4 == 0


def test_realign_makes_a_foreign_file_mappable(tmp_path, monkeypatch):
    from pyedge import onnx_wire
    m, ws = _chain_model(sizes=tuple(range(30, 45)))
    src = tmp_path / "plain.onnx"
    onnx.save(m, str(src))
    monkeypatch.setattr(onnx_wire, "COPY_WARNING_BYTES", 1)
    with pytest.warns(UserWarning, match="realign"):
        load_onnx(src)
    assert onnx_wire.main(["realign", str(src), str(tmp_path / "a.onnx")]) == 0
    g = load_onnx(tmp_path / "a.onnx")  # no warning: nothing copied
    for i, w in enumerate(ws):
        assert _base_is_mmap(g.initializers[f"w{i}"])
        np.testing.assert_array_equal(g.initializers[f"w{i}"], w)
    (tmp_path / "e").mkdir()
    onnx_wire.realign(src, tmp_path / "e" / "m.onnx", external=True)
    assert sorted(os.listdir(tmp_path / "e")) == ["m.onnx", "m.onnx.data"]
    np.testing.assert_array_equal(load_onnx(tmp_path / "e" / "m.onnx").initializers["w3"], ws[3])


def test_other_element_types_read_from_a_copy(tmp_path):
    """A type outside the plainly mappable ones goes through the ordinary tensor reader with
    its bytes (unsupported ones keep their error)."""
    m, _ = _chain_model()
    t = m.graph.initializer.add()
    t.CopyFrom(TensorProto(name="u16", data_type=TensorProto.UINT16, dims=[3],
                           raw_data=np.array([1, 2, 3], np.uint16).tobytes()))
    path = tmp_path / "a.onnx"
    save_aligned(m, path)
    with pytest.raises(ModelLoadError, match="u16.*unsupported element type"):
        load_onnx(path)
