"""merge_adapters: LoRA folded into the base initializers and whole tensors written back; the
graph is untouched (same nodes, op types, other initializers byte-identical) and the merged
file, run by onnxruntime, equals the adapted PyTorch model."""
import collections

import numpy as np
import pytest

import pyedge
import pyedge.torch  # noqa: F401 - pyedge.torch.export / load_adapters

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from pyedge.export import merge_adapters  # noqa: E402
from pyedge.export.peft import AdapterError  # noqa: E402
from test_peft_roundtrip import (SETUPS, build, export_model, export_root, make_batch,  # noqa: E402,F401,E501
                                 peft_train, rel_err, torch_out)

TOL = 1e-4


def ort_run(path, feed):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})[0]


def pyedge_adapters(name, path, folder, seed=0):
    """A session whose adapters are set to random values (B != 0), saved to `folder`."""
    s = SETUPS[name]
    sess = pyedge.TrainingSession(path, lora=pyedge.LoraConfig(r=4, alpha=8,
                                  target_modules=s["lora"]), train=s["train"], loss=None)
    rng = np.random.default_rng(seed)
    for k, v in sess.trainable_parameters().items():
        scale = 0.05 if ".lora_" in k else 0.1 * (float(np.abs(v).mean()) + 1e-3)
        v[...] += (rng.standard_normal(v.shape) * scale).astype(np.float32)
    sess.save_adapters(folder)
    return sess


def check_structure(orig_path, merged_path, changed):
    a, b = onnx.load(orig_path), onnx.load(merged_path)
    assert len(a.graph.node) == len(b.graph.node)
    assert [n.SerializeToString() for n in a.graph.node] == \
        [n.SerializeToString() for n in b.graph.node]
    assert collections.Counter(n.op_type for n in a.graph.node) == \
        collections.Counter(n.op_type for n in b.graph.node)
    assert [t.name for t in a.graph.initializer] == [t.name for t in b.graph.initializer]
    for ta, tb in zip(a.graph.initializer, b.graph.initializer):
        same = ta.SerializeToString() == tb.SerializeToString()
        assert same != (ta.name in changed), ta.name
    assert a.graph.input == b.graph.input and a.graph.output == b.graph.output
    assert list(a.metadata_props) == list(b.metadata_props)
    assert list(a.opset_import) == list(b.opset_import)


def merged_equals_torch(name, exporter, export_root, tmp_path, source="pyedge"):
    path = export_model(name, exporter, export_root)
    folder = str(tmp_path / "ad")
    if source == "pyedge":
        pyedge_adapters(name, path, folder)
        torch_model = pyedge.torch.load_adapters(build(name)[0], folder, merge=True)
    else:
        pm = peft_train(name)
        pm.save_pretrained(folder)
        torch_model = pm
    out = str(tmp_path / "merged.onnx")
    info = merge_adapters(path, folder, out)
    assert info["lora"] and info["whole"]
    check_structure(path, out, set(info["lora"]) | set(info["whole"]))
    errs = []
    for seed in (31, 32):
        feed, _ = make_batch(name, seed)
        errs.append(rel_err(ort_run(out, feed), torch_out(torch_model, feed)))
    return max(errs)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("source", ["pyedge", "peft"])
def test_merge_mlp(exporter, source, export_root, tmp_path):
    assert merged_equals_torch("mlp", exporter, export_root, tmp_path, source) < TOL


@pytest.mark.parametrize("source", ["pyedge", "peft"])
def test_merge_gpt2_fan_in_fan_out(source, export_root, tmp_path):
    assert merged_equals_torch("gpt2", "torchscript", export_root, tmp_path, source) < TOL


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_merge_cnn_whole_tensors(exporter, export_root, tmp_path):
    assert merged_equals_torch("cnn", exporter, export_root, tmp_path, "pyedge") < TOL


def test_merge_gpt2_dynamo(export_root, tmp_path):
    assert merged_equals_torch("gpt2", "dynamo", export_root, tmp_path, "pyedge") < TOL


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_merge_minilm(exporter, export_root, tmp_path):
    src = "peft" if exporter == "dynamo" else "pyedge"
    assert merged_equals_torch("minilm", exporter, export_root, tmp_path, src) < TOL


def test_merge_rejects_adapters_of_another_model(export_root, tmp_path):
    mlp = export_model("mlp", "torchscript", export_root)
    folder = str(tmp_path / "ad")
    peft_train("gpt2", steps=1).save_pretrained(folder)
    with pytest.raises(AdapterError, match="not in the model|no MatMul"):
        merge_adapters(mlp, folder, str(tmp_path / "x.onnx"))
    assert not (tmp_path / "x.onnx").exists()


def test_merge_peft_conv_lora(export_root, tmp_path):
    """PEFT's Conv2d LoRA (A: k×k conv to r channels, B: 1×1 conv) folds into Conv weights."""
    path = export_model("cnn", "torchscript", export_root)
    model = build("cnn")[0]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["blocks.1.conv", "blocks.3.conv"],
                          modules_to_save=["head"])
    pm = peft.get_peft_model(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    pm.eval()
    folder = str(tmp_path / "ad")
    pm.save_pretrained(folder)
    out = str(tmp_path / "merged.onnx")
    info = merge_adapters(path, folder, out)
    assert info["lora"] == ["blocks.1.conv.weight", "blocks.3.conv.weight"]
    assert info["whole"] == ["head.bias", "head.weight"]
    check_structure(path, out, set(info["lora"]) | set(info["whole"]))
    feed, _ = make_batch("cnn", 41)
    assert rel_err(ort_run(out, feed), torch_out(pm, feed)) < TOL
    # and the no-peft merge path in torch does the same
    manual = pyedge.torch.load_adapters(build("cnn")[0], folder, use_peft=False, merge=True)
    assert rel_err(torch_out(manual, feed), torch_out(pm, feed)) < TOL


def test_merge_keeps_external_data(export_root, tmp_path):
    src = export_model("mlp", "torchscript", export_root)
    model = onnx.load(src)
    ext = str(tmp_path / "ext.onnx")
    onnx.save_model(model, ext, save_as_external_data=True, location="ext.onnx.data",
                    size_threshold=1024)
    folder = str(tmp_path / "ad")
    pm = peft_train("mlp")
    pm.save_pretrained(folder)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    merge_adapters(ext, folder, str(out_dir / "merged.onnx"))
    assert (out_dir / "merged.onnx.data").exists()
    assert (out_dir / "merged.onnx").stat().st_size < 100_000
    feed, _ = make_batch("mlp", 61)
    assert rel_err(ort_run(str(out_dir / "merged.onnx"), feed), torch_out(pm, feed)) < TOL
