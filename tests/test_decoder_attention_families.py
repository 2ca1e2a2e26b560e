"""Decoder attention fusion (pyedge/attention_fusion.py) on the config-built tiny decoders of
tests/decoder_families.py: every spelling (transformers' "eager" and "sdpa" attention, dynamo
and TorchScript exporters), static and dynamic shapes (batch and sequence symbolic), with and
without a padding mask. Each export must fuse one pyedge.Attention per layer (causal flag for
the causal mask, a mask input for a padding mask), plus the rotary, RMSNorm and gated-MLP
fusions where the family has them, and the fused session must compute what the op-by-op one
computes (logits, loss, LoRA gradients) within 1e-5 relative, and the torch model's logits
within 1e-4.

Families: every one of decoder_families.FAMILIES but Gemma 2 and 3 (soft-capping and sliding
windows: not fused yet). GPT-NeoX projects q, k, v in one query_key_value viewed as
[B, T, H, 3·D] and chunked, with partial rotary; Phi-3 in one qkv_proj sliced. The dynamo
exports here read input_ids alone (the causal mask is built from shapes: causal flag), the
TorchScript ones need the attention_mask (a mask input, fed right-padded)."""
from __future__ import annotations

import numpy as np
import pytest

import pyedge
from pyedge.fusions import fuse
from pyedge.onnx_import import load_onnx
from decoder_families import (N_LAYERS, VOCAB, export_family, family_feeds, parity_sessions,
                              torch_logits)

LAYERS = N_LAYERS
# RMSNorms per layer (the final norm adds one), gated MLPs per layer
NORMS = {"llama": 2, "qwen2": 2, "qwen3": 4, "mistral": 2, "gemma": 2, "phi3": 2,
         "phi3_partial": 2, "smollm3": 2, "neox": 0}
FAMILIES = list(NORMS)
TORCH_TOL = 1e-4


def targets(family):
    """q and v (as the bench trains): NeoX and Phi-3 project q, k, v in one Linear."""
    if family == "neox":
        return ("query_key_value",)
    if family.startswith("phi3"):
        return ("qkv_proj",)
    return ("q_proj", "v_proj")


_CACHE: dict = {}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(family, exporter, dynamic, attn, mask) -> (path, ids, rotary layers), exported once
    per module."""
    root = tmp_path_factory.mktemp("attn_families")

    def get(family="llama", attn="eager", exporter="dynamo", dynamic=False, with_mask=False):
        key = (family, attn, exporter, dynamic, with_mask)
        if key not in _CACHE:
            _CACHE[key] = export_family(root, family, exporter, dynamic, attn=attn,
                                        mask=with_mask)
        return _CACHE[key]
    return get


def parity(path, feeds, family="llama"):
    """Fused vs op-by-op session: logits, two SGD steps' losses and LoRA gradients (two per
    target and layer) within 1e-5 relative."""
    fused, plain, _ = parity_sessions(path, feeds["input_ids"], list(targets(family)),
                                      feeds=feeds)
    return fused, plain


def check_fused(sess, with_mask, family="llama", rope_layers=N_LAYERS):
    f = sess.fusions
    assert f.get("attention", 0) == LAYERS, f
    assert f.get("rmsnorm", 0) == NORMS[family] * LAYERS + (1 if NORMS[family] else 0), f
    assert f.get("gated_mlp", 0) == (0 if family == "neox" else LAYERS), f
    assert f.get("rotary", 0) == 2 * rope_layers, f
    att = [n for n in sess.graph.nodes if n.op_type == "Attention"]
    assert len(att) == LAYERS
    # the causal mask becomes the flag; a mask built from attention_mask stays an input
    assert all((n.attrs.get("causal") == 1) != with_mask for n in att), [n.attrs for n in att]
    assert all(len(n.inputs) == (4 if with_mask else 3) for n in att)
    assert all(n.attrs["out_layout"] == "blhd" for n in att)
    ops = {(n.domain, n.op_type) for n in sess.graph.nodes}
    for gone in ("Softmax", "IsNaN", "MaskedSoftmax"):
        assert ("", gone) not in ops and ("pyedge", gone) not in ops, gone


def check_torch(path, family, attn, feeds):
    """pyedge's logits (fused, untrained) against the torch model's."""
    sess = pyedge.TrainingSession(path, loss=None)
    got = sess.run(feeds)[sess.output_name]
    ref = torch_logits(family, feeds, attn)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= TORCH_TOL, np.abs(got - ref).max()


def check_other_size(fused, plain, with_mask):
    """Another batch and sequence length (the trained adapters): new plans, same results."""
    feeds = family_feeds(np.zeros((2, 12), np.int64), with_mask, padded=with_mask,
                         batch=3, seq=7)
    yf = fused.run(feeds)[fused.output_name]
    yp = plain.run(feeds)[plain.output_name]
    assert yf.shape == (3, 7, VOCAB)
    np.testing.assert_allclose(yf, yp, rtol=0, atol=1e-5 * np.abs(yp).max())


# Llama: eager (the bench's spelling) and sdpa, static and dynamic, causal and padded: dynamo
@pytest.mark.parametrize("with_mask", [False, True], ids=["causal", "padding"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llama_dynamo_fuses_and_trains_the_same(exported, attn, dynamic, with_mask):
    path, ids, _ = exported(family="llama", attn=attn, dynamic=dynamic, with_mask=with_mask)
    fused, plain = parity(path, family_feeds(ids, with_mask, padded=with_mask))
    check_fused(fused, with_mask)
    if dynamic:
        check_other_size(fused, plain, with_mask)


def test_eager_fusion_counts_what_attention_absorbed(exported):
    """The eager softmax first becomes a MaskedSoftmax and Q·Kᵀ a transposed MatMul; once
    attention takes them, `fusions` no longer counts them as such."""
    path, _, _ = exported(family="llama", attn="eager")
    g = load_onnx(path)
    f = fuse(g)
    assert f["attention"] == LAYERS and f.get("masked_softmax", 0) == 0
    assert not any(n.op_type == "MaskedSoftmax" for n in g.nodes)


def test_dynamic_mask_that_is_not_causal_stays_an_input(exported):
    """A mask built from the shapes alone whose "minus infinity" is -1 is not the causal mask:
    it stays the Attention's mask input, and the result is unchanged at another size."""
    path, ids, _ = exported(family="llama", attn="eager", dynamic=True)
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
    feeds = family_feeds(ids, False, batch=3, seq=5)
    yf, yp = fused.run(feeds)[fused.output_name], plain.run(feeds)[plain.output_name]
    np.testing.assert_allclose(yf, yp, rtol=0, atol=1e-5 * np.abs(yp).max())


