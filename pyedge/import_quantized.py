"""Quantized weights at import: every file kind becomes the ops the core runs, weights stay packed.

* ``com.microsoft.MatMulNBits`` / ``MatMulBnb4`` (ORT's quantizers, pyedge.quantize) are run
  as they are; their tensors are checked against K, N, bits and block size here, so a broken
  file is a clear error naming the node instead of a read past a buffer. pyedge computes
  x·W with W dequantized exactly, in float32, whatever ``accuracy_level`` says (ORT with
  accuracy_level=4 quantizes the activations to int8 too: its outputs then differ from the
  exact product by ~1e-2 relative; pyedge's do not).
* ``DequantizeLinear(q, scale[, zero_point])`` of a constant (int8/uint8/int4/uint4; per
  tensor, per axis or blocked) read by ``MatMul``/``Gemm`` -- directly or through
  ``Transpose`` -- becomes ``MatMulNBits`` (bits 8 for int8/uint8, 4 for int4/uint4): the
  integers are re-packed once into MatMulNBits' layout (signed values shifted to unsigned
  codes, zero points likewise), scales become [N, n_blocks]. Per-tensor and per-output-channel
  scales are one block of K (the core takes any block size). No float copy of the weight.
* ``com.microsoft.GatherBlockQuantized`` (pyedge.quantize's embeddings, ORT's quantized
  lookup) runs as it is: the core dequantizes only the gathered rows. When it reads a tied
  head's MatMulNBits B through ``Reshape(B, [0, -1])`` (ORT wants the lookup's data 2-D), the
  Reshape is dropped and the lookup reads B itself (`share_gather_tables`): one packed copy.
* A ``DequantizeLinear`` of a constant read only by embedding ``Gather``s (axis 0) besides
  MatMul/Gemm readers, with scales per row or in blocks along the row, becomes
  ``GatherBlockQuantized`` on the re-packed rows (the same B, scales and zero points as the
  tied head's MatMulNBits when that reads the table as [V, D]): no float copy of the table.
* A ``DequantizeLinear`` of a constant with any other reader (or scales that vary along K,
  which MatMulNBits cannot express) is folded into a float constant once at load, with a
  warning for linear weights.

Module names for quantized tensors (`quantized_param_entries`): the file's parameter map entry
of the weight the quantizer replaced (``W_Q4`` -> ``W``), else ORT-style names
(``model.layers.0.self_attn.q_proj.weight_Q4``, ``..._DQ_Q4``, ``..._Bnb4``), else the node's
name (``/model/layers.0/self_attn/q_proj/MatMul_Q4``) or dynamo's name scopes.
"""
from __future__ import annotations

import json
import re
import warnings

import numpy as np

from pyedge.graph import Graph, Node
from pyedge.quant_formats import QuantFormatError, check_bnb4, check_nbits, pack_codes

MS = "com.microsoft"
FOLDED_KEY = "pyedge.folded_dequantize"  # set at import, never read from a file
QUANT_OPS = ("MatMulNBits", "MatMulBnb4")
GATHER_OP = "GatherBlockQuantized"
_SUFFIX_RE = re.compile(r"^(?P<base>.+?)(?:_DQ)?(?:_Q[248]|_Bnb4)(?:_\d+)?$")
_PARAM_RE = re.compile(r"^[\w.]+\.weight$")


def is_quant_node(node: Node) -> bool:
    return node.domain == MS and node.op_type in QUANT_OPS


def quant_weight_inputs(node: Node) -> list[str]:
    """The base's inputs after A, in LoraQuantMatMul's order: MatMulNBits -> [B, scales,
    zero_points or "", bias or ""] (g_idx is never supported); MatMulBnb4 -> [B, absmax]."""
    ins = list(node.inputs) + [""] * 6
    if node.op_type == "MatMulNBits":
        return [ins[1], ins[2], ins[3], ins[5]]
    return [ins[1], ins[2]]


