"""Tiny config-built decoders of every family the decoder fusions cover, exported by either
exporter: the one place that builds a family (tests/test_decoder_attention_families.py,
tests/test_rotary_fusion.py, tests/test_decoder_families_norm_mlp.py use it).

    path, ids, rope_layers = export_family(tmp_dir, "phi3", exporter="torchscript", dynamic=True)
    path, ids, _ = export_family(tmp_dir, "llama", attn="sdpa", mask=False)  # causal only

Two layers, hidden 64, 4 heads (2 key/value heads where the family has grouped-query
attention), head size 16, vocabulary 128; every 1-D parameter (norm weights, biases) moved
away from its init (1 or 0, 0 in Gemma's 1 + w) so a wrong form shows. `attn` picks
transformers' attention implementation ("eager", "sdpa"; None: transformers' default);
`mask=False` exports input_ids alone (the causal mask is then built from shapes, dynamo only:
with TorchScript transformers needs an attention_mask, see LM.forward). Exported with
models.export_reference.export (the dynamo exporter: pyedge's defaults; TorchScript: plain
torch.onnx.export, folding off), so the files carry no pyedge metadata."""
from __future__ import annotations

N_LAYERS = 2
VOCAB = 128
FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3",
            "phi3_partial", "smollm3", "neox"]


def build(family: str, attn: str | None = None, config: dict | None = None):
    """(model, rotary layers): a causal LM returning logits, and how many layers apply a
    rotary embedding (SmolLM3 leaves every fourth layer without: NoPE). Deterministic: a
    second call gives the same weights (the torch reference of an exported file). `config`:
    overrides of the family's config fields (e.g. Mistral's sliding_window)."""
    import torch
    import transformers as tf
    torch.manual_seed(0)
    kw = dict(num_hidden_layers=N_LAYERS, hidden_size=64, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=96, vocab_size=VOCAB,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=0,
              attention_dropout=0.0)
    kw.update({k: v for k, v in (config or {}).items() if family != "neox"})
    rope_layers = N_LAYERS
    if family == "llama":
        cfg, base = tf.LlamaConfig(**kw), tf.LlamaForCausalLM
    elif family == "qwen2":
        cfg, base = tf.Qwen2Config(**kw), tf.Qwen2ForCausalLM
    elif family == "qwen3":  # q_norm / k_norm on the heads
        cfg, base = tf.Qwen3Config(head_dim=16, **kw), tf.Qwen3ForCausalLM
    elif family == "mistral":  # no sliding window (4096 by default): that is gemma2/3's case
        cfg, base = tf.MistralConfig(**{"sliding_window": None, **kw}), tf.MistralForCausalLM
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
                               rotary_pct=0.25, attention_dropout=0.0, **(config or {}))
        base = tf.GPTNeoXForCausalLM
    else:
        raise ValueError(family)

    if attn is not None:
        cfg._attn_implementation = attn

    class LM(base):  # a subclass keeps the parameter names PEFT expects
        def forward(self, input_ids, attention_mask=None):
            # with an attention_mask transformers does not look for packed sequences
            # (torch.diff, which the TorchScript exporter cannot export)
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   use_cache=False).logits
    model = LM(cfg).eval()
    with torch.no_grad():  # norm weights and biases away from their init (1 or 0)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model, rope_layers


def export_family(root, family: str, exporter: str = "dynamo", dynamic: bool = False,
                  batch: int = 2, seq: int = 12, attn: str | None = None, mask: bool = True,
                  config: dict | None = None, name: str | None = None):
    """Exports `family` into `root`; returns (path, input_ids [batch, seq] int64, rotary
    layers). Inputs: input_ids and (with `mask`) attention_mask, both [batch, seq], symbolic
    when `dynamic`. `config` goes to build; `name` replaces the file's name."""
    import numpy as np
    import torch
    from models.export_reference import export
    if not mask and exporter != "dynamo":
        raise ValueError("TorchScript exports need the attention_mask input (LM.forward)")
    model, rope_layers = build(family, attn, config)
    ids = np.random.default_rng(0).integers(0, VOCAB, (batch, seq)).astype(np.int64)
    args = (torch.from_numpy(ids),) + ((torch.ones(batch, seq, dtype=torch.long),) if mask else ())
    names = ["input_ids", "attention_mask"][:len(args)]
    dyn = {n: {0: "b", 1: "t"} for n in names} if dynamic else None
    tag = "_".join([family, exporter, "dyn" if dynamic else "static"]
                   + ([attn] if attn else []) + ([] if mask else ["nomask"]))
    path = str(root / f"{name or tag}.onnx")
    export(model, args, path, exporter=exporter, input_names=names, output_names=["logits"],
           dynamic_axes=dyn)
    return path, ids, rope_layers


def family_feeds(ids, mask: bool = True, padded: bool = False, batch: int | None = None,
                 seq: int | None = None):
    """input_ids (new random ones of another [batch, seq] when asked) and, with `mask`, an
    attention_mask of ones, or with `padded` the last row right-padded by 3."""
    import numpy as np
    batch, seq = batch or ids.shape[0], seq or ids.shape[1]
    if (batch, seq) != ids.shape:
        ids = np.random.default_rng(5).integers(0, VOCAB, (batch, seq))
    feeds = {"input_ids": ids.astype(np.int64)}
    if mask:
        am = np.ones(ids.shape, np.int64)
        if padded:
            am[-1, -3:] = 0
        feeds["attention_mask"] = am
    return feeds


def torch_logits(family: str, feeds: dict, attn: str | None = None, config: dict | None = None):
    """The torch model's logits (float32 numpy) on `feeds` (build is deterministic)."""
    import torch
    model, _ = build(family, attn, config)
    args = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        return model(**args).numpy()


def decoder_parity(path, ids, targets, rtol=1e-5, feeds=None):
    """Fused and op-by-op sessions (LoRA on `targets`, nonzero B): logits, two SGD steps'
    losses and every LoRA gradient (two per target and layer) agree within rtol (relative to
    each tensor's max). `feeds` defaults to `ids` with an all-ones attention_mask. Returns
    (fused session, worst gradient error)."""
    fused, _, worst = parity_sessions(path, ids, targets, rtol, feeds)
    return fused, worst


def parity_sessions(path, ids, targets, rtol=1e-5, feeds=None):
    """decoder_parity's checks; returns (fused session, op-by-op session, worst error), both
    after the same two updates."""
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
    if feeds is None:
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    lf_ = fused.run(feeds)[fused.output_name]
    lp_ = plain.run(feeds)[plain.output_name]
    np.testing.assert_allclose(lf_, lp_, rtol=0, atol=rtol * np.abs(lp_).max())
    labels = feeds["input_ids"].astype(np.int64)
    worst = 0.0
    for _ in range(2):
        lf = fused.step(feeds, labels, update=False)
        lp = plain.step(feeds, labels, update=False)
        np.testing.assert_allclose(lf, lp, rtol=rtol)
        gf, gp = fused.gradients(), plain.gradients()
        assert gf.keys() == gp.keys() and len(gp) == 2 * len(targets) * N_LAYERS, sorted(gp)
        for k in gp:
            assert np.abs(gp[k]).max() > 0, k
            err = float(np.abs(gf[k] - gp[k]).max() / np.abs(gp[k]).max())
            worst = max(worst, err)
            assert err <= rtol, (k, err)
        fused.apply_update()
        plain.apply_update()
    return fused, plain, worst
