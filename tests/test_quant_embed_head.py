"""A quantized embedding table and a quantized (tied) LM head kept packed:
com.microsoft.GatherBlockQuantized against numpy's dequantize-then-gather (exactly) and
onnxruntime; pyedge.LinearCrossEntropy on a packed MatMulNBits head against torch float64 on
the dequantized weight; pyedge.quantize(include=("embeddings", "lm_head")) writing one packed
copy of a tied table, and a tiny Llama training on it at a fraction of the float weight bytes."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import pyedge
from pyedge import _core
from pyedge.quant_formats import dequantize_nbits, quantize_nbits
from pyedge.quantize import quantize_model
from quant_models import inits_of, run_ort, tied_lm

MS = "com.microsoft"


def table(V=40, K=128, bits=4, block=32, sym=False, seed=0):
    """(packed [V, n_blocks, blob], scales [V, n_blocks], zero points or None, float table)"""
    W = np.random.default_rng(seed).standard_normal((V, K)).astype(np.float32)
    packed, scales, zp = quantize_nbits(W, bits, block, sym)
    return packed, scales.astype(np.float32), zp, dequantize_nbits(packed, scales, zp, K, V,
                                                                    bits, block, np.float32)


def gbq(data, ids, scales, zp, **attrs):
    ins = [data, ids, scales] + ([zp] if zp is not None else [])
    (y,), _ = _core.run_op("GatherBlockQuantized", ins, attrs, domain=MS)
    return y


def ort_gbq(data, ids, scales, zp, **attrs):
    import onnxruntime as ort
    inits = [numpy_helper.from_array(data, "d"), numpy_helper.from_array(scales, "s")]
    ins = ["d", "ids", "s"]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "z"))
        ins.append("z")
    g = helper.make_graph([helper.make_node("GatherBlockQuantized", ins, ["y"], domain=MS,
                                            **attrs)], "g",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                            helper.make_opsetid(MS, 1)])
    m.ir_version = 8
    return ort.InferenceSession(m.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [False, True], ids=["zero_points", "symmetric"])
def test_lookup_equals_numpy_dequantize_then_gather_and_onnxruntime(bits, sym):
    V, K, bs = 40, 128, 32
    packed, scales, zp, deq = table(V, K, bits, bs, sym)
    ids = np.array([[0, 5, 39], [3, -3, 1], [39, 39, 0]], np.int64)
    data = packed.reshape(V, -1)                     # ORT's layout
    zp2 = None if zp is None else zp.reshape(V, -1)
    y = gbq(data, ids, scales, zp2, bits=bits, block_size=bs)
    assert y.shape == (3, 3, K) and y.dtype == np.float32
    np.testing.assert_array_equal(y, deq[ids])
    # MatMulNBits' 3-D B (a tied head's bytes) and int32 indices: the same rows
    np.testing.assert_array_equal(gbq(packed, ids.astype(np.int32), scales, zp2, bits=bits,
                                      block_size=bs), y)
    pytest.importorskip("onnxruntime")
    np.testing.assert_allclose(y, ort_gbq(data, ids, scales, zp2, bits=bits, block_size=bs),
                               rtol=1e-6, atol=1e-7)


def test_lookup_errors_name_the_node():
    packed, scales, zp, _ = table(V=8, K=64, block=32)
    data = packed.reshape(8, -1)
    with pytest.raises(Exception, match=r"index 8 .*out of range for a table of 8 rows"):
        gbq(data, np.array([1, 8]), scales, zp, bits=4, block_size=32)
    with pytest.raises(Exception, match="multiple of block_size"):
        gbq(data, np.array([1]), scales, zp, bits=4, block_size=48)
    with pytest.raises(Exception, match="scales"):
        gbq(data, np.array([1]), scales[:, :1].copy(), zp, bits=4, block_size=32)
    with pytest.raises(Exception, match="gather_axis"):
        gbq(data, np.array([1]), scales, zp, bits=4, block_size=32, gather_axis=1)
    with pytest.raises(Exception, match="uint8"):
        gbq(data.astype(np.int8), np.array([1]), scales, zp, bits=4, block_size=32)


# --- the fused loss on a packed head -------------------------------------------------------
torch = pytest.importorskip("torch")


def torch_head_loss(h, W, labels, bias, A, B, attrs):
    logits = h @ W.T
    if bias is not None:
        logits = logits + bias
    if A is not None:
        logits = logits + attrs.get("lora_scale", 1.0) * (h @ A.T) @ B.T
    if attrs.get("shift"):
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
        label_smoothing=attrs.get("label_smoothing", 0.0),
        reduction=attrs.get("reduction", "mean"))


HEAD_CASES = {
    "q4_shift": (dict(bits=4), dict(shift=1)),
    "q4_sym_bias_chunk3": (dict(bits=4, sym=True, bias=True), dict(chunk=3)),
    "q8_ignored_smoothing": (dict(bits=8, ignored=(1, 4, 5)), dict(label_smoothing=0.1, shift=1)),
    "q4_lora_sum_chunk5": (dict(bits=4, r=3), dict(lora_scale=0.5, reduction="sum", chunk=5)),
}


@pytest.mark.parametrize("name", list(HEAD_CASES))
def test_fused_quantized_head_equals_unfused_on_dequantized_weight(name):
    case, attrs = HEAD_CASES[name]
    V, D, bs, bits = 50, 64, 32, case["bits"]
    rng = np.random.default_rng(1)
    packed, scales, zp, Wd = table(V, D, bits, bs, case.get("sym", False), seed=2)
    h = rng.standard_normal((2, 7, D)).astype(np.float32)
    labels = rng.integers(0, V, (2, 7)).astype(np.int64)
    labels.reshape(-1)[list(case.get("ignored", ()))] = -100
    bias = rng.standard_normal(V).astype(np.float32) if case.get("bias") else None
    r = case.get("r", 0)
    A = (rng.standard_normal((r, D)) * 0.3).astype(np.float32) if r else None
    B = (rng.standard_normal((V, r)) * 0.3).astype(np.float32) if r else None
    qattrs = dict(attrs, K=D, N=V, bits=bits, block_size=bs)
    (loss,), grads = _core.run_op("LinearCrossEntropy", [h, packed, labels, bias, A, B, scales,
                                                        zp], qattrs, domain="pyedge",
                                  grad_outputs=[np.float32(0.7)])
    t = [None if x is None else torch.tensor(x, dtype=torch.float64, requires_grad=True)
         for x in (h, Wd, bias, A, B)]
    ref = torch_head_loss(t[0], t[1], torch.from_numpy(labels), t[2], t[3], t[4], attrs)
    (ref * 0.7).backward()
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5, atol=1e-6)
    assert grads[1] is None and grads[6] is None  # packed W, scales: frozen
    for i, k in ((0, 0), (3, 2), (4, 3), (5, 4)):
        if t[k] is None:
            assert grads[i] is None
            continue
        np.testing.assert_allclose(grads[i], t[k].grad.numpy(), rtol=1e-5, atol=1e-5,
                                   err_msg=f"input {i}")


def test_fused_quantized_head_rejects_bad_inputs():
    packed, scales, zp, _ = table(V=16, K=64, block=32)
    h = np.zeros((3, 64), np.float32)
    lab = np.zeros(3, np.int64)
    with pytest.raises(Exception, match="scales as input 6"):
        _core.run_op("LinearCrossEntropy", [h, packed, lab], dict(K=64, N=16, block_size=32),
                     domain="pyedge")
    with pytest.raises(Exception, match="trans_w"):
        _core.run_op("LinearCrossEntropy", [h, packed, lab, None, None, None, scales, zp],
                     dict(K=64, N=16, block_size=32, trans_w=0), domain="pyedge")
    with pytest.raises(Exception, match="K = 48"):
        _core.run_op("LinearCrossEntropy", [h, packed, lab, None, None, None, scales, zp],
                     dict(K=48, N=16, block_size=32), domain="pyedge")


# --- the quantizer, the importer and a session ---------------------------------------------
def test_tied_table_is_one_packed_copy_read_by_lookup_and_head():
    m = tied_lm()
    ids = np.random.default_rng(0).integers(0, 96, (2, 7)).astype(np.int64)
    q, rep = quantize_model(m, bits=4, group_size=32, include=("embeddings", "lm_head"))
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == 2
    t = inits_of(q)
    assert "embed.weight" not in t and not any(a.dtype == np.float32 and a.size >= 96 * 64
                                               for a in t.values())
    assert rep.bytes_before == (96 * 64 + 64 * 64) * 4  # the tied table counted once
    sess = pyedge.TrainingSession(q, loss=None)
    g = sess.graph
    gq = next(n for n in g.nodes if n.op_type == "GatherBlockQuantized")
    head = [n for n in g.nodes if n.op_type == "MatMulNBits" and n.outputs == ["logits"]][0]
    assert gq.inputs[0] == head.inputs[1] and gq.inputs[2] == head.inputs[2]  # shared bytes
    assert "Reshape" not in [n.op_type for n in g.nodes]
    ours = sess.run({"ids": ids})["logits"]
    pytest.importorskip("onnxruntime")
    ref = run_ort(q, {"ids": ids})
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_untied_embedding_gets_its_own_packed_table_and_runs_in_onnxruntime():
    m = tied_lm()
    ids = np.random.default_rng(1).integers(0, 96, (3, 7)).astype(np.int64)
    # the head stays float: the tied table too (the int8 DequantizeLinear fallback) ...
    q, rep = quantize_model(m, bits=4, group_size=32, include=("embeddings",))
    assert {lay.name: lay.format for lay in rep.layers}["embed"] == "DequantizeLinear"
    # ... while an embedding-only table (its head made a separate weight) is packed
    g = m.graph
    head_w = numpy_helper.to_array(next(t for t in g.initializer if t.name == "embed.weight"))
    g.initializer.append(numpy_helper.from_array(head_w.copy(), "lm_head.weight"))
    for n in g.node:
        if n.name == "/lm/T":
            n.input[0] = "lm_head.weight"
    q, rep = quantize_model(m, bits=8, group_size=16, include=("embeddings",))
    fmt = {lay.weight: lay.format for lay in rep.layers}
    assert fmt["embed.weight"] == "GatherBlockQuantized" and "lm_head.weight" not in fmt
    ref = run_ort(q, {"ids": ids})
    ours = pyedge.TrainingSession(q, loss=None).run({"ids": ids})["logits"]
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_fused_loss_recognises_the_quantized_head_and_equals_the_unfused_loss():
    m = tied_lm()
    q, _ = quantize_model(m, bits=4, group_size=32, include=("embeddings", "lm_head"))
    ids = np.random.default_rng(2).integers(0, 96, (2, 7)).astype(np.int64)
    lora = pyedge.LoraConfig(r=2, target_modules=["fc"])
    kw = dict(lora=lora, loss="causal_lm")
    fused = pyedge.TrainingSession(q, **kw)
    plain = pyedge.TrainingSession(q, chunked_loss=False, **kw)
    lce = [n for n in fused.graph.nodes if n.op_type == "LinearCrossEntropy"]
    assert len(lce) == 1 and len(lce[0].inputs) >= 7 and lce[0].attrs["bits"] == 4
    assert not any(n.op_type == "LinearCrossEntropy" for n in plain.graph.nodes)
    lf = fused.step({"ids": ids}, ids, update=False)
    lp = plain.step({"ids": ids}, ids, update=False)
    assert abs(lf - lp) <= 1e-5 * abs(lp)
    gf, gp = fused.gradients(), plain.gradients()
    for k in gp:
        np.testing.assert_allclose(gf[k], gp[k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    pytest.importorskip("transformers")
    import pyedge.torch as pt
    from quant_models import tiny_llama
    d = tmp_path_factory.mktemp("qllama")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    pt.export(tiny_llama(), {"input_ids": ids}, str(d / "f.onnx"),
              dynamic_axes={"input_ids": {0: "b", 1: "s"}}, task_type="CAUSAL_LM")
    return d / "f.onnx"


def test_tiny_llama_with_packed_embeddings_and_head_trains_at_a_fifth_of_the_bytes(llama_file,
                                                                                 tmp_path):
    q = tmp_path / "q4.onnx"
    rep = pyedge.quantize(llama_file, q, bits=4, group_size=32,
                          include=("embeddings", "lm_head"))
    fmts = sorted(lay.format for lay in rep.layers)
    assert fmts.count("GatherBlockQuantized") == 1 and fmts.count("MatMulNBits") == 15
    lora = pyedge.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    ids = np.random.default_rng(0).integers(0, 256, (2, 16)).astype(np.int64)
    sf = pyedge.TrainingSession(str(llama_file), lora=lora, loss="causal_lm")
    sq = pyedge.TrainingSession(str(q), lora=lora, loss="causal_lm",
                                optimizer=pyedge.AdamW(lr=1e-2))
    assert "Gather" not in [n.op_type for n in sq.graph.nodes]
    assert any(n.op_type == "LinearCrossEntropy" and len(n.inputs) >= 7 for n in sq.graph.nodes)
    ratio = sq.plan_stats({"input_ids": ids})["weight_bytes"] / \
        sf.plan_stats({"input_ids": ids})["weight_bytes"]
    print(f"weight_bytes ratio {ratio:.4f}")
    assert ratio <= 0.2, ratio
    losses = [sq.step({"input_ids": ids}, ids) for _ in range(8)]
    print("losses", np.round(losses, 4))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("kw", [dict(bits=8, include=("embeddings", "lm_head")),
                                dict(bits=4, include=("embeddings",))],
                         ids=["int8_per_row_tied", "int8_table_4bit_linears"])
def test_int8_dequantizelinear_table_runs_packed_and_equals_onnxruntime(kw):
    """The int8-per-row DequantizeLinear form (8-bit per channel, or a tied table whose head
    stays float) is re-packed at import: lookup and head share one uint8 table."""
    m = tied_lm()
    ids = np.random.default_rng(3).integers(0, 96, (2, 7)).astype(np.int64)
    q, _ = quantize_model(m, **kw)
    sess = pyedge.TrainingSession(q, loss=None)
    ops = [n.op_type for n in sess.graph.nodes]
    assert "GatherBlockQuantized" in ops and "Gather" not in ops
    assert not any(a.dtype == np.float32 and a.size >= 96 * 64
                   for a in sess.graph.initializers.values())
    pytest.importorskip("onnxruntime")
    np.testing.assert_allclose(sess.run({"ids": ids})["logits"], run_ort(q, {"ids": ids}),
                               rtol=1e-4, atol=1e-6)


def test_fused_loss_takes_a_lora_adapted_quantized_head():
    """LoRA on the packed tied head (a LoraQuantMatMul): the fused op carries A, B and the
    packed weight; loss and adapter gradients equal the unfused loss's."""
    m = tied_lm()
    q, _ = quantize_model(m, bits=4, group_size=32, include=("embeddings", "lm_head"))
    ids = np.random.default_rng(4).integers(0, 96, (2, 7)).astype(np.int64)
    # the tied head carries the embedding's module name
    lora = pyedge.LoraConfig(r=2, target_modules=["fc", "embed"])
    fused = pyedge.TrainingSession(q, lora=lora, loss="causal_lm")
    plain = pyedge.TrainingSession(q, lora=lora, loss="causal_lm", chunked_loss=False)
    (lce,) = [n for n in fused.graph.nodes if n.op_type == "LinearCrossEntropy"]
    assert lce.inputs[4] == "embed.lora_A.weight" and lce.attrs["bits"] == 4
    for s in (fused, plain):  # B nonzero, the same in both, so A has a gradient
        for i, (k, a) in enumerate(sorted(s.trainable_parameters().items())):
            if ".lora_B" in k:
                a[...] = np.random.default_rng(i).standard_normal(a.shape) * 0.1
    lf = fused.step({"ids": ids}, ids, update=False)
    lp = plain.step({"ids": ids}, ids, update=False)
    assert abs(lf - lp) <= 1e-5 * abs(lp)
    gf, gp = fused.gradients(), plain.gradients()
    assert len(gp) == 4
    for k in gp:
        np.testing.assert_allclose(gf[k], gp[k], rtol=1e-4, atol=1e-6, err_msg=k)
