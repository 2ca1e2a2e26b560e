"""Models nobody on this project wrote (issue 19), config-built with random weights at tiny
sizes, each exported by the TorchScript and by the dynamo exporter as anyone would call them
(models/export_reference.export: no pyedge metadata): logits equal PyTorch's within 1e-4,
LoRA trains (the loss falls on one repeated batch), the saved adapters load in PEFT with no
missing or unexpected keys and give pyedge's logits.

wav2vec2 (group-norm feature extractor: InstanceNormalization), a Whisper encoder (audio
classification head), EfficientNet (its pooler is an AveragePool with ceil_mode and a window
larger than its input), Phi-3, DistilBERT, RoBERTa, ViT. Llama, Qwen2, Mistral and Gemma are
in tests/test_torchscript_decoders.py (TorchScript) and test_parity_torch.py / test_hf_export.py
(dynamo)."""
from __future__ import annotations

import numpy as np
import pytest

import pyedge
from optional_deps import optional

torch = optional("torch")
transformers = optional("transformers")
TOL = 1e-4


def _subclass(base, names):
    """A subclass of `base` whose forward takes `names` positionally and returns the logits;
    PEFT then finds the same module names on a plain instance."""
    class M(base):
        def forward(self, *args):
            return super().forward(**dict(zip(names, args))).logits
    M.__name__ = base.__name__
    return M


def _wav2vec2():
    cfg = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
        conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), feat_extract_norm="group",
        num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, num_labels=3,
        classifier_proj_size=16, do_stable_layer_norm=False)
    model = _subclass(transformers.Wav2Vec2ForSequenceClassification, ["input_values"])(cfg)
    x = np.random.default_rng(1).standard_normal((2, 400)).astype(np.float32)
    return model, {"input_values": x}, ["q_proj", "v_proj"]


def _whisper():
    cfg = transformers.WhisperConfig(
        d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=37,
        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=37, num_mel_bins=8,
        max_source_positions=16, max_target_positions=16, num_labels=3, vocab_size=64,
        classifier_proj_size=16)
    model = _subclass(transformers.WhisperForAudioClassification, ["input_features"])(cfg)
    x = np.random.default_rng(2).standard_normal((2, 8, 32)).astype(np.float32)
    return model, {"input_features": x}, ["q_proj", "v_proj"]


def _efficientnet():
    cfg = transformers.EfficientNetConfig(
        image_size=32, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320,
        num_labels=3, dropout_rate=0.0, drop_connect_rate=0.0)  # hidden_dim: 1280 x width
    model = _subclass(transformers.EfficientNetForImageClassification, ["pixel_values"])(cfg)
    with torch.no_grad():  # transformers' std-0.02 conv init makes the features vanish (1e-7)
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight)
        # and BatchNorm's running statistics (0 and 1) squash them: calibrate on random images
        model.train()
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
        model.eval()
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    return model, {"pixel_values": x}, ["classifier", "top_conv"]


def _text(config_cls, model_cls, targets, **kw):
    def build():
        cfg = config_cls(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=37,
                         max_position_embeddings=40, num_labels=3, **kw)
        model = _subclass(model_cls, ["input_ids", "attention_mask"])(cfg)
        ids = np.random.default_rng(4).integers(3, 64, (2, 9)).astype(np.int64)
        return model, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, targets
    return build


def _distilbert():
    cfg = transformers.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2,
                                        hidden_dim=37, max_position_embeddings=40, num_labels=3)
    model = _subclass(transformers.DistilBertForSequenceClassification,
                      ["input_ids", "attention_mask"])(cfg)
    ids = np.random.default_rng(5).integers(3, 64, (2, 9)).astype(np.int64)
    return model, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, ["q_lin", "v_lin"]


def _vit():
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                 num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=37, num_labels=3)
    model = _subclass(transformers.ViTForImageClassification, ["pixel_values"])(cfg)
    x = np.random.default_rng(6).standard_normal((2, 3, 16, 16)).astype(np.float32)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear)}
    # transformers 5 names ViT's projections q_proj / v_proj, 4.x query / value
    return model, {"pixel_values": x}, ["q_proj", "v_proj"] if "q_proj" in names else \
        ["query", "value"]


