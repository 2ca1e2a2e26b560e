"""ONNX file -> pyedge Graph: parse, inline functions, confine external data, read weights.

Weights are read-only numpy views on memory maps: of the model file itself (onnx_wire.py finds
each initializer's raw_data in it, so a single-file model's weights are never copied), or of
external data files (never outside the model's folder).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from pyedge.graph import Graph, Node, ValueInfo

ONNX_TO_NP = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.INT8: "int8", onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT16: "int16",
}

# Default cap on one tensor's declared size, checked before anything is allocated.
DEFAULT_MAX_TENSOR_BYTES = 8 << 30


class ModelLoadError(ValueError):
    """The ONNX file cannot be used (corrupt, unsafe external data, unsupported feature)."""


def load_onnx(path_or_model, max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES) -> Graph:
    """Reads an ONNX model (path, bytes or ModelProto) into a Graph (a progress line on
    stderr if that takes over 2 s: large models)."""
    from pyedge.progress import Phase
    named = isinstance(path_or_model, (str, os.PathLike))
    what = f"importing {Path(path_or_model).name}" if named else "importing the model"
    with Phase(what):
        return _load_onnx(path_or_model, max_tensor_bytes)


def _load_onnx(path_or_model, max_tensor_bytes: int) -> Graph:
    base_dir = None
    mapped = None  # a file's initializers: views on its memory map (onnx_wire.py)
    if isinstance(path_or_model, onnx.ModelProto):
        proto = path_or_model
    elif isinstance(path_or_model, (bytes, bytearray)):
        proto = _parse(bytes(path_or_model), "<bytes>")
    else:
        path = Path(path_or_model)
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such model file")
        base_dir = path.resolve().parent
        proto, mapped = _parse_mapped(path)
    if proto.functions:
        try:
            from onnx import inliner
            proto = inliner.inline_local_functions(proto)
        except Exception as e:  # noqa: BLE001 - any failure here is a bad model
            raise ModelLoadError(f"cannot inline the model's local functions: {e}") from e
    graph = _to_graph(proto, base_dir, max_tensor_bytes, mapped)
    if mapped is not None:
        from pyedge.onnx_wire import warn_if_copied
        warn_if_copied(mapped, path_or_model)
    return graph


def _parse_mapped(path: Path):
    """(ModelProto without the initializers' raw_data, MappedWeights) from a memory map of
    the file, so weights are used in place; a file the wire walk does not understand is
    parsed whole by protobuf instead (same errors as before), with mapped None."""
    from pyedge.onnx_wire import WireError, map_model
    try:
        proto, mapped = map_model(path)
    except (WireError, Exception):  # noqa: BLE001 - incl. protobuf's DecodeError: _parse reports
        return _parse(path.read_bytes(), str(path)), None
    if not proto.HasField("graph"):
        raise ModelLoadError(f"{path}: not a valid ONNX file (no graph)")
    return proto, mapped


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types
        raise ModelLoadError(f"{where}: not a valid ONNX file ({type(e).__name__}: {e})") from e
    if not proto.HasField("graph"):
        raise ModelLoadError(f"{where}: not a valid ONNX file (no graph)")
    return proto


def _check_names(g: onnx.GraphProto) -> None:
    """Protobuf hands out bytes for a string field holding invalid UTF-8: refuse such names."""
    def bad(x, what):
        raise ModelLoadError(f"{what} {x!r} is not valid UTF-8")
    for t in g.initializer:
        if not isinstance(t.name, str):
            bad(t.name, "initializer name")
    for v in list(g.input) + list(g.output):
        if not isinstance(v.name, str):
            bad(v.name, "graph input/output name")
    for n in g.node:
        for x in (n.name, n.op_type, n.domain, *n.input, *n.output):
            if not isinstance(x, str):
                bad(x, f"{n.op_type!r} node name/input/output/domain")
        for a in n.attribute:
            if not isinstance(a.name, str):
                bad(a.name, "attribute name")
        for p in n.metadata_props:
            if not isinstance(p.key, str) or not isinstance(p.value, str):
                bad(p.key, "node metadata")
    for p in getattr(g, "metadata_props", []):
        if not isinstance(p.key, str) or not isinstance(p.value, str):
            bad(p.key, "graph metadata")


def _np_dtype(elem_type: int, what: str) -> str:
    try:
        return ONNX_TO_NP[elem_type]
    except KeyError:
        raise ModelLoadError(f"{what}: unsupported element type "
                             f"{onnx.TensorProto.DataType.Name(elem_type) if elem_type in onnx.TensorProto.DataType.values() else elem_type}") from None


_INT4 = {onnx.TensorProto.INT4: np.int8, onnx.TensorProto.UINT4: np.uint8}


def _int4_array(t: onnx.TensorProto, base_dir, max_bytes: int) -> np.ndarray:
    """INT4/UINT4 (two values a byte, low nibble first) -> int8/uint8, one value a byte; only
    DequantizeLinear reads these, and import_quantized re-packs them for MatMulNBits."""
    dims = [int(d) for d in t.dims]
    if any(d < 0 for d in dims):
        raise ModelLoadError(f"initializer '{t.name}' has a negative dimension {dims}")
    count = math.prod(dims)
    nbytes = (count + 1) // 2
    if count > max_bytes:
        raise ModelLoadError(f"initializer '{t.name}' declares {count} values, over the limit")
    if t.data_location == onnx.TensorProto.EXTERNAL:
        raw = _external_array(t, np.dtype(np.uint8), [nbytes], nbytes, base_dir)
    elif t.raw_data:
        if len(t.raw_data) != nbytes:
            raise ModelLoadError(f"initializer '{t.name}' holds {len(t.raw_data)} bytes, its "
                                 f"shape {dims} needs {nbytes}")
        raw = np.frombuffer(t.raw_data, np.uint8)
    else:
        raw = np.asarray(list(t.int32_data), np.int64).astype(np.uint8)
        if raw.size != nbytes:
            raise ModelLoadError(f"initializer '{t.name}' holds {raw.size} packed bytes, its "
                                 f"shape {dims} needs {nbytes}")
    vals = np.stack([raw & 0xF, raw >> 4], -1).reshape(-1)[:count]
    if t.data_type == onnx.TensorProto.INT4:
        return (vals.astype(np.int8) - ((vals >= 8) * 16).astype(np.int8)).reshape(dims)
    return vals.astype(np.uint8).reshape(dims)


def _tensor_array(t: onnx.TensorProto, base_dir, max_bytes: int) -> np.ndarray:
    if t.data_type in _INT4:
        return _int4_array(t, base_dir, max_bytes)
    dtype = np.dtype(_np_dtype(t.data_type, f"initializer '{t.name}'"))
    dims = [int(d) for d in t.dims]
    if any(d < 0 for d in dims):
        raise ModelLoadError(f"initializer '{t.name}' has a negative dimension {dims}")
    count = math.prod(dims)  # Python ints: no overflow for hostile dims
    nbytes = count * dtype.itemsize
    if nbytes > max_bytes:
        raise ModelLoadError(f"initializer '{t.name}' declares {nbytes} bytes, over the limit of "
                             f"{max_bytes} bytes")
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return _external_array(t, dtype, dims, nbytes, base_dir)
    if t.raw_data:
        if len(t.raw_data) != nbytes:
            raise ModelLoadError(f"initializer '{t.name}' holds {len(t.raw_data)} bytes, its "
                                 f"shape {dims} needs {nbytes}")
        return np.frombuffer(t.raw_data, dtype=dtype).reshape(dims)
    try:
        arr = numpy_helper.to_array(t)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"initializer '{t.name}' cannot be read: {e}") from e
    if arr.size != count:
        raise ModelLoadError(f"initializer '{t.name}' holds {arr.size} values, its shape {dims} "
                             f"needs {count}")
    return arr


# Element types whose raw_data is one plain array of whole elements (views work); anything
# else (packed 4-bit types, ...) is read by _tensor_array from a copy of its bytes.
_MAPPABLE = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64,
             onnx.TensorProto.INT32, onnx.TensorProto.UINT8, onnx.TensorProto.BOOL,
             onnx.TensorProto.INT8, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT16}


def _mapped_array(mapped, index: int, t: onnx.TensorProto, base_dir,
                  max_bytes: int) -> np.ndarray:
    """Initializer `index` as a read-only view on the model file's memory map."""
    if t.data_type not in _MAPPABLE:
        t.raw_data = mapped.raw(index)
        return _tensor_array(t, base_dir, max_bytes)
    dtype = np.dtype(_np_dtype(t.data_type, f"initializer '{t.name}'"))
    dims = [int(d) for d in t.dims]
    if any(d < 0 for d in dims):
        raise ModelLoadError(f"initializer '{t.name}' has a negative dimension {dims}")
    nbytes = math.prod(dims) * dtype.itemsize
    if nbytes > max_bytes:
        raise ModelLoadError(f"initializer '{t.name}' declares {nbytes} bytes, over the limit of "
                             f"{max_bytes} bytes")
    return mapped.array(index, t.name, dtype, dims)


def _external_array(t, dtype, dims, nbytes, base_dir) -> np.ndarray:
    info = {e.key: e.value for e in t.external_data}
    loc = info.get("location", "")
    if base_dir is None:
        raise ModelLoadError(f"initializer '{t.name}' uses external data '{loc}': load the model "
                             "from its file path so the data file can be found")
    if not loc or os.path.isabs(loc) or ".." in Path(loc).parts:
        raise ModelLoadError(f"initializer '{t.name}': external data path '{loc}' is not "
                             "a plain relative path inside the model's folder")
    target = (base_dir / loc)
    real = target.resolve()
    if base_dir not in real.parents and real != base_dir:
        raise ModelLoadError(f"initializer '{t.name}': external data '{loc}' resolves outside "
                             "the model's folder (symlink?)")
    if not real.is_file():
        raise ModelLoadError(f"initializer '{t.name}': external data file '{loc}' is missing")
    offset = _external_range(t.name, loc, info, nbytes, dims, dtype, real.stat().st_size)
    if nbytes == 0:
        return np.zeros(dims, dtype)
    arr = np.memmap(real, dtype=dtype, mode="r", offset=offset, shape=tuple(dims))
    # the core takes typed pointers: a misaligned tensor (another writer's layout) is copied
    return arr if offset % dtype.itemsize == 0 else np.array(arr)


def _external_range(name, loc, info, nbytes, dims, dtype, size) -> int:
    """The offset of a tensor's external data, after checking its declared offset/length
    against the file (`size` bytes) and the tensor's shape; each message gives the numbers
    that disagree."""
    where = f"initializer '{name}': external data '{loc}'"
    try:
        offset = int(info.get("offset") or 0)
        length = int(info["length"]) if info.get("length") else nbytes
    except ValueError:
        raise ModelLoadError(f"{where}: offset {info.get('offset')!r} / length "
                             f"{info.get('length')!r} are not integers") from None
    for what, v in (("offset", offset), ("length", length)):
        if v < 0:
            raise ModelLoadError(f"{where}: negative {what} {v}")
    if offset + length > size:
        what = "declares length" if "length" in info else "needs"
        raise ModelLoadError(f"{where} holds {size} bytes; the tensor {what} {length} bytes "
                             f"from offset {offset} (to byte {offset + length}), "
                             f"{offset + length - size} bytes past the end of the file")
    if length != nbytes:
        raise ModelLoadError(f"{where} declares length {length} bytes, the tensor's shape "
                             f"{dims} of {dtype} needs {nbytes}")
    return offset


def check_opset_known(opsets: dict[str, int]) -> None:
    """An ai.onnx opset newer than the installed onnx package knows is refused: the schemas
    (and so the op semantics pyedge checks against) of that opset are unknown here."""
    known = onnx.defs.onnx_opset_version()
    v = opsets.get("", opsets.get("ai.onnx"))
    if v is not None and v > known:
        raise ModelLoadError(f"the model uses ONNX opset {v} (ai.onnx), newer than the "
                             f"installed onnx {onnx.__version__} knows (up to opset {known}); "
                             "upgrade onnx or re-export the model with opset <= "
                             f"{known}")


def _attr_value(a: onnx.AttributeProto, node_desc: str):
    A = onnx.AttributeProto
    if a.type == A.FLOAT:
        return float(a.f)
    if a.type == A.INT:
        return int(a.i)
    if a.type == A.STRING:
        return a.s.decode("utf-8", "replace")
    if a.type == A.FLOATS:
        return [float(x) for x in a.floats]
    if a.type == A.INTS:
        return [int(x) for x in a.ints]
    if a.type == A.STRINGS:
        return [s.decode("utf-8", "replace") for s in a.strings]
    if a.type == A.TENSOR:
        return _to_array(a.t, node_desc)
    raise ModelLoadError(f"{node_desc}: attribute '{a.name}' of type "
                         f"{A.AttributeType.Name(a.type)} is not supported (control flow / "
                         "subgraphs)")


def _value_info(v: onnx.ValueInfoProto) -> ValueInfo:
    tt = v.type.tensor_type
    dtype = _np_dtype(tt.elem_type, f"graph input/output '{v.name}'") if tt.elem_type else "float32"
    shape = [int(d.dim_value) if d.HasField("dim_value") else -1 for d in tt.shape.dim]
    if any(d.HasField("dim_value") and d.dim_value < 0 for d in tt.shape.dim):
        # invalid ONNX, and onnx's own shape inference aborts the process on it
        raise ModelLoadError(f"graph input/output '{v.name}' has a negative dimension "
                             f"{[int(d.dim_value) for d in tt.shape.dim]}")
    return ValueInfo(v.name, dtype, shape)


def _to_array(t: onnx.TensorProto, desc: str) -> np.ndarray:
    try:
        return np.array(numpy_helper.to_array(t), order="C")
    except Exception as e:  # noqa: BLE001 - onnx raises TypeError/ValueError/... on bad tensors
        raise ModelLoadError(f"{desc}: tensor attribute cannot be read: {e}") from e


def _constant_value(node: onnx.NodeProto, desc: str) -> np.ndarray:
    for a in node.attribute:
        if a.name == "value":
            return _to_array(a.t, desc)
        if a.name == "value_float":
            return np.array(a.f, np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), np.float32)
        if a.name == "value_int":
            return np.array(a.i, np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), np.int64)
    raise ModelLoadError(f"{desc}: Constant without a supported value attribute")


