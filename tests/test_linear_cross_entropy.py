"""pyedge.LinearCrossEntropy (the LM head fused with cross-entropy over row chunks): the op
against torch autograd in float64 of the unfused head + F.cross_entropy, and the session-level
rewrite (pyedge/fused_loss.py) against the plain loss on tiny GPT-2 and Llama models."""
import numpy as np
import pytest

import pyedge
from pyedge import _core
from opcheck import check_backward

torch = pytest.importorskip("torch")
F = torch.nn.functional

OP = "LinearCrossEntropy"


def run(inputs, attrs, **kw):
    return _core.run_op(OP, list(inputs), dict(attrs), domain="pyedge", **kw)


def make_case(lead=(2, 7), D=6, V=11, r=0, bias=False, trans_w=1, seed=0, ignored=()):
    """h [*lead, D], W, labels [*lead] (flat positions in `ignored` set to -100), bias, A, B."""
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((*lead, D)).astype(np.float32)
    W = (rng.standard_normal((V, D) if trans_w else (D, V)) * 0.7).astype(np.float32)
    labels = rng.integers(0, V, lead).astype(np.int64)
    flat = labels.reshape(-1)
    for i in ignored:
        flat[i] = -100
    b = rng.standard_normal(V).astype(np.float32) if bias else None
    A = (rng.standard_normal((r, D)) * 0.5).astype(np.float32) if r else None
    B = (rng.standard_normal((V, r)) * 0.5).astype(np.float32) if r else None
    return [h, W, labels, b, A, B]


def torch_loss(attrs):
    """The unfused computation: logits = h·op(W) + b + s·(h·Aᵀ)·Bᵀ, then F.cross_entropy."""
    trans_w = attrs.get("trans_w", 1)
    shift = attrs.get("shift", 0)
    scale = attrs.get("lora_scale", 1.0)

    def fn(h, W, labels, b=None, A=None, B=None):
        logits = h @ (W.T if trans_w else W)
        if b is not None:
            logits = logits + b
        if A is not None:
            logits = logits + scale * (h @ A.T) @ B.T
        if shift:
            logits, labels = logits[..., :-1, :], labels[..., 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=attrs.get("ignore_index", -100),
                               label_smoothing=attrs.get("label_smoothing", 0.0),
                               reduction=attrs.get("reduction", "mean"))
    return fn


def trim(inputs):
    inputs = list(inputs)
    while inputs[-1] is None:
        inputs.pop()
    return inputs


def check_op(inputs, attrs, frozen_w=False):
    """Loss vs torch float64; every gradient (three buffer modes) vs torch autograd.
    frozen_w: W a plan-time constant (a frozen head), so the op takes the gradients in the
    forward; otherwise it recomputes each chunk in the backward."""
    inputs = trim(inputs)
    kw = dict(const_inputs=[1]) if frozen_w else {}
    (loss,), _ = run(inputs, attrs, **kw)
    t_in = [torch.tensor(np.asarray(x), dtype=torch.float64 if x.dtype == np.float32 else None)
            if x is not None else None for x in inputs]
    ref = float(torch_loss(attrs)(*t_in))
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5, atol=1e-6)
    grads = check_backward(OP, inputs, torch_loss(attrs), attrs, domain="pyedge", rtol=1e-5,
                           atol=1e-5, **kw)
    assert [g is not None for g in grads] == [x is not None and x.dtype == np.float32
                                              and not (frozen_w and i == 1)
                                              for i, x in enumerate(inputs)]
    return grads


