"""Decoder attention fusion (pyedge/attention_fusion.py) on config-built tiny decoders: every
spelling (transformers' "eager" and "sdpa" attention, dynamo and TorchScript exporters), static
and dynamic shapes (batch and sequence symbolic), with and without a padding mask. Each export
must fuse one pyedge.Attention per layer (causal flag for the causal mask, a mask input for a
padding mask), plus the RMSNorm and gated-MLP fusions, and the fused session must compute
what the op-by-op one computes (logits, loss, LoRA gradients) within 1e-5 relative."""
from __future__ import annotations

import numpy as np
import pytest

import pyedge
from pyedge.fusions import fuse
from pyedge.onnx_import import load_onnx

LAYERS, BATCH, SEQ, VOCAB = 2, 2, 12, 128


def export_decoder(path, family="llama", attn="eager", exporter="dynamo", dynamic=False,
                   with_mask=False, **extra):
    """A 2-layer decoder (hidden 64, 4 heads, 2 kv heads) with random weights, exported by
    pyedge.export.torch_export; returns the example input_ids."""
    import torch
    import transformers as tf

    from pyedge.export.torch_export import export_module
    torch.manual_seed(0)
    kw = dict(num_hidden_layers=LAYERS, hidden_size=64, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=96, vocab_size=VOCAB,
              max_position_embeddings=64, attention_dropout=0.0, pad_token_id=0,
              bos_token_id=0, eos_token_id=0)
    cfg_cls, base, own = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
        "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": None}),
        "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}),
    }[family]
    cfg = getattr(tf, cfg_cls)(**kw, **{**own, **extra})
    cfg._attn_implementation = attn
    base = getattr(tf, base)

    class LM(base):  # a subclass keeps the parameter names PEFT expects
        def forward(self, input_ids, attention_mask=None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   use_cache=False).logits
    model = LM(cfg).eval()
    with torch.no_grad():  # norm weights away from their init
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    args = {"input_ids": ids}
    if with_mask:
        args["attention_mask"] = torch.ones(BATCH, SEQ, dtype=torch.long)
    dyn = {0: "batch", 1: "seq"}
    axes = {**{k: dyn for k in args}, "logits": dyn} if dynamic else None
    export_module(model, args, str(path), output_names=["logits"], dynamic_axes=axes,
                  exporter=exporter)
    return ids.numpy()


_CACHE: dict = {}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("attn_families")

    def get(**kw):
        key = tuple(sorted(kw.items()))
        if key not in _CACHE:
            path = root / ("_".join(f"{k}-{v}" for k, v in key) + ".onnx")
            _CACHE[key] = (str(path), export_decoder(path, **kw))
        return _CACHE[key]
    return get


def _feeds(ids, with_mask, batch=BATCH, seq=SEQ):
    """input_ids (of another batch/sequence size than the export's when asked) and a
    right-padded attention_mask."""
    rng = np.random.default_rng(5)
    ids = ids if (batch, seq) == ids.shape else rng.integers(0, VOCAB, (batch, seq))
    feeds = {"input_ids": ids.astype(np.int64)}
    if with_mask:
        am = np.ones(ids.shape, np.int64)
        am[-1, -3:] = 0
        feeds["attention_mask"] = am
    return feeds


def parity(path, feeds, targets=("q_proj", "v_proj"), rtol=1e-5):
    """Fused vs op-by-op session: logits, two SGD steps' losses and LoRA gradients."""
    lora = pyedge.LoraConfig(r=4, target_modules=list(targets))
    kw = dict(lora=lora, loss="causal_lm", optimizer=pyedge.SGD(lr=0.5))
    fused = pyedge.TrainingSession(path, **kw)
    plain = pyedge.TrainingSession(path, fuse=False, **kw)
    for sess in (fused, plain):  # the same nonzero B, so every adapter gets a gradient
        for i, (k, v) in enumerate(sorted(sess.trainable_parameters().items())):
            if ".lora_B" in k:
                v[...] = np.random.default_rng(i).standard_normal(v.shape) * 0.05
    lf_, lp_ = fused.run(feeds)[fused.output_name], plain.run(feeds)[plain.output_name]
    np.testing.assert_allclose(lf_, lp_, rtol=0, atol=rtol * np.abs(lp_).max())
    labels = feeds["input_ids"].astype(np.int64)
    for _ in range(2):
        lf = fused.step(feeds, labels, update=False)
        lp = plain.step(feeds, labels, update=False)
        np.testing.assert_allclose(lf, lp, rtol=rtol)
        gf, gp = fused.gradients(), plain.gradients()
        assert gf.keys() == gp.keys() and len(gp) == 2 * len(targets) * LAYERS
        for k in gp:
            assert np.abs(gp[k]).max() > 0, k
            err = np.abs(gf[k] - gp[k]).max() / np.abs(gp[k]).max()
            assert err <= rtol, (k, err)
        fused.apply_update()
        plain.apply_update()
    return fused, plain


def check_fused(sess, with_mask, norms=True, norms_per_layer=2):
    f = sess.fusions
    assert f.get("attention", 0) == LAYERS, f
    if norms:
        assert f.get("rmsnorm", 0) == norms_per_layer * LAYERS + 1, f
        assert f.get("gated_mlp", 0) == LAYERS, f
    att = [n for n in sess.graph.nodes if n.op_type == "Attention"]
    assert len(att) == LAYERS
    # the causal mask becomes the flag; a mask built from attention_mask stays an input
    assert all((n.attrs.get("causal") == 1) != with_mask for n in att), [n.attrs for n in att]
    assert all(len(n.inputs) == (4 if with_mask else 3) for n in att)
    assert all(n.attrs["out_layout"] == "blhd" for n in att)
    ops = {(n.domain, n.op_type) for n in sess.graph.nodes}
    for gone in ("Softmax", "IsNaN", "MaskedSoftmax"):
        assert ("", gone) not in ops and ("pyedge", gone) not in ops, gone