def _check_attr_types(n: onnx.NodeProto, opset: int, desc: str) -> None:
    """An attribute whose type differs from the one the ONNX schema declares (a float `perm`,
    a list `axis`) is refused here: rewrites and kernels read attributes by their schema
    type. Unknown ops and attributes are left to the core's own checks."""
    if n.domain not in ("", "ai.onnx"):
        return
    try:
        schema = onnx.defs.get_schema(n.op_type, opset)
    except Exception:  # noqa: BLE001 - no schema at that opset, or unknown op
        try:
            schema = onnx.defs.get_schema(n.op_type)
        except Exception:  # noqa: BLE001
            return
    A = onnx.AttributeProto
    for a in n.attribute:
        decl = schema.attributes.get(a.name)
        if decl is None or a.type == A.UNDEFINED:
            continue
        want = int(decl.type)
        if want != int(a.type):
            raise ModelLoadError(f"{desc}: attribute '{a.name}' is "
                                 f"{A.AttributeType.Name(a.type)}, the op's schema declares "
                                 f"{A.AttributeType.Name(want)}")


def _check_inputs_against_schema(node: Node, opset: int) -> None:
    """An absent input ("") is allowed only where the ONNX schema marks it optional; kernels
    rely on this, so a broken file is refused here rather than read through a null tensor."""
    if node.domain not in ("", "ai.onnx"):
        return
    try:
        schema = onnx.defs.get_schema(node.op_type, opset)
    except Exception:  # noqa: BLE001 - no schema at that opset: use the newest one
        try:
            schema = onnx.defs.get_schema(node.op_type)
        except Exception:  # noqa: BLE001 - unknown op: the core reports it with the node's name
            return
    formal = list(schema.inputs)
    if len([o for o in node.outputs if o]) < schema.min_output:
        # rewrites read a node's first output; a file without it is broken, not an edge case
        raise ModelLoadError(f"{node.op_type} node '{node.name}' has "
                             f"{len([o for o in node.outputs if o])} outputs, the op needs at "
                             f"least {schema.min_output}")
    if len(node.inputs) < schema.min_input:
        raise ModelLoadError(f"{node.op_type} node '{node.name}' has {len(node.inputs)} inputs, "
                             f"the op needs at least {schema.min_input}")
    Opt = onnx.defs.OpSchema.FormalParameterOption
    for i, name in enumerate(node.inputs):
        if name:
            continue
        param = formal[min(i, len(formal) - 1)] if formal else None
        if param is None or param.option != Opt.Optional:
            what = param.name if param is not None else f"#{i}"
            raise ModelLoadError(f"{node.op_type} node '{node.name}': required input {i} "
                                 f"('{what}') is missing")