CASES = {
    "plain": (dict(), dict()),
    "shift": (dict(), dict(shift=1)),
    "trans_w0": (dict(trans_w=0), dict(trans_w=0)),
    "trans_w0_shift_bias": (dict(trans_w=0, bias=True), dict(trans_w=0, shift=1)),
    "bias": (dict(bias=True), dict()),
    "smoothing": (dict(), dict(label_smoothing=0.2)),
    "smoothing_ignored_shift": (dict(ignored=(1, 3, 8)), dict(label_smoothing=0.1, shift=1)),
    "ignored": (dict(ignored=(0, 2, 5, 13)), dict()),
    # chunk 3 over 14 rows with rows 3..8 ignored: a whole chunk's worth of rows is dropped
    "ignored_run_chunk3": (dict(ignored=(3, 4, 5, 6, 7, 8)), dict(chunk=3)),
    "lora": (dict(r=3), dict(lora_scale=0.5)),
    "lora_bias_shift_trans_w0": (dict(r=2, bias=True, trans_w=0),
                                 dict(lora_scale=2.0, shift=1, trans_w=0)),
    "lora_ignored_smoothing": (dict(r=4, ignored=(2, 9)),
                               dict(lora_scale=1.5, label_smoothing=0.3, chunk=4)),
    "sum": (dict(bias=True, ignored=(1,)), dict(reduction="sum")),
    "chunk1": (dict(), dict(chunk=1)),
    "chunk5_of_14": (dict(bias=True), dict(chunk=5)),
    "chunk5_shift_of_12": (dict(r=2), dict(chunk=5, shift=1, lora_scale=0.7)),
    "chunk_bigger_than_rows": (dict(), dict(chunk=100)),
    "rank3_h": (dict(lead=(2, 3, 4)), dict(shift=1, chunk=2)),
    "one_row": (dict(lead=(1,)), dict()),
    "one_row_lora_bias": (dict(lead=(1, 1), r=2, bias=True), dict(lora_scale=0.5)),
    "shift_t2": (dict(lead=(3, 2)), dict(shift=1)),
}


@pytest.mark.parametrize("frozen_w", [False, True], ids=["recompute", "grads_in_forward"])
@pytest.mark.parametrize("name", list(CASES))
def test_op_matches_torch(name, frozen_w):
    case, attrs = CASES[name]
    check_op(make_case(**case), attrs, frozen_w)


def test_op_int32_labels_equal_int64():
    inputs = trim(make_case(bias=True, ignored=(1, 4)))
    attrs = dict(shift=1, label_smoothing=0.1, chunk=3)
    g = [np.float32(0.7)]
    l64, g64 = run(inputs, attrs, grad_outputs=g)
    inputs[2] = inputs[2].astype(np.int32)
    l32, g32 = run(inputs, attrs, grad_outputs=g)
    assert l64[0] == l32[0]
    for a, b in zip(g64, g32):
        if a is not None:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("frozen_w", [False, True], ids=["recompute", "grads_in_forward"])
def test_op_all_ignored_gives_what_cross_entropy_loss_gives(frozen_w):
    """Mean over zero rows: CrossEntropyLoss's 0 and zero gradients (torch: NaN), including
    into fresh (NaN-filled) buffers; ignored rows leave an accumulating dh untouched."""
    kw = dict(const_inputs=[1]) if frozen_w else {}
    for attrs in (dict(), dict(shift=1), dict(reduction="sum", lora_scale=0.5)):
        inputs = trim(make_case(r=2 if "lora_scale" in attrs else 0, bias=True,
                                ignored=range(14)))
        logits = inputs[0] @ inputs[1].T + inputs[3]
        if len(inputs) > 4:
            logits = logits + attrs["lora_scale"] * (inputs[0] @ inputs[4].T) @ inputs[5].T
        ce_attrs = {k: v for k, v in attrs.items() if k != "lora_scale"}
        (ce,), _ = _core.run_op("CrossEntropyLoss", [logits, inputs[2]], ce_attrs,
                                domain="pyedge")
        for init, base in (("zeros", 0.0), ("ones", 1.0), ("fresh", 0.0)):
            (loss,), grads = run(inputs, attrs, grad_outputs=[np.float32(1.0)], grad_init=init,
                                 **kw)
            assert float(loss) == float(ce) == 0.0
            assert (grads[1] is None) == frozen_w
            for i, g in enumerate(grads):
                if g is not None:
                    np.testing.assert_array_equal(g, np.full_like(g, base), err_msg=f"{init} {i}")


@pytest.mark.parametrize("frozen_w", [False, True], ids=["recompute", "grads_in_forward"])
def test_op_partly_ignored_fresh_dh_rows_are_zero_and_live_rows_exact(frozen_w):
    # shifted, ignored rows and each sequence's last position: their dh rows must be 0
    inputs = trim(make_case(ignored=(2, 3, 9)))
    attrs = dict(shift=1, chunk=2)
    kw = dict(const_inputs=[1]) if frozen_w else {}
    _, fresh = run(inputs, attrs, grad_outputs=[np.float32(1.0)], grad_init="fresh", **kw)
    _, zeros = run(inputs, attrs, grad_outputs=[np.float32(1.0)], grad_init="zeros", **kw)
    dh = fresh[0].reshape(-1, inputs[0].shape[-1])
    np.testing.assert_array_equal(fresh[0], zeros[0])
    # row t is counted when label t+1 is not ignored and t is not a sequence's last position
    labels = inputs[2]
    dead = [b * 7 + t for b in range(2) for t in range(7)
            if t == 6 or labels[b, t + 1] == -100]
    assert dead and np.all(dh[dead] == 0) and np.all(np.abs(np.delete(dh, dead, 0)).sum(1) > 0)