def dequantized_weight(graph: Graph, node: Node, dtype=np.float32) -> np.ndarray:
    """W [N, K] of a MatMulNBits/MatMulBnb4 node (for merges and checks; never for training)."""
    from pyedge.quant_formats import dequantize_bnb4, dequantize_nbits
    a = node.attrs
    K, N, bs = int(a["K"]), int(a["N"]), int(a["block_size"])
    q = quant_weight_inputs(node)
    get = graph.initializers.get
    if node.op_type == "MatMulBnb4":
        if int(a.get("transB", 1)):  # ORT's default: the flattened weight is [N, K]
            return dequantize_bnb4(get(q[0]), get(q[1]), K, N, bs, int(a.get("quant_type", 1)),
                                   dtype)
        return dequantize_bnb4(get(q[0]), get(q[1]), N, K, bs, int(a.get("quant_type", 1)),
                               dtype).T  # transB=0: flattened [K, N]
    return dequantize_nbits(get(q[0]), get(q[1]), get(q[2]) if q[2] else None, K, N,
                            int(a.get("bits", 4)), bs, dtype)


def quant_resident_bytes(graph: Graph, node: Node) -> int:
    """Bytes of a quantized node's frozen tensors (packed weight, scales, zero points, bias)."""
    return int(sum(graph.initializers[n].nbytes for n in quant_weight_inputs(node)
                   if n and n in graph.initializers))


def quantized_bytes(graph: Graph) -> int:
    """Bytes of all quantized weights' tensors (each counted once), base or LoRA-wrapped."""
    names = set()
    for n in graph.nodes:
        if is_quant_node(n):
            names.update(quant_weight_inputs(n))
        elif n.op_type == "LoraQuantMatMul" and n.domain == "pyedge":
            names.update(n.inputs[3:])
        elif n.op_type == GATHER_OP and n.domain == MS:
            names.update([n.inputs[0]] + list(n.inputs[2:]))
        elif n.op_type == "LinearCrossEntropy" and n.domain == "pyedge" and len(n.inputs) > 6:
            names.update([n.inputs[1]] + list(n.inputs[6:]))  # a quantized head
    return int(sum(graph.initializers[x].nbytes for x in names if x in graph.initializers))


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------
def check_quant_nodes(graph: Graph) -> None:
    """Every MatMulNBits/MatMulBnb4 node's constant tensors fit its attributes."""
    from pyedge.onnx_import import ModelLoadError
    inits = graph.initializers
    for n in graph.nodes:
        if not is_quant_node(n):
            continue
        a = n.attrs
        missing = [k for k in ("K", "N", "block_size") if k not in a]
        if missing:
            raise ModelLoadError(f"{n.op_type} node '{n.name}': attribute(s) {missing} missing")
        ins = list(n.inputs) + [""] * 6
        for i in range(1, 6 if n.op_type == "MatMulNBits" else 3):
            if ins[i] and ins[i] not in inits:
                raise ModelLoadError(f"{n.op_type} node '{n.name}': input {i} ('{ins[i]}') is "
                                     "not a constant; pyedge needs constant quantized weights")
        try:
            if n.op_type == "MatMulNBits":
                check_nbits(n.name, int(a["K"]), int(a["N"]), int(a.get("bits", 4)),
                            int(a["block_size"]), inits.get(ins[1]), inits.get(ins[2]),
                            inits.get(ins[3]) if ins[3] else None,
                            inits.get(ins[5]) if ins[5] else None,
                            inits.get(ins[4]) if ins[4] else None)
            else:
                check_bnb4(n.name, int(a["K"]), int(a["N"]), int(a["block_size"]),
                           int(a.get("quant_type", 1)), inits.get(ins[1]), inits.get(ins[2]))
        except QuantFormatError as e:
            raise ModelLoadError(str(e)) from None


def share_gather_tables(graph: Graph) -> int:
    """GatherBlockQuantized(Reshape(B, shape), ...) with B a constant uint8 [V, n_blocks, blob]
    (a tied head's MatMulNBits weight) -> GatherBlockQuantized(B, ...): the core's lookup takes
    MatMulNBits' 3-D layout, so no reshaped copy of the table is made. Returns the count."""
    producers = graph.producer_map()
    done = 0
    for n in graph.nodes:
        if n.op_type != GATHER_OP or n.domain != MS or not n.inputs:
            continue
        r = producers.get(n.inputs[0])
        if r is None or r.op_type != "Reshape" or r.domain != "" or \
                r.inputs[0] not in graph.initializers:
            continue
        b = graph.initializers[r.inputs[0]]
        if b.dtype != np.uint8 or b.ndim != 3:
            continue
        n.inputs[0] = r.inputs[0]
        done += 1
    if done:
        read = {i for n in graph.nodes for i in n.inputs} | {o.name for o in graph.outputs}
        graph.nodes = [n for n in graph.nodes if not (n.op_type == "Reshape" and n.domain == ""
                                                      and not set(n.outputs) & read)]
    return done


