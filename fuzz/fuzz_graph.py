"""atheris harness: structured mutations of seed models' protobuf fields.

    python fuzz/fuzz_graph.py -max_total_time=300 -timeout=20 -rss_limit_mb=3072

The fuzzer's bytes drive a FuzzedDataProvider that picks a seed model (built-in small models
and the bundled demo model) and applies a few mutations: wrong attribute types and values,
negative/huge dims (initializers, graph inputs, Reshape/Expand/ConstantOfShape targets), cyclic
or unsorted graphs, dangling inputs, initializers whose data does not match their shape, wrong
op input/output counts, other op types. The result goes through common.run_model; only the
documented exceptions may come out.
"""
import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with atheris.instrument_imports(include=["pyedge"]):
    from fuzz import common
    import pyedge  # noqa: F401

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import AttributeProto, TensorProto  # noqa: E402

SEEDS = sorted(common.seed_models().items())
SEED_BYTES = [m.SerializeToString() for _, m in SEEDS]
OPS = ["Relu", "Add", "MatMul", "Gemm", "Reshape", "Expand", "ConstantOfShape", "Transpose",
       "Concat", "Slice", "Gather", "Softmax", "ReduceSum", "Conv", "MaxPool", "Split", "Tile",
       "Pad", "LayerNormalization", "Where", "Cast", "Squeeze", "Unsqueeze", "Range", "TopK",
       "Einsum", "Resize", "NonZero", "Loop", "Identity", "Flatten", "Shape", "Size", "Neg"]
INTS = [0, 1, -1, 2, 3, -2, 7, 1 << 31, -(1 << 31), (1 << 62), -(1 << 63), 1 << 40, 100000]


def _int(fdp):
    return fdp.PickValueInList(INTS) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(-4, 8)


def _names(m):
    g = m.graph
    names = [i.name for i in g.input] + [t.name for t in g.initializer]
    for n in g.node:
        names += list(n.output)
    return names or ["x"]


