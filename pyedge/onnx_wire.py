"""Where initializer bytes sit in a single-file ONNX model: read them in place, write them aligned.

A single-file ONNX model is one protobuf ModelProto; its weights are the ``raw_data`` fields of
``ModelProto.graph (7) -> GraphProto.initializer (5) -> TensorProto.raw_data (9)``. Parsing
the file with protobuf copies every one of them into the process (twice with ``read_bytes``),
so a 2 GB model costs 2-4 GB of anonymous memory. Instead:

* ``map_model(path)`` memory-maps the file, walks just those three levels of the wire format
  to find each initializer's raw_data byte range, and parses a *stripped* copy of the file
  (raw_data removed, a few MB) with protobuf. ``MappedWeights.array(i, ...)`` then gives
  read-only numpy views on the map: page cache, shared, evictable, not anonymous memory.
* A view is only handed out where the bytes are aligned to the element size (the core's
  kernels and OpenBLAS take ``float*``; a misaligned one is undefined behaviour in C++). Files
  written by ``save_aligned`` (pyedge's exports) have every raw_data at a 64-byte boundary;
  other writers leave them wherever the protobuf framing puts them, so some tensors of
  foreign files are copied (``MappedWeights.copied_bytes`` says how much).
* ``save_aligned(proto, path)`` writes the ModelProto itself, field by field, padding each
  initializer with a ``metadata_props`` entry ``pyedge.align`` (spaces) in front of its
  raw_data so that the data starts at a multiple of 64 bytes. Protobuf parsers accept fields
  in any order, so the file is an ordinary ONNX file for every reader.

Only the initializers of the main graph are mapped; everything else (nodes, Constant
tensors, subgraphs, functions) goes through protobuf as before.
"""
from __future__ import annotations

import math
import mmap
import os

import numpy as np

MODEL_GRAPH = 7          # ModelProto.graph
GRAPH_INITIALIZER = 5    # GraphProto.initializer
TENSOR_RAW_DATA = 9      # TensorProto.raw_data
TENSOR_METADATA = 16     # TensorProto.metadata_props (StringStringEntryProto)
ALIGN = 64
PAD_KEY = b"pyedge.align"

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5


class WireError(ValueError):
    """The bytes are not the protobuf framing expected (the caller falls back to protobuf)."""


# ------------------------------------------------------------------------------ wire format
def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf, pos: int, end: int):
    """Yields (field number, wire type, field start, payload start, payload end) of one
    message's top-level fields in buf[pos:end]."""
    while pos < end:
        start = pos
        key, pos = _varint(buf, pos, end)
        num, wt = key >> 3, key & 7
        if wt == VARINT:
            _, nxt = _varint(buf, pos, end)
        elif wt == FIXED64:
            nxt = pos + 8
        elif wt == FIXED32:
            nxt = pos + 4
        elif wt == LEN:
            n, pos = _varint(buf, pos, end)
            nxt = pos + n
        else:  # groups (wire types 3/4) are not used by onnx.proto
            raise WireError(f"unsupported wire type {wt} in field {num}")
        if num == 0 or nxt > end:
            raise WireError("field runs past the end of its message")
        yield num, wt, start, pos, nxt
        pos = nxt


def encode_varint(value: int, width: int = 0) -> bytes:
    """Protobuf varint; `width` > its natural length pads it with continuation bytes (an
    overlong varint, which every protobuf parser accepts)."""
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value or len(out) + 1 < width:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(num: int, wt: int) -> bytes:
    return encode_varint((num << 3) | wt)


