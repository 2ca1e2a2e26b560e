"""A key/value cache for incremental decoding: an inference-only rewrite of a causal LM graph.

    spec = add_kv_cache(graph, max_len=256)     # after pyedge.fusions.fuse(graph)
    caches = spec.new_caches()                  # numpy buffers the caller owns
    feed = {..., "position_ids": [[p .. p+L-1]], spec.past_input: [p], **caches}

Why a graph rewrite: the decoder fusions (pyedge/attention_fusion.py) turn each layer's
attention into one ``pyedge.Attention(Q, K, V[, mask])`` whose K and V are the new positions'
keys and values after the rotary embedding, with the head split done and GQA not expanded.
Everything else in a Llama-family decoder is per position (embedding, norms, projections, MLP,
rotary with ``position_ids``), so replacing each such node with
``pyedge.CachedAttention(Q, K, V, cache_k, cache_v, past)`` (csrc/ops/cached_attention.cpp:
append K, V at rows [past, past+L) of the layer's cache, attend over rows 0..past+i) makes the
whole graph run on the L new positions only. The caches are graph inputs bound to the same
numpy arrays at every call (no copies: the core binds input memory), and ``past`` is a
one-element int64 input read at run time, so the plan for a decoding step ([1, 1] inputs) is
built once and reused for every token; the prefill ([1, P]) gets its own.

Sliding windows and soft-capping (Mistral, Gemma 2/3) go with each layer: an Attention's
``window`` and ``softcap`` attributes are copied to its CachedAttention (the window counted
at absolute positions, so a step attends to the last w cached rows); a mask input that is the
causal mask with a sliding window when ``attention_mask`` is all ones (how exports with an
attention_mask input spell it) gives the window the same way. The window is read from the
mask evaluated on the probe and, when it cuts nothing there, once more at a length past every
integer constant of the mask's subgraph (attention_fusion.window_probe_length): a window longer
than the probe would otherwise pass for the plain causal mask and let cached generation past
the window attend too far.

The rewrite refuses (NoCache, with the reason; generation then recomputes the prefix each
token) when: the graph has no ``position_ids`` input (the rotary angles would restart at 0),
no attention node was fused, an attention is neither causal nor masked by the causal mask
(with or without a sliding window; checked by evaluating the mask on a probe with
``attention_mask`` all ones), or the cache shapes cannot be found (from the graph's shapes or
config.json).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pyedge.graph import Graph, Node, ValueInfo

PAST_INPUT = "pyedge_past_length"
POSITIONS = "position_ids"


class NoCache(ValueError):
    """The graph cannot decode incrementally (the message says why)."""


@dataclass
class CacheSpec:
    past_input: str
    max_len: int
    batch: int
    # per attention layer: (cache_k input, cache_v input, kv heads, head size of K, of V)
    layers: list[tuple[str, str, int, int, int]] = field(default_factory=list)

    def new_caches(self) -> dict[str, np.ndarray]:
        """Zeroed cache buffers, by input name ([batch, kv heads, max_len, head size])."""
        out = {}
        for ck, cv, hkv, d, dv in self.layers:
            out[ck] = np.zeros((self.batch, hkv, self.max_len, d), np.float32)
            out[cv] = np.zeros((self.batch, hkv, self.max_len, dv), np.float32)
        return out

    @property
    def nbytes(self) -> int:
        return sum(4 * self.batch * self.max_len * hkv * (d + dv) for _, _, hkv, d, dv in self.layers)


def _attention_nodes(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if n.domain == "pyedge" and n.op_type == "Attention"]


def _cone(graph: Graph, names: list[str]) -> list[Node]:
    """The nodes `names` are computed by, in graph order (NoCache when one has no producer)."""
    producer = graph.producer_map()
    given = {v.name for v in graph.inputs}
    taken, stack, seen = set(), list(names), set()
    while stack:
        v = stack.pop()
        if v in seen or v in graph.initializers or v in given:
            continue
        seen.add(v)
        n = producer.get(v)
        if n is None:
            raise NoCache(f"value '{v}' has no producer")
        if id(n) not in taken:
            taken.add(id(n))
            stack.extend(i for i in n.inputs if i)
    return [n for n in graph.nodes if id(n) in taken]


def evaluate(graph: Graph, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The values `names` of `graph` computed from `feeds` (only the nodes they need)."""
    from pyedge import _core
    from pyedge.graph import to_core
    sub = Graph(nodes=_cone(graph, names),
                initializers=graph.initializers,
                inputs=[v for v in graph.inputs if v.name in feeds],
                outputs=[ValueInfo(nm, "float32", []) for nm in names], opsets=graph.opsets)
    sess = _core.Session(to_core(sub), [], "", {}, 0)
    return [np.asarray(a) for a in sess.run([feeds[v.name] for v in sub.inputs], list(names))]


def _probe_feeds(graph: Graph, n: int) -> dict[str, np.ndarray]:
    feeds = {}
    for v in graph.inputs:
        if v.name == POSITIONS:
            feeds[v.name] = np.arange(n, dtype=v.dtype)[None, :]
        elif v.name == "attention_mask":
            feeds[v.name] = np.ones((1, n), v.dtype)
        elif len(v.shape) == 2:
            feeds[v.name] = np.zeros((1, n), v.dtype)
    return feeds