# TorchScript: transformers needs an attention_mask there (its packed-sequence check uses
# torch.diff, which that exporter cannot write), so the mask is always an input
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_torchscript_eager_fuses_and_trains_the_same(exported, dynamic):
    path, ids, _ = exported(family="llama", attn="eager", exporter="torchscript",
                            dynamic=dynamic, with_mask=True)
    fused, _ = parity(path, family_feeds(ids, True, padded=True))
    check_fused(fused, with_mask=True)


def test_torchscript_sdpa_with_an_infinite_mask_keeps_its_nan_guard(exported):
    """TorchScript's SDPA masks with -inf and guards the softmax with IsNaN → 0: a row whose
    keys are all masked gives 0 there but NaN in pyedge.Attention, so it is not fused; with
    the mask's -inf made finite (as the dynamo exporter writes it) it is."""
    path, ids, _ = exported(family="llama", attn="sdpa", exporter="torchscript",
                            with_mask=True)
    g = load_onnx(path)
    assert fuse(g.copy())["attention"] == 0
    for n in g.nodes:
        if n.op_type == "Where" and len(n.inputs) == 3:
            v = g.initializers.get(n.inputs[2])
            if v is not None and np.size(v) == 1 and np.isneginf(np.ravel(v)[0]):
                g.initializers[n.inputs[2]] = np.full(np.shape(v), -3.4e38, np.float32)
    assert fuse(g)["attention"] == LAYERS


# ------------------------------------------------------------------- every family, both exporters
# eager attention (the bench's), static and dynamic: dynamo on input_ids alone (causal flag),
# TorchScript with a right-padded attention_mask (mask input); sdpa on the dynamo exporter.
# The default run keeps the cases that cover NeoX's and Phi-3's own spellings; the rest are
# marked slow.
FAST = {("neox", "eager", "dynamo", False), ("neox", "eager", "torchscript", True),
        ("neox", "sdpa", "dynamo", True), ("phi3_partial", "eager", "torchscript", False)}


def _family_cases():
    out = []
    for fam in FAMILIES:
        for attn, exporter in (("eager", "dynamo"), ("eager", "torchscript"),
                               ("sdpa", "dynamo")):
            for dynamic in (False, True):
                key = (fam, attn, exporter, dynamic)
                marks = [] if key in FAST else [pytest.mark.slow]
                out.append(pytest.param(*key, marks=marks, id="-".join(
                    [fam, attn, exporter, "dynamic" if dynamic else "static"])))
    return out


@pytest.mark.parametrize("family,attn,exporter,dynamic", _family_cases())
def test_family_fuses_one_attention_per_layer_and_trains_the_same(exported, family, attn,
                                                                  exporter, dynamic):
    with_mask = exporter == "torchscript"
    path, ids, rope_layers = exported(family=family, attn=attn, exporter=exporter,
                                      dynamic=dynamic, with_mask=with_mask)
    feeds = family_feeds(ids, with_mask, padded=with_mask)
    fused, plain = parity(path, feeds, family)
    check_fused(fused, with_mask, family, rope_layers)
    check_torch(path, family, attn, feeds)
    if dynamic:
        check_other_size(fused, plain, with_mask)


def test_sliding_window_mask_is_not_taken_for_the_causal_one(tmp_path):
    """Mistral with a sliding window of 16, symbolic sequence length: its mask equals the
    causal one at every length up to 16, so the sizes the fusion evaluates it at must go past
    the window's constant; it becomes causal=1 with window=16 (no mask tensor) and a 40-token
    sequence gives what the op-by-op graph and torch give (a plain causal flag would attend
    past the window)."""
    path, ids, _ = export_family(tmp_path, "mistral", dynamic=True, attn="eager", mask=False,
                                 config={"sliding_window": 16})
    fused = pyedge.TrainingSession(path, loss=None)
    att = [n for n in fused.graph.nodes if n.op_type == "Attention"]
    assert len(att) == LAYERS and all(len(n.inputs) == 3 and n.attrs.get("causal") == 1
                                      and n.attrs.get("window") == 16 for n in att), \
        [(len(n.inputs), n.attrs) for n in att]
    plain = pyedge.TrainingSession(path, loss=None, fuse=False)
    feeds = family_feeds(ids, False, batch=1, seq=40)
    yf, yp = fused.run(feeds)[fused.output_name], plain.run(feeds)[plain.output_name]
    np.testing.assert_allclose(yf, yp, rtol=0, atol=1e-5 * np.abs(yp).max())
    ref = torch_logits("mistral", feeds, "eager", config={"sliding_window": 16})
    assert np.abs(yf - ref).max() <= TORCH_TOL