# eager (the bench's spelling) and sdpa, static and dynamic, causal and padded: dynamo
@pytest.mark.parametrize("with_mask", [False, True], ids=["causal", "padding"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llama_dynamo_fuses_and_trains_the_same(exported, attn, dynamic, with_mask):
    path, ids = exported(family="llama", attn=attn, dynamic=dynamic, with_mask=with_mask)
    fused, plain = parity(path, _feeds(ids, with_mask))
    check_fused(fused, with_mask)
    if dynamic:  # another batch and sequence length (the trained adapters): new plans
        feeds = _feeds(ids, with_mask, batch=3, seq=7)
        yf = fused.run(feeds)[fused.output_name]
        yp = plain.run(feeds)[plain.output_name]
        assert yf.shape == (3, 7, VOCAB)
        np.testing.assert_allclose(yf, yp, rtol=0, atol=1e-5 * np.abs(yp).max())


def test_eager_fusion_counts_what_attention_absorbed(exported):
    """The eager softmax first becomes a MaskedSoftmax and Q·Kᵀ a transposed MatMul; once
    attention takes them, `fusions` no longer counts them as such."""
    path, _ = exported(family="llama", attn="eager")
    g = load_onnx(path)
    f = fuse(g)
    assert f["attention"] == LAYERS and f.get("masked_softmax", 0) == 0
    assert not any(n.op_type == "MaskedSoftmax" for n in g.nodes)


def test_dynamic_mask_that_is_not_causal_stays_an_input(exported):
    """A mask built from the shapes alone whose "minus infinity" is -1 is not the causal mask:
    it stays the Attention's mask input, and the result is unchanged at another size."""
    path, ids = exported(family="llama", attn="eager", dynamic=True)
    base = load_onnx(path)
    assert fuse(base.copy())["attention"] == LAYERS
    g = base.copy()
    # the mask's "-3.4e38" replaced by -1: not the causal mask at any size
    for n in g.nodes:
        if n.op_type == "Where" and len(n.inputs) == 3:
            v = g.initializers.get(n.inputs[2])
            if v is not None and np.size(v) == 1 and float(np.ravel(v)[0]) < -1e37:
                g.initializers[n.inputs[2]] = np.full(np.shape(v), -1.0, np.float32)
    gf = g.copy()
    assert fuse(gf)["attention"] == LAYERS
    att = [n for n in gf.nodes if n.op_type == "Attention"]
    assert all(len(n.inputs) == 4 and "causal" not in n.attrs for n in att)
    fused = pyedge.TrainingSession(g, loss=None)
    plain = pyedge.TrainingSession(g, loss=None, fuse=False)
    feeds = _feeds(ids, False, batch=3, seq=5)
    yf, yp = fused.run(feeds)[fused.output_name], plain.run(feeds)[plain.output_name]
    np.testing.assert_allclose(yf, yp, rtol=0, atol=1e-5 * np.abs(yp).max())


# TorchScript: transformers needs an attention_mask there (its packed-sequence check uses
# torch.diff, which that exporter cannot write), so the mask is always an input
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_torchscript_eager_fuses_and_trains_the_same(exported, dynamic):
    path, ids = exported(family="llama", attn="eager", exporter="torchscript", dynamic=dynamic,
                         with_mask=True)
    fused, _ = parity(path, _feeds(ids, True))
    check_fused(fused, with_mask=True)


def test_torchscript_sdpa_with_an_infinite_mask_keeps_its_nan_guard(exported):
    """TorchScript's SDPA masks with -inf and guards the softmax with IsNaN → 0: a row whose
    keys are all masked gives 0 there but NaN in pyedge.Attention, so it is not fused; with
    the mask's -inf made finite (as the dynamo exporter writes it) it is."""
    path, ids = exported(family="llama", attn="sdpa", exporter="torchscript", with_mask=True)
    g = load_onnx(path)
    assert fuse(g.copy())["attention"] == 0
    for n in g.nodes:
        if n.op_type == "Where" and len(n.inputs) == 3:
            v = g.initializers.get(n.inputs[2])
            if v is not None and np.size(v) == 1 and np.isneginf(np.ravel(v)[0]):
                g.initializers[n.inputs[2]] = np.full(np.shape(v), -3.4e38, np.float32)
    assert fuse(g)["attention"] == LAYERS


# the families, dynamo export, transformers' eager attention (the bench's), dynamic shapes:
# one attention per layer, causal flag; fused vs op by op
FAMILIES = ["qwen2", "qwen3", "mistral", "gemma", "phi3", "smollm3"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_fuses_one_attention_per_layer_and_trains_the_same(exported, family):
    path, ids = exported(family=family, attn="eager", dynamic=True)
    # Phi-3 projects q, k, v in one qkv_proj
    fused, _ = parity(path, _feeds(ids, False),
                      targets=("qkv_proj",) if family == "phi3" else ("q_proj", "v_proj"))
    # Phi-3's MLP is one gate_up projection split in two: not the gated-MLP rule's pattern;
    # Qwen3 normalises q and k per head too (two more RMSNorms per layer)
    check_fused(fused, with_mask=False, norms=family != "phi3",
                norms_per_layer=4 if family == "qwen3" else 2)
