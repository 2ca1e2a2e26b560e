"""pyedge.torch.export: one ONNX file carrying the parameter map; names survive both
exporters; TorchScript's deduplication is off (or detected); factories for the CLI."""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import pyedge  # noqa: E402
import pyedge.torch  # noqa: E402
from models import reference as R  # noqa: E402
from pyedge.export.torch_export import build_param_map, load_factory, load_factory_spec  # noqa: E402,E501

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def meta(path):
    return {p.key: p.value for p in onnx.load(path).metadata_props}


def ort_run(path, feed):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_mlp_map_and_metadata(exporter, tmp_path):
    model, inputs, names, outs, dyn = R.mlp()
    path = pyedge.torch.export(model, inputs, str(tmp_path / "m.onnx"), output_names=outs,
                               dynamic_axes=dyn, exporter=exporter)
    md = meta(path)
    assert md["pyedge.exporter"] == exporter
    assert md["pyedge.torch_class"] == "models.reference.MLP"
    pm = json.loads(md["pyedge.param_map"])
    assert set(pm) == {n for n, _ in model.named_parameters()}
    assert pm["layers.2.weight"] == {"module": "layers.2", "param": "weight",
                                     "transposed": False, "kind": "linear"}
    # the session reads the stored map, and the file runs like the module
    assert pyedge.load_onnx(path).param_map == pm
    x = np.random.default_rng(0).standard_normal((3, 784)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(ort_run(path, {"x": x}) - ref).max() < 1e-4
    assert [i.name for i in onnx.load(path).graph.input] == ["x"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_cnn_kinds_and_buffers(exporter, tmp_path):
    model, inputs, names, outs, dyn = R.cnn()
    path = pyedge.torch.export(model, inputs, str(tmp_path / "c.onnx"), exporter=exporter)
    pm = json.loads(meta(path)["pyedge.param_map"])
    assert pm["blocks.0.conv.weight"]["kind"] == "conv"
    assert pm["head.weight"]["kind"] == "linear"
    assert pm["blocks.3.bn.running_var"].get("buffer") is True
    assert "buffer" not in pm["blocks.3.bn.weight"]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_gpt2_fan_in_fan_out_and_tied_weights(exporter, tmp_path):
    model, inputs, names, outs, dyn = R.gpt2()
    path = pyedge.torch.export(model, inputs, str(tmp_path / "g.onnx"), output_names=outs,
                               dynamic_axes=dyn, exporter=exporter)
    pm = json.loads(meta(path)["pyedge.param_map"])
    e = pm["transformer.h.0.attn.c_attn.weight"]
    assert e["kind"] == "conv1d_fan_in_fan_out" and e["transposed"] is False
    tied = [k for k, v in pm.items() if v["module"] == "transformer.wte"]
    assert len(tied) == 1  # one initializer: named lm_head.weight (dynamo) or wte (TorchScript)
    assert pm[tied[0]]["param"] == "weight" and pm[tied[0]]["aliases"] == ["lm_head.weight"]
    assert pm[tied[0]]["kind"] == "embedding"


class Twins(torch.nn.Module):
    """Distinct parameters with identical values (what TorchScript deduplicates)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.ln1, self.ln2 = torch.nn.LayerNorm(8), torch.nn.LayerNorm(8)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)
            self.a.bias.zero_()
            self.b.bias.zero_()

    def forward(self, x):
        return self.ln2(self.b(self.ln1(self.a(x))))


def test_dynamic_axes_start_at_two_where_every_example_allows():
    """torch < 2.10 refuses the `seq != 1` guard transformers' models leave on an unbounded
    Dim (seen with torch 2.9.1 on aarch64); a lower bound of 2 satisfies it. A label with an
    example size of 1 stays unbounded (a min of 2 would reject the example itself)."""
    from pyedge.export.torch_export import _dynamic_shapes
    ids, mask = torch.zeros(2, 5), torch.zeros(1, 5)
    axes = {"ids": {0: "b", 1: "s"}, "mask": {0: "b", 1: "s"}}
    d_ids, d_mask = _dynamic_shapes(["ids", "mask"], axes, (ids, mask))
    assert d_ids[1] is d_mask[1] and d_ids[0] is d_mask[0]  # one Dim per label
    assert (d_ids[1].min, d_ids[0].min) == (2, 0)
    only_ids = _dynamic_shapes(["ids"], {"ids": [0]}, (ids,))
    assert only_ids[0][0].__name__ == "ids_0" and only_ids[0][0].min == 2
    assert _dynamic_shapes(["ids", "x"], {"ids": {1: "s"}}, (ids, ids))[1] is None


class _ConstraintViolation(Exception):
    """What torch.onnx.export raises: its own error, the ConstraintViolation as the cause."""


def _fake_export(monkeypatch, fixes):
    """torch.onnx.export replaced: raises with each of `fixes` (torch's "Suggested fixes:"
    text) in turn, then succeeds; returns the dynamic_shapes of every call."""
    calls = []

    def fake(model, args, path, dynamic_shapes=None, **kw):
        calls.append(dynamic_shapes)
        if len(calls) <= len(fixes):
            cause = _ConstraintViolation("Constraints violated (seq)!\nSuggested fixes:\n  "
                                         + fixes[len(calls) - 1])
            raise RuntimeError("Failed to export the model with torch.export.") from cause
        return "exported"
    monkeypatch.setattr(torch.onnx, "export", fake)
    return calls


def test_dynamo_export_takes_suggested_ranges_round_after_round(monkeypatch):
    """torch 2.9 applies one round of torch.export's suggested fixes and fails on the next
    (seen under qemu: `seq <= 512` for BERT's positions, then `seq != 1`); pyedge keeps
    taking them, as torch >= 2.10 does."""
    from torch.export import Dim
    from pyedge.export.torch_export import export_dynamo
    calls = _fake_export(monkeypatch, ["seq = Dim('seq', max=512)",
                                       "seq = Dim('seq', min=2, max=512)"])
    dyn = ({0: Dim("batch"), 1: Dim("seq")},)
    assert export_dynamo(None, (), "x.onnx", dynamic_shapes=dyn) == "exported"
    assert len(calls) == 3
    assert (calls[1][0][1].min, calls[1][0][1].max) == (0, 512)
    assert (calls[2][0][1].min, calls[2][0][1].max) == (2, 512)
    assert calls[2][0][0] is calls[0][0][0]  # untouched axes keep their Dim


def test_dynamo_export_keeps_asked_ranges_and_adds_min_2_for_a_not_one_guard(monkeypatch):
    """What torch 2.9 raised for MiniLM under qemu: its own retry had replaced seq's min of 2
    by max=512, then failed on `seq != 1`, a guard it suggests no fix for."""
    from torch.export import Dim
    from pyedge.export.torch_export import export_dynamo
    calls = _fake_export(monkeypatch, ["seq = Dim('seq', max=512)"])
    export_dynamo(None, (), "x.onnx", dynamic_shapes=({1: Dim("seq", min=2)},))
    assert (calls[1][0][1].min, calls[1][0][1].max) == (2, 512)  # the min asked for stays

    not_one = ("Not all values of seq = L['input_ids'].size()[1] in the specified range "
               "seq <= 512 satisfy the generated guard L['input_ids'].size()[1] != 1.")

    def fake(model, args, path, dynamic_shapes=None, **kw):
        calls.append(dynamic_shapes)
        if len(calls) == 1:
            raise RuntimeError("export failed") from _ConstraintViolation(not_one)
        return "exported"
    calls = []
    monkeypatch.setattr(torch.onnx, "export", fake)
    assert export_dynamo(None, (), "x.onnx", dynamic_shapes=({1: Dim("seq")},)) == "exported"
    assert (calls[1][0][1].min, calls[1][0][1].max) == (2, 512)


def test_dynamo_export_refuses_a_fix_that_makes_an_axis_static(monkeypatch):
    from torch.export import Dim
    from pyedge.export.torch_export import export_dynamo
    calls = _fake_export(monkeypatch, ["seq = 16"])
    with pytest.raises(RuntimeError, match="Failed to export") as err:
        export_dynamo(None, (), "x.onnx", dynamic_shapes=({1: Dim("seq")},))
    assert isinstance(err.value.__cause__, _ConstraintViolation) and len(calls) == 1
    # no dynamic axes: nothing to refine, the first error goes out
    calls = _fake_export(monkeypatch, ["seq = Dim('seq', max=512)"])
    with pytest.raises(RuntimeError):
        export_dynamo(None, (), "x.onnx")
    assert len(calls) == 1


def test_reference_exports_need_no_compiled_core(tmp_path):
    """scripts/arm64-check.sh exports the parity models with the host's torch before anything
    is built: models.export_reference must not import the pyedge package (its core)."""
    code = ("import sys; sys.modules['pyedge'] = None\n"  # any `import pyedge...` now fails
            "from models.export_reference import export_reference\n"
            f"export_reference('mlp', {str(tmp_path / 'm.onnx')!r})\n"
            "print('ok')")
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
    assert (tmp_path / "m.onnx").stat().st_size > 0


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_identical_parameters_stay_distinct(exporter, tmp_path):
    model = Twins().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "merged" warning
        path = pyedge.torch.export(model, (torch.randn(2, 8),), str(tmp_path / "t.onnx"),
                                   exporter=exporter)
    proto = onnx.load(path)
    names = {n for n, _ in model.named_parameters()}
    assert {t.name for t in proto.graph.initializer} == names
    assert [i.name for i in proto.graph.input] == ["x"]  # weights are not graph inputs
    assert set(json.loads(meta(path)["pyedge.param_map"])) == names
    x = np.ones((2, 8), np.float32)
    with torch.no_grad():
        assert np.abs(ort_run(path, {"x": x}) - model(torch.from_numpy(x)).numpy()).max() < 1e-5


def test_deduplicated_file_records_all_names(tmp_path):
    """A plain TorchScript export merges identical tensors: the map records every name."""
    model = Twins().eval()
    path = str(tmp_path / "plain.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 8),), path, dynamo=False)
    proto = onnx.load(path)
    assert len(proto.graph.initializer) < 8
    with pytest.warns(UserWarning, match="identical-valued"):
        pm = build_param_map(model, proto)
    recorded = {f"{e['module']}.{e['param']}" for e in pm.values()}
    recorded |= {a for e in pm.values() for a in e.get("aliases", [])}
    assert recorded == {n for n, _ in model.named_parameters()}


def test_renamed_initializers_matched_by_value(tmp_path):
    """Constant folding renames a transposed weight; the map still finds it (transposed)."""
    path = str(tmp_path / "f.onnx")

    class ThreeD(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 4)

        def forward(self, x):
            return self.lin(x)
    model = ThreeD().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 6),), path, dynamo=False,
                          do_constant_folding=True)
    proto = onnx.load(path)
    pm = build_param_map(model, proto)
    renamed = [n for n in pm if n != "lin.bias"]
    assert len(renamed) == 1
    e = pm[renamed[0]]
    assert e["module"] == "lin" and e["param"] == "weight"
    assert e["transposed"] is (renamed[0] != "lin.weight")


def test_load_factory_module_spec_and_file(tmp_path):
    module, inputs = load_factory("models.reference:mlp", batch=4)
    assert isinstance(module, torch.nn.Module) and inputs["x"].shape == (4, 784)
    spec = load_factory_spec("models.reference:gpt2")
    assert spec.input_names == ["input_ids"] and spec.dynamic_axes["input_ids"] == \
        {0: "batch", 1: "seq"}

    f = tmp_path / "model.py"
    f.write_text(textwrap.dedent("""
        import torch
        def build():
            return torch.nn.Linear(3, 2), (torch.randn(1, 3),)
    """))
    module, inputs = load_factory(str(f))
    assert isinstance(module, torch.nn.Linear) and inputs[0].shape == (1, 3)
    g = tmp_path / "other.py"
    g.write_text("import torch\nmodel = torch.nn.Linear(5, 1)\n"
                 "example_inputs = lambda: {'x': torch.zeros(2, 5)}\n")
    module, inputs = load_factory(str(g))
    assert module.in_features == 5 and list(inputs) == ["x"]
    path = pyedge.torch.export(module, inputs, str(tmp_path / "o.onnx"), exporter="torchscript")
    assert [i.name for i in onnx.load(path).graph.input] == ["x"]
    with pytest.raises(ValueError, match="neither"):
        load_factory("no_colon_here")


def test_device_imports_do_not_need_torch():
    code = ("import sys, pyedge, pyedge.export, pyedge.export.peft, pyedge.export.merge, "
            "pyedge.torch; assert 'torch' not in sys.modules, 'torch was imported'")
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_export_restores_each_submodule_mode(tmp_path):
    """An eval-mode module inside a training-mode wrapper stays in eval mode after export."""
    import torch

    from pyedge.torch import export

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))

        def forward(self, x):
            return self.inner(x)

    m = Wrapper()
    m.inner.eval()
    assert m.training and not m.inner.training
    export(m, (torch.zeros(2, 4),), str(tmp_path / "m.onnx"))
    assert m.training and not m.inner.training and not m.inner[1].training
