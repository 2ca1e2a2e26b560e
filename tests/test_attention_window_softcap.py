"""Sliding-window attention and Gemma 2's soft-capping through the decoder fusions
(pyedge/attention_fusion.py) on config-built tiny Mistral, Gemma 2 and Gemma 3 decoders with a
SMALL sliding window (4 keys, sequences of 12, so the window really cuts): each export fuses one
pyedge.Attention per layer with the flags its layer has (window = 4 on the sliding layers only:
Gemma 2 and 3 mix sliding and global layers; softcap on Gemma 2's), the fused session computes
what the op-by-op one computes (logits, loss, LoRA gradients within 1e-5 relative) and what the
torch model computes (logits within 1e-4). Dynamo exports with the mask built from shapes
alone (static and dynamic: then the window comes from evaluating the mask, also when it is
longer than the evaluation's sequences), and TorchScript / padded exports (the mask reads
attention_mask and stays an input; the soft cap is still fused)."""
from __future__ import annotations

import numpy as np
import pytest

import pyedge

pytest.importorskip("transformers")

from decoder_families import N_LAYERS as LAYERS, VOCAB, build as build_family  # noqa: E402

BATCH, SEQ, WINDOW = 2, 12, 4
CAP = 2.0  # Gemma 2's attn_logit_softcapping, small enough to bend these scores


