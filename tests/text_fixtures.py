"""Text test material made here (no hub): a byte-level BPE trained with `tokenizers`, a chat
template, chat / prompt-completion / text records, and a tiny config-built Llama folder.

The tokenizer needs only `tokenizers`; the Llama folder needs torch + transformers."""
from __future__ import annotations

import json
import os

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Edge devices fine-tune small adapters on the data where it lives.",
    "Café naïve résumé — Grüße aus Köln! 日本語のテキスト 🤖 emoji too.",
    "A tokenizer turns text into ids; the model turns ids into logits.",
    "User: hello there. Assistant: hi, how can I help you today?",
    "Numbers 12345 and symbols #@%& appear sometimes, don't they?",
] * 4

SPECIAL = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]

# A template without generation tags: the assistant spans come from prefix rendering.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported role ' + m['role']) }}{% endif %}"
    "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")

# The same with {% generation %} tags (transformers' return_assistant_tokens_mask needs them).
CHAT_TEMPLATE_GEN = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ m['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")

CHATS = [
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "What is a fox?"},
     {"role": "assistant", "content": "A small wild dog."},
     {"role": "user", "content": "Grüße? 日本語"},
     {"role": "assistant", "content": "Greetings 🤖 in German."}],
    [{"role": "user", "content": "hello there"},
     {"role": "assistant", "content": "hi, how can I help you today?"}],
    [{"role": "user", "content": "The quick brown fox"},
     {"role": "assistant", "content": "jumps over the lazy dog."}],
]

PROMPTS = [
    {"prompt": "Question: what turns text into ids?\nAnswer:", "completion": " a tokenizer"},
    {"prompt": "Translate Köln:", "completion": " Cologne — a city 🤖"},
    {"prompt": "The quick brown", "completion": " fox jumps over the lazy dog."},
]


def train_bpe(vocab_size: int = 300):
    """A byte-level BPE with <s> ... </s> added around single sequences (like Llama's BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return tok


def save_tokenizer_folder(folder, chat_template: str = CHAT_TEMPLATE, tok=None):
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja) via transformers when it
    is installed (as a user's save_pretrained writes them), else by hand."""
    tok = tok or train_bpe()
    os.makedirs(folder, exist_ok=True)
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        tok.save(os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                       "chat_template": chat_template}, f)
        return folder
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = chat_template
    fast.save_pretrained(folder)
    return folder


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def llama_folder(folder, vocab_size: int = 300, max_positions: int = 64, seed: int = 0,
                 chat_template: str = CHAT_TEMPLATE):
    """A config-built tiny Llama + the BPE tokenizer, both via save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=1,
                      pad_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # distinct norm weights (fresh ones are all equal)
        g = torch.Generator().manual_seed(seed + 1)
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    m.save_pretrained(folder)
    save_tokenizer_folder(folder, chat_template)
    return folder
