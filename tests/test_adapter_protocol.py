"""The adapter protocol (pyedge/adapters/base.py): the registry, PEFT-named config fields,
per-tensor learning rates (LoRA+), the DoraScale op against numpy/finite differences and its
SIMD kernels against their scalar reference; PiSSA/OLoRA residuals. No torch needed."""
import json
import os

import numpy as np
import pytest

import pyedge
from pyedge import _core
from pyedge.adapters.base import method_by_name, method_for_config, method_for_peft, op_rule
from pyedge.adapters.lora_init import initial_adapters
from pyedge.export.adapter_files import AdapterError
from pyedge.graph import Graph, Node, ValueInfo


def mlp_graph(seed=0, k=12, h=10, n=4, transposed=True):
    """x [B, k] -> Gemm(fc1, transB) -> Relu -> MatMul(fc2) -> y [B, n]; parameter names like
    an exported nn.Sequential(fc1, relu, fc2)."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((h, k)).astype(np.float32) * 0.3
    inits = {"fc1.weight": w1 if transposed else np.ascontiguousarray(w1.T),
             "fc1.bias": rng.standard_normal(h).astype(np.float32) * 0.1,
             "fc2.weight": rng.standard_normal((h, n)).astype(np.float32) * 0.3}
    nodes = [Node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h"], "fc1", "",
                  {"transB": int(transposed)}),
             Node("Relu", ["h"], ["hr"], "relu", "", {}),
             Node("MatMul", ["hr", "fc2.weight"], ["y"], "fc2", "", {})]
    g = Graph(nodes=nodes, initializers=inits, inputs=[ValueInfo("x", "float32", [-1, k])],
              outputs=[ValueInfo("y", "float32", [-1, n])], opsets={"": 17})
    g.param_map = {"fc1.weight": {"module": "fc1", "param": "weight", "kind": "linear",
                                  "transposed": not transposed},
                   "fc1.bias": {"module": "fc1", "param": "bias", "kind": "linear"},
                   "fc2.weight": {"module": "fc2", "param": "weight", "kind": "linear",
                                  "transposed": True}}
    return g


def graph_to_onnx_file(graph, path):
    """A pyedge Graph of standard ops as an ONNX file with its parameter map."""
    import onnx
    from onnx import helper, numpy_helper

    from pyedge.param_names import PARAM_MAP_KEY
    nodes = [helper.make_node(n.op_type, n.inputs, n.outputs, name=n.name, **n.attrs)
             for n in graph.nodes]
    io = [[helper.make_tensor_value_info(v.name, onnx.TensorProto.FLOAT,
                                         [d if d >= 0 else None for d in v.shape])
           for v in vs] for vs in (graph.inputs, graph.outputs)]
    g = helper.make_graph(nodes, "g", io[0], io[1],
                          [numpy_helper.from_array(a, k) for k, a in graph.initializers.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(m, {PARAM_MAP_KEY: json.dumps(graph.param_map)})
    onnx.save(m, str(path))
    return str(path)


def test_config_accepts_peft_names():
    c = pyedge.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="q_proj",
                          task_type="CAUSAL_LM", bias="none")
    assert (c.alpha, c.dropout, c.lora_alpha, c.target_modules) == (8, 0.1, 8, ["q_proj"])
    assert c.scaling == 2.0
    assert pyedge.LoraConfig(r=4, alpha=8, use_rslora=True).scaling == 4.0
    # positional order of the old dataclass still works
    assert pyedge.LoraConfig(4, 8.0, ["fc1"], 0.0, True).scaling == 4.0
    with pytest.raises(TypeError, match="both alpha"):
        pyedge.LoraConfig(alpha=8, lora_alpha=16)
    with pytest.raises(TypeError, match="lora_bias_foo"):
        pyedge.LoraConfig(lora_bias_foo=True)
    with pytest.raises(ValueError, match="bias"):
        pyedge.LoraConfig(bias="all")
    with pytest.raises(ValueError, match="init_lora_weights"):
        pyedge.LoraConfig(init_lora_weights="corda")


def test_registry():
    assert method_for_config(pyedge.LoraConfig()).name == "lora"
    assert method_for_config(pyedge.LoraConfig(use_dora=True)).name == "dora"
    assert method_for_peft({"peft_type": "LORA"}).name == "lora"
    assert method_for_peft({"peft_type": "LORA", "use_dora": True}).name == "dora"
    assert method_by_name("DoRA").name == "dora"
    with pytest.raises(AdapterError, match="'BOFT'.*cannot load"):
        method_for_peft({"peft_type": "BOFT"}, "x/adapter_config.json")
    with pytest.raises(ValueError, match="unknown adapter method 'boft'"):
        method_by_name("boft")
    assert op_rule(Node("LoraMatMul", [], [], "", "pyedge", {})).bias_input == 4
    assert op_rule(Node("DoraScale", [], [], "", "pyedge", {})).row_input == 0
    assert op_rule(Node("MatMul", [], [], "", "", {})) is None


def test_peft_folder_of_unknown_method_is_named(tmp_path):
    sess = pyedge.TrainingSession(mlp_graph(), adapter=pyedge.LoraConfig(
        r=2, alpha=4, target_modules=["fc1"]), loss="mse")
    folder = sess.save_adapters(tmp_path / "a")
    cfg_path = os.path.join(folder, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    for pt in ("OFT", "BOFT"):
        json.dump({**cfg, "peft_type": pt}, open(cfg_path, "w"))
        with pytest.raises(AdapterError, match=f"peft_type is '{pt}', a PEFT method pyedge "
                                               "cannot load"):
            sess.load_adapters(folder)


def test_lora_plus_scales_b_learning_rate():
    """One AdamW step moves every element by ~lr (Adam's first step is lr·sign(g)); with
    LoRA+ B moves by lr·ratio and A by lr."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 12)).astype(np.float32)
    y = rng.standard_normal((8, 4)).astype(np.float32)
    moves = {}
    for ratio in (None, 8.0):
        cfg = pyedge.LoraConfig(r=2, alpha=4, target_modules=["fc1"], loraplus_lr_ratio=ratio)
        sess = pyedge.TrainingSession(mlp_graph(), adapter=cfg, loss="mse",
                                      optimizer=pyedge.AdamW(lr=1e-3, weight_decay=0.0))
        p = sess.trainable_parameters()
        p["fc1.lora_B.weight"][...] = rng.standard_normal((10, 2)).astype(np.float32) * 0.1
        before = {k: v.copy() for k, v in p.items()}
        sess.step({"x": x}, y)
        moves[ratio] = {k: float(np.median(np.abs(p[k] - before[k]))) for k in p}
    assert moves[None]["fc1.lora_A.weight"] == pytest.approx(1e-3, rel=1e-2)
    assert moves[None]["fc1.lora_B.weight"] == pytest.approx(1e-3, rel=1e-2)
    assert moves[8.0]["fc1.lora_A.weight"] == pytest.approx(1e-3, rel=1e-2)
    assert moves[8.0]["fc1.lora_B.weight"] == pytest.approx(8e-3, rel=1e-2)


@pytest.mark.parametrize("how", ["pissa", "olora"])
@pytest.mark.parametrize("transposed", [True, False])
def test_pissa_olora_residual_keeps_the_model(how, transposed):
    """W_res + s·B·A = W: the session computes what the base computed; A, B as the numpy
    SVD/QR in float64 give them (up to a sign per component)."""
    g = mlp_graph(transposed=transposed)
    base = pyedge.TrainingSession(g, loss=None)
    cfg = pyedge.LoraConfig(r=3, alpha=6, target_modules=["fc1"], init_lora_weights=how)
    sess = pyedge.TrainingSession(g, adapter=cfg, loss="mse")
    x = np.random.default_rng(1).standard_normal((5, 12)).astype(np.float32)
    np.testing.assert_allclose(sess.run({"x": x})["y"], base.run({"x": x})["y"], rtol=1e-5,
                               atol=1e-5)
    W = g.initializers["fc1.weight"]
    W_eff = (W if transposed else W.T).astype(np.float64)
    p = sess.trainable_parameters()
    A, B = p["fc1.lora_A.weight"], p["fc1.lora_B.weight"]
    if how == "pissa":
        V, S, Uh = np.linalg.svd(W_eff, full_matrices=False)
        ref_A = np.sqrt(S[:3] / 2.0)[:, None] * Uh[:3]
    else:
        ref_A = np.linalg.qr(W_eff)[1][:3]
    sign = np.sign(np.sum(A * ref_A, axis=1))[:, None]
    np.testing.assert_allclose(A * sign, ref_A, rtol=1e-4, atol=1e-5)
    res = sess.graph.initializers["fc1.weight"]
    res_eff = res if transposed else res.T
    np.testing.assert_allclose(res_eff + 2.0 * B @ A, W_eff, atol=1e-5)
    assert np.abs(res - W).max() > 0.1  # the base really is a residual


def test_initial_adapters_rank_check():
    with pytest.raises(ValueError, match="r <= min"):
        initial_adapters(np.ones((3, 5), np.float32), 4, 1.0, "pissa")


# ------------------------------------------------------------------------ DoRA op
def dora_ref(x, W_eff, A, B, m, s):
    """float64 DoRA forward (PEFT's formula) -> (y, n)."""
    merged = W_eff + s * B @ A
    n = np.linalg.norm(merged, axis=1)
    return (x @ merged.T) * (m / n), n


def test_dora_session_matches_formula_and_gradients():
    """A DoRA session: forward equals m/‖W + sBA‖ ∘ (x·(W + sBA)ᵀ) + b; dm and dB equal the
    float64 derivatives of that formula with the norm held constant (PEFT detaches it)."""
    rng = np.random.default_rng(3)
    g = mlp_graph()
    cfg = pyedge.LoraConfig(r=2, alpha=4, target_modules=["fc1"], use_dora=True)
    sess = pyedge.TrainingSession(g, adapter=cfg, loss="mse", fuse=False)
    assert [n.op_type for n in sess.graph.nodes][:2] == ["LoraMatMul", "DoraScale"]
    p = sess.trainable_parameters()
    assert set(p) == {"fc1.lora_A.weight", "fc1.lora_B.weight", "fc1.lora_magnitude_vector"}
    W = g.initializers["fc1.weight"].astype(np.float64)
    np.testing.assert_allclose(p["fc1.lora_magnitude_vector"], np.linalg.norm(W, axis=1),
                               rtol=1e-6)
    p["fc1.lora_B.weight"][...] = rng.standard_normal((10, 2)) * 0.3
    p["fc1.lora_magnitude_vector"][...] *= 1 + 0.2 * rng.standard_normal(10)
    x = rng.standard_normal((6, 12)).astype(np.float32)
    A, B, m = (p[k].astype(np.float64) for k in ("fc1.lora_A.weight", "fc1.lora_B.weight",
                                                 "fc1.lora_magnitude_vector"))
    b1 = g.initializers["fc1.bias"].astype(np.float64)
    h, n = dora_ref(x.astype(np.float64), W, A, B, m, 2.0)
    h = h + b1
    np.testing.assert_allclose(sess.run({"x": x}, outputs=["h"])["h"], h, rtol=1e-5, atol=1e-5)
    # gradients: loss = mean((relu(h)·W2 - t)²)
    t = rng.standard_normal((6, 4)).astype(np.float32)
    sess.step({"x": x}, t, update=False)
    grads = sess.gradients()
    W2 = g.initializers["fc2.weight"].astype(np.float64)
    dy = 2.0 * (np.maximum(h, 0) @ W2 - t) / t.size
    dh = (dy @ W2.T) * (h > 0)
    z = x.astype(np.float64) @ (W + 2.0 * B @ A).T
    np.testing.assert_allclose(grads["fc1.lora_magnitude_vector"], (dh * z).sum(0) / n,
                               rtol=1e-4, atol=1e-7)
    dz = dh * (m / n)
    dB = 2.0 * dz.T @ (x.astype(np.float64) @ A.T)
    np.testing.assert_allclose(grads["fc1.lora_B.weight"], dB, rtol=1e-4, atol=1e-7)


@pytest.mark.arm64
@pytest.mark.parametrize("n", [1, 7, 16, 37])
def test_dora_simd_kernels_equal_scalar(n):
    rng = np.random.default_rng(n)
    z = rng.standard_normal((5, n)).astype(np.float32)
    c = rng.standard_normal(n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    dy = rng.standard_normal((5, n)).astype(np.float32)

    def both(*args):
        return (_core.simd_kernel(*args, scalar=False), _core.simd_kernel(*args, scalar=True))

    v, s = both("dora_sum_sq", z[0])
    np.testing.assert_allclose(v, s, rtol=1e-6)
    np.testing.assert_allclose(s, [np.sum(z[0].astype(np.float64) ** 2)], rtol=1e-5)
    for bias in (b, np.zeros(0, np.float32)):
        v, s = both("dora_scale", z, c, bias)
        np.testing.assert_allclose(v, s, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(s, z * c + (bias if bias.size else 0), rtol=1e-6, atol=1e-6)
    v, s = both("dora_scale_bwd", dy, z, c)
    np.testing.assert_allclose(v, s, rtol=1e-5, atol=1e-6)
    ref_dz = dy * c + np.where(np.arange(5)[:, None] % 2 == 0, 0.0, 0.5)
    np.testing.assert_allclose(s[:5], ref_dz, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s[5], (dy * z).sum(0), rtol=1e-5, atol=1e-5)


def test_dora_merge_equals_session(tmp_path):
    """pyedge merge of a DoRA folder: the merged graph computes what the session does."""
    pytest.importorskip("onnx")
    from pyedge.export.merge import merge_adapters
    rng = np.random.default_rng(5)
    g = mlp_graph()
    model = graph_to_onnx_file(g, tmp_path / "m.onnx")
    sess = pyedge.TrainingSession(model, adapter=pyedge.LoraConfig(
        r=2, alpha=4, target_modules=["fc1", "fc2"], use_dora=True), loss="mse")
    for k, v in sess.trainable_parameters().items():
        v[...] = v + rng.standard_normal(v.shape).astype(np.float32) * 0.1
    folder = sess.save_adapters(tmp_path / "ad")
    merge_adapters(model, folder, tmp_path / "merged.onnx")
    plain = pyedge.TrainingSession(str(tmp_path / "merged.onnx"), loss=None)
    x = rng.standard_normal((3, 12)).astype(np.float32)
    np.testing.assert_allclose(plain.run({"x": x})["y"], sess.run({"x": x})["y"], rtol=1e-5,
                               atol=1e-5)
    # and back: the folder loads into a fresh DoRA session
    again = pyedge.TrainingSession(model, adapter=pyedge.LoraConfig(
        r=2, alpha=4, target_modules=["fc1", "fc2"], use_dora=True), loss="mse")
    again.load_adapters(folder)
    np.testing.assert_allclose(again.run({"x": x})["y"], sess.run({"x": x})["y"], rtol=1e-6)
    with pytest.raises(AdapterError, match="dora"):
        pyedge.TrainingSession(model, adapter=pyedge.LoraConfig(
            r=2, alpha=4, target_modules=["fc1", "fc2"]), loss="mse").load_adapters(folder)


@pytest.mark.parametrize("flags", [["--method", "dora"], ["--init-lora-weights", "pissa"],
                                   ["--method", "dora", "--loraplus-lr-ratio", "4"]])
def test_cli_train_eval_merge_with_method(tmp_path, flags):
    """pyedge train --method / --init-lora-weights / --loraplus-lr-ratio, then eval (pyedge
    adapters dir and the PEFT folder) and merge: the same outputs everywhere."""
    pytest.importorskip("onnx")
    from pyedge.cli import main
    rng = np.random.default_rng(0)
    model = graph_to_onnx_file(mlp_graph(), tmp_path / "m.onnx")
    x = rng.standard_normal((64, 12)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, labels=rng.standard_normal((64, 4)).astype(np.float32))
    out = tmp_path / "run"
    assert main(["train", model, "--data", str(tmp_path / "d.npz"), "--target", "fc1,fc2",
                 "--lora-r", "2", "--loss", "mse", "--max-steps", "5", "--batch-size", "16",
                 "--out", str(out), "--no-progress", "--quiet"] + flags) == 0
    peft_dir = out / "adapters"
    cfg = json.load(open(peft_dir / "adapter_config.json"))
    assert cfg["use_dora"] is ("dora" in flags)
    assert cfg["init_lora_weights"] == ("pissa" if "pissa" in flags else True)
    from pyedge.train import session_from_adapters
    sess, _ = session_from_adapters(model, str(peft_dir))
    assert sess.adapter_method.name == ("dora" if "dora" in flags else "lora")
    ref = sess.run({"x": x[:5]})["y"]
    assert main(["merge", model, "--adapters", str(peft_dir), "-o",
                 str(tmp_path / "merged.onnx")]) == 0
    merged = pyedge.TrainingSession(str(tmp_path / "merged.onnx"), loss=None)
    np.testing.assert_allclose(merged.run({"x": x[:5]})["y"], ref, rtol=1e-5, atol=1e-5)