def build(family: str, attn: str = "eager", window: int = WINDOW):
    """(model, per-layer (window or 0, softcap or 0)): decoder_families' model of `family`
    with this window (and cap), q/k projections scaled up so the scores (and the cap)
    matter."""
    import torch
    config = {"sliding_window": window}
    if family == "mistral":
        layers = [(window, 0.0)] * LAYERS
    elif family == "gemma2":  # layer 0 sliding, layer 1 global; both soft-capped
        config.update(attn_logit_softcapping=CAP, query_pre_attn_scalar=16)
        layers = [(window, CAP), (0, CAP)]
    elif family == "gemma3":  # local then global layer (its default pattern is 5:1)
        config.update(query_pre_attn_scalar=16,
                      layer_types=["sliding_attention", "full_attention"])
        layers = [(window, 0.0), (0, 0.0)]
    else:
        raise ValueError(family)
    model, _ = build_family(family, attn, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(6.0)
    return model, layers


_CACHE: dict = {}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("window_softcap")

    def get(family, attn="eager", exporter="dynamo", dynamic=False, with_mask=False,
            window=WINDOW):
        from pyedge.export.torch_export import export_module
        import torch
        key = (family, attn, exporter, dynamic, with_mask, window)
        if key not in _CACHE:
            model, layers = build(family, attn, window)
            ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
            args = {"input_ids": ids}
            if with_mask:
                args["attention_mask"] = torch.ones(BATCH, SEQ, dtype=torch.long)
            dyn = {0: "batch", 1: "seq"}
            axes = {**{k: dyn for k in args}, "logits": dyn} if dynamic else None
            path = root / ("_".join(str(k) for k in key) + ".onnx")
            export_module(model, args, str(path), output_names=["logits"], dynamic_axes=axes,
                          exporter=exporter)
            _CACHE[key] = (str(path), ids.numpy(), model, layers)
        return _CACHE[key]
    return get


def feeds_of(ids, with_mask, pad=False):
    feeds = {"input_ids": ids.astype(np.int64)}
    if with_mask:
        am = np.ones(ids.shape, np.int64)
        if pad:
            am[-1, -3:] = 0
        feeds["attention_mask"] = am
    return feeds


def parity(path, feeds, rtol=1e-5):
    """Fused vs op-by-op session: logits, two SGD steps' losses and LoRA gradients."""
    lora = pyedge.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
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
        assert gf.keys() == gp.keys() and len(gp) == 4 * LAYERS
        for k in gp:
            assert np.abs(gp[k]).max() > 0, k
            err = np.abs(gf[k] - gp[k]).max() / np.abs(gp[k]).max()
            assert err <= rtol, (k, err)
        fused.apply_update()
        plain.apply_update()
    return fused, plain


def attention_nodes(sess):
    assert sess.fusions.get("attention", 0) == LAYERS, sess.fusions
    att = [n for n in sess.graph.nodes if n.op_type == "Attention" and n.domain == "pyedge"]
    assert len(att) == LAYERS
    ops = {(n.domain, n.op_type) for n in sess.graph.nodes}
    for gone in ("Softmax", "MaskedSoftmax"):
        assert ("", gone) not in ops and ("pyedge", gone) not in ops, gone
    return att


def check_flags(att, layers, mask_input):
    """Per layer, in graph order: window where the layer slides, softcap where it caps; the
    causal flag when the mask was built from shapes alone, a mask input otherwise."""
    for n, (window, cap) in zip(att, layers):
        assert float(n.attrs.get("softcap", 0.0)) == pytest.approx(cap), n.attrs
        if mask_input:
            assert len(n.inputs) == 4 and "window" not in n.attrs, n.attrs
        else:
            assert len(n.inputs) == 3 and n.attrs.get("causal") == 1, n.attrs
            assert int(n.attrs.get("window", 0)) == window, n.attrs


def torch_logits(model, feeds):
    import torch
    with torch.no_grad():
        am = feeds.get("attention_mask")
        return model(torch.from_numpy(feeds["input_ids"]),
                     None if am is None else torch.from_numpy(am)).numpy()


def check_torch(sess, model, feeds, atol=1e-4):
    got = sess.run(feeds)[sess.output_name]
    want = torch_logits(model, feeds)
    np.testing.assert_allclose(got, want, rtol=0, atol=atol * max(1.0, np.abs(want).max()))


# dynamo, the mask from shapes alone: the fast set (one family per kind of layer)
@pytest.mark.parametrize("family,attn,dynamic", [
    ("mistral", "eager", False),
    ("gemma2", "eager", True),
    pytest.param("mistral", "sdpa", True, marks=pytest.mark.slow),
    pytest.param("gemma2", "eager", False, marks=pytest.mark.slow),
    pytest.param("gemma3", "sdpa", True, marks=pytest.mark.slow),
    pytest.param("gemma3", "eager", False, marks=pytest.mark.slow),
])
def test_dynamo_fuses_window_and_softcap(exported, family, attn, dynamic):
    path, ids, model, layers = exported(family, attn, dynamic=dynamic)
    feeds = feeds_of(ids, False)
    fused, _ = parity(path, feeds)
    check_flags(attention_nodes(fused), layers, mask_input=False)
    check_torch(pyedge.TrainingSession(path, loss=None), model, feeds)


@pytest.mark.slow
@pytest.mark.parametrize("window", [7, 20])
def test_a_window_longer_than_the_probe_sizes_is_found(exported, window):
    """A window of 7 or 20 keys cuts nothing in the two evaluations of a dynamic mask
    (sequences of 3 and 7): it is found at a length past the mask subgraph's constants, so at
    30 positions the fused graph still attends to that many keys, as torch does."""
    path, _, model, _ = exported("mistral", "eager", dynamic=True, window=window)
    sess = pyedge.TrainingSession(path, loss=None)
    assert all(int(n.attrs.get("window", 0)) == window for n in attention_nodes(sess))
    ids = np.random.default_rng(3).integers(0, VOCAB, (1, 30))
    feeds = feeds_of(ids, False)
    plain = pyedge.TrainingSession(path, loss=None, fuse=False)
    got, ref = sess.run(feeds)[sess.output_name], plain.run(feeds)[plain.output_name]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    check_torch(sess, model, feeds)
    # and the window matters at that length
    full, _ = build("mistral", "eager", window=None)
    assert np.abs(torch_logits(full, feeds) - got).max() > 1e-3


# the mask reads attention_mask (TorchScript always needs one; dynamo with a padding mask):
# it stays an input (no window flag), the soft cap is still fused
@pytest.mark.parametrize("family,exporter,dynamic", [
    ("gemma2", "torchscript", False),
    pytest.param("gemma2", "dynamo", True, marks=pytest.mark.slow),
    pytest.param("mistral", "torchscript", True, marks=pytest.mark.slow),
    pytest.param("gemma3", "torchscript", False, marks=pytest.mark.slow),
])
def test_masked_exports_fuse_the_cap_and_keep_the_mask(exported, family, exporter, dynamic):
    path, ids, model, layers = exported(family, "eager", exporter=exporter, dynamic=dynamic,
                                        with_mask=True)
    feeds = feeds_of(ids, True, pad=True)
    fused, _ = parity(path, feeds)
    check_flags(attention_nodes(fused), layers, mask_input=True)
    check_torch(pyedge.TrainingSession(path, loss=None), model, feeds)