# --------------------------------------------------------------------------------------------
# DequantizeLinear -> MatMulNBits
# --------------------------------------------------------------------------------------------
def _split_readers(graph, cons, value, outputs):
    """(linear, other): linear = [(reader, weight is [N, K] as read, Transpose or None)] for
    plain MatMul/Gemm weight inputs, directly or through one Transpose; other = every other
    reader (they get a float copy)."""
    linear, other = [], []
    for r in cons.get(value, []):
        if r.domain == "" and r.op_type == "Transpose" and \
                list(r.attrs.get("perm", [1, 0])) == [1, 0]:
            sub, sub_other = _split_readers(graph, cons, r.outputs[0], outputs)
            if sub and not sub_other and r.outputs[0] not in outputs and \
                    all(t is None for _, _, t in sub):
                linear += [(n, not nk, r) for n, nk, _ in sub]
            else:
                other.append(r)
            continue
        if r.domain != "" or len(r.inputs) < 2 or r.inputs[1] != value or r.inputs[0] == value:
            other.append(r)
        elif r.op_type == "MatMul":
            linear.append((r, False, None))
        elif r.op_type == "Gemm" and _plain_gemm(graph, r):
            linear.append((r, bool(r.attrs.get("transB", 0)), None))
        else:
            other.append(r)
    return linear, other


def _plain_gemm(graph, r) -> bool:
    """Gemm = x·W (+ 1-D constant bias): no transA, alpha = beta = 1."""
    a = r.attrs
    if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0:
        return False
    if len(r.inputs) > 2 and r.inputs[2]:
        c = graph.initializers.get(r.inputs[2])
        return c is not None and c.ndim == 1 and a.get("beta", 1.0) == 1.0
    return True


def _scales_nk(q, scale, zp, axis, block, n_axis):
    """Scales and zero points as [N, n_blocks] plus the block size along K, or None when the
    scales vary along K in a way MatMulNBits cannot hold (per-axis on K)."""
    K = q.shape[1 - n_axis]
    N = q.shape[n_axis]
    s = np.asarray(scale)
    z = None if zp is None else np.asarray(zp)
    if s.size == 1:                                   # per tensor
        return (np.full((N, 1), s.reshape(()), s.dtype),
                None if z is None else np.full((N, 1), z.reshape(()), z.dtype), K)
    axis = axis % 2
    if block == 0 and s.ndim == 1:                    # per axis
        if axis != n_axis:
            return None
        return s.reshape(N, 1), None if z is None else z.reshape(N, 1), K
    if block > 0 and s.ndim == 2:                     # blocked along `axis`
        if axis == n_axis:
            return None
        if n_axis == 0:   # q [N, K], scales [N, nb]
            return s, z, block
        return s.T, None if z is None else z.T, block  # q [K, N], scales [nb, N]
    return None


def _fold_dequantize(q, scale, zp, axis, block) -> np.ndarray:
    """ONNX DequantizeLinear on constants, float32."""
    q = q.astype(np.float32)
    s = np.asarray(scale, np.float32)
    z = np.zeros_like(s) if zp is None else np.asarray(zp, np.float32)
    if s.size == 1:
        return (q - z.reshape(())) * s.reshape(())
    axis = axis % q.ndim
    if block > 0:
        s = np.repeat(s, block, axis=axis).take(range(q.shape[axis]), axis=axis)
        z = np.repeat(z, block, axis=axis).take(range(q.shape[axis]), axis=axis)
        return (q - z) * s
    shape = [1] * q.ndim
    shape[axis] = -1
    return (q - z.reshape(shape)) * s.reshape(shape)


