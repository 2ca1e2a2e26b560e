"""A config-built 2-layer Llama decoder (GQA, tied embeddings, eager attention) exported with
pyedge.torch.export, returning logits only: shared by tests/test_recompute.py and
tests/test_budget_all_plans.py (the memory-budget tests)."""
import pytest


def export_llama(path, vocab, max_pos=128):
    """Exports to `path` (dynamic batch and sequence); returns the path as a string."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import pyedge
    import pyedge.torch  # noqa: F401  (the export entry point)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=vocab, max_position_embeddings=max_pos,
                                   tie_word_embeddings=True)
    cfg._attn_implementation = "eager"

    class Logits(transformers.LlamaForCausalLM):
        def forward(self, input_ids):  # noqa: D401
            return super().forward(input_ids=input_ids, use_cache=False).logits

    torch.manual_seed(0)
    model = Logits(cfg).eval()
    ids = torch.randint(0, vocab, (2, 16))
    pyedge.torch.export(model, (ids,), str(path), input_names=["input_ids"],
                        output_names=["logits"],
                        dynamic_axes={"input_ids": {0: "b", 1: "s"}, "logits": {0: "b", 1: "s"}})
    return str(path)