def mutate(m: onnx.ModelProto, fdp: atheris.FuzzedDataProvider) -> None:
    g = m.graph
    kind = fdp.ConsumeIntInRange(0, 15)
    nodes = g.node
    node = nodes[fdp.ConsumeIntInRange(0, len(nodes) - 1)] if len(nodes) else None
    if kind == 0 and node is not None and node.attribute:         # wrong attribute type
        a = node.attribute[fdp.ConsumeIntInRange(0, len(node.attribute) - 1)]
        t = fdp.PickValueInList([AttributeProto.FLOAT, AttributeProto.INT, AttributeProto.STRING,
                                 AttributeProto.INTS, AttributeProto.FLOATS, AttributeProto.TENSOR,
                                 AttributeProto.GRAPH, AttributeProto.STRINGS])
        a.type = t
    elif kind == 1 and node is not None:                           # attribute values
        a = node.attribute.add() if not node.attribute or fdp.ConsumeBool() else \
            node.attribute[fdp.ConsumeIntInRange(0, len(node.attribute) - 1)]
        if not a.name:
            a.name = fdp.PickValueInList(["axis", "perm", "pads", "strides", "kernel_shape",
                                          "transB", "keepdims", "group", "dilations", "axes",
                                          "epsilon", "to", "value", "mode", "alpha"])
        del a.ints[:]
        if fdp.ConsumeBool():
            a.type = AttributeProto.INT
            a.i = _int(fdp)
        else:
            a.type = AttributeProto.INTS
            a.ints.extend(_int(fdp) for _ in range(fdp.ConsumeIntInRange(0, 6)))
    elif kind == 2 and g.initializer:                              # initializer dims vs data
        t = g.initializer[fdp.ConsumeIntInRange(0, len(g.initializer) - 1)]
        if t.dims and fdp.ConsumeBool():
            t.dims[fdp.ConsumeIntInRange(0, len(t.dims) - 1)] = _int(fdp)
        elif fdp.ConsumeBool():
            t.dims.append(_int(fdp))
        else:
            t.raw_data = t.raw_data[:fdp.ConsumeIntInRange(0, max(len(t.raw_data), 1))]
    elif kind == 3 and g.initializer:                              # int initializer values
        t = g.initializer[fdp.ConsumeIntInRange(0, len(g.initializer) - 1)]
        if t.data_type == TensorProto.INT64:
            n = fdp.ConsumeIntInRange(0, 5)
            vals = np.array([_int(fdp) for _ in range(n)], np.int64)
            t.ClearField("int64_data")
            t.raw_data = vals.tobytes()
            del t.dims[:]
            t.dims.append(n)
        else:
            t.data_type = fdp.PickValueInList([TensorProto.INT64, TensorProto.DOUBLE,
                                               TensorProto.STRING, TensorProto.BFLOAT16,
                                               TensorProto.INT8, 0, 99])
    elif kind == 4 and g.input:                                    # graph input dims / type
        v = g.input[fdp.ConsumeIntInRange(0, len(g.input) - 1)]
        dims = v.type.tensor_type.shape.dim
        if dims and fdp.ConsumeBool():
            d = dims[fdp.ConsumeIntInRange(0, len(dims) - 1)]
            d.dim_value = _int(fdp) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 9)
        elif fdp.ConsumeBool():
            v.type.tensor_type.shape.dim.add().dim_value = fdp.ConsumeIntInRange(0, 4)
        else:
            v.type.tensor_type.elem_type = fdp.ConsumeIntInRange(0, 17)
    elif kind == 5 and len(nodes) > 1:                             # unsorted / cyclic
        i, j = fdp.ConsumeIntInRange(0, len(nodes) - 1), fdp.ConsumeIntInRange(0, len(nodes) - 1)
        if fdp.ConsumeBool():
            a, b = onnx.NodeProto(), onnx.NodeProto()
            a.CopyFrom(nodes[i]); b.CopyFrom(nodes[j])
            nodes[i].CopyFrom(b); nodes[j].CopyFrom(a)
        elif nodes[j].output and nodes[i].input:                   # feed a later output back
            nodes[i].input[fdp.ConsumeIntInRange(0, len(nodes[i].input) - 1)] = nodes[j].output[0]
    elif kind == 6 and node is not None and node.input:            # dangling input
        node.input[fdp.ConsumeIntInRange(0, len(node.input) - 1)] = \
            fdp.PickValueInList(["", "nope", node.output[0] if node.output else "x"])
    elif kind == 7 and node is not None:                           # input count
        if node.input and fdp.ConsumeBool():
            del node.input[fdp.ConsumeIntInRange(0, len(node.input) - 1)]
        else:
            node.input.append(fdp.PickValueInList(_names(m)))
    elif kind == 8 and node is not None:                           # output count / names
        if fdp.ConsumeBool():
            node.output.append(fdp.PickValueInList(_names(m) + ["extra"]))
        elif node.output:
            del node.output[-1]
    elif kind == 9 and node is not None:                           # another op type
        node.op_type = fdp.PickValueInList(OPS)
    elif kind == 10:                                               # huge shape producers
        big = fdp.PickValueInList([1 << 20, 1 << 30, 1 << 40, 10 ** 12, -5])
        op = fdp.PickValueInList(["ConstantOfShape", "Expand", "Reshape", "Tile", "Range"])
        src = fdp.PickValueInList(_names(m))
        shp = onnx.numpy_helper.from_array(np.array([big, big // 1024 or 1], np.int64),
                                           f"fz_shape{len(g.initializer)}")
        g.initializer.append(shp)
        out = f"fz_out{len(nodes)}"
        ins = {"ConstantOfShape": [shp.name], "Range": [shp.name, shp.name, shp.name]}.get(
            op, [src, shp.name])
        nodes.insert(fdp.ConsumeIntInRange(0, len(nodes)), onnx.helper.make_node(op, ins, [out]))
        if g.output:
            g.output[0].name = out if fdp.ConsumeBool() else g.output[0].name
    elif kind == 11 and g.output:                                  # outputs
        if fdp.ConsumeBool():
            g.output[0].name = fdp.PickValueInList(_names(m) + ["missing"])
        else:
            g.output.add().name = fdp.PickValueInList(_names(m))
    elif kind == 12:                                               # opset / domain
        if node is not None and fdp.ConsumeBool():
            node.domain = fdp.PickValueInList(["", "ai.onnx", "com.microsoft", "pyedge", "x"])
        elif m.opset_import:
            m.opset_import[0].version = fdp.ConsumeIntInRange(-1, 30)
    elif kind == 13 and g.initializer:                             # external data
        t = g.initializer[fdp.ConsumeIntInRange(0, len(g.initializer) - 1)]
        t.data_location = TensorProto.EXTERNAL
        e = t.external_data.add()
        e.key, e.value = "location", fdp.PickValueInList(["../x.bin", "/etc/passwd", "w.bin", ""])
    elif kind == 14 and node is not None:                          # duplicate a node
        g.node.append(node)
    elif kind == 15 and node is not None:                          # Constant node oddities
        c = onnx.helper.make_node("Constant", [], [f"fz_c{len(nodes)}"])
        a = c.attribute.add()
        a.name = fdp.PickValueInList(["value", "value_ints", "value_float", "sparse_value", "x"])
        a.type = fdp.PickValueInList([AttributeProto.INTS, AttributeProto.TENSOR,
                                      AttributeProto.FLOAT, AttributeProto.SPARSE_TENSOR])
        a.ints.extend([_int(fdp) for _ in range(fdp.ConsumeIntInRange(0, 3))])
        nodes.insert(0, c)
        if node.input:
            node.input[fdp.ConsumeIntInRange(0, len(node.input) - 1)] = c.output[0]


def build(data: bytes) -> bytes:
    fdp = atheris.FuzzedDataProvider(data)
    m = onnx.ModelProto()
    m.ParseFromString(SEED_BYTES[fdp.ConsumeIntInRange(0, len(SEED_BYTES) - 1)])
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        mutate(m, fdp)
    return m.SerializeToString()


def TestOneInput(data: bytes) -> None:
    common.checked(build(data))


def main():
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
