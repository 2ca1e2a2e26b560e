"""TorchScript exports of modern decoders load and train (issue 19).

Files nobody here wrote: tiny config-built Llama / Qwen2 / Mistral / Gemma models exported with
plain `torch.onnx.export(..., dynamo=False)` (no pyedge metadata), with transformers' "sdpa"
attention (its scale is a float64 `Sqrt(Constant)` → `Cast`, folded at import by
import_rewrites.fold_cast_chains) and with "eager". pyedge's logits must equal onnxruntime's
and torch's, LoRA must train, and the saved adapters must load into PEFT with exactly the
keys PEFT itself saves. A hand-made graph checks the rewrite alone.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import pyedge
from pyedge.import_rewrites import fold_cast_chains
from pyedge.onnx_import import load_onnx

FAMILIES = ["llama", "qwen2", "mistral", "gemma"]
IMPLS = ["sdpa", "eager"]
BATCH, SEQ, VOCAB = 2, 12, 128
TOL = 1e-4


# ------------------------------------------------------------------ the rewrite on its own
def _scale_model(extra_cast_reader=False, cast_to=TensorProto.FLOAT):
    """x [2, 3] * Cast(Sqrt(Constant 0.25 float64)) -> y, as TorchScript writes SDPA's scale;
    also an integer chain: Cast(Div(Constant 7 int64, Constant -2 int64)) added to y."""
    c = numpy_helper.from_array(np.array(0.25, np.float64), "c")
    seven = numpy_helper.from_array(np.array(7, np.int64), "seven")
    m2 = numpy_helper.from_array(np.array(-2, np.int64), "m2")
    nodes = [helper.make_node("Constant", [], ["c_out"], name="const", value=c),
             helper.make_node("Sqrt", ["c_out"], ["s"], name="sqrt"),
             helper.make_node("Cast", ["s"], ["s32"], name="cast", to=cast_to),
             helper.make_node("Mul", ["x", "s32"], ["xs"], name="mul"),
             helper.make_node("Div", ["seven", "m2"], ["q"], name="idiv"),
             helper.make_node("Cast", ["q"], ["q32"], name="cast_q", to=TensorProto.FLOAT),
             helper.make_node("Add", ["xs", "q32"], ["y"], name="add")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])]
    if extra_cast_reader:  # the float64 value is also read by a node that is not constant
        nodes.append(helper.make_node("Cast", ["x"], ["x64"], name="x64", to=TensorProto.DOUBLE))
        nodes.append(helper.make_node("Mul", ["x64", "s"], ["z"], name="mul64"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.DOUBLE, [2, 3]))
    graph = helper.make_graph(nodes, "scale", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [2, 3])], outputs, initializer=[seven, m2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fold_rewrite_on_hand_made_graph():
    import onnxruntime as ort
    model = _scale_model()
    g = load_onnx(model)  # fold_cast_chains already ran at import
    ops = [n.op_type for n in g.nodes]
    assert ops == ["Mul", "Add"], ops
    assert g.initializers["s32"].dtype == np.float32 and g.initializers["s32"].shape == () and float(g.initializers["s32"]) == 0.5
    # ONNX integer Div truncates toward zero: 7 / -2 = -3 (numpy's // would give -4)
    assert float(g.initializers["q32"]) == -3.0
    assert not any(a.dtype == np.float64 for a in g.initializers.values())
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    ref = ort.InferenceSession(model.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(ref, x * 0.5 - 3)
    out = pyedge.TrainingSession(g, loss=None).run({"x": x})
    np.testing.assert_array_equal(out["y"], ref)


def test_fold_rewrite_keeps_values_other_nodes_read():
    g = load_onnx(_scale_model(extra_cast_reader=True))
    ops = sorted(n.op_type for n in g.nodes)
    # the float64 Sqrt stays for its other reader; the Cast is gone, its value a float32 init
    assert ops == sorted(["Sqrt", "Mul", "Add", "Cast", "Mul"]), ops
    assert "s32" in g.initializers and "c_out" in g.initializers


def test_fold_rewrite_leaves_float32_chains_and_other_casts():
    g = load_onnx(_scale_model(cast_to=TensorProto.DOUBLE))  # not a Cast to float32
    assert "Sqrt" in [n.op_type for n in g.nodes]
    nodes = [helper.make_node("Sqrt", ["c"], ["s"], name="sqrt"),
             helper.make_node("Cast", ["s"], ["s32"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", "s32"], ["y"], name="mul")]
    graph = helper.make_graph(
        nodes, "f32", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        initializer=[numpy_helper.from_array(np.array(4.0, np.float32), "c")])
    g = load_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [n.op_type for n in g.nodes] == ["Sqrt", "Cast", "Mul"]  # the core folds these
    assert fold_cast_chains(g) == 0


def _chain_model(nodes, inits, out_name="y"):
    """y = x + (the chain's float32 value named "k") over x [3]."""
    nodes = nodes + [helper.make_node("Add", ["x", "k"], [out_name], name="add")]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [3])],
        initializer=[numpy_helper.from_array(v, n) for n, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fold_rewrite_float64_tensor_and_refusals():
    import onnxruntime as ort
    x = np.array([1.0, -2.0, 3.5], np.float32)
    # a float64 tensor read through a Cast (and a float64 Pow on the way): one float32 tensor
    w = np.array([0.1, 1e-9, 3.0], np.float64)
    m = _chain_model([helper.make_node("Pow", ["w", "two"], ["w2"], name="pow"),
                      helper.make_node("Cast", ["w2"], ["k"], name="cast", to=TensorProto.FLOAT)],
                     {"w": w, "two": np.array(2.0, np.float64)})
    g = load_onnx(m)
    assert [n.op_type for n in g.nodes] == ["Add"] and set(g.initializers) == {"k"}
    ref = ort.InferenceSession(m.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(pyedge.TrainingSession(g, loss=None).run({"x": x})["y"], ref)
    # an integer to a negative integer power: numpy refuses, the chain is left as it is
    m = _chain_model([helper.make_node("Pow", ["i", "e"], ["p"], name="ipow"),
                      helper.make_node("Cast", ["p"], ["k"], name="cast", to=TensorProto.FLOAT)],
                     {"i": np.array(2, np.int64), "e": np.array(-1, np.int64)})
    assert [n.op_type for n in load_onnx(m).nodes] == ["Pow", "Cast", "Add"]
    # an op that is not elementwise (Shape) in the chain: not constant here, left to the core
    m = _chain_model([helper.make_node("Shape", ["x"], ["s"], name="shape"),
                      helper.make_node("Cast", ["s"], ["k"], name="cast", to=TensorProto.FLOAT)],
                     {})
    assert [n.op_type for n in load_onnx(m).nodes] == ["Shape", "Cast", "Add"]


# ------------------------------------------------------------- exported decoders, end to end
def _build(family, impl):
    """The family's tiny decoder (tests/decoder_families.py) with transformers' `impl`
    attention; deterministic, so a second call gives the model PEFT loads adapters onto."""
    from decoder_families import build
    return build(family, impl)[0]


def _feeds(seed=0, batch=BATCH, seq=SEQ):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (batch, seq)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(family, impl) -> (path, torch model): exported once per module by the TorchScript
    exporter as anyone would call it (no pyedge.torch.export, so no pyedge metadata)."""
    import torch
    from models.export_reference import export
    root = tmp_path_factory.mktemp("tsdec")
    cache = {}

    def get(family, impl):
        if (family, impl) not in cache:
            model = _build(family, impl)
            f = _feeds()
            path = str(root / f"{family}_{impl}.onnx")
            export(model, (torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])),
                   path, exporter="torchscript", input_names=["input_ids", "attention_mask"],
                   output_names=["logits"],
                   dynamic_axes={"input_ids": {0: "b", 1: "t"}, "attention_mask": {0: "b", 1: "t"}})
            cache[(family, impl)] = (path, model)
        return cache[(family, impl)]
    return get


def _cases():  # about 1 s each (export included): none needs the slow mark
    return [pytest.param(fam, impl, id=f"{fam}-{impl}") for fam in FAMILIES for impl in IMPLS]


def _torch_logits(model, feeds):
    import torch
    with torch.no_grad():
        return model(torch.from_numpy(feeds["input_ids"]),
                     torch.from_numpy(feeds["attention_mask"])).numpy()


@pytest.mark.parametrize("family,impl", _cases())
def test_torchscript_decoder_loads_trains_and_goes_to_peft(exported, family, impl, tmp_path):
    import onnxruntime as ort
    import torch
    path, model = exported(family, impl)
    if impl == "sdpa":  # the case this is about: Sqrt of a float64 Constant is in the file
        nodes = onnx.load(path).graph.node
        f64 = {n.output[0] for n in nodes if n.op_type == "Constant"
               and any(a.name == "value" and a.t.data_type == TensorProto.DOUBLE
                       for a in n.attribute)}
        assert any(n.op_type == "Sqrt" and n.input[0] in f64 for n in nodes)
    ort_sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    # another shape than the export's example (the axes are dynamic), right padding
    other = _feeds(2, batch=3, seq=7)
    other["attention_mask"][1, -3:] = 0
    feeds = _feeds(1)
    ref_ort = ort_sess.run(None, feeds)[0]
    ref_torch = _torch_logits(model, feeds)
    sess = pyedge.TrainingSession(path, lora=pyedge.LoraConfig(
        r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
        loss="causal_lm", optimizer=pyedge.AdamW(lr=1e-2))
    assert not any(a.dtype == np.float64 for a in sess.graph.initializers.values())
    got = sess.run(feeds)[sess.output_name]
    assert np.abs(got - ref_ort).max() <= TOL
    assert np.abs(got - ref_torch).max() <= TOL
    got = sess.run(other)[sess.output_name]
    assert got.shape == (3, 7, VOCAB)
    assert np.abs(got - ort_sess.run(None, other)[0]).max() <= TOL
    assert np.abs(got - _torch_logits(model, other)).max() <= TOL

    labels = feeds["input_ids"]
    losses = [sess.step(feeds, labels) for _ in range(5)]  # one batch: the loss must fall
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    sess.save_adapters(str(tmp_path / "ad"))

    from tests.test_peft_roundtrip import load_peft_strict
    pm = load_peft_strict(_build(family, impl), str(tmp_path / "ad"))
    n_lora = sum(1 for k, _ in pm.named_parameters() if "lora_A" in k)
    assert n_lora == 3 * 2  # three targets in each of the two layers
    after = sess.run(feeds)[sess.output_name]
    with torch.no_grad():
        peft_logits = pm(torch.from_numpy(feeds["input_ids"]),
                         torch.from_numpy(feeds["attention_mask"])).numpy()
    assert np.abs(after - ref_torch).max() > 10 * TOL  # the adapters changed the model
    assert np.abs(after - peft_logits).max() <= TOL


def test_pyedge_torchscript_export_of_sdpa_decoder(tmp_path):
    """The same file through pyedge.torch.export(exporter="torchscript") (parameter map in
    the metadata, initializers first written as graph inputs then taken out again)."""
    import torch
    import pyedge.torch as pt
    model = _build("qwen2", "sdpa")
    f = _feeds()
    path = str(tmp_path / "qwen2.onnx")
    pt.export(model, (torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])),
              path, input_names=["input_ids", "attention_mask"], exporter="torchscript")
    sess = pyedge.TrainingSession(path, lora=pyedge.LoraConfig(r=4, target_modules=["q_proj"]),
                                  loss="causal_lm")
    assert np.abs(sess.run(f)[sess.output_name] - _torch_logits(model, f)).max() <= TOL
    assert np.isfinite(sess.step(f, f["input_ids"]))