def _value_shapes(proto: onnx.ModelProto) -> tuple[dict[str, list[int]], dict[str, list[str]]]:
    """Shapes of intermediate values (-1 for a symbolic dimension): the file's value_info
    (the dynamo exporter writes it), else ONNX shape inference; {} when neither tells.
    Only rewrites use them (row_pruning.py), the core infers its own shapes. Second: the
    names of the symbolic dimensions ("" where unnamed, e.g. "batch", "seq") of every value,
    graph inputs and outputs included, that has one (decoder_fusions matches dynamic shapes
    with them: equal names are equal sizes)."""
    infos = proto.graph.value_info
    if not infos and proto.graph.node:
        try:
            infos = onnx.shape_inference.infer_shapes(proto).graph.value_info
        except Exception:  # noqa: BLE001 - inference is optional: no shapes then
            infos = []
    out, names = {}, {}
    n_infos = len(infos)
    for k, v in enumerate(list(infos) + list(proto.graph.input) + list(proto.graph.output)):
        tt = v.type.tensor_type
        if v.type.HasField("tensor_type") and tt.HasField("shape"):
            dims = tt.shape.dim
            if any(not d.HasField("dim_value") for d in dims):
                names[v.name] = [d.dim_param if d.HasField("dim_param") else "" for d in dims]
            if k < n_infos:
                out[v.name] = [int(d.dim_value) if d.HasField("dim_value") else -1 for d in dims]
    return out, names