def probe_values(graph: Graph, n: int = 7) -> dict[str, np.ndarray]:
    """Every intermediate value for one probe input of n positions (batch 1, attention_mask
    all ones), as the core computes it: one forward pass over tiny activations."""
    from pyedge import _core
    from pyedge.graph import to_core
    feeds = _probe_feeds(graph, n)
    missing = [v.name for v in graph.inputs if v.name not in feeds]
    if missing:
        raise NoCache(f"no probe value for input(s) {missing}")
    names = [o for nd in graph.nodes for o in nd.outputs if o]
    try:
        sess = _core.Session(to_core(graph), [], "", {}, 0)
        arrays = sess.run([feeds[v.name] for v in graph.inputs], names)
    except Exception as e:  # noqa: BLE001 - a graph the probe cannot run: no cache
        raise NoCache(f"the probe run failed ({str(e).splitlines()[0]})") from None
    return dict(zip(names, arrays))


def fuse_attention_with_probe_shapes(graph: Graph, values: dict[str, np.ndarray],
                                     n: int = 7) -> int:
    """Fuses the SDPA decomposition of an export with symbolic shapes (the importer keeps them
    as -1, and decoder_fusions matches static shapes only) by matching against the concrete
    shapes of a probe run of n positions (`values`). The fused pyedge.Attention itself takes
    any shapes; what the match fixed (scale, head layout) does not depend on the sequence
    length. Returns the number of attention nodes fused. A fallback: the decoder fusions
    match symbolic shapes themselves (pyedge/attention_fusion.py); this catches what they
    miss (and is how generation ran on dynamic exports before they did)."""
    from pyedge.attention_fusion import fuse_decoder_attention as fuse_attention
    saved_shapes, saved_inputs = graph.value_shapes, [list(v.shape) for v in graph.inputs]
    graph.value_shapes = {**saved_shapes, **{k: list(a.shape) for k, a in values.items()}}
    for v in graph.inputs:
        if v.name in ("input_ids", "attention_mask", POSITIONS):
            v.shape = [1, n]
    try:
        return fuse_attention(graph)
    finally:
        graph.value_shapes = saved_shapes
        for v, s in zip(graph.inputs, saved_inputs):
            v.shape = s