def test_op_frozen_head_skips_weight_gradients():
    """Only dh wanted (the frozen-head case: W and bias constants, gradients taken in the
    forward): the same dh as the recompute path gives, bit for bit, at dloss = 1."""
    inputs = trim(make_case(bias=True, r=2))
    attrs = dict(shift=1, lora_scale=0.5, chunk=4)
    _, all_grads = run(inputs, attrs, grad_outputs=[np.float32(1.0)])
    _, only_h = run(inputs, attrs, grad_outputs=[np.float32(1.0)], const_inputs=[1, 3, 4, 5])
    assert [g is None for g in only_h] == [False, True, True, True, True, True]
    np.testing.assert_array_equal(only_h[0], all_grads[0])


@pytest.mark.parametrize("frozen_w", [False, True], ids=["recompute", "grads_in_forward"])
def test_op_result_independent_of_thread_count_and_chunking_close(frozen_w):
    inputs = trim(make_case(lead=(4, 40), D=16, V=300, r=4, bias=True, ignored=(5, 6, 7, 90)))
    attrs = dict(shift=1, label_smoothing=0.1, lora_scale=0.5, chunk=48)
    kw = dict(const_inputs=[1]) if frozen_w else {}
    n0 = _core.num_threads()
    try:
        res = []
        for nt in (1, 2):
            _core.set_num_threads(nt)
            res.append(run(inputs, attrs, grad_outputs=[np.float32(1.0)], **kw))
    finally:
        _core.set_num_threads(n0)
    (l1,), g1 = res[0]
    (l2,), g2 = res[1]
    assert l1 == l2
    for a, b in zip(g1, g2):
        if a is not None:
            np.testing.assert_array_equal(a, b)
    # another chunking: the same up to rounding of the per-chunk weight-gradient sums
    (l3,), g3 = run(inputs, {**attrs, "chunk": 7}, grad_outputs=[np.float32(1.0)], **kw)
    np.testing.assert_allclose(l3, l1, rtol=1e-6)
    for a, b in zip(g3, g1):
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())


def test_op_errors_name_the_node():
    h, W, labels, *_ = make_case()
    with pytest.raises(_core.PyedgeError, match=r"LinearCrossEntropy node 'test'.*label 11\b"):
        bad = labels.copy()
        bad[0, 3] = 11
        run([h, W, bad], {})
    with pytest.raises(_core.PyedgeError, match=r"LinearCrossEntropy node 'test'.*does not match W"):
        run([h, W, labels], {"trans_w": 0})  # [V, D] = [11, 6] read as [D, V]: D 11 is not h's 6
    with pytest.raises(_core.PyedgeError, match=r"labels shape"):
        run([h, W, labels[:, :3].copy()], {})
    with pytest.raises(_core.PyedgeError, match=r"bias must have 11"):
        run([h, W, labels, np.zeros(3, np.float32)], {})
    with pytest.raises(_core.PyedgeError, match=r"lora_B must be"):
        run([h, W, labels, None, np.zeros((2, 6), np.float32), np.zeros((11, 3), np.float32)],
            {})
    with pytest.raises(_core.PyedgeError, match=r"both A and B"):
        run([h, W, labels, None, np.zeros((2, 6), np.float32)], {})


# ------------------------------------------------------------------ session level
def _llama_factory(vocab, tie):
    from transformers import LlamaConfig, LlamaForCausalLM

    class LlamaLogits(LlamaForCausalLM):
        def forward(self, input_ids):  # noqa: D401
            return super().forward(input_ids=input_ids,
                                   attention_mask=torch.ones_like(input_ids),
                                   use_cache=False, return_dict=True).logits

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=tie, use_cache=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    m = LlamaLogits(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # distinct norm weights (the exporter deduplicates equal tensors)
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=g))
    return m.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory, exported):
    """name -> onnx path: GPT-2 (tied head through the exporter's transposed read) and an
    untied Llama, both tiny, random weights."""
    root = tmp_path_factory.mktemp("closs")
    out = {"gpt2": exported("gpt2", "torchscript", vocab=384)[0]}
    m = _llama_factory(320, tie=False)
    ids = torch.randint(0, 320, (2, 12))
    path = str(root / "llama.onnx")
    pyedge.torch.export(m, {"input_ids": ids}, path, input_names=["input_ids"],
                        output_names=["logits"],
                        dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                      "logits": {0: "batch", 1: "seq"}},
                        exporter="torchscript")  # 1.5 s here; dynamo 20 s
    out["llama"] = path
    return out