def _to_graph(proto: onnx.ModelProto, base_dir, max_bytes, mapped=None) -> Graph:
    g = proto.graph
    _check_names(g)
    for p in proto.metadata_props:
        if not isinstance(p.key, str) or not isinstance(p.value, str):
            raise ModelLoadError(f"model metadata {p.key!r} is not valid UTF-8")
    for o in proto.opset_import:
        if not isinstance(o.domain, str):
            raise ModelLoadError(f"opset domain {o.domain!r} is not valid UTF-8")
    opsets = {(o.domain or ""): int(o.version) for o in proto.opset_import}
    if "ai.onnx" in opsets and "" not in opsets:
        opsets[""] = opsets["ai.onnx"]
    inits: dict[str, np.ndarray] = {}
    int4_names = set()
    for i, t in enumerate(g.initializer):
        if mapped is not None and mapped.has(i) and t.data_location != onnx.TensorProto.EXTERNAL:
            arr = _mapped_array(mapped, i, t, base_dir, max_bytes)
        else:
            arr = _tensor_array(t, base_dir, max_bytes)
        if arr.dtype == np.float16:
            arr = arr.astype(np.float32)
        if t.data_type in _INT4:
            int4_names.add(t.name)
        inits[t.name] = arr  # int8/int16 widen after the quantized-weight rewrite
    nodes: list[Node] = []
    node_scopes: dict[str, str] = {}
    names_seen: set[str] = set()
    for i, n in enumerate(g.node):
        name = n.name or f"{n.op_type}_{i}"
        if name in names_seen:
            name = f"{name}_{i}"
        names_seen.add(name)
        desc = f"{n.op_type} node '{name}'"
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.output) == 1:
            inits[n.output[0]] = _constant_value(n, desc)
            continue
        _check_attr_types(n, opsets.get(n.domain or "", opsets.get("", 17)), desc)
        attrs = {a.name: _attr_value(a, desc) for a in n.attribute}
        for p in n.metadata_props:
            if p.key == "pkg.torch.onnx.name_scopes":
                node_scopes[name] = p.value
        nodes.append(Node(n.op_type, list(n.input), list(n.output), name,
                          "" if n.domain == "ai.onnx" else n.domain, attrs))
    init_names = set(inits)
    inputs = [_value_info(v) for v in g.input if v.name not in init_names]
    outputs = [_value_info(v) for v in g.output]
    if not outputs:
        raise ModelLoadError("the model declares no graph outputs")
    bad = {d: v for d, v in opsets.items() if v < 1}
    if bad:
        raise ModelLoadError(f"invalid opset version(s) {bad}")
    check_opset_known(opsets)
    for n in nodes:
        _check_inputs_against_schema(n, opsets.get(n.domain, opsets.get("", 17)))
    metadata = {p.key: p.value for p in proto.metadata_props}
    shapes, dim_names = _value_shapes(proto)
    graph = Graph(nodes, inits, inputs, outputs, opsets, metadata=metadata,
                  node_scopes=node_scopes, value_shapes=shapes, dim_names=dim_names)
    from pyedge.import_quantized import (check_quant_nodes, rewrite_dequantize,
                                         share_gather_tables)
    from pyedge.import_rewrites import (fold_cast_chains, rewrite_sequences,
                                        widen_narrow_ints)
    from pyedge.param_names import recover_param_map
    rewrite_sequences(graph)
    fold_cast_chains(graph)
    rewrite_dequantize(graph, int4_names)
    share_gather_tables(graph)
    narrow_inits = {}
    for name, arr in graph.initializers.items():
        if arr.dtype in (np.int8, np.int16):
            narrow_inits[name] = str(arr.dtype)
            graph.initializers[name] = arr.astype(np.int64)
    widen_narrow_ints(graph, narrow_inits)
    check_quant_nodes(graph)
    graph.param_map = recover_param_map(graph)
    return graph
