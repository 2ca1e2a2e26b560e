"""RMSNorm, the gated MLP and the rotary embedding fuse on every layer of every decoder family,
with both exporters: Llama, Qwen2, Qwen3 (q_norm/k_norm on the heads), Mistral, Gemma
(1 + w, GeGLU with the tanh GELU), Gemma 2 (pre/post feed-forward norms), Gemma 3 (both, and
q_norm/k_norm), Phi-3 (fused gate_up_proj chunked into gate and up; full and partial rotary),
SmolLM3 (NoPE layers: no rotary there), GPT-NeoX (LayerNorm and a plain GELU MLP: nothing of
these to fuse, partial rotary). Config-built tiny models (tests/decoder_families.py); fused vs
op-by-op logits, losses and LoRA gradients within 1e-5 relative, and the fusion counts that
`plan_stats()["fusions"]` reports.

Each case exports a model (a few seconds on a quiet machine); the default run keeps three
cases that cover the new matcher paths (Phi-3's chunked gate/up, TorchScript's x·x·x GELU,
q_norm/k_norm), the rest are marked slow."""
import pytest

from decoder_families import N_LAYERS, decoder_parity, export_family

# RMSNorms per layer (the final norm adds one) and gated MLPs per layer
NORMS = {"llama": 2, "qwen2": 2, "qwen3": 4, "mistral": 2, "gemma": 2, "gemma2": 4,
         "gemma3": 6, "phi3": 2, "phi3_partial": 2, "smollm3": 2, "neox": 0}
FAST = {("phi3", "dynamo"), ("gemma3", "torchscript"), ("qwen3", "dynamo")}


def _cases():
    out = []
    for fam in NORMS:
        for exporter in ("dynamo", "torchscript"):
            marks = [] if (fam, exporter) in FAST else [pytest.mark.slow]
            out.append(pytest.param(fam, exporter, id=f"{fam}-{exporter}", marks=marks))
    return out


def _targets(family):
    if family == "neox":
        return ["query_key_value", "dense_h_to_4h"]
    if family.startswith("phi3"):
        return ["qkv_proj", "gate_up_proj"]
    return ["q_proj", "v_proj", "gate_proj", "up_proj"]


@pytest.mark.parametrize("family,exporter", _cases())
def test_family_fuses_every_layer_and_trains_the_same(tmp_path, family, exporter):
    path, ids, rope_layers = export_family(tmp_path, family, exporter)
    fused, worst = decoder_parity(path, ids, _targets(family))
    f = fused.fusions
    norms = NORMS[family] * N_LAYERS + (1 if NORMS[family] else 0)
    assert f.get("rmsnorm", 0) == norms, f
    assert f.get("gated_mlp", 0) == (0 if family == "neox" else N_LAYERS), f
    assert f.get("rotary", 0) == 2 * rope_layers, f
    ops = {(n.domain, n.op_type) for n in fused.graph.nodes}
    for gone in ("ReduceMean", "Sigmoid", "Tanh", "Neg", "Pow"):
        if (gone == "ReduceMean" and family == "neox") or (gone == "Tanh" and family == "gemma2"):
            continue  # LayerNorm stays LayerNorm; Gemma 2 soft-caps logits with tanh
        assert ("", gone) not in ops, gone
    if family.startswith("gemma"):
        rms = [n for n in fused.graph.nodes if n.op_type == "RMSNorm"]
        assert all(n.attrs.get("add_one") == 1 for n in rms)
        glu = [n for n in fused.graph.nodes if n.op_type == "SwiGLU"]
        assert all(n.attrs["act"] == "gelu_tanh" for n in glu)
    stats = fused.plan_stats({"input_ids": ids, "attention_mask": ids * 0 + 1})
    assert stats["fusions"] == {k: v for k, v in f.items() if v}
    assert worst <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_phi3_dynamic_shapes_fuse_the_chunked_mlp(tmp_path, exporter):
    """Symbolic batch and length: gate and up are halves of one tensor, so they match even
    though their shapes are not static."""
    path, ids, rope_layers = export_family(tmp_path, "phi3", exporter, dynamic=True)
    fused, _ = decoder_parity(path, ids, _targets("phi3"))
    assert fused.fusions.get("gated_mlp", 0) == N_LAYERS
    assert fused.fusions.get("rotary", 0) == 2 * rope_layers
    assert fused.fusions.get("rmsnorm", 0) == 2 * N_LAYERS + 1