def _sessions(path, **kw):
    # SGD: parameters after a few steps stay as close as the gradients (AdamW's normalised
    # step would amplify rounding of near-zero gradient elements)
    kw.setdefault("optimizer", pyedge.SGD(lr=0.1))
    fused = pyedge.TrainingSession(path, **kw)
    plain = pyedge.TrainingSession(path, chunked_loss=False, **kw)
    rng = np.random.default_rng(0)
    for sess in (fused, plain):  # the same nonzero B, so every adapter gets a gradient
        for i, (k, v) in enumerate(sorted(sess.trainable_parameters().items())):
            if ".lora_B" in k:
                v[...] = np.random.default_rng(i).standard_normal(v.shape) * 0.05
    return fused, plain


def _ops(sess):
    return [f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in sess.graph.nodes]


SESSION_CASES = {
    # (model, lora targets, train patterns, session kwargs)
    "gpt2_frozen_tied_head": ("gpt2", ["c_attn", "c_proj"], [], {}),
    "gpt2_frozen_head_chunked": ("gpt2", ["c_attn"], [], dict(loss_chunk_rows=2)),
    "gpt2_trained_tied_embedding_smoothing": ("gpt2", ["c_attn"], ["transformer.wte.*"],
                                              dict(label_smoothing=0.1)),
    "llama_frozen_head_smoothing": ("llama", ["q_proj", "v_proj"], [],
                                    dict(label_smoothing=0.2, loss_chunk_rows=5)),
    "llama_lora_head": ("llama", ["q_proj", "v_proj", "lm_head"], [],
                        dict(loss_chunk_rows=3)),
    "llama_trained_head_ignored": ("llama", ["q_proj", "k_proj", "v_proj", "o_proj"],
                                   ["lm_head.*"], dict(loss_chunk_rows=4)),
}


