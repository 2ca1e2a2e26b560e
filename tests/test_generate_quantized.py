"""Generation on a quantized base (pyedge.quantize + LoRA trained on it + pyedge.Generator with
the key/value cache): a config-built tiny Llama exported with `pyedge export --hf`, quantized
to 4 bits (MatMulNBits, blocks of 16, zero points) and to 8 bits (int8 per output channel,
DequantizeLinear); LoRA trained on the quantized model for a few AdamW steps, its B scaled up
so the adapters change the greedy path.

Checked, per bit width: cached == uncached tokens (the cache path on LoraQuantMatMul), and
tokens equal to generating from the *dequantized float* model (the same weights W = (q − z)·s
as plain float initializers, LoRA on LoraMatMul) with the same adapters; the prompt's
last-position logits of the two agree to float32 rounding (the two GEMMs sum in different
orders), which is why the tokens can be compared exactly on this model. Exports take 10-20 s
(once per module): slow."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

import text_fixtures as tf

PROMPTS = ["The quick brown fox", "Grüße aus Köln 🤖, a tokenizer"]
NEW = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUANT = {4: dict(bits=4, group_size=16), 8: dict(bits=8)}


def dequantized_proto(proto):
    """The quantized ONNX model with every MatMulNBits replaced by Transpose + MatMul of its
    dequantized weight W [N, K] (the float export's own form) and every DequantizeLinear of an
    int8 initializer by the float initializer it computes, under the float weight's name and
    with its parameter-map entry (so LoRA targets and PEFT keys are the same): the float model
    whose weights are exactly the quantized ones."""
    import json

    from onnx import helper, numpy_helper

    from pyedge.quant_formats import dequantize_nbits
    g = proto.graph
    meta = {p.key: p for p in proto.metadata_props}
    pmap = json.loads(meta["pyedge.param_map"].value)
    inits = {t.name: t for t in g.initializer}
    arr = lambda n: numpy_helper.to_array(inits[n])  # noqa: E731

    def float_entry(qname, name):
        e = dict(pmap.pop(qname))
        e.pop("quantized", None)
        pmap[name] = e

    nodes, new_inits, used = [], [], set()
    for n in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "MatMulNBits":
            assert len(n.input) <= 4 or not any(n.input[4:]), n.name   # no bias/g_idx here
            zp = arr(n.input[3]) if len(n.input) > 3 and n.input[3] else None
            w = dequantize_nbits(arr(n.input[1]), arr(n.input[2]), zp, attrs["K"], attrs["N"],
                                 attrs["bits"], attrs["block_size"])          # [N, K]
            name = n.input[1].rsplit(f"_Q{attrs['bits']}", 1)[0]
            new_inits.append(numpy_helper.from_array(w.astype(np.float32), name))
            float_entry(n.input[1], name)
            nodes += [helper.make_node("Transpose", [name], [f"{name}_T"], perm=[1, 0],
                                       name=f"{n.name}_T"),
                      helper.make_node("MatMul", [n.input[0], f"{name}_T"], list(n.output),
                                       name=n.name)]
            used.update(n.input[1:])
        elif n.op_type == "DequantizeLinear" and n.input[0] in inits and \
                arr(n.input[0]).dtype == np.int8:
            q, s = arr(n.input[0]).astype(np.float32), arr(n.input[1]).astype(np.float32)
            zp = arr(n.input[2]).astype(np.float32) if len(n.input) > 2 and n.input[2] else 0.0
            axis = attrs.get("axis", 1) % q.ndim
            shape = [1] * q.ndim
            shape[axis] = -1
            w = (q - np.reshape(zp, shape)) * np.reshape(s, shape) if s.ndim else (q - zp) * s
            new_inits.append(numpy_helper.from_array(w.astype(np.float32), n.output[0]))
            if n.input[0] in pmap:
                float_entry(n.input[0], n.output[0])
            used.update(n.input)
        else:
            nodes.append(n)
    readers = {i for n in nodes for i in n.input}
    keep = [t for t in g.initializer if t.name not in used or t.name in readers]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    meta["pyedge.param_map"].value = json.dumps(pmap)
    if "pyedge.quantization" in meta:
        proto.metadata_props.remove(meta["pyedge.quantization"])
    assert not [n for n in g.node if n.domain == "com.microsoft"]
    return proto


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny Llama HF folder exported with `pyedge export --hf` (model.onnx + tokenizer)."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("llama")
    src, out = root / "hf", root / "export"
    tf.llama_folder(str(src))
    from pyedge.cli import main
    assert main(["export", "--hf", str(src), "--task", "causal-lm", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module", params=sorted(QUANT), ids=lambda b: f"int{b}")
def quantized(request, export, tmp_path_factory):
    """(quantized export folder, its dequantized float twin, PEFT adapters trained on the
    quantized model)."""
    import onnx

    import pyedge
    bits = request.param
    root = tmp_path_factory.mktemp(f"q{bits}")
    qdir, fdir = root / "quantized", root / "dequantized"
    for d in (qdir, fdir):
        shutil.copytree(export, d)
    report = pyedge.quantize(export / "model.onnx", qdir / "model.onnx", **QUANT[bits])
    assert len(report.layers) == 2 * len(TARGETS)   # every projection of both layers
    proto = onnx.load(str(qdir / "model.onnx"))
    onnx.save(dequantized_proto(proto), str(fdir / "model.onnx"))

    sess = pyedge.TrainingSession(str(qdir / "model.onnx"), lora=pyedge.LoraConfig(
        r=4, alpha=8, target_modules=TARGETS), loss="causal_lm",
        optimizer=pyedge.AdamW(lr=1e-2))
    assert sum(n.op_type == "LoraQuantMatMul" for n in sess.graph.nodes) == 2 * len(TARGETS)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(6):
        ids = rng.integers(3, 300, (2, 12)).astype(np.int64)
        losses.append(sess.step({"input_ids": ids}, ids))
    assert all(np.isfinite(losses))
    for k, v in sess.trainable_parameters().items():
        if ".lora_B" in k:
            v *= 50.0   # large enough to change the greedy path (the test must see them)
    adapters = sess.save_adapters(root / "adapters")
    return qdir, fdir, adapters


@pytest.mark.slow
def test_cached_equals_uncached_and_the_dequantized_float_model(quantized):
    from pyedge.generate import Generator
    qdir, fdir, adapters = quantized
    q_cached = Generator(qdir, adapters=adapters)
    assert q_cached.cache_spec is not None, q_cached.cache_reason
    assert any(n.op_type == "LoraQuantMatMul" for n in q_cached._session.graph.nodes)
    q_plain = Generator(qdir, adapters=adapters, cache=False)
    f_cached = Generator(fdir, adapters=adapters)
    assert not any(n.domain == "com.microsoft" or n.op_type == "LoraQuantMatMul"
                   for n in f_cached._session.graph.nodes)
    for prompt in PROMPTS:
        a = q_cached.generate(prompt, max_new_tokens=NEW)
        b = q_plain.generate(prompt, max_new_tokens=NEW)
        c = f_cached.generate(prompt, max_new_tokens=NEW)
        assert a.cached and not b.cached and c.cached
        assert a.ids == b.ids, (prompt, a.ids, b.ids)
        assert a.ids == c.ids, (prompt, a.ids, c.ids)
        # the same weights through two GEMMs: logits equal to float32 rounding
        ids = q_cached.encode(prompt)
        lq, lf = q_cached._logits(ids, 0), f_cached._logits(ids, 0)
        print(f"\n{qdir.parent.name} {prompt[:12]!r}: {len(a.ids)} tokens equal; prompt logits "
              f"max |quantized - dequantized float| = {np.abs(lq - lf).max():.3g} "
              f"(max |logit| {np.abs(lf).max():.3g})")
        assert np.abs(lq - lf).max() <= 1e-4 * np.abs(lf).max()


@pytest.mark.slow
def test_the_trained_adapters_change_the_quantized_output(quantized):
    from pyedge.generate import Generator
    qdir, _, adapters = quantized
    with_ad = Generator(qdir, adapters=adapters).generate(PROMPTS[0], max_new_tokens=NEW).ids
    without = Generator(qdir).generate(PROMPTS[0], max_new_tokens=NEW).ids
    assert with_ad != without   # otherwise the equalities above could not see the adapters


@pytest.mark.slow   # (the export fixture: 10-20 s)
def test_training_defaults_the_attention_mask(export):
    """A step fed input_ids alone on an export that takes attention_mask (and position_ids):
    the mask defaults to ones as in transformers and pyedge's data files (it was fed as
    missing, and the core failed in the mask's Range with a message naming no input)."""
    import pyedge
    ids = np.random.default_rng(0).integers(3, 300, (2, 12)).astype(np.int64)
    kw = dict(lora=pyedge.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
              loss="causal_lm", optimizer=pyedge.SGD(lr=0.0))
    a = pyedge.TrainingSession(str(export / "model.onnx"), **kw)
    b = pyedge.TrainingSession(str(export / "model.onnx"), **kw)
    assert a.step({"input_ids": ids}, ids) == \
        b.step({"input_ids": ids, "attention_mask": np.ones_like(ids)}, ids)