def _unrepeated(producer, value: str, axis: int, values: dict[str, np.ndarray]) -> str:
    """The key/value heads before transformers' repeat_kv (Unsqueeze → Expand → Reshape, with
    Identity and whole-tensor Slices between, as exporters write it) when `value` is their
    repetition along `axis`, checked on the probe's numbers; else `value`. The cache then
    keeps Hkv heads, not H."""
    b = values.get(value)
    v, n = value, producer.get(value)
    for _ in range(8):  # up the chain of shape-only ops
        if n is None or n.op_type not in ("Reshape", "Identity", "Expand", "Slice", "Unsqueeze") \
                or n.domain not in ("", "ai.onnx"):
            return value
        v = n.inputs[0]
        a = values.get(v)
        if b is not None and a is not None and a.ndim == 4 and b.ndim == 4 \
                and a.shape[axis] < b.shape[axis] and b.shape[axis] % a.shape[axis] == 0 \
                and np.array_equal(np.repeat(a, b.shape[axis] // a.shape[axis], axis=axis), b):
            return v
        n = producer.get(v)
    return value


def _causal_mask_windows(graph: Graph, masks: list[str]) -> dict[str, int]:
    """Each mask, computed for a probe of n positions with attention_mask all ones, must be the
    causal one (0 where key j <= query i, below -1e30 elsewhere), or the causal one with a
    sliding window (0 only where i − w < j <= i). Returns each mask's window (0: none); a
    window longer than the probe is looked for at a length past the integer constants of the
    mask's subgraph (NoCache when that is too long to evaluate)."""
    from pyedge.attention_fusion import causal_band_width, window_probe_length

    def band(names: list[str], n: int) -> dict[str, int]:
        computed = [m for m in names if m not in graph.initializers]
        try:
            values = evaluate(graph, computed, _probe_feeds(graph, n)) if computed else []
        except NoCache:
            raise
        except Exception as e:  # noqa: BLE001 - any failure: the mask cannot be shown causal
            raise NoCache(f"the attention mask cannot be evaluated ({str(e).splitlines()[0]})") \
                from None
        values = dict(zip(computed, values))
        out = {}
        for name in names:
            val = np.asarray(graph.initializers[name] if name in graph.initializers
                             else values[name])
            # an exporter's mask may also be below -1e30 but above -1e37 (finfo.min / 2 ...)
            val = np.where(val < -1e30, np.float32(-3.4e38), val).astype(np.float32) \
                if val.dtype.kind == "f" else val
            w = causal_band_width(val, n, n)
            if w is None:
                raise NoCache(f"attention mask '{name}' is not the causal mask (with or without "
                              "a sliding window): prefix-LM or bidirectional attention")
            out[name] = w
        return out

    n = 5
    windows = band(masks, n)
    uncut = [m for m in masks if windows[m] >= n]
    for name in uncut:
        windows[name] = 0
        length = window_probe_length(graph, _cone(graph, [name]), n)
        if length is None:
            raise NoCache(f"attention mask '{name}' may have a sliding window longer than can "
                          "be checked")
        if length:
            w = band([name], length)[name]
            windows[name] = 0 if w >= length else w
    return windows


def _kv_dims(graph: Graph, node: Node, config: dict | None,
             values: dict | None = None) -> tuple[int, int, int]:
    """(kv heads, head size of K, of V) of an Attention node: from the probe's or the graph's
    shapes, else from config.json."""
    layout = node.attrs.get("layout", "bhld")
    dims = []
    for v in node.inputs[1:3]:
        s = list(values[v].shape) if values is not None and v in values \
            else graph.value_shapes.get(v)
        if s is not None and len(s) == 4:
            dims.append((s[2] if layout == "blhd" else s[1], s[3]))
        else:
            dims.append((-1, -1))
    (hk, d), (hv, dv) = dims
    if min(hk, d, dv) > 0 and hk == hv:
        return hk, d, dv
    c = config or {}
    c = c.get("text_config", c) if isinstance(c.get("text_config"), dict) else c
    heads = c.get("num_attention_heads")
    hkv = c.get("num_key_value_heads") or heads
    hd = c.get("head_dim") or (c["hidden_size"] // heads if heads and c.get("hidden_size") else None)
    if not (isinstance(hkv, int) and isinstance(hd, int)):
        raise NoCache(f"the key/value shapes of '{node.name}' are not in the graph and "
                      "config.json does not give num_key_value_heads/head_dim")
    return hkv, (d if d > 0 else hd), (dv if dv > 0 else hd)


def add_kv_cache(graph: Graph, max_len: int, batch: int = 1, config: dict | None = None) -> CacheSpec:
    """Rewrites `graph` (fused, in place) for incremental decoding; returns what to feed.
    Raises NoCache, leaving the graph unchanged, when it cannot."""
    names = {v.name for v in graph.inputs}
    if POSITIONS not in names:
        raise NoCache("the model has no position_ids input (export it again with "
                      "pyedge export --hf, which adds one)")
    nodes = _attention_nodes(graph)
    values = None
    if not nodes:
        values = probe_values(graph)
        probe = graph.copy()
        if fuse_attention_with_probe_shapes(probe, values):
            graph.nodes, graph.initializers = probe.nodes, probe.initializers
            nodes = _attention_nodes(graph)
    if not nodes:
        raise NoCache("no attention was fused into pyedge.Attention")
    producer = graph.producer_map()
    if any(producer.get(i) is not None and producer[i].op_type == "Reshape"
           for n in nodes for i in n.inputs[1:3]):
        values = values if values is not None else probe_values(graph)
        for n in nodes:  # K, V before repeat_kv
            axis = 2 if n.attrs.get("layout") == "blhd" else 1
            n.inputs[1:3] = [_unrepeated(producer, i, axis, values) for i in n.inputs[1:3]]
    masks = []
    for n in nodes:
        mask = n.inputs[3] if len(n.inputs) > 3 else ""
        if mask:
            masks.append(mask)
        elif not int(n.attrs.get("causal", 0)):
            raise NoCache(f"attention '{n.name}' is not causal")
    windows = _causal_mask_windows(graph, sorted(set(masks))) if masks else {}
    spec = CacheSpec(PAST_INPUT, int(max_len), int(batch))
    replace = {}
    for i, n in enumerate(nodes):
        hkv, d, dv = _kv_dims(graph, n, config, values)
        ck, cv = f"pyedge_cache_k_{i}", f"pyedge_cache_v_{i}"
        spec.layers.append((ck, cv, hkv, d, dv))
        attrs = {k: n.attrs[k] for k in ("scale", "layout", "out_layout", "window", "softcap")
                 if k in n.attrs}
        mask = n.inputs[3] if len(n.inputs) > 3 else ""
        if mask and windows.get(mask):
            attrs["window"] = int(windows[mask])
        replace[id(n)] = Node("CachedAttention", list(n.inputs[:3]) + [ck, cv, PAST_INPUT],
                              list(n.outputs), name=f"{n.name}_cached", domain="pyedge",
                              attrs=attrs)
    graph.nodes = [replace.get(id(n), n) for n in graph.nodes]
    for ck, cv, hkv, d, dv in spec.layers:
        graph.inputs.append(ValueInfo(ck, "float32", [batch, hkv, spec.max_len, d]))
        graph.inputs.append(ValueInfo(cv, "float32", [batch, hkv, spec.max_len, dv]))
    graph.inputs.append(ValueInfo(PAST_INPUT, "int64", [1]))
    graph.opsets.setdefault("pyedge", 1)
    return spec


__all__ = ["add_kv_cache", "CacheSpec", "NoCache", "PAST_INPUT", "evaluate"]