@pytest.mark.parametrize("name", list(SESSION_CASES))
def test_session_chunked_loss_equals_plain(models, name):
    model, targets, train, kw = SESSION_CASES[name]
    path = models[model]
    fused, plain = _sessions(path, lora=pyedge.LoraConfig(r=4, alpha=8, target_modules=targets),
                             train=train, loss="causal_lm", **kw)
    assert fused.fusions["linear_cross_entropy"] == 1
    assert "linear_cross_entropy" not in plain.fusions
    loss_node = next(n for n in fused.graph.nodes if n.op_type == "LinearCrossEntropy")
    lora_head = "lm_head" in targets
    assert ("lm_head" in [site.module for site in fused.lora_sites]) == lora_head
    assert (loss_node.inputs[4:] == ["lm_head.lora_A.weight", "lm_head.lora_B.weight"]) == lora_head
    assert "pyedge.LinearCrossEntropy" in _ops(fused) and "pyedge.CrossEntropyLoss" in _ops(plain)
    vocab = 384 if model == "gpt2" else 320
    rng = np.random.default_rng(1)
    ids = rng.integers(0, vocab, (2, 12)).astype(np.int64)
    labels = ids.copy()
    labels[0, 7:] = -100   # padding
    labels[1, 2] = -100
    feeds = {"input_ids": ids}
    # run() still returns the logits (the head node stays for inference plans)
    np.testing.assert_array_equal(fused.run(feeds)["logits"], plain.run(feeds)["logits"])
    for step in range(3):
        # gradients are read before the update (which zeroes them)
        lf, lp = (s.step(feeds, labels, update=False) for s in (fused, plain))
        assert abs(lf - lp) <= 1e-6 * abs(lp), (step, lf, lp)
        gf, gp = fused.gradients(), plain.gradients()
        assert set(gf) == set(gp)
        for k in gp:
            scale = float(np.abs(gp[k]).max())
            assert scale > 0, k
            np.testing.assert_allclose(gf[k], gp[k], rtol=1e-5, atol=1e-6 * scale, err_msg=k)
        fused.apply_update()
        plain.apply_update()
    pf, pp = fused.trainable_parameters(), plain.trainable_parameters()
    for k in pp:
        np.testing.assert_allclose(pf[k], pp[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_session_finds_head_forms(models):
    """Whatever the earlier fusions made of the head, the loss takes it over: with fuse()
    (pyedge.MatMul trans_b) and without it (MatMul(h, Transpose(W)) as exported)."""
    path = models["gpt2"]
    lora = pyedge.LoraConfig(r=2, target_modules=["c_attn"])
    a = pyedge.TrainingSession(path, lora=lora, loss="causal_lm")
    b = pyedge.TrainingSession(path, lora=lora, loss="causal_lm", fuse=False, chunked_loss=True)
    c = pyedge.TrainingSession(path, lora=lora, loss="causal_lm", fuse=False)
    assert a.fusions["linear_cross_entropy"] == 1 and b.fusions == {"linear_cross_entropy": 1}
    assert c.fusions == {}
    assert "pyedge.CrossEntropyLoss" in _ops(c)
    ids = np.random.default_rng(3).integers(0, 384, (2, 12)).astype(np.int64)
    la, lb, lc = (s.step({"input_ids": ids}, ids) for s in (a, b, c))
    np.testing.assert_allclose([la, lb], lc, rtol=1e-6)
    # mse, and a LoRA head with dropout (the fused op has none), are left alone
    mse = pyedge.TrainingSession(path, lora=lora, loss="mse")
    assert "linear_cross_entropy" not in mse.fusions
    drop = pyedge.TrainingSession(models["llama"], loss="causal_lm", lora=pyedge.LoraConfig(
        r=2, target_modules=["q_proj", "lm_head"], dropout=0.1))
    assert "lm_head" in [site.module for site in drop.lora_sites]
    assert "linear_cross_entropy" not in drop.fusions and "pyedge.CrossEntropyLoss" in _ops(drop)


def test_fused_training_plan_drops_the_logits(exported):
    """On a vocabulary big enough to dominate, the training arena shrinks by at least the
    logits' B·T·V·4 bytes, and the training plan never runs the head's own node."""
    V, B, T = 4096, 2, 32
    path = exported("gpt2", "torchscript", vocab=V, n_embd=32, n_layer=1)[0]
    lora = pyedge.LoraConfig(r=2, target_modules=["c_attn"])
    # 8 rows per chunk: with the automatic size (~32 MiB of logits) these 62 rows would be
    # one chunk, as large as the logits
    fused = pyedge.TrainingSession(path, lora=lora, loss="causal_lm", loss_chunk_rows=8)
    plain = pyedge.TrainingSession(path, lora=lora, loss="causal_lm", chunked_loss=False)
    shapes = {"input_ids": [B, T], "labels": [B, T]}
    sf, sp = fused.plan_stats(shapes=dict(shapes)), plain.plan_stats(shapes=dict(shapes))
    assert sf["arena_bytes"] <= sp["arena_bytes"] - B * T * V * 4, (sf["arena_bytes"],
                                                                     sp["arena_bytes"])
    assert sf["forward_ops"] == sp["forward_ops"] - 1  # the head's GEMM: not planned
    assert sf["fusions"]["linear_cross_entropy"] == 1
    # the inference plan still computes the logits
    inf = fused.plan_stats(shapes={"input_ids": [B, T]}, training=False)
    assert inf["activation_bytes"] >= B * T * V * 4


# ------------------------------------------------------------------ head forms (hand-made)
def head_model(form, D=8, V=13):
    """x [2, 5, D] -> MatMul(w1) -> a head of the given form -> logits (the graph output)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(4)

    def init(name, shape):
        return helper.make_tensor(name, TensorProto.FLOAT, shape,
                                  (rng.standard_normal(shape) * 0.5).ravel().tolist())
    inits = [init("w1", [D, D]), init("W", [D, V]), init("Wt", [V, D]), init("b", [V])]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["hid"])]
    lead = [2, 5]
    if form == "matmul":
        nodes.append(helper.make_node("MatMul", ["hid", "W"], ["logits"]))
    elif form == "matmul_transpose":
        nodes += [helper.make_node("Transpose", ["Wt"], ["WtT"], perm=[1, 0]),
                  helper.make_node("MatMul", ["hid", "WtT"], ["logits"])]
    elif form in ("matmul_add", "add_first"):
        nodes.append(helper.make_node("MatMul", ["hid", "W"], ["mm"]))
        nodes.append(helper.make_node("Add", ["mm", "b"] if form == "matmul_add" else ["b", "mm"],
                                      ["logits"]))
    elif form.startswith("gemm"):
        lead = [10]
        inits.append(helper.make_tensor("shape2", TensorProto.INT64, [2], [-1, D]))
        nodes.append(helper.make_node("Reshape", ["hid", "shape2"], ["h2"]))
        if form == "gemm_transB":
            nodes.append(helper.make_node("Gemm", ["h2", "Wt", "b"], ["logits"], transB=1))
        else:
            nodes.append(helper.make_node("Gemm", ["h2", "W", "b"], ["logits"]))
    elif form == "scaled":  # a softcap-like Mul after the head: not a linear head's output
        inits.append(helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]))
        nodes += [helper.make_node("MatMul", ["hid", "W"], ["mm"]),
                  helper.make_node("Mul", ["mm", "half"], ["logits"])]
    elif form == "product_is_output":  # the pre-bias product is a graph output too
        nodes += [helper.make_node("MatMul", ["hid", "W"], ["mm"]),
                  helper.make_node("Add", ["mm", "b"], ["logits"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, lead + [V])]
    if form == "product_is_output":
        outputs.append(helper.make_tensor_value_info("mm", TensorProto.FLOAT, lead + [V]))
    g = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                        [2, 5, D])],
                          outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("form,train", [
    ("matmul", ["w1"]), ("matmul", ["w1", "W"]), ("matmul_transpose", ["w1", "Wt"]),
    ("matmul_add", ["w1"]), ("matmul_add", ["w1", "b"]), ("add_first", ["w1", "b", "W"]),
    ("gemm_transB", ["w1"]), ("gemm_transB", ["w1", "Wt", "b"]), ("gemm", ["w1", "b"]),
    ("product_is_output", ["w1", "b"])])
@pytest.mark.parametrize("fuse", [True, False])
def test_head_forms_fuse_and_train_the_same(form, train, fuse):
    model = head_model(form)
    kw = dict(train=train, loss="cross_entropy", label_smoothing=0.05, fuse=fuse,
              optimizer=pyedge.SGD(lr=0.1))
    fused = pyedge.TrainingSession(model, chunked_loss=True, loss_chunk_rows=3, **kw)
    plain = pyedge.TrainingSession(model, chunked_loss=False, **kw)
    assert fused.fusions.get("linear_cross_entropy") == 1
    assert "pyedge.LinearCrossEntropy" in _ops(fused)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    y = rng.integers(0, 13, (10,) if form.startswith("gemm") else (2, 5)).astype(np.int64)
    y.reshape(-1)[[1, 6]] = -100
    rf, rp = fused.run({"x": x}), plain.run({"x": x})  # every graph output, logits included
    assert sorted(rf) == sorted(rp) and all(np.array_equal(rf[k], rp[k]) for k in rp)
    for _ in range(2):
        lf, lp = (s.step({"x": x}, y, update=False) for s in (fused, plain))
        assert abs(lf - lp) <= 1e-6 * abs(lp)
        gf, gp = fused.gradients(), plain.gradients()
        assert sorted(gf) == sorted(train)
        for k in gp:
            np.testing.assert_allclose(gf[k], gp[k], rtol=1e-5,
                                       atol=1e-6 * float(np.abs(gp[k]).max()), err_msg=k)
        fused.apply_update()
        plain.apply_update()


def test_heads_it_cannot_take_over_keep_the_plain_loss():
    sess = pyedge.TrainingSession(head_model("scaled"), train=["w1"], loss="cross_entropy")
    assert "linear_cross_entropy" not in sess.fusions
    assert "pyedge.CrossEntropyLoss" in _ops(sess)


def test_data_spec_reads_ignore_index_from_the_fused_loss():
    from pyedge.data import DataSpec
    sess = pyedge.TrainingSession(head_model("matmul"), train=["w1"], loss="cross_entropy",
                                  ignore_index=7)
    assert "pyedge.LinearCrossEntropy" in _ops(sess)
    spec = DataSpec.from_session(sess)
    assert spec.ignore_index == 7 and spec.num_classes == 13