# ------------------------------------------------------------------------------ reading
class MappedWeights:
    """raw_data byte ranges of the main graph's initializers (by position) in a mapped file."""

    def __init__(self, mm: mmap.mmap, ranges: list):
        self.mm = mm
        self.ranges = ranges          # [(offset, length) | None] per graph.initializer
        self.mapped_bytes = 0         # handed out as views on the map
        self.copied_bytes = 0         # copied because misaligned

    def has(self, index: int) -> bool:
        return index < len(self.ranges) and self.ranges[index] is not None \
            and self.ranges[index][1] > 0

    def _release(self, offset: int, nbytes: int) -> None:
        """Drops the map's pages lying wholly inside a copied tensor from this process's
        resident set: the copy holds the values, and the file pages reading it faulted in
        would otherwise be counted twice (W1's MiniLM file: 76 MiB). Read-only map, so a
        later read of a neighbouring view just faults the page in again."""
        page = mmap.PAGESIZE
        start = -(-offset // page) * page
        end = (offset + nbytes) // page * page
        if end > start and hasattr(self.mm, "madvise"):
            try:
                self.mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            except (OSError, ValueError):  # advice only: the values are already copied
                pass

    def raw(self, index: int) -> bytes:
        """A copy of initializer `index`'s raw_data bytes."""
        offset, length = self.ranges[index]
        self.copied_bytes += length
        return self.mm[offset:offset + length]

    def array(self, index: int, name: str, dtype: np.dtype, dims: list[int]) -> np.ndarray:
        """Read-only view (or, if misaligned, a copy) of initializer `index`, checked against
        its declared dtype and shape."""
        offset, length = self.ranges[index]
        nbytes = math.prod(dims) * dtype.itemsize
        if length != nbytes:
            from pyedge.onnx_import import ModelLoadError
            raise ModelLoadError(f"initializer '{name}' holds {length} bytes, its shape {dims} "
                                 f"needs {nbytes}")
        arr = np.frombuffer(self.mm, dtype=dtype, count=nbytes // dtype.itemsize,
                            offset=offset).reshape(dims)
        if offset % dtype.itemsize:
            self.copied_bytes += nbytes
            copy = arr.copy()
            self._release(offset, nbytes)
            return copy
        self.mapped_bytes += nbytes
        return arr


def map_model(path):
    """(stripped onnx.ModelProto, MappedWeights) for a single-file model; raises WireError
    when the file is not framed as expected (the caller then parses it the old way)."""
    import onnx

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise WireError("empty file")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        stripped, ranges = _strip(mm, size)
        proto = onnx.ModelProto()
        proto.ParseFromString(stripped)
    except Exception:
        mm.close()
        raise
    if len(ranges) != len(proto.graph.initializer):
        mm.close()
        raise WireError("initializer count differs between the wire walk and protobuf")
    return proto, MappedWeights(mm, ranges)


def _strip(buf, size: int) -> tuple[bytes, list]:
    """The file without the initializers' raw_data payloads, and where those were."""
    out = []
    ranges: list = []
    graphs = 0
    for num, wt, start, p0, p1 in _fields(buf, 0, size):
        if num == MODEL_GRAPH and wt == LEN:
            graphs += 1
            if graphs > 1:  # protobuf would merge the two; too odd to map: parse it normally
                raise WireError("more than one graph field")
            body = _strip_graph(buf, p0, p1, ranges)
            out += [_key(MODEL_GRAPH, LEN), encode_varint(len(body)), body]
        else:
            out.append(bytes(buf[start:p1]))
    return b"".join(out), ranges


def _strip_graph(buf, pos, end, ranges) -> bytes:
    out = []
    for num, wt, start, p0, p1 in _fields(buf, pos, end):
        if num == GRAPH_INITIALIZER and wt == LEN:
            raw = None
            parts = []
            for tn, twt, ts, tp0, tp1 in _fields(buf, p0, p1):
                if tn == TENSOR_RAW_DATA and twt == LEN:
                    raw = (tp0, tp1 - tp0)  # the last occurrence wins, as in protobuf
                else:
                    parts.append(bytes(buf[ts:tp1]))
            body = b"".join(parts)
            ranges.append(raw)
            out += [_key(GRAPH_INITIALIZER, LEN), encode_varint(len(body)), body]
        else:
            out.append(bytes(buf[start:p1]))
    return b"".join(out)


# ------------------------------------------------------------------------------ writing
def _without(msg, exclude: set[str]):
    """A new message of msg's type with every set field except `exclude` (no deep copy of
    the excluded ones, which is the point: they are the large ones)."""
    new = type(msg)()
    for fd, value in msg.ListFields():
        if fd.name in exclude:
            continue
        repeated = getattr(fd, "is_repeated", None)
        if repeated is None:
            repeated = fd.label == fd.LABEL_REPEATED
        if repeated:
            getattr(new, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(new, fd.name).CopyFrom(value)
        else:
            setattr(new, fd.name, value)
    return new


def _pad_field(spaces: int) -> bytes:
    entry = _key(1, LEN) + encode_varint(len(PAD_KEY)) + PAD_KEY + \
        _key(2, LEN) + encode_varint(spaces) + b" " * spaces
    return _key(TENSOR_METADATA, LEN) + encode_varint(len(entry)) + entry


def _tensor_record(fields: bytes, nraw: int, at: int, align: int) -> tuple[bytes, int]:
    """(bytes of one initializer record up to its raw payload, payload's offset) for a record
    starting at file offset `at`, padded so that the payload is `align`-aligned."""
    tail = _key(TENSOR_RAW_DATA, LEN) + encode_varint(nraw)
    for pad in [b""] + [_pad_field(k) for k in range(2 * align)]:
        body_len = len(fields) + len(pad) + len(tail) + nraw
        head = _key(GRAPH_INITIALIZER, LEN) + encode_varint(body_len) + fields + pad + tail
        if (at + len(head)) % align == 0:
            return head, at + len(head)
    raise AssertionError("no padding aligns the payload")  # 2*align sizes cover every residue


def save_aligned(proto, path, align: int = ALIGN) -> None:
    """Writes `proto` as one ONNX file whose initializers' raw_data start at multiples of
    `align`; atomic (temp file in the same folder, fsync, rename; no temp file is left on
    failure). The model must fit protobuf's 2 GB limit (use external data above it)."""
    g = proto.graph
    head_model = _without(proto, {"graph"}).SerializeToString()
    head_graph = _without(g, {"initializer"}).SerializeToString()
    # (fields without raw_data, tensor, raw bytes) or (whole serialized tensor, None, 0)
    tensors = []
    for t in g.initializer:
        n = len(t.raw_data) if t.HasField("raw_data") else 0
        if n:
            tensors.append((_without(t, {"raw_data"}).SerializeToString(), t, n))
        else:
            tensors.append((t.SerializeToString(), None, 0))

    def layout(width: int):
        """Record heads and the graph's length, the graph length varint being `width` bytes."""
        at = len(head_model) + 1 + width + len(head_graph)
        heads = []
        for fields, t, n in tensors:
            if t is None:
                head = _key(GRAPH_INITIALIZER, LEN) + encode_varint(len(fields)) + fields
                heads.append(head)
                at += len(head)
            else:
                head, at = _tensor_record(fields, n, at, align)
                heads.append(head)
                at += n
        return heads, at - (len(head_model) + 1 + width)

    width = 1
    for _ in range(4):  # the graph's length decides its varint's width and vice versa
        heads, glen = layout(width)
        need = len(encode_varint(glen))
        if need == width:
            break
        width = max(width, need)
    else:
        heads, glen = layout(width)  # overlong varint of the widest size seen: consistent
    if len(head_model) + 1 + width + glen >= 2 ** 31:
        raise ValueError(f"the model needs {(len(head_model) + glen) / 2**30:.2f} GiB, over "
                         "protobuf's 2 GiB limit for one file: save it with external data")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(head_model)
            f.write(_key(MODEL_GRAPH, LEN) + encode_varint(glen, width))
            f.write(head_graph)
            for head, (_, t, _n) in zip(heads, tensors):
                f.write(head)
                if t is not None:
                    f.write(t.raw_data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_external(proto, path, align: int = ALIGN, size_threshold: int = 1024) -> str:
    """Writes `proto` as `path` + `path.data` (the raw_data of initializers of at least
    `size_threshold` bytes, each at a multiple of `align`, in the layout onnx's external data
    spec describes). Moves the tensors' bytes out of `proto` as it goes, so the process holds
    one tensor's bytes at a time beyond the proto itself. Both files are written under
    temporary names in the same folder and renamed (data first); nothing is left behind on
    failure (not even the data file, if the model file's rename fails). Returns the data
    file's name."""
    import onnx

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    location = os.path.basename(path) + ".data"
    tmp_data = os.path.join(folder, f".{location}.tmp-{os.getpid()}")
    tmp_model = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp_data, "wb") as f:
            offset = 0
            for t in proto.graph.initializer:
                n = len(t.raw_data) if t.HasField("raw_data") else 0
                if n < size_threshold:
                    continue
                pad = -offset % align
                f.write(b"\0" * pad)
                offset += pad
                f.write(t.raw_data)
                t.ClearField("raw_data")
                del t.external_data[:]
                for k, v in (("location", location), ("offset", str(offset)),
                             ("length", str(n))):
                    t.external_data.add(key=k, value=v)
                t.data_location = onnx.TensorProto.EXTERNAL
                offset += n
            f.flush()
            os.fsync(f.fileno())
        save_aligned(proto, tmp_model, align)  # the small tensors left inline: aligned too
        placed = os.path.join(folder, location)
        os.replace(tmp_data, placed)
        tmp_data = placed  # a data file without its model file is of no use: goes too
        os.replace(tmp_model, path)
    except BaseException:
        for p in (tmp_data, tmp_model):
            try:
                os.unlink(p)
            except OSError:
                pass
        raise
    return location


def initializer_bytes(proto) -> int:
    """Bytes of the main graph's initializers (raw_data or typed fields, external included)."""
    total = 0
    for t in proto.graph.initializer:
        if t.data_location == 1:  # EXTERNAL
            total += int(next((e.value for e in t.external_data if e.key == "length"), 0) or 0)
        else:
            total += t.ByteSize()
    return total


# ------------------------------------------------------------------------------ realign
COPY_WARNING_BYTES = 256 << 20  # small models: not worth a warning


def warn_if_copied(mapped: MappedWeights, path) -> None:
    """A warning when a file's misaligned weights cost a lot of anonymous memory."""
    if mapped is not None and mapped.copied_bytes >= COPY_WARNING_BYTES:
        import warnings
        warnings.warn(
            f"{path}: {mapped.copied_bytes / 2**20:.0f} MiB of weights are not aligned in the "
            "file and were copied into memory; `python -m pyedge.onnx_wire realign "
            f"{os.path.basename(os.fspath(path))} aligned.onnx` writes a copy pyedge maps in "
            "place", stacklevel=3)


def realign(src, dst, external: bool | None = None, threshold: int = int(1.8e9)) -> str:
    """Rewrites the model `src` as `dst` with every initializer's data 64-byte aligned: one
    file, or `dst` + ".data" when `external` (None: above `threshold` bytes of weights).
    Loads the whole model (a workstation job for big files)."""
    import onnx

    proto = onnx.load(os.fspath(src))  # with its external data, if any
    if external is None:
        external = initializer_bytes(proto) > threshold
    if external:
        save_external(proto, dst)
    else:
        save_aligned(proto, dst)
    return os.fspath(dst)


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m pyedge.onnx_wire",
                                 description="ONNX initializers: check or fix their alignment")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("realign", help="write a copy whose weights pyedge maps in place")
    r.add_argument("src")
    r.add_argument("dst")
    r.add_argument("--external-data", choices=("auto", "yes", "no"), default="auto")
    c = sub.add_parser("check", help="how many weight bytes would be mapped / copied")
    c.add_argument("model")
    a = ap.parse_args(argv)
    if a.cmd == "realign":
        ext = {"auto": None, "yes": True, "no": False}[a.external_data]
        print(realign(a.src, a.dst, external=ext))
        return 0
    _, mapped = map_model(a.model)
    aligned = sum(n for r in mapped.ranges if r for o, n in [r] if o % 4 == 0)
    total = sum(r[1] for r in mapped.ranges if r)
    print(f"{a.model}: {total / 2**20:.1f} MiB of weights in the file, "
          f"{aligned / 2**20:.1f} MiB at 4-byte aligned offsets")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
