"""Quantize an ONNX model's frozen linear weights to 4 or 8 bits (numpy only: runs on the device).

    report = pyedge.quantize("model.onnx", "model-q4.onnx", bits=4, group_size=64)

The output is a standard ONNX file in ONNX Runtime's own formats, so onnxruntime runs it for
inference and pyedge trains LoRA adapters on it (the quantized weights stay frozen and packed).

What becomes what
-----------------
A *linear weight* is a 2-D float initializer W read by ``MatMul(x, W)``, by
``MatMul(x, Transpose(W))`` (how pyedge's and torch's exports write nn.Linear; ORT's own
quantizers skip this form), or by ``Gemm(x, W[, bias])`` (transA=0, alpha=1, beta=1).

* ``bits=4`` (``scheme="int"``): ``com.microsoft.MatMulNBits`` with blocks of ``group_size``
  (default 64) values along K, asymmetric with zero points unless ``symmetric=True``. The
  packed bytes, scales and zero points equal ORT's ``matmul_nbits_quantizer`` for the same
  weight and settings (same rounding, same padding), so the two are interchangeable.
* ``scheme="nf4"`` (or ``"fp4"``): ``com.microsoft.MatMulBnb4`` (QLoRA's NormalFloat-4,
  absmax per block of ``group_size`` values of the [N, K] weight), equal to ORT's
  ``matmul_bnb4_quantizer``.
* ``bits=8`` with a ``group_size``: ``MatMulNBits`` bits=8, block-wise.
* ``bits=8`` without ``group_size`` (the default for 8 bits): **per output channel,
  symmetric** int8: W is replaced by ``DequantizeLinear(W_Q8 int8, scale [N], axis)`` whose
  output keeps W's name, so every reader of W (the Transpose, the MatMul, a tied Gather) is
  unchanged. Why not ``MatMulNBits`` with block_size = K: ORT requires a power-of-two
  block_size >= 16, so that file would not run in onnxruntime for most K; the QDQ form is
  plain ONNX (opset >= 13), ORT runs it (and fuses it into an int8 GEMM where it can), and
  pyedge's import turns it into ``MatMulNBits(bits=8, block_size=K)`` for its core, which
  accepts any block size. scale = max|w_row| / 127, q = round(w / scale) in [-127, 127].

Embeddings and the LM head (opt-in, ``include=("embeddings", "lm_head")``)
----------------------------------------------------------------------------
* ``"lm_head"``: the output projection (a linear weight whose module is ``lm_head``, or whose
  node produces a graph output, or which is tied to a Gather) is left float by default, as
  QLoRA and PEFT's all-linear do. Included, it is quantized like the other layers; a *tied*
  head gets its own quantized copy (the float table stays for the embedding Gather unless
  "embeddings" is included too), and in 8-bit per-channel mode both share one int8 table.
* ``"embeddings"`` with the ``MatMulNBits`` format (``bits=4``, or ``bits=8`` with a group
  size) and a row length that the group size divides: tables read by ``Gather`` (axis 0)
  become ``com.microsoft.GatherBlockQuantized`` (ORT's quantized embedding: data uint8
  [V, D·bits/8], scales [V, n_blocks], zero points packed like MatMulNBits'), the same
  bytes MatMulNBits would hold for the table; pyedge's core gathers and dequantizes only the
  looked-up rows, so the table stays packed in memory. A *tied* table whose head is
  quantized too (``include=("embeddings", "lm_head")``) is stored once: the head's
  MatMulNBits B [V, n_blocks, blob] is read by the GatherBlockQuantized through
  ``Reshape(B, [0, -1])`` (ORT wants its data 2-D, MatMulNBits its B 3-D), which pyedge's
  import drops so both ops read one buffer.
* ``"embeddings"`` otherwise (nf4/fp4, 8-bit per channel, a group size that does not divide
  D, or a tied table whose head stays float): int8 per row (symmetric)
  ``DequantizeLinear`` -> Gather, which ONNX Runtime runs as it is and pyedge's import turns
  into a packed 8-bit GatherBlockQuantized (one block per row; the tied head's MatMulNBits
  bytes when the head reads the same int8 table). nf4/fp4 tables read by a Gather stay float.

The parameter map (``pyedge.param_map`` in metadata_props) moves to the quantized tensors
(``W_Q4`` -> the module of W, with ``"quantized": {...}``), so LoRA still targets ``q_proj``;
initializer and node names follow ORT's quantizer (``W_Q4``, ``W_scales``,
``W_zero_points``, node ``name_Q4``), from which pyedge recovers module names when a file
carries no map. ``pyedge.quantization`` records the settings.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from pyedge.quant_formats import QUANT_TYPES, quantize_bnb4, quantize_nbits

MS = "com.microsoft"
QUANT_META_KEY = "pyedge.quantization"
PARAM_MAP_KEY = "pyedge.param_map"
INCLUDES = ("embeddings", "lm_head")


@dataclasses.dataclass
class QuantizedLayer:
    name: str            # PyTorch module (or the ONNX weight name when unknown)
    weight: str          # the float initializer that was replaced
    format: str          # MatMulNBits | MatMulBnb4 | DequantizeLinear
    bits: int
    block_size: int      # 0: per output channel
    shape: list          # [N, K] (out, in)
    bytes_before: int
    bytes_after: int


@dataclasses.dataclass
class QuantizeReport:
    layers: list = dataclasses.field(default_factory=list)      # QuantizedLayer
    skipped: list = dataclasses.field(default_factory=list)     # (weight, reason)
    settings: dict = dataclasses.field(default_factory=dict)

    @property
    def bytes_before(self) -> int:
        return sum(q.bytes_before for q in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(q.bytes_after for q in self.layers)

    def summary(self) -> str:
        return (f"quantized {len(self.layers)} weights ({self.settings.get('label', '')}): "
                f"{_fmt_bytes(self.bytes_before)} -> {_fmt_bytes(self.bytes_after)}; "
                f"{len(self.skipped)} left float")

    def lines(self) -> list[str]:
        """One line per layer, then what stayed float, then the totals."""
        out = []
        for q in self.layers:
            block = f"blocks of {q.block_size}" if q.block_size else "per channel"
            out.append(f"  {q.name}  {q.format} {q.bits}-bit {block}  [{q.shape[0]}, "
                       f"{q.shape[1]}]  {_fmt_bytes(q.bytes_before)} -> "
                       f"{_fmt_bytes(q.bytes_after)}")
        for w, why in self.skipped:
            out.append(f"  {w}  left float: {why}")
        out.append(self.summary())
        return out


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def parse_spec(spec) -> dict:
    """'4' | '8' | 'nf4' | 'fp4' (the CLI's --quantize) -> quantize_model keyword arguments."""
    s = str(spec).strip().lower()
    if s in ("4", "8"):
        return {"bits": int(s)}
    if s in QUANT_TYPES:
        return {"scheme": s}
    raise ValueError(f"--quantize must be 4, 8, nf4 or fp4, got '{spec}'")


def load_quantized(path, spec, **kw):
    """The pyedge Graph of `path` quantized in memory (``pyedge train --quantize``);
    returns (graph, report)."""
    import onnx

    from pyedge.onnx_import import load_onnx
    proto, report = quantize_model(onnx.load(os.fspath(path)), copy=False,
                                   **{**parse_spec(spec), **kw})
    return load_onnx(proto), report


def _settings(bits, group_size, scheme, symmetric):
    scheme = scheme.lower()
    if scheme in QUANT_TYPES:  # nf4 / fp4
        if bits not in (4, None):
            raise ValueError(f"scheme '{scheme}' is 4-bit; got bits={bits}")
        bits, gs = 4, group_size or 64
        if symmetric is False:
            raise ValueError(f"scheme '{scheme}' is symmetric (absmax) by construction")
        return {"format": "MatMulBnb4", "bits": 4, "block_size": gs, "scheme": scheme,
                "quant_type": QUANT_TYPES[scheme], "symmetric": True,
                "label": f"{scheme}, blocks of {gs}"}
    if scheme != "int":
        raise ValueError(f"unknown scheme '{scheme}'; choose int, nf4 or fp4")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if bits == 8 and not group_size:
        if symmetric is False:
            raise ValueError("8-bit per-channel quantization is symmetric; give a group size "
                             "for asymmetric 8-bit blocks")
        return {"format": "DequantizeLinear", "bits": 8, "block_size": 0, "scheme": "int",
                "symmetric": True, "label": "int8 per output channel, symmetric"}
    gs = group_size or 64
    sym = bool(symmetric) if symmetric is not None else False
    return {"format": "MatMulNBits", "bits": bits, "block_size": gs, "scheme": "int",
            "symmetric": sym, "label": f"int{bits}, blocks of {gs}, "
                                       f"{'symmetric' if sym else 'zero points'}"}


def _check_group_size(gs):
    if gs is not None and (gs < 16 or gs & (gs - 1)):
        raise ValueError(f"group size must be a power of two >= 16 (ORT's rule), got {gs}")


def quantize(in_path, out_path, bits: int = 4, group_size: int | None = None,
             scheme: str = "int", include=(), symmetric: bool | None = None,
             exclude=()) -> QuantizeReport:
    """Reads `in_path`, writes the quantized model to `out_path`; returns the report (which
    layers, formats, bytes before/after, what stayed float and why)."""
    import onnx

    from pyedge.export.merge import _save_atomic
    proto = onnx.load(os.fspath(in_path))
    proto, report = quantize_model(proto, bits, group_size, scheme, include, symmetric, exclude,
                                   copy=False)
    _save_atomic(proto, os.fspath(out_path), external=proto.ByteSize() > 1_800_000_000)
    return report


def quantize_model(proto, bits: int = 4, group_size: int | None = None, scheme: str = "int",
                   include=(), symmetric: bool | None = None, exclude=(), only=None,
                   copy: bool = True):
    """(quantized ModelProto, QuantizeReport); see the module docstring.
    `exclude`: module/weight name patterns left float; `only`: if given, the set of weight
    initializers to quantize (merge re-quantizes the merged ones only); copy=False edits
    `proto` itself (no second copy of a large model's weights in memory)."""
    import onnx

    unknown = set(include) - set(INCLUDES)
    if unknown:
        raise ValueError(f"include: unknown {sorted(unknown)}; choose from {list(INCLUDES)}")
    _check_group_size(group_size)
    st = _settings(bits, group_size, scheme, symmetric)
    out = proto
    if copy:
        out = onnx.ModelProto()
        out.CopyFrom(proto)
    return out, _Rewriter(out, st, set(include), list(exclude), only).run()


class _Rewriter:
    """One pass over a ModelProto's graph (edited in place)."""

    def __init__(self, proto, st, include, exclude, only=None):
        from onnx import numpy_helper
        self.np_helper = numpy_helper
        self.proto, self.g, self.st = proto, proto.graph, st
        self.include, self.exclude = include, exclude
        self.inits = {t.name: t for t in self.g.initializer}
        meta = {p.key: p.value for p in proto.metadata_props}
        try:
            self.param_map = json.loads(meta.get(PARAM_MAP_KEY, "{}"))
        except ValueError:
            self.param_map = {}
        self.had_map = PARAM_MAP_KEY in meta
        self.report = QuantizeReport(settings={k: v for k, v in st.items()})
        self.outputs = {o.name for o in self.g.output}
        self._extra_after = {}  # node name -> nodes to insert right after it
        self.only = None if only is None else set(only)
        # weight read as [N, K] as stored -> (packed, scales, zero points or "") of matmul_op
        self.packed_of = {}
        self.taken = set(self.inits) | {o for n in self.g.node for o in n.output} | \
            {i.name for i in self.g.input}

    # --- helpers --------------------------------------------------------------------------
    def fresh(self, base):
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name

    def array(self, name):
        return self.np_helper.to_array(self.inits[name])

    def add_init(self, arr, base):
        name = self.fresh(base)
        self.g.initializer.append(self.np_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def module(self, w):
        e = self.param_map.get(w)
        return e["module"] if e and e.get("module") else w

    def consumers(self):
        cons = {}
        for n in self.g.node:
            for i in n.input:
                if i:
                    cons.setdefault(i, []).append(n)
        return cons

    def excluded(self, w):
        from pyedge.adapters.patterns import any_match
        return any_match(self.module(w), self.exclude) or any_match(w, self.exclude)

    # --- linear sites ---------------------------------------------------------------------
    def linear_sites(self):
        """({weight: [(reader, weight read as [N, K], Transpose node or None)]} for eligible
        MatMul/Gemm readers, {weight: [other reader nodes]}), for 2-D float initializers."""
        cons = self.consumers()
        sites, other = {}, {}
        for name, t in self.inits.items():
            if t.data_type not in (1, 10) or len(t.dims) != 2:  # float / float16, 2-D
                continue
            for c in cons.get(name, []):
                site = self._linear_reader(c, name, cons)
                if site is None:
                    other.setdefault(name, []).append(c)
                else:
                    sites.setdefault(name, []).extend(site)
        return sites, other

    def _linear_reader(self, node, w, cons):
        attr = {a.name: a for a in node.attribute}
        if node.op_type == "Transpose" and node.domain in ("", "ai.onnx"):
            perm = list(attr["perm"].ints) if "perm" in attr else [1, 0]
            readers = cons.get(node.output[0], [])
            if perm != [1, 0] or not readers:
                return None
            out = []
            for r in readers:
                s = self._direct(r, node.output[0], True)
                if s is None:
                    return None
                out.append((r, s, node))
            return out
        s = self._direct(node, w, False)
        return None if s is None else [(node, s, None)]

    def _direct(self, node, value, transposed):
        """True/False: the weight as read is [N, K] / [K, N]; None: not an eligible reader."""
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2 or node.input[1] != value \
                or node.input[0] == value:
            return None
        if node.op_type == "MatMul":
            return transposed
        if node.op_type == "Gemm":
            a = {x.name: x for x in node.attribute}
            if (a["transA"].i if "transA" in a else 0) or \
                    (a["alpha"].f if "alpha" in a else 1.0) != 1.0:
                return None
            if len(node.input) > 2 and node.input[2]:
                c = self.inits.get(node.input[2])
                if c is None or len(c.dims) != 1 or (a["beta"].f if "beta" in a else 1.0) != 1.0:
                    return None
            return transposed != bool(a["transB"].i if "transB" in a else 0)
        return None

    def is_head(self, w, readers, others):
        mod = self.module(w)
        if mod == "lm_head" or mod.endswith(".lm_head"):
            return True
        if any(n.op_type == "Gather" for n in others.get(w, [])):
            return True  # tied with an embedding Gather
        return any(set(n.output) & self.outputs for n, _, _ in readers)

    # --- run --------------------------------------------------------------------------------
    def run(self) -> QuantizeReport:
        sites, others = self.linear_sites()
        gathers = self.embedding_tables()
        remove_inits, remove_nodes, new_nodes_before = set(), set(), {}
        for w, readers in sites.items():
            if self.only is not None and w not in self.only:
                continue
            if self.excluded(w):
                self.report.skipped.append((w, "excluded"))
                continue
            odd = sorted({n.op_type for n in others.get(w, []) if n.op_type != "Gather"})
            if odd:
                self.report.skipped.append((w, f"also read by {', '.join(odd)}"))
                continue
            if self.is_head(w, readers, others) and "lm_head" not in self.include:
                self.report.skipped.append((w, "LM head / output layer (include 'lm_head' to "
                                               "quantize it)"))
                continue
            arr = self.array(w)
            nk = readers[0][1]
            if any(r[1] != nk for r in readers):
                self.report.skipped.append((w, "read in two layouts"))
                continue
            w_nk = arr if nk else arr.T
            if self.st["format"] == "DequantizeLinear":
                self.dequantize_linear(w, w_nk, nk, readers, others, gathers, new_nodes_before)
                if not others.get(w) or (w in gathers and "embeddings" in self.include):
                    remove_inits.add(w)
                continue
            self.matmul_op(w, w_nk, readers, remove_nodes)
            if not others.get(w):
                remove_inits.add(w)
        # embedding tables not handled above
        if "embeddings" in self.include:
            for w in gathers:
                if w in remove_inits:
                    continue
                if others.get(w) and any(n.op_type != "Gather" for n in others[w]):
                    self.report.skipped.append((w, "embedding table with other readers"))
                    continue
                tied = w in self.packed_of  # its head became MatMulNBits on the same rows
                packed_ok = self.st["format"] == "MatMulNBits" and \
                    self.inits[w].dims[1] % self.st["block_size"] == 0
                if packed_ok and (tied or not sites.get(w)):
                    self.gather_block_quantized(w, others[w], tied, new_nodes_before)
                    remove_inits.add(w)
                    continue
                if tied or any(q.weight == w for q in self.report.layers):
                    continue  # the quantized head has its own copy; the float table stays
                self.embedding(w, new_nodes_before)
                remove_inits.add(w)
        self.finish(remove_inits, remove_nodes, new_nodes_before)
        return self.report

    def embedding_tables(self):
        out = set()
        for n in self.g.node:
            if n.op_type == "Gather" and n.domain in ("", "ai.onnx") and n.input[0] in self.inits:
                axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
                t = self.inits[n.input[0]]
                if axis == 0 and len(t.dims) == 2 and t.data_type in (1, 10):
                    out.add(n.input[0])
        return out

    def _record(self, w, fmt, bits, bs, shape, before, after_arrays):
        after = int(sum(a.nbytes for a in after_arrays if a is not None))
        self.report.layers.append(QuantizedLayer(self.module(w), w, fmt, bits, bs,
                                                 [int(s) for s in shape], int(before), after))

    def _map_entry(self, w, qname, info):
        e = dict(self.param_map.get(w) or {})
        if not e:
            return
        e["transposed"] = False
        e["quantized"] = info
        self.param_map[qname] = e

    def matmul_op(self, w, w_nk, readers, remove_nodes):
        """MatMulNBits / MatMulBnb4 nodes replacing the readers of w."""
        from onnx import helper
        st = self.st
        N, K = w_nk.shape
        dtype = np.float16 if self.inits[w].data_type == 10 else np.float32
        before = w_nk.size * np.dtype(dtype).itemsize
        if st["format"] == "MatMulBnb4":
            packed, absmax = quantize_bnb4(w_nk, st["block_size"], st["quant_type"])
            qn = self.add_init(packed, f"{w}_Bnb4")
            q_inputs = [qn, self.add_init(absmax.astype(dtype), f"{w}_absmax")]
            attrs = {"K": K, "N": N, "block_size": st["block_size"],
                     "quant_type": st["quant_type"]}
            suffix, arrays = "_Bnb4", [packed, absmax.astype(dtype)]
        else:
            packed, scales, zp = quantize_nbits(w_nk, st["bits"], st["block_size"],
                                                st["symmetric"])
            qn = self.add_init(packed, f"{w}_Q{st['bits']}")
            q_inputs = [qn, self.add_init(scales.astype(dtype), f"{w}_scales")]
            if zp is not None:
                q_inputs.append(self.add_init(zp, f"{w}_zero_points"))
            attrs = {"K": K, "N": N, "bits": st["bits"], "block_size": st["block_size"]}
            suffix, arrays = f"_Q{st['bits']}", [packed, scales.astype(dtype), zp]
        info = {"op": st["format"], **attrs, "symmetric": st["symmetric"]}
        if st["format"] == "MatMulNBits" and readers[0][1]:  # packed rows = the table's rows
            self.packed_of[w] = (qn, q_inputs[1], q_inputs[2] if len(q_inputs) > 2 else "")
        self._map_entry(w, qn, info)
        self._record(w, st["format"], st["bits"], st["block_size"], (N, K), before, arrays)
        for node, _, tnode in readers:
            inputs = [node.input[0]] + q_inputs
            if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
                if st["format"] == "MatMulBnb4":
                    # MatMulBnb4 has no bias input: add it after
                    out = self.fresh(node.output[0] + "_nobias")
                    q = helper.make_node("MatMulBnb4", inputs, [out], name=self.fresh(
                        (node.name or w) + suffix), domain=MS, **attrs)
                    add = helper.make_node("Add", [out, node.input[2]], [node.output[0]],
                                           name=self.fresh((node.name or w) + "_bias"))
                    node.CopyFrom(q)
                    self._extra_after.setdefault(q.name, []).append(add)
                    continue
                inputs = inputs + [""] * (5 - len(inputs)) + [node.input[2]]
            q = helper.make_node(st["format"], inputs, list(node.output),
                                 name=self.fresh((node.name or w) + suffix), domain=MS, **attrs)
            node.CopyFrom(q)
            if tnode is not None:
                remove_nodes.add(tnode.output[0])

    def dequantize_linear(self, w, w_nk, nk, readers, others, gathers, new_nodes_before):
        """int8 per output channel: DequantizeLinear(W_Q8, scale, axis) -> (name of W)."""
        from onnx import helper
        tied_emb = w in gathers and "embeddings" in self.include
        q, s = _int8_per_row(w_nk)
        dtype = np.float16 if self.inits[w].data_type == 10 else np.float32
        stored = q if nk else q.T         # the int8 table in W's own layout
        qn = self.add_init(np.ascontiguousarray(stored), f"{w}_Q8")
        sn = self.add_init(s.astype(dtype), f"{w}_scales")
        everyone = not others.get(w) or tied_emb
        out = w if everyone else self.fresh(f"{w}_dequantized")
        node = helper.make_node("DequantizeLinear", [qn, sn], [out],
                                name=self.fresh(f"{w}_DequantizeLinear"), axis=0 if nk else 1)
        new_nodes_before.setdefault("__front__", []).append(node)
        if not everyone:
            for r, _, tnode in readers:
                tgt = tnode if tnode is not None else r
                for i, x in enumerate(tgt.input):
                    if x == w:
                        tgt.input[i] = out
        N, K = w_nk.shape
        self._map_entry(w, qn, {"op": "DequantizeLinear", "bits": 8, "axis": 0 if nk else 1,
                                "K": int(K), "N": int(N), "symmetric": True})
        self._record(w, "DequantizeLinear", 8, 0, (N, K), w_nk.size * np.dtype(dtype).itemsize,
                     [stored, s.astype(dtype)])

    def gather_block_quantized(self, w, gathers, tied, new_nodes_before):
        """Gather(table, ids) -> com.microsoft.GatherBlockQuantized on the packed table (the
        tied head's own packed bytes when `tied`)."""
        from onnx import helper
        table = self.array(w)
        V, D = table.shape
        st = self.st
        before = table.size * table.dtype.itemsize
        front = []
        if tied:
            qn, sn, zn = self.packed_of[w]
            shape = self.add_init(np.array([0, -1], np.int64), f"{w}_gather_shape")
            data = self.fresh(f"{qn}_rows")
            front.append(helper.make_node("Reshape", [qn, shape], [data],
                                          name=self.fresh(f"{w}_gather_Reshape")))
            arrays = []  # no bytes of its own
        else:
            packed, scales, zp = quantize_nbits(table, st["bits"], st["block_size"],
                                                st["symmetric"])
            dtype = table.dtype
            data = self.add_init(packed.reshape(V, -1), f"{w}_Q{st['bits']}G")
            sn = self.add_init(scales.reshape(V, -1).astype(dtype), f"{w}_scales")
            zn = self.add_init(zp.reshape(V, -1), f"{w}_zero_points") if zp is not None else ""
            arrays = [packed, scales.astype(dtype), zp]
            self._map_entry(w, data, {"op": "GatherBlockQuantized", "bits": st["bits"],
                                      "block_size": st["block_size"], "K": int(D), "N": int(V),
                                      "symmetric": st["symmetric"], "embedding": True})
        new_nodes_before.setdefault("__front__", []).extend(front)
        for g in gathers:
            ins = [data, g.input[1], sn] + ([zn] if zn else [])
            g.CopyFrom(helper.make_node("GatherBlockQuantized", ins, list(g.output),
                                        name=self.fresh((g.name or w) + f"_Q{st['bits']}"),
                                        domain=MS, bits=st["bits"], block_size=st["block_size"],
                                        gather_axis=0, quantize_axis=1))
        # a tied table's bytes were counted with its head
        self._record(w, "GatherBlockQuantized", st["bits"], st["block_size"], (V, D),
                     0 if tied else before, arrays)

    def embedding(self, w, new_nodes_before):
        from onnx import helper
        table = self.array(w)
        dtype = table.dtype
        q, s = _int8_per_row(table)
        qn = self.add_init(q, f"{w}_Q8")
        sn = self.add_init(s.astype(dtype), f"{w}_scales")
        node = helper.make_node("DequantizeLinear", [qn, sn], [w],
                                name=self.fresh(f"{w}_DequantizeLinear"), axis=0)
        new_nodes_before.setdefault("__front__", []).append(node)
        self._map_entry(w, qn, {"op": "DequantizeLinear", "bits": 8, "axis": 0,
                                "K": int(table.shape[1]), "N": int(table.shape[0]),
                                "symmetric": True, "embedding": True})
        self._record(w, "DequantizeLinear", 8, 0, table.shape, table.nbytes, [q, s.astype(dtype)])

    def finish(self, remove_inits, remove_nodes, new_nodes_before):
        import onnx
        cons = self.consumers()
        # Transposes that fed a quantized reader only
        dead_t = {o for o in remove_nodes if not cons.get(o)}
        nodes = list(new_nodes_before.get("__front__", []))
        for n in self.g.node:
            if n.op_type == "Transpose" and n.output[0] in dead_t:
                continue
            nodes.append(n)
            nodes.extend(self._extra_after.pop(n.name, []))
        self.g.ClearField("node")
        self.g.node.extend(nodes)
        # removed weights have no reader left, or a DequantizeLinear now produces their name
        keep = [t for t in self.g.initializer if t.name not in remove_inits]
        self.g.ClearField("initializer")
        self.g.initializer.extend(keep)
        for name in remove_inits:
            self.param_map.pop(name, None)
        ins = [i for i in self.g.input if i.name not in remove_inits]
        self.g.ClearField("input")
        self.g.input.extend(ins)
        if not any(o.domain == MS for o in self.proto.opset_import) and \
                self.st["format"] != "DequantizeLinear":
            self.proto.opset_import.append(onnx.helper.make_opsetid(MS, 1))
        if self.st["format"] == "DequantizeLinear" or "embeddings" in self.include:
            v = next((o.version for o in self.proto.opset_import if o.domain in ("", "ai.onnx")), 0)
            if v < 13:
                raise ValueError(f"per-axis DequantizeLinear needs opset >= 13, the model has {v}; "
                                 "give a group size (MatMulNBits) instead")
        meta = {p.key: p for p in self.proto.metadata_props}
        if self.had_map:
            meta[PARAM_MAP_KEY].value = json.dumps(self.param_map, sort_keys=True)
        settings = {k: v for k, v in self.st.items() if k != "label"}
        settings["include"] = sorted(self.include)
        if QUANT_META_KEY in meta:
            meta[QUANT_META_KEY].value = json.dumps(settings, sort_keys=True)
        else:
            self.proto.metadata_props.add(key=QUANT_META_KEY,
                                          value=json.dumps(settings, sort_keys=True))
        self.report.settings = {**self.report.settings, **settings}


def _int8_per_row(w: np.ndarray):
    """Symmetric int8 per row: (q int8 [R, C], scale float32 [R]); q = round(w / s),
    s = max|w_row| / 127 (1 for an all-zero row)."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=1)
    s = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.sign(w) * np.floor(np.abs(w / s[:, None]) + np.float32(0.5)), -127, 127)
    return q.astype(np.int8), s