def _phi3():
    cfg = transformers.Phi3Config(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=2,
                                  intermediate_size=37, max_position_embeddings=40,
                                  pad_token_id=0)
    model = _subclass(transformers.Phi3ForCausalLM, ["input_ids", "attention_mask"])(cfg)
    ids = np.random.default_rng(7).integers(3, 64, (2, 9)).astype(np.int64)
    return model, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, \
        ["qkv_proj", "o_proj"]


MODELS = {
    "wav2vec2": _wav2vec2,
    "whisper_encoder": _whisper,
    "efficientnet": _efficientnet,
    "phi3": _phi3,
    "distilbert": _distilbert,
    "roberta": lambda: _text(transformers.RobertaConfig,
                             transformers.RobertaForSequenceClassification,
                             ["query", "value"], pad_token_id=1)(),
    "vit": _vit,
}


def _build(name):
    torch.manual_seed(0)
    model, feeds, targets = MODELS[name]()
    model.eval()
    with torch.no_grad():  # norm weights away from their init (1 and 0)
        for pname, p in model.named_parameters():
            if "norm" in pname.lower() or "layer_norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    return model, feeds, targets


def _torch_logits(model, feeds):
    with torch.no_grad():
        return model(*[torch.from_numpy(v) for v in feeds.values()]).numpy()


_EXPORTS = {}


def _exported(name, exporter, root):
    if (name, exporter) not in _EXPORTS:
        from models.export_reference import export
        model, feeds, targets = _build(name)
        path = str(root / f"{name}_{exporter}.onnx")
        export(model, tuple(torch.from_numpy(v) for v in feeds.values()), path,
               exporter=exporter, input_names=list(feeds), output_names=["logits"])
        _EXPORTS[(name, exporter)] = (path, model, feeds, targets)
    return _EXPORTS[(name, exporter)]


def _cases():
    out = []
    for name in MODELS:
        for exporter in ("torchscript", "dynamo"):
            # dynamo exports take 5-20 s each here: the slow run has them
            marks = [pytest.mark.slow] if exporter == "dynamo" else []
            out.append(pytest.param(name, exporter, id=f"{name}-{exporter}", marks=marks))
    return out


@pytest.mark.parametrize("name,exporter", _cases())
def test_model_logits_lora_and_peft(name, exporter, tmp_path_factory, tmp_path):
    root = tmp_path_factory.getbasetemp() / "import_models"
    root.mkdir(exist_ok=True)
    path, model, feeds, targets = _exported(name, exporter, root)
    ref = _torch_logits(model, feeds)
    causal = name == "phi3"
    sess = pyedge.TrainingSession(path, lora=pyedge.LoraConfig(r=4, alpha=8,
                                                              target_modules=targets),
                                  loss="causal_lm" if causal else "cross_entropy",
                                  optimizer=pyedge.AdamW(lr=2e-2))
    assert sess.lora_sites, "no LoRA site found"
    got = sess.run(feeds)[sess.output_name]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= TOL, np.abs(got - ref).max()

    labels = feeds["input_ids"] if causal else np.array([0, 2], np.int64)
    losses = [sess.step(feeds, labels) for _ in range(6)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    sess.save_adapters(str(tmp_path / "ad"))

    from tests.test_peft_roundtrip import load_peft_strict
    fresh, _, _ = _build(name)
    pm = load_peft_strict(fresh, str(tmp_path / "ad")).eval()
    assert sum(1 for k, _ in pm.named_parameters() if "lora_A" in k) == len(sess.lora_sites)
    after = sess.run(feeds)[sess.output_name]
    peft_logits = _torch_logits(pm, feeds)
    assert np.abs(after - ref).max() > 10 * TOL  # the adapters changed the model
    assert np.abs(after - peft_logits).max() <= TOL, np.abs(after - peft_logits).max()
