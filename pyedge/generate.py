"""Text generation on the device: tokenizer + causal LM (+ adapters), greedy or sampled,
with a key/value cache (device path: numpy, tokenizers, jinja2 and the core; no torch).

    gen = pyedge.Generator("my-llama-onnx", adapters="runs/chat/adapters")
    out = gen.generate("What is a fox?", chat=True, max_new_tokens=32, stream=print_piece)
    out.text, out.ids

How it runs: the model graph gets the decoder fusions (attention as pyedge.Attention), the LM
head reads only the last position (a Slice before it: the prompt's other logits are never
computed, as transformers' generate with logits_to_keep=1), and the key/value-cache rewrite
(pyedge/kv_cache.py), so a new token costs one position: one plan for the prefill of the
prompt, one for every decoding step (the cache length is a run-time value). Exports with
symbolic shapes (what `pyedge export --hf` writes) get their attention fused against the shapes
of a tiny probe run (pyedge/kv_cache.py). A model whose attention does not fuse (or has no
position_ids input) decodes by recomputing the whole sequence each token, after a one-line
warning. Adapters stay LoRA ops over the frozen weights
(with one row per step the op computes x·W + s·(x·Aᵀ)·Bᵀ, as PEFT does), so greedy output
equals transformers + PEFT ``generate`` token for token.

Stops at the model's end-of-sequence ids (generation_config.json, else config.json, else the
tokenizer's EOS), at ``max_new_tokens`` or at the model's positions.
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pyedge.graph import Graph, Node

MODEL_FILE = "model.onnx"


class GenerationError(ValueError):
    """Input generation cannot use (one line): no tokenizer, not a causal LM, too long."""


@dataclass
class Generation:
    text: str                    # the continuation only (special tokens skipped)
    ids: list[int]               # its token ids (EOS included when it stopped there)
    prompt_ids: list[int]
    stop: str                    # "eos", "length" (max_new_tokens) or "positions"
    seconds: float = 0.0         # prefill + decoding
    prefill_seconds: float = 0.0
    cached: bool = True          # False: the prefix was recomputed each token
    times: list[float] = field(default_factory=list)  # seconds per new token


def _model_file(model) -> Path:
    p = Path(model)
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.is_file():
        raise FileNotFoundError(2, "No such file or directory", str(p))
    return p


def _read_json(p: Path) -> dict:
    try:
        d = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _ids(v) -> list[int]:
    if isinstance(v, int):
        return [v]
    if isinstance(v, list):
        return [int(x) for x in v if isinstance(x, int)]
    return []


def keep_last_position(graph: Graph, output: str) -> bool:
    """Makes `output` (logits [B, L, V]) [B, 1, V]: a Slice of the last position before the
    linear head that computes it (MatMul-like on its input 0, maybe + bias). False (graph
    unchanged) when the head is not of that form."""
    producer = graph.producer_map()
    n = producer.get(output)
    if n is not None and n.op_type == "Add" and n.domain in ("", "ai.onnx") and len(n.inputs) == 2 \
            and n.inputs[1] in graph.initializers and graph.initializers[n.inputs[1]].ndim <= 1:
        n = producer.get(n.inputs[0])
    heads = {("", "MatMul"), ("ai.onnx", "MatMul"), ("", "Gemm"), ("pyedge", "MatMul"),
             ("pyedge", "LoraMatMul"), ("com.microsoft", "MatMulNBits"),
             ("com.microsoft", "MatMulBnb4"), ("pyedge", "LoraQuantMatMul")}
    if n is None or (n.domain, n.op_type) not in heads or n.attrs.get("trans_a"):
        return False
    x = n.inputs[0]
    if x in graph.initializers or len(graph.value_shapes.get(x, [0, 0, 0])) != 3:
        return False
    sliced = graph.fresh_name(f"{x}_last")
    names = {k: graph.fresh_name(f"pyedge_last_{k}") for k in ("starts", "ends", "axes")}
    graph.initializers[names["starts"]] = np.array([-1], np.int64)
    graph.initializers[names["ends"]] = np.array([2**62], np.int64)
    graph.initializers[names["axes"]] = np.array([1], np.int64)
    at = graph.nodes.index(n)
    graph.nodes.insert(at, Node("Slice", [x, names["starts"], names["ends"], names["axes"]],
                                [sliced], name=f"{n.name}_last_position"))
    n.inputs[0] = sliced  # (other readers of x, if any, keep every position)
    return True


class Generator:
    """A causal LM ready to generate: model (a pyedge export folder or its model.onnx),
    optional adapters (a run's adapters/ or a PEFT folder), tokenizer (default: next to the
    model). cache=False recomputes the whole sequence each token (the reference path)."""

    def __init__(self, model, adapters=None, tokenizer=None, threads: int | None = None,
                 cache: bool = True):
        from pyedge.text_data import TextTokenizer, find_tokenizer
        self.model_path = _model_file(model)
        tpath = find_tokenizer(self.model_path, tokenizer)
        if tpath is None:
            raise GenerationError(f"no tokenizer.json next to {self.model_path}: pass "
                                  "--tokenizer PATH (pyedge export --hf writes it beside the model)")
        self.tokenizer = TextTokenizer(tpath)
        base = self._base_session(adapters, threads)
        self._check_causal_lm(base)
        from pyedge.text_data import model_facts
        vocab, self.max_positions, config = model_facts(base, self.model_path)
        if vocab and self.tokenizer.vocab_size > vocab:
            raise GenerationError(f"{tpath}: the tokenizer has {self.tokenizer.vocab_size} "
                                  f"tokens, the model's vocabulary {vocab}: not this model's "
                                  "tokenizer (pass the right one with --tokenizer)")
        folder = self.model_path.parent
        gen_cfg = _read_json(folder / "generation_config.json")
        self.eos_ids = set(_ids(gen_cfg.get("eos_token_id")) or _ids(config.get("eos_token_id")))
        if not self.eos_ids and self.tokenizer.eos_id is not None:
            self.eos_ids = {self.tokenizer.eos_id}
        self.config = config
        self.threads = threads
        self._graph = self._generation_graph(base)
        self._output = base.output_name
        self._base_inputs = [v.name for v in self._graph.inputs]
        del base
        self.cache_spec = None
        self.cache_reason = "off (cache=False)"
        if cache:
            from pyedge.kv_cache import NoCache
            try:
                self._rewrite_for_cache(256)
                self.cache_reason = ""
            except NoCache as e:
                self.cache_reason = str(e)
                warnings.warn(f"no key/value cache: {e}; every token recomputes the whole "
                              "sequence", stacklevel=2)
        if self.cache_spec is None:
            self._session = self._make_session(self._graph)

    # --- building -----------------------------------------------------------------------
    def _base_session(self, adapters, threads):
        import pyedge
        if adapters:
            from pyedge.train import session_from_adapters
            sess, _ = session_from_adapters(str(self.model_path), adapters, threads=threads)
            return sess
        return pyedge.TrainingSession(str(self.model_path), loss=None, threads=threads)

    def _check_causal_lm(self, sess):
        g = sess.graph
        task = g.metadata.get("pyedge.task")
        names = [v.name for v in g.inputs]
        out = next(o for o in g.outputs if o.name == sess.output_name)
        if (task and task != "causal-lm") or "input_ids" not in names or len(out.shape) != 3:
            what = f"a {task} model" if task else (f"inputs {names}, output '{out.name}' "
                                                   f"{out.shape}")
            raise GenerationError(f"{self.model_path} is not a causal language model ({what}); "
                                  "generation needs input_ids -> logits [batch, seq, vocab] "
                                  "(pyedge export --hf DIR --task causal-lm)")

    @staticmethod
    def _generation_graph(sess) -> Graph:
        """The session's fused graph with the adapters' current values as constants and the
        head reading the last position only."""
        g = sess.graph.copy()
        for name, arr in sess.trainable_parameters().items():
            g.initializers[name] = np.array(arr, copy=True)
        keep_last_position(g, sess.output_name)
        return g

    def _make_session(self, graph):
        import pyedge
        self._planned = set()
        return pyedge.TrainingSession(graph, loss=None, fuse=False, output=self._output,
                                      threads=self.threads)

    def _rewrite_for_cache(self, length: int):
        from pyedge.kv_cache import add_kv_cache
        g = self._graph.copy()
        spec = add_kv_cache(g, length, 1, self.config)
        self._session = self._make_session(g)
        self.cache_spec, self._caches = spec, spec.new_caches()

    # --- encoding -----------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if chat:
            from pyedge.text_data import ChatRenderer
            text = ChatRenderer(self.tokenizer).render([{"role": "user", "content": prompt}],
                                                       add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt)

    def decode(self, ids) -> str:
        return self.tokenizer.tok.decode(list(ids), skip_special_tokens=True)

    # --- running ------------------------------------------------------------------------
    def _feed(self, ids: np.ndarray, start: int) -> dict[str, np.ndarray]:
        n = ids.shape[1]
        feed = {}
        for name in self._base_inputs:
            if name == "input_ids":
                feed[name] = ids
            elif name == "position_ids":
                feed[name] = np.arange(start, start + n, dtype=np.int64)[None, :]
            elif name == "attention_mask":
                feed[name] = np.ones((1, n), np.int64)
            elif name == "token_type_ids":
                feed[name] = np.zeros((1, n), np.int64)
            else:
                raise GenerationError(f"the model takes an input '{name}' generation cannot "
                                      "feed (it feeds input_ids, attention_mask, position_ids)")
        return feed

    def _logits(self, ids: list[int], start: int) -> np.ndarray:
        """Last-position logits [V] for `ids` at positions start.. (cached path: the cache
        holds positions < start; uncached: start is 0 and ids is the whole sequence)."""
        feed = self._feed(np.asarray([ids], np.int64), start)
        if self.cache_spec is not None:
            feed.update(self._caches)
            feed[self.cache_spec.past_input] = np.array([start], np.int64)
        # straight to the core (TrainingSession.run checks and converts each of the 2·layers
        # cache inputs per call); the feed is already in the graph's dtypes, C-contiguous
        arrays = [feed[n] for n in self._session._input_names]
        key = (len(ids), start == 0)
        if key not in self._planned:
            from pyedge.progress import Phase
            self._planned.add(key)
            what = "the prompt" if start == 0 or self.cache_spec is None else "a decoding step"
            with Phase(f"planning {what} ({len(ids)} positions)"):
                out = self._session._sess.run(arrays, [self._output])[0]
        else:
            out = self._session._sess.run(arrays, [self._output])[0]
        return out[0, -1]

    def generate(self, prompt: str | None = None, *, ids: list[int] | None = None,
                 chat: bool = False, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None,
                 stream: Callable[[str], None] | None = None) -> Generation:
        """Continues `prompt` (or token `ids`); `stream(piece)` gets the text as it comes."""
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise GenerationError(f"temperature must be >= 0 and top_p in (0, 1], got "
                                  f"{temperature}, {top_p}")
        prompt_ids = list(ids) if ids is not None else self.encode(prompt or "", chat)
        if not prompt_ids:
            raise GenerationError("the prompt is empty (no tokens)")
        limit = self.max_positions
        if limit and len(prompt_ids) >= limit:
            raise GenerationError(f"the prompt has {len(prompt_ids)} tokens; the model takes at "
                                  f"most {limit} positions (shorten it)")
        total = len(prompt_ids) + max_new_tokens
        if limit:
            total = min(total, limit)
        if self.cache_spec is not None and total > self.cache_spec.max_len:
            self._rewrite_for_cache(-(-total // 256) * 256)
        # a cache used before needs no clearing: a step reads only rows < past + L, all
        # written by this generation
        rng = np.random.default_rng(seed)
        streamer = _Streamer(self, stream)
        out: list[int] = []
        t0 = time.perf_counter()
        logits = self._logits(prompt_ids, 0)
        prefill = time.perf_counter() - t0
        stamps = [t0 + prefill]
        stop = "length"
        while True:
            tok = _pick(logits, temperature, top_p, rng)
            out.append(tok)
            if tok in self.eos_ids:
                stop = "eos"
                break
            streamer.add(tok)
            if len(out) >= max_new_tokens:
                break
            if limit and len(prompt_ids) + len(out) >= limit:
                stop = "positions"
                break
            if self.cache_spec is not None:
                logits = self._logits([tok], len(prompt_ids) + len(out) - 1)
            else:
                logits = self._logits(prompt_ids + out, 0)
            stamps.append(time.perf_counter())
        streamer.flush()
        return Generation(text=self.decode(out), ids=out, prompt_ids=prompt_ids, stop=stop,
                          seconds=time.perf_counter() - t0, prefill_seconds=prefill,
                          cached=self.cache_spec is not None,
                          times=list(np.diff(stamps)))


def _pick(logits: np.ndarray, temperature: float, top_p: float, rng) -> int:
    """Greedy (temperature 0: the first maximum, as torch.argmax) or a sample from
    softmax(logits / temperature) restricted to the top-p nucleus."""
    if temperature <= 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = order[:int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(p.size, p=p))


class _Streamer:
    """Text as it becomes final: the decoded continuation minus what was already shown, held
    back while it ends inside a multi-byte character (decoded as U+FFFD)."""

    def __init__(self, gen: Generator, sink):
        self.gen, self.sink, self.ids, self.shown = gen, sink, [], 0

    def add(self, tok: int):
        self.ids.append(tok)
        if self.sink is None:
            return
        text = self.gen.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self._emit(text)

    def flush(self):
        if self.sink is not None and self.ids:
            self._emit(self.gen.decode(self.ids))

    def _emit(self, text):
        if len(text) > self.shown:
            self.sink(text[self.shown:])
            self.shown = len(text)


def generate(model, prompt: str, *, adapters=None, tokenizer=None, chat: bool = False,
             max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, threads: int | None = None, stream=None) -> str:
    """One-shot: the continuation of `prompt` (see Generator for repeated calls)."""
    gen = Generator(model, adapters=adapters, tokenizer=tokenizer, threads=threads)
    return gen.generate(prompt, chat=chat, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, seed=seed, stream=stream).text


def print_piece(piece: str) -> None:
    """A `stream` sink: the piece on stdout at once."""
    sys.stdout.write(piece)
    sys.stdout.flush()


__all__ = ["Generator", "Generation", "GenerationError", "generate", "keep_last_position",
           "print_piece"]
