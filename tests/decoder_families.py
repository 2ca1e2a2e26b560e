"""Tiny config-built decoders of every family the decoder fusions cover, exported by either
exporter (shared by tests/test_rotary_fusion.py and tests/test_decoder_families_norm_mlp.py).

    path, ids = export_family(tmp_dir, "phi3", exporter="torchscript", dynamic=True)

Two layers, hidden 64, 4 heads (2 key/value heads where the family has grouped-query
attention), head size 16, vocabulary 128; norm weights moved away from their init (1, or 0
in Gemma's 1 + w) so a wrong form shows. Exported with models.export_reference.export (the
dynamo exporter: pyedge's defaults; TorchScript: plain torch.onnx.export, folding off)."""
from __future__ import annotations

N_LAYERS = 2
VOCAB = 128
FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3",
            "phi3_partial", "smollm3", "neox"]


def build(family: str):
    """(model, rotary layers): a causal LM returning logits, and how many layers apply a
    rotary embedding (SmolLM3 leaves every fourth layer without: NoPE)."""
    import torch
    import transformers as tf
    torch.manual_seed(0)
    kw = dict(num_hidden_layers=N_LAYERS, hidden_size=64, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=96, vocab_size=VOCAB,
              max_position_embeddings=64, pad_token_id=0)
    rope_layers = N_LAYERS
    if family == "llama":
        cfg, base = tf.LlamaConfig(**kw), tf.LlamaForCausalLM
    elif family == "qwen2":
        cfg, base = tf.Qwen2Config(**kw), tf.Qwen2ForCausalLM
    elif family == "qwen3":  # q_norm / k_norm on the heads
        cfg, base = tf.Qwen3Config(head_dim=16, **kw), tf.Qwen3ForCausalLM
    elif family == "mistral":
        cfg, base = tf.MistralConfig(**kw), tf.MistralForCausalLM
    elif family == "gemma":  # RMSNorm times 1 + w, GeGLU (gelu_pytorch_tanh)
        cfg, base = tf.GemmaConfig(head_dim=16, **kw), tf.GemmaForCausalLM
    elif family == "gemma2":  # pre/post feed-forward norms, soft-capping
        cfg, base = tf.Gemma2Config(head_dim=16, **kw), tf.Gemma2ForCausalLM
    elif family == "gemma3":  # + q_norm / k_norm, local and global rotary tables
        cfg, base = tf.Gemma3TextConfig(head_dim=16, **kw), tf.Gemma3ForCausalLM
    elif family in ("phi3", "phi3_partial"):  # fused qkv_proj and gate_up_proj
        extra = {"partial_rotary_factor": 0.5} if family == "phi3_partial" else {}
        cfg, base = tf.Phi3Config(**kw, **extra), tf.Phi3ForCausalLM
    elif family == "smollm3":
        cfg, base = tf.SmolLM3Config(**kw), tf.SmolLM3ForCausalLM
        rope_layers = sum(int(x) for x in cfg.no_rope_layers[:N_LAYERS])
    elif family == "neox":  # LayerNorm, plain GELU MLP, partial rotary (rotary_pct)
        cfg = tf.GPTNeoXConfig(num_hidden_layers=N_LAYERS, hidden_size=64, num_attention_heads=4,
                               intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64,
                               rotary_pct=0.25)
        base = tf.GPTNeoXForCausalLM
    else:
        raise ValueError(family)

    class LM(base):  # a subclass keeps the parameter names PEFT expects
        def forward(self, input_ids, attention_mask):
            # with an attention_mask transformers does not look for packed sequences
            # (torch.diff, which the TorchScript exporter cannot export)
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   use_cache=False).logits
    model = LM(cfg).eval()
    with torch.no_grad():  # norm weights away from their init (1, or 0 in 1 + w)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model, rope_layers


def export_family(root, family: str, exporter: str = "dynamo", dynamic: bool = False,
                  batch: int = 2, seq: int = 12):
    """Exports `family` into `root`; returns (path, input_ids [batch, seq] int64, rotary
    layers)."""
    import numpy as np
    import torch
    from models.export_reference import export
    model, rope_layers = build(family)
    ids = np.random.default_rng(0).integers(0, VOCAB, (batch, seq)).astype(np.int64)
    args = (torch.from_numpy(ids), torch.ones(batch, seq, dtype=torch.long))
    names = ["input_ids", "attention_mask"]
    dyn = {n: {0: "b", 1: "t"} for n in names} if dynamic else None
    path = str(root / f"{family}_{exporter}_{'dyn' if dynamic else 'static'}.onnx")
    export(model, args, path, exporter=exporter, input_names=names, output_names=["logits"],
           dynamic_axes=dyn)
    return path, ids, rope_layers


def decoder_parity(path, ids, targets, rtol=1e-5):
    """Fused and op-by-op sessions (LoRA on `targets`, nonzero B): logits, two SGD steps'
    losses and every LoRA gradient agree within rtol (relative to each tensor's max)."""
    import numpy as np
    import pyedge
    lora = pyedge.LoraConfig(r=4, target_modules=targets)
    kw = dict(lora=lora, loss="causal_lm", optimizer=pyedge.SGD(lr=0.5))
    fused = pyedge.TrainingSession(path, **kw)
    plain = pyedge.TrainingSession(path, fuse=False, **kw)
    for sess in (fused, plain):  # the same nonzero B, so every adapter gets a gradient
        for i, (k, v) in enumerate(sorted(sess.trainable_parameters().items())):
            if ".lora_B" in k:
                v[...] = np.random.default_rng(i).standard_normal(v.shape) * 0.05
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    lf_ = fused.run(feeds)[fused.output_name]
    lp_ = plain.run(feeds)[plain.output_name]
    np.testing.assert_allclose(lf_, lp_, rtol=0, atol=rtol * np.abs(lp_).max())
    labels = ids.astype(np.int64)
    worst = 0.0
    for _ in range(2):
        lf = fused.step(feeds, labels, update=False)
        lp = plain.step(feeds, labels, update=False)
        np.testing.assert_allclose(lf, lp, rtol=rtol)
        gf, gp = fused.gradients(), plain.gradients()
        assert gf.keys() == gp.keys() and gp
        for k in gp:
            assert np.abs(gp[k]).max() > 0, k
            err = float(np.abs(gf[k] - gp[k]).max() / np.abs(gp[k]).max())
            worst = max(worst, err)
            assert err <= rtol, (k, err)
        fused.apply_update()
        plain.apply_update()
    return fused, worst