def _pack(graph, int_name, codes, qdtype, s_nk, z_nk, bs, bits, keep_name):
    """Integer codes [N, K] (int8/uint8, 4-bit values for bits=4) with scales and zero points
    [N, n_blocks] -> MatMulNBits' B, scales and packed zero points as new initializers;
    returns (B, scales, zero points or "", K, N, block). keep_name: B takes `int_name` (the
    file's parameter map, written for W_Q8, still applies)."""
    N, K = codes.shape
    offset = (1 << (bits - 1)) if qdtype == np.int8 else 0  # signed -> unsigned codes
    nb = -(-K // bs)
    padded = np.zeros((N, nb * bs), np.int16)
    padded[:, :K] = codes.astype(np.int16) + offset
    if z_nk is not None:
        zpu = (z_nk.astype(np.int16) + offset).astype(np.uint8)
    elif qdtype == np.uint8:
        zpu = np.zeros(s_nk.shape, np.uint8)  # ONNX's default zero point is 0
    else:
        zpu = None                            # 2^(bits-1): MatMulNBits' default
    if zpu is not None:
        padded[:, K:] = np.repeat(zpu, bs, axis=1)[:, K:nb * bs]
    else:
        padded[:, K:] = offset
    packed = pack_codes(padded.astype(np.uint8).reshape(N, nb, bs), bits)
    pname = int_name if keep_name else graph.fresh_name(f"{int_name}_Q{bits}")
    graph.initializers[pname] = packed
    sname = graph.fresh_name(f"{int_name}_scales")
    graph.initializers[sname] = np.ascontiguousarray(s_nk, np.float32).reshape(N, nb)
    zname = ""
    if zpu is not None:
        zname = graph.fresh_name(f"{int_name}_zero_points")
        graph.initializers[zname] = pack_codes(zpu, bits, pad=1 << (bits - 1))
    return pname, sname, zname, K, N, bs


def rewrite_dequantize(graph: Graph, int4_names: set[str] = frozenset()) -> dict:
    """DequantizeLinear of constants -> MatMulNBits / folded constants, in place.
    `int4_names`: initializers that were INT4/UINT4 in the file (unpacked to int8/uint8).
    Returns {"matmulnbits": [DQ node names], "gather": [...], "folded": [...]}."""
    graph.metadata.pop(FOLDED_KEY, None)
    cons = graph.consumer_map()
    outputs = {o.name for o in graph.outputs}
    done = {"matmulnbits": [], "gather": [], "folded": []}
    folded: dict[str, str] = {}  # float constant -> the int tensor it was dequantized from
    drop_nodes: set[int] = set()
    replace: dict[int, Node] = {}
    used_elsewhere = lambda name: len(cons.get(name, [])) > 1  # noqa: E731
    for dq in graph.nodes:
        if dq.op_type != "DequantizeLinear" or dq.domain != "" or \
                dq.inputs[0] not in graph.initializers:
            continue
        ins = list(dq.inputs) + ["", ""]
        if ins[1] not in graph.initializers or (ins[2] and ins[2] not in graph.initializers):
            continue
        q = graph.initializers[ins[0]]
        if q.dtype not in (np.int8, np.uint8):
            continue
        scale = graph.initializers[ins[1]]
        zp = graph.initializers[ins[2]] if ins[2] else None
        axis, block = int(dq.attrs.get("axis", 1)), int(dq.attrs.get("block_size", 0))
        out = dq.outputs[0]
        readers, others = _split_readers(graph, cons, out, outputs) if q.ndim == 2 else ([], [1])
        if out in outputs:
            others.append(out)
        layout = None
        if readers:
            layouts = {nk for _, nk, _ in readers}
            if len(layouts) == 1:
                layout = _scales_nk(q, scale, zp, axis, block, 0 if layouts.pop() else 1)
            if layout is None:
                warnings.warn(f"DequantizeLinear node '{dq.name}': its scales vary along the "
                              "weight's K axis, which MatMulNBits cannot hold; the weight is "
                              "dequantized to float at load", stacklevel=3)
        bits = 4 if ins[0] in int4_names else 8
        if readers and layout is not None:
            nk = readers[0][1]
            pname, sname, zname, K, N, bs = _pack(graph, ins[0], q if nk else q.T, q.dtype,
                                                  *layout, bits, not used_elsewhere(ins[0]))
            attrs = {"K": int(K), "N": int(N), "bits": bits, "block_size": int(bs)}
            for r, _, t in readers:
                bias = r.inputs[2] if r.op_type == "Gemm" and len(r.inputs) > 2 else ""
                replace[id(r)] = Node("MatMulNBits", [r.inputs[0], pname, sname, zname, "",
                                                      bias], list(r.outputs), r.name, MS, attrs)
                if t is not None:
                    drop_nodes.add(id(t))
            drop_nodes.add(id(dq))
            done["matmulnbits"].append(dq.name)
            if not others:
                continue
        # embedding lookups (axis 0) of a table quantized along its rows: GatherBlockQuantized
        # on the packed rows, the tied head's own bytes when it reads the table as [V, D]
        lookups = [r for r in others if isinstance(r, Node) and r.op_type == "Gather" and
                   r.domain == "" and r.inputs[0] == out and int(r.attrs.get("axis", 0)) == 0]
        if others and q.ndim == 2 and len(lookups) == len(others):
            if readers and layout is not None and readers[0][1]:
                g_pack = (pname, sname, zname, K, N, bs)
            else:
                g_layout = _scales_nk(q, scale, zp, axis, block, 0)
                g_pack = None if g_layout is None else _pack(graph, ins[0], q, q.dtype,
                                                             *g_layout, bits, False)
            if g_pack is not None and g_pack[3] % g_pack[5] == 0 and \
                    (bits == 8 or g_pack[5] % 2 == 0):
                gname, gs, gz, _, _, gbs = g_pack
                for r in lookups:
                    replace[id(r)] = Node("GatherBlockQuantized",
                                          [gname, r.inputs[1], gs] + ([gz] if gz else []),
                                          list(r.outputs), r.name, MS,
                                          {"bits": bits, "block_size": int(gbs)})
                drop_nodes.add(id(dq))
                done["gather"].append(dq.name)
                continue
        # other readers (an embedding Gather, a tied head's lookup): one float copy at load
        graph.initializers[out] = _fold_dequantize(q, scale, zp, axis, block)
        folded[out] = ins[0]
        drop_nodes.add(id(dq))
        done["folded"].append(dq.name)
    if drop_nodes or replace:
        dq_inputs = {i for n in graph.nodes if id(n) in drop_nodes and n.op_type ==
                     "DequantizeLinear" for i in n.inputs if i}
        graph.nodes = [replace.get(id(n), n) for n in graph.nodes if id(n) not in drop_nodes]
        graph.opsets.setdefault(MS, 1)
        read = {i for n in graph.nodes for i in n.inputs} | {o.name for o in graph.outputs}
        for name in dq_inputs - read:  # the file's int weights, scales, zero points
            graph.initializers.pop(name, None)
    if folded:  # recover_param_map gives them the int tensor's module (quantized_param_entries)
        graph.metadata[FOLDED_KEY] = json.dumps(folded)
    return done


# --------------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------------
def _module_from_node_name(name: str) -> str | None:
    """'/model/layers.0/self_attn/q_proj/MatMul_Q4' -> 'model.layers.0.self_attn.q_proj'."""
    if not name.startswith("/"):
        return None
    parts = [p for p in name.split("/") if p]
    return ".".join(parts[:-1]) or None


def quantized_param_entries(graph: Graph, param_map: dict) -> dict[str, dict]:
    """{packed initializer: param map entry} for quantized nodes the map does not cover."""
    from pyedge.param_names import _module_from_scope
    out = {}
    try:
        folded = json.loads(graph.metadata.get(FOLDED_KEY, "{}"))
    except ValueError:
        folded = {}
    for value, int_name in folded.items():
        if value not in param_map and int_name in param_map:
            e = {k: v for k, v in param_map[int_name].items() if k != "quantized"}
            out[value] = {**e, "transposed": False}
    for n in graph.nodes:
        if not is_quant_node(n) or len(n.inputs) < 2:
            continue
        w = n.inputs[1]
        info = {"op": n.op_type, **{k: n.attrs[k] for k in ("K", "N", "bits", "block_size",
                                                             "quant_type") if k in n.attrs}}
        if w in param_map:
            e = dict(param_map[w])
            e.setdefault("quantized", info)
            e["transposed"] = False
            out[w] = e
            continue
        module = None
        m = _SUFFIX_RE.match(w)
        base = m.group("base") if m else None
        if base and base in param_map and param_map[base].get("module"):
            module = param_map[base]["module"]
        elif base and _PARAM_RE.match(base):
            module = base[: -len(".weight")]
        elif _PARAM_RE.match(w):
            module = w[: -len(".weight")]
        if module is None:
            module = _module_from_node_name(n.name)
        if module is None and n.name in graph.node_scopes:
            module = _module_from_scope(graph.node_scopes[n.name])
        if module is not None:
            out[w] = {"module": module, "param": "weight", "transposed": False, "kind": "linear",
                      "quantized": info}
    return out
