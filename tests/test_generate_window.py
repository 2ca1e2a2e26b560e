"""Generation with a key/value cache on models with a sliding window shorter than prompt +
generated tokens (Mistral; Gemma 2 with soft-capping, sliding and global layers), exported with
`pyedge export --hf` (its attention_mask input keeps the mask an Attention input; the cache
rewrite finds the window by evaluating it, pyedge/kv_cache.py): the cached path equals the
recompute-the-prefix path (tokens and step logits) and transformers' greedy `generate` token for
token. Exports take 10-20 s each (once per module): slow."""
from __future__ import annotations

import numpy as np
import pytest

import text_fixtures as tf

PROMPT = "The quick brown fox"
NEW = 20
WINDOW = 5


def hf_folder(folder, family):
    import torch
    import transformers as t
    kw = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              bos_token_id=0, eos_token_id=1, pad_token_id=2, sliding_window=WINDOW)
    if family == "mistral":
        m = t.MistralForCausalLM(t.MistralConfig(**kw))
    else:  # layer 0 sliding, layer 1 global; attention logits soft-capped
        m = t.Gemma2ForCausalLM(t.Gemma2Config(head_dim=8, attn_logit_softcapping=2.0,
                                               query_pre_attn_scalar=8, **kw))
    torch.manual_seed(0)
    m.eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g) + (0.0 if "gemma" in family
                                                                   else 1.0))
            elif "q_proj" in n or "k_proj" in n:
                p.mul_(8.0)  # scores large enough for the window and the cap to matter
    m.save_pretrained(folder)
    tf.save_tokenizer_folder(folder, tf.CHAT_TEMPLATE)
    return folder


@pytest.fixture(scope="module", params=["mistral", "gemma2"])
def model(request, tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp(request.param)
    src, out = root / "hf", root / "export"
    hf_folder(str(src), request.param)
    from pyedge.cli import main
    assert main(["export", "--hf", str(src), "--task", "causal-lm", "-o", str(out)]) == 0
    return request.param, src, out


def hf_generate(src, prompt, n):
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast.from_pretrained(str(src))
    m = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         do_sample=False, num_beams=1)
    return ids[0].tolist(), out[0, ids.shape[1]:].tolist()


@pytest.mark.slow
def test_cached_generation_with_a_window(model):
    from pyedge.generate import Generator
    family, src, out = model
    cached = Generator(out)
    assert cached.cache_spec is not None, cached.cache_reason
    windows = [int(n.attrs.get("window", 0)) for n in cached._session.graph.nodes
               if n.op_type == "CachedAttention"]
    # Mistral slides in both layers; Gemma 2 in layer 0, layer 1 is global
    assert windows == ([WINDOW, WINDOW] if family == "mistral" else [WINDOW, 0]), windows
    caps = [float(n.attrs.get("softcap", 0)) for n in cached._session.graph.nodes
            if n.op_type == "CachedAttention"]
    assert caps == ([0.0, 0.0] if family == "mistral" else [2.0, 2.0]), caps
    plain = Generator(out, cache=False)
    prompt_ids, want = hf_generate(src, PROMPT, NEW)
    assert len(prompt_ids) + NEW > 2 * WINDOW  # the window really cuts
    a = cached.generate(PROMPT, max_new_tokens=NEW)
    b = plain.generate(PROMPT, max_new_tokens=NEW)
    assert a.prompt_ids == prompt_ids and a.cached and not b.cached
    assert a.ids == b.ids
    assert a.ids == want, (family, a.ids, want)
    # step logits agree closely too (not only their argmax)
    ids = cached.encode(PROMPT)
    extra = [5, 7, 9, 11, 13, 17, 19]
    la = [cached._logits(ids, 0)] + [cached._logits([t], len(ids) + i)
                                      for i, t in enumerate(extra)]
    lb = [plain._logits(ids + extra[:i], 0) for i in range(len(extra) + 1)]
    np.testing.assert_allclose(np.stack(la), np.stack(lb), rtol=1e-4, atol=1e-5)
