"""Quantized files at import: MatMulNBits/MatMulBnb4 checked against their attributes,
DequantizeLinear weights re-packed as MatMulNBits (no float copy), module names recovered,
LoRA on quantized nodes (pyedge.LoraQuantMatMul) with the float model's initial adapters."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import pyedge
from pyedge.import_quantized import dequantized_weight, is_quant_node
from pyedge.onnx_import import ModelLoadError, load_onnx
from pyedge.quantize import quantize_model
from quant_models import inits_of, linear_model, run_ort

ort = pytest.importorskip("onnxruntime")


def quant_nodes(graph):
    return [n for n in graph.nodes if is_quant_node(n)]


# ---------------------------------------------------------------- QDQ models
QTYPES = {"int8": (TensorProto.INT8, -128, 127), "uint8": (TensorProto.UINT8, 0, 255),
          "int4": (TensorProto.INT4, -8, 7), "uint4": (TensorProto.UINT4, 0, 15)}


def int_tensor(name, q, qtype):
    if qtype in ("int8", "uint8"):
        return numpy_helper.from_array(q.astype(np.int8 if qtype == "int8" else np.uint8), name)
    return helper.make_tensor(name, QTYPES[qtype][0], list(q.shape),
                              q.reshape(-1).astype(np.int64).tolist())


def qdq_model(qtype="int8", gran="axis", form="transpose", K=64, N=48, block=16, zp=True,
              seed=0):
    """x [2, 5, K] -> MatMul/Gemm with W = DequantizeLinear(q, scale[, zp]) -> y.
    form "transpose": DQ gives [N, K] (torch layout) then Transpose; "matmul": DQ gives
    [K, N]; "gemm": Gemm(transB=1) on [N, K]. gran: tensor | axis (per output channel) |
    block (blocks of `block` along K)."""
    rng = np.random.default_rng(seed)
    _, lo, hi = QTYPES[qtype]
    nk = form in ("transpose", "gemm")
    shape = (N, K) if nk else (K, N)
    q = rng.integers(lo, hi + 1, shape)
    n_axis, k_axis = (0, 1) if nk else (1, 0)
    attrs = {}
    if gran == "tensor":
        s_shape = ()
    elif gran == "axis":
        s_shape, attrs["axis"] = (N,), n_axis
    else:
        nb = -(-K // block)
        s_shape = (N, nb) if nk else (nb, N)
        attrs.update(axis=k_axis, block_size=block)
    scale = (rng.random(s_shape) * 0.02 + 0.005).astype(np.float32)
    inits = [int_tensor("w_q", q, qtype), numpy_helper.from_array(np.asarray(scale), "w_scale")]
    dq_in = ["w_q", "w_scale"]
    if zp:
        z = rng.integers(lo, hi + 1, s_shape)
        inits.append(int_tensor("w_zp", np.asarray(z), qtype))
        dq_in.append("w_zp")
    nodes = [helper.make_node("DequantizeLinear", dq_in, ["w"], name="/fc/DequantizeLinear",
                              **attrs)]
    if form == "transpose":
        nodes += [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0], name="/fc/T"),
                  helper.make_node("MatMul", ["x", "wt"], ["y"], name="/fc/MatMul")]
    elif form == "matmul":
        nodes += [helper.make_node("MatMul", ["x", "w"], ["y"], name="/fc/MatMul")]
    else:
        inits.append(numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "b"))
        nodes += [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, name="/fc/Gemm")]
    lead = ["n"] if form == "gemm" else ["n", 5]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     lead + [K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, lead + [N])],
                          inits)
    opset = 21 if qtype in ("int4", "uint4") or gran == "block" else 13
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10 if opset >= 21 else 8
    return m


def ort_weight(m):
    """W as ORT's DequantizeLinear computes it: a model whose output is the DQ value."""
    g = onnx.GraphProto()
    g.CopyFrom(m.graph)
    dq = next(n for n in g.node if n.op_type == "DequantizeLinear")
    g.ClearField("node")
    g.node.append(dq)
    g.ClearField("input")
    g.ClearField("output")
    g.output.append(helper.make_tensor_value_info(dq.output[0], TensorProto.FLOAT, None))
    mm = helper.make_model(g, opset_imports=m.opset_import)
    mm.ir_version = m.ir_version
    return run_ort(mm, {})


@pytest.mark.parametrize("qtype", ["int8", "uint8", "int4", "uint4"])
@pytest.mark.parametrize("gran", ["tensor", "axis", "block"])
@pytest.mark.parametrize("form", ["transpose", "matmul", "gemm"])
def test_dequantizelinear_weights_become_matmulnbits(qtype, gran, form):
    zp = gran != "tensor" or qtype.startswith("u")   # also: signed, no zero point
    m = qdq_model(qtype, gran, form, K=72, block=16, zp=zp)  # 72: K not a block multiple
    g = load_onnx(m)
    assert not any(n.op_type in ("DequantizeLinear", "Transpose") for n in g.nodes)
    (node,) = quant_nodes(g)
    bits = 4 if qtype.endswith("4") else 8
    assert node.op_type == "MatMulNBits" and node.name in ("/fc/MatMul", "/fc/Gemm")
    assert node.attrs == {"K": 72, "N": 48, "bits": bits,
                          "block_size": 16 if gran == "block" else 72}
    W = ort_weight(m)
    W_nk = W if form != "matmul" else W.T
    np.testing.assert_allclose(dequantized_weight(g, node), W_nk, rtol=1e-6, atol=1e-7)
    # weights stay integer: no float tensor of the weight's size
    assert not any(a.dtype.kind == "f" and a.size >= 72 * 48 for a in g.initializers.values())
    assert g.initializers[node.inputs[1]].dtype == np.uint8
    assert g.initializers[node.inputs[1]].nbytes == 48 * (72 if gran != "block" else 80) * bits // 8
    if form == "gemm":
        assert node.inputs[5] == "b"


def test_ort_qdq_int4_file_imports():
    """onnxruntime's own QDQ output (int4 blocks, opset 21)."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    m, _ = linear_model(K=64, form="matmul", with_map=False)
    for sym in (False, True):
        q = MatMulNBitsQuantizer(onnx.ModelProto.FromString(m.SerializeToString()), bits=4,
                                 block_size=32, is_symmetric=sym, quant_format=QuantFormat.QDQ)
        q.process()
        qm = q.model.model
        assert any(n.op_type == "DequantizeLinear" for n in qm.graph.node)
        g = load_onnx(qm)
        nodes = quant_nodes(g)
        assert len(nodes) == 2 and all(n.attrs["bits"] == 4 and n.attrs["block_size"] == 32
                                       for n in nodes)
        assert {g.param_map[n.inputs[1]]["module"] for n in nodes} == {"layers.0.fc",
                                                                       "layers.1.out"}


def _lookup_table(g, node):
    """The float table a GatherBlockQuantized node reads, every row gathered by the core."""
    V = g.initializers[node.inputs[0]].shape[0]
    ins = [g.initializers[node.inputs[0]], np.arange(V, dtype=np.int64)] + \
        [g.initializers[i] for i in node.inputs[2:]]
    (y,), _ = pyedge._core.run_op("GatherBlockQuantized", ins, dict(node.attrs),
                                  domain="com.microsoft")
    return y


def test_dequantizelinear_read_by_gather_becomes_a_packed_lookup_sharing_the_head():
    m, _ = quantize_model(__import__("quant_models").tied_lm(), bits=4, include=("embeddings",))
    g = load_onnx(m)
    assert not any(n.op_type in ("DequantizeLinear", "Gather") for n in g.nodes)
    assert "embed.weight" not in g.initializers                  # no float copy
    t = inits_of(m)
    (lookup,) = [n for n in g.nodes if n.op_type == "GatherBlockQuantized"]
    np.testing.assert_allclose(_lookup_table(g, lookup),
                               t["embed.weight_Q8"] * t["embed.weight_scales"][:, None],
                               rtol=1e-6)
    # the tied head read the same int8 table in the file: it runs from it, packed, and the
    # lookup reads the same bytes
    (head,) = [n for n in quant_nodes(g) if n.inputs[1] == "embed.weight_Q8"]
    assert head.name == "/lm_head/MatMul" and head.attrs["bits"] == 8
    assert lookup.inputs[0] == head.inputs[1] and lookup.inputs[2] == head.inputs[2]


def test_tied_int8_table_packs_the_head_and_the_lookup_once():
    from quant_models import tied_lm
    m = tied_lm()
    q, _ = quantize_model(m, bits=8, include=("lm_head", "embeddings"))
    g = load_onnx(q)
    nodes = {g.param_map[n.inputs[1]]["module"]: n for n in quant_nodes(g)}
    assert sorted(nodes) == ["embed", "fc"]                      # the head reads the table
    assert nodes["embed"].attrs == {"K": 64, "N": 96, "bits": 8, "block_size": 64}
    (lookup,) = [n for n in g.nodes if n.op_type == "GatherBlockQuantized"]
    assert lookup.inputs[0] == nodes["embed"].inputs[1] and "embed.weight" not in g.initializers
    np.testing.assert_array_equal(dequantized_weight(g, nodes["embed"]), _lookup_table(g, lookup))
    assert not any(n.op_type in ("DequantizeLinear", "Transpose") for n in g.nodes)


def test_scales_along_k_are_refused_for_packing_and_folded_with_a_warning():
    m = qdq_model("int8", "axis", "matmul")
    dq = m.graph.node[0]
    dq.attribute[0].i = 0                                  # per input row (K): not MatMulNBits
    t = {i.name: i for i in m.graph.initializer}
    t["w_scale"].CopyFrom(numpy_helper.from_array(np.full(64, 0.01, np.float32), "w_scale"))
    t["w_zp"].CopyFrom(numpy_helper.from_array(np.zeros(64, np.int8), "w_zp"))
    with pytest.warns(UserWarning, match="along the weight's K axis"):
        g = load_onnx(m)
    assert not quant_nodes(g) and g.initializers["w"].shape == (64, 48)


# ---------------------------------------------------------------- names
def test_module_names_from_ort_quantizer_files():
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    m, _ = linear_model(form="matmul", with_map=False)
    q = MatMulNBitsQuantizer(onnx.ModelProto.FromString(m.SerializeToString()), bits=4,
                             block_size=32)
    q.process()
    qm = q.model.model
    g = load_onnx(qm)
    got = {n.inputs[1]: g.param_map[n.inputs[1]]["module"] for n in quant_nodes(g)}
    assert got == {"layers.0.fc.weight_Q4": "layers.0.fc", "layers.1.out.weight_Q4": "layers.1.out"}
    # renamed initializers (onnx::MatMul_N): the node name still carries the module path
    for t in qm.graph.initializer:
        if t.name.endswith("_Q4"):
            new = "onnx::MatMul_" + str(len(t.name))
            for n in qm.graph.node:
                n.input[:] = [new if i == t.name else i for i in n.input]
            t.name = new
    g = load_onnx(qm)
    assert sorted(g.param_map[n.inputs[1]]["module"] for n in quant_nodes(g)) == \
        ["layers.0.fc", "layers.1.out"]
    assert all(n.name.endswith("MatMul_Q4") for n in quant_nodes(g))


def test_pyedge_map_survives_quantization_and_import():
    m, _ = linear_model(form="transpose")
    for kind in (dict(bits=4), dict(bits=8), dict(scheme="nf4")):
        g = load_onnx(quantize_model(m, **kind)[0])
        mods = sorted(g.param_map[n.inputs[1]]["module"] for n in quant_nodes(g))
        assert mods == ["layers.0.fc", "layers.1.out"], kind
        if kind == dict(bits=8):  # per output channel: one block of K
            assert all(n.attrs["block_size"] == n.attrs["K"] for n in quant_nodes(g))


# ---------------------------------------------------------------- broken files
def _nbits_file(**edit):
    m, _ = linear_model(form="matmul")
    q, _ = quantize_model(m, bits=4, group_size=32, include=("lm_head",))
    node = next(n for n in q.graph.node if n.op_type == "MatMulNBits")
    t = {i.name: i for i in q.graph.initializer}
    for key, fn in edit.items():
        if key == "attr":
            fn(node)
        else:
            name = node.input[{"B": 1, "scales": 2, "zp": 3}[key]]
            t[name].CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(t[name])), name))
    return q, node.name


@pytest.mark.parametrize("edit,match", [
    (dict(scales=lambda a: a[:, :1]), r"scales holds 48 values .*need 96"),
    (dict(B=lambda a: a[:, :, :8]), r"B \(packed weight\) holds"),
    (dict(zp=lambda a: np.concatenate([a, a], 1)), r"zero_points holds"),
    (dict(attr=lambda n: [a for a in n.attribute if a.name == "K"][0].__setattr__("i", 96)),
     r"K=96"),
    (dict(attr=lambda n: [a for a in n.attribute if a.name == "bits"][0].__setattr__("i", 2)),
     r"bits=2 is not supported"),
    (dict(scales=lambda a: a.astype(np.float64)), r"scales is float64"),
])
def test_mismatched_quantized_tensors_are_clear_errors(edit, match):
    q, name = _nbits_file(**edit)
    with pytest.raises(ModelLoadError, match=match) as e:
        load_onnx(q)
    assert f"MatMulNBits node '{name}'" in str(e.value)


def test_bnb4_and_gidx_errors_name_the_node():
    m, _ = linear_model(form="matmul")
    q, _ = quantize_model(m, scheme="nf4", include=("lm_head",))
    node = next(n for n in q.graph.node if n.op_type == "MatMulBnb4")
    t = {i.name: i for i in q.graph.initializer}
    t[node.input[2]].CopyFrom(numpy_helper.from_array(np.ones(5, np.float32), node.input[2]))
    with pytest.raises(ModelLoadError, match=rf"MatMulBnb4 node '{node.name}': absmax holds 5"):
        load_onnx(q)
    q, name = _nbits_file()
    node = next(n for n in q.graph.node if n.name == name)
    q.graph.initializer.append(numpy_helper.from_array(np.zeros(64, np.int32), "g_idx"))
    node.input[:] = list(node.input)[:4] + ["g_idx"]
    with pytest.raises(ModelLoadError, match=rf"'{name}': g_idx"):
        load_onnx(q)


# ---------------------------------------------------------------- LoRA on quantized nodes
@pytest.mark.parametrize("kind", [dict(bits=4), dict(bits=8), dict(scheme="nf4"),
                                  dict(bits=4, symmetric=True)])
def test_lora_sites_on_quantized_nodes_start_like_the_float_model(kind):
    from pyedge.adapters import LoraConfig, inject_lora
    m, _ = linear_model(form="transpose", final_relu=False)
    cfg = LoraConfig(r=4, alpha=8, target_modules=["fc", "out"], dropout=0.1, seed=3)
    fg = load_onnx(m)
    fsites = inject_lora(fg, cfg)
    qg = load_onnx(quantize_model(m, include=("lm_head",), **kind)[0])
    before = {n.name: n for n in quant_nodes(qg)}
    sites = inject_lora(qg, cfg)
    assert [(s.module, s.in_features, s.out_features, s.fan_in_fan_out) for s in sites] == \
        [(s.module, s.in_features, s.out_features, False) for s in fsites]
    for s, f in zip(sites, fsites):
        np.testing.assert_array_equal(qg.initializers[s.lora_a], fg.initializers[f.lora_a])
        assert not qg.initializers[s.lora_b].any()
    lq = [n for n in qg.nodes if n.op_type == "LoraQuantMatMul"]
    assert len(lq) == 2 and all(n.domain == "pyedge" for n in lq)
    for n in lq:
        base = before[n.name]
        assert n.attrs["base"] == base.op_type and n.attrs["scale"] == 2.0
        assert n.attrs["dropout"] == 0.1 and n.attrs["salt"] in (1, 2)
        assert all(n.attrs[k] == v for k, v in base.attrs.items())
        site = sites[lq.index(n)]
        assert n.inputs[:3] == [base.inputs[0], site.lora_a, site.lora_b]
        if base.op_type == "MatMulNBits":
            want = (base.inputs + [""] * 6)
            assert n.inputs[3:] == [want[1], want[2], want[3], want[5]]
        else:
            assert n.inputs[3:] == base.inputs[1:3]


def test_weight_modules_list_quantized_layers_with_bits_and_bytes():
    from pyedge.train import expand_targets, weight_modules
    m, _ = linear_model(form="transpose", final_relu=False)
    g = load_onnx(quantize_model(m, bits=4, group_size=32)[0])
    mods = {x["module"]: x for x in weight_modules(g)}
    fc = mods["layers.0.fc"]
    assert fc["op"] == "MatMulNBits" and fc["bits"] == 4 and fc["lora"]
    assert fc["resident_bytes"] == 48 * 64 // 2 + 48 * 2 * 4 + 48 * 1  # packed, scales, zp
    assert mods["layers.1.out"]["op"] == "MatMul"                        # the head: float
    assert expand_targets(g, ["all-linear"]) == ["layers.0.fc"]


# ---------------------------------------------------------------- merge into a quantized base
def _adapters(folder, modules, K=64, N=48, r=4, seed=0):
    from pyedge.export.peft import write_adapters
    rng = np.random.default_rng(seed)
    tensors = {}
    for mod, (k, n) in modules.items():
        for ab, shape in (("A", (r, k)), ("B", (n, r))):
            tensors[f"base_model.model.{mod}.lora_{ab}.weight"] = \
                (rng.standard_normal(shape) * 0.1).astype(np.float32)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": list(modules),
           "fan_in_fan_out": False, "bias": "none", "use_rslora": False}
    write_adapters(folder, cfg, tensors)
    return {m: 2.0 * tensors[f"base_model.model.{m}.lora_B.weight"].astype(np.float64)
            @ tensors[f"base_model.model.{m}.lora_A.weight"] for m in modules}


@pytest.mark.parametrize("kind", [dict(bits=4), dict(bits=8), dict(scheme="nf4")])
def test_merge_into_quantized_base_writes_float_or_requantized(tmp_path, kind):
    from pyedge.export.merge import merge_adapters
    from pyedge.quant_formats import quantize_nbits
    m, _ = linear_model(form="transpose", final_relu=False)
    qm, rep = quantize_model(m, include=("lm_head",), **kind)
    onnx.save(qm, tmp_path / "q.onnx")
    delta = _adapters(tmp_path / "ad", {"layers.0.fc": (64, 48)})
    g = load_onnx(qm)
    fc = next(n for n in quant_nodes(g) if g.param_map[n.inputs[1]]["module"] == "layers.0.fc")
    W = dequantized_weight(g, fc, np.float64) + delta["layers.0.fc"]
    info = merge_adapters(tmp_path / "q.onnx", tmp_path / "ad", tmp_path / "merged.onnx")
    assert info["dequantized"] == ["layers.0.fc"] and not info["requantized"]
    out = onnx.load(tmp_path / "merged.onnx")
    t = inits_of(out)
    np.testing.assert_allclose(t["layers.0.fc.weight"], W.T.astype(np.float32), rtol=1e-6)
    (fc_node,) = [n for n in out.graph.node if "layers.0.fc.weight" in n.input]
    assert fc_node.op_type == "MatMul" and fc_node.name == fc.name
    assert sum(n.op_type in ("MatMulNBits", "MatMulBnb4", "DequantizeLinear")
               for n in out.graph.node) == 1  # layers.1.out stays quantized
    assert not any(k.startswith("layers.0.fc.weight_") for k in t)  # packed tensors gone
    x = np.random.default_rng(2).standard_normal((2, 5, 64)).astype(np.float32)
    q_out = run_ort(out, {"x": x})
    g2 = load_onnx(out)  # the merged file imports with the module names kept
    assert g2.param_map["layers.0.fc.weight"]["module"] == "layers.0.fc"
    assert g2.param_map["layers.0.fc.weight"]["transposed"]
    ref = np.maximum(x @ W.T, 0) @ dequantized_weight(g, next(
        n for n in quant_nodes(g) if n is not fc), np.float64).T
    np.testing.assert_allclose(q_out, ref, rtol=1e-4, atol=1e-5)
    # re-quantized
    info = merge_adapters(tmp_path / "q.onnx", tmp_path / "ad", tmp_path / "mq.onnx", bits=4)
    assert info["requantized"] == ["layers.0.fc"] and not info["dequantized"]
    mq = onnx.load(tmp_path / "mq.onnx")
    gq = load_onnx(mq)
    assert len(quant_nodes(gq)) == 2
    if kind == dict(bits=4):
        packed, scales, zp = quantize_nbits(W.astype(np.float32), 4, 64)
        t = inits_of(mq)
        np.testing.assert_array_equal(t["layers.0.fc.weight_Q4"], packed)
        np.testing.assert_array_equal(t["layers.0.fc.weight_scales"], scales)
    assert float(np.linalg.norm(run_ort(mq, {"x": x}) - ref) / np.linalg.norm(ref)) < 0.15


def test_merge_cli_says_what_it_wrote(tmp_path, capsys):
    from pyedge.cli import main
    m, _ = linear_model(form="transpose")
    onnx.save(quantize_model(m, bits=4)[0], tmp_path / "q.onnx")
    _adapters(tmp_path / "ad", {"layers.0.fc": (64, 48)})
    assert main(["merge", str(tmp_path / "q.onnx"), "--adapters", str(tmp_path / "ad"),
                 "-o", str(tmp_path / "m.onnx")]) == 0
    assert "written as float weights (dequantized + LoRA delta)" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "q.onnx"), "--adapters", str(tmp_path / "ad"),
                 "-o", str(tmp_path / "m8.onnx"), "--bits", "8"]) == 0
    assert "re-quantized (int 8-bit, blocks of 64)" in capsys.readouterr().out


# ---------------------------------------------------------------- end to end (needs the core ops)
def _core_has(*ops):
    return set(ops) <= set(pyedge._core.registered_ops())


needs_quant_core = pytest.mark.skipif(
    not _core_has("com.microsoft.MatMulNBits", "com.microsoft.MatMulBnb4",
                  "pyedge.LoraQuantMatMul"),
    reason="the core has no quantized kernels (branch qcore)")


def _ort_files():
    """(id, model) for every file kind: pyedge's quantizer, ORT's quantizers, QDQ."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    out = []
    m, _ = linear_model(form="transpose", final_relu=False)
    for kind in (dict(bits=4), dict(bits=4, symmetric=True), dict(bits=8),
                 dict(bits=8, group_size=32), dict(scheme="nf4"), dict(scheme="fp4")):
        out.append(("pyedge-" + "-".join(f"{k}{v}" for k, v in kind.items()),
                    quantize_model(m, include=("lm_head",), **kind)[0]))
    mm, _ = linear_model(form="matmul", final_relu=False)
    for bits, sym, fmt in ((4, False, QuantFormat.QOperator), (4, True, QuantFormat.QOperator),
                           (8, False, QuantFormat.QOperator), (4, False, QuantFormat.QDQ),
                           (4, True, QuantFormat.QDQ)):
        q = MatMulNBitsQuantizer(onnx.ModelProto.FromString(mm.SerializeToString()), bits=bits,
                                 block_size=32, is_symmetric=sym, quant_format=fmt)
        q.process()
        out.append((f"ort-nbits{bits}-{'sym' if sym else 'zp'}-{fmt.name}", q.model.model))
    q = MatMulBnb4Quantizer(onnx.ModelProto.FromString(mm.SerializeToString()), 1, 64)
    q.process()
    out.append(("ort-bnb4-nf4", q.model.model))
    for qtype in ("int8", "uint8", "int4", "uint4"):
        for gran in ("tensor", "axis", "block"):
            out.append((f"qdq-{qtype}-{gran}", qdq_model(qtype, gran, "transpose", K=64)))
    return out


@needs_quant_core
def test_pyedge_forward_equals_onnxruntime_for_every_file_kind():
    x = np.random.default_rng(0).standard_normal((2, 5, 64)).astype(np.float32)
    worst = {}
    for name, m in _ort_files():
        ref = run_ort(m, {"x": x})
        sess = pyedge.TrainingSession(m, loss=None)
        out = next(iter(sess.run({"x": x}).values()))
        worst[name] = float(np.abs(out - ref).max() / np.abs(ref).max())
        assert quant_nodes(sess.graph), name
    assert max(worst.values()) <= 1e-4, sorted(worst.items(), key=lambda kv: -kv[1])[:3]


@needs_quant_core
def test_plan_weight_bytes_are_the_packed_sizes():
    m, _ = linear_model(form="transpose", final_relu=False)
    x = np.zeros((2, 5, 64), np.float32)
    f = pyedge.TrainingSession(m, lora=pyedge.LoraConfig(r=4, target_modules=["fc"]), loss="mse")
    q = pyedge.TrainingSession(quantize_model(m, bits=4, include=("lm_head",))[0],
                               lora=pyedge.LoraConfig(r=4, target_modules=["fc"]), loss="mse")
    sf = f.plan_stats({"x": x})
    sq = q.plan_stats({"x": x})
    lora = sum(a.nbytes for a in q.trainable_parameters().values())
    # packed 4-bit (1/8 of float32; out's K = 48 padded to one block of 64) + one float
    # scale and a 4-bit zero point (a byte, the odd tail padded) per block
    want = (48 * 64 + 40 * 64) // 2 + (48 + 40) * (4 + 1)
    assert sq["quantized_weight_bytes"] == want
    assert sq["weight_bytes"] == want + lora
    assert sf["weight_bytes"] == (48 * 64 + 40 * 48) * 4 + lora


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_files(tmp_path_factory):
    """(float ONNX, 4-bit ONNX, torch model) of a tiny Llama exported by pyedge.torch.export."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import pyedge.torch as pt
    from quant_models import tiny_llama
    d = tmp_path_factory.mktemp("llama")
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    pt.export(model, {"input_ids": ids}, str(d / "f.onnx"),
              dynamic_axes={"input_ids": {0: "b", 1: "s"}}, task_type="CAUSAL_LM")
    rep = pyedge.quantize(d / "f.onnx", d / "q4.onnx", bits=4, group_size=32)
    assert len(rep.layers) == 14  # 7 projections x 2 layers; lm_head and embeddings float
    return d / "f.onnx", d / "q4.onnx", model


def _dequantized_torch_model(model, qgraph):
    """A copy of `model` carrying the quantized file's dequantized weights."""
    import copy

    import torch
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    n = 0
    for node in quant_nodes(qgraph):
        mod = qgraph.param_map[node.inputs[1]]["module"]
        with torch.no_grad():
            params[mod + ".weight"].copy_(torch.from_numpy(dequantized_weight(qgraph, node)))
        n += 1
    assert n == 14
    return m


@pytest.mark.slow
@needs_quant_core
def test_qlora_llama_matches_peft_on_dequantized_weights(llama_files, tmp_path):
    """llm.c check on a 4-bit Llama: step-0 gradients and 20 AdamW losses equal PyTorch+PEFT
    on the dequantized weights; the saved adapters load into PEFT on the float model with no
    missing or unexpected keys and reproduce pyedge's outputs on the dequantized one."""
    import warnings

    import torch
    peft = pytest.importorskip("peft")
    fpath, qpath, model = llama_files
    sess = pyedge.TrainingSession(str(qpath), lora=pyedge.LoraConfig(
        r=8, alpha=16, target_modules=LLAMA_TARGETS), loss="causal_lm",
        optimizer=pyedge.AdamW(lr=1e-3))
    assert sum(n.op_type == "LoraQuantMatMul" for n in sess.graph.nodes) == 14
    tm = _dequantized_torch_model(model, sess.base_graph)
    pm = peft.get_peft_model(tm, peft.LoraConfig(r=8, lora_alpha=16,
                                                 target_modules=LLAMA_TARGETS))
    pm.eval()
    tparams = dict(pm.named_parameters())
    rng = np.random.default_rng(0)
    name_map = {}
    for onnx_name, arr in sess.trainable_parameters().items():
        module, which = onnx_name.split(".lora_")
        t = tparams[f"base_model.model.{module}.lora_{which.split('.')[0]}.default.weight"]
        if ".lora_B" in onnx_name:  # B nonzero so that A has a gradient at step 0
            with torch.no_grad():
                t.copy_(torch.tensor(rng.standard_normal(t.shape) * 0.02, dtype=torch.float32))
        else:  # pyedge's draw (the float model's, see the LoRA rule's test), copied to torch
            with torch.no_grad():
                t.copy_(torch.from_numpy(np.array(arr)))
        arr[...] = t.detach().numpy()
        name_map[onnx_name] = t
    assert len(name_map) == 28
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3,
                            weight_decay=0.01)
    batches = [rng.integers(0, 256, (2, 16)).astype(np.int64) for _ in range(4)]
    loss_err, grad_err = [], {}
    for step in range(20):
        ids = batches[step % 4]
        ours = sess.step({"input_ids": ids}, ids, update=(step > 0))
        opt.zero_grad()
        logits = pm(torch.from_numpy(ids))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256),
                                                 torch.from_numpy(ids[:, 1:]).reshape(-1))
        loss.backward()
        if step == 0:
            grads = sess.gradients()
            for k, t in name_map.items():
                g = t.grad.numpy()
                grad_err[k] = float(np.abs(grads[k] - g).max() / max(np.abs(g).max(), 1e-12))
            sess.apply_update()
        opt.step()
        loss_err.append(abs(ours - loss.item()) / abs(loss.item()))
    assert max(grad_err.values()) <= 1e-4, sorted(grad_err.items(), key=lambda kv: -kv[1])[:3]
    assert max(loss_err) <= 1e-3, loss_err

    # adapters out: PEFT loads them onto the float model (no missing/unexpected keys) ...
    sess.save_adapters(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert sorted({m.rsplit(".", 1)[-1] for m in cfg["target_modules"]}) == sorted(LLAMA_TARGETS)
    from quant_models import tiny_llama
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ad"))
    bad = [str(w.message) for w in caught if "missing" in str(w.message).lower()
           or "unexpected" in str(w.message).lower()]
    assert not bad, bad
    # ... and exactly reproduce pyedge on the dequantized weights
    deq = peft.PeftModel.from_pretrained(_dequantized_torch_model(model, sess.base_graph),
                                         str(tmp_path / "ad")).eval()
    ids = batches[0]
    ours = sess.run({"input_ids": ids})[sess.output_name]
    with torch.no_grad():
        theirs = deq(torch.from_numpy(ids)).numpy()
        float_out = loaded.eval()(torch.from_numpy(ids)).numpy()
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() <= 1e-4
    assert np.abs(float_out - theirs).max() / np.abs(theirs).max() < 0.2  # 4-bit vs float


@needs_quant_core
@pytest.mark.parametrize("lora", [False, True])
def test_cls_row_pruning_moves_through_quantized_linears(lora):
    """Gather(MatMulNBits(x), 0, axis=1) -> MatMulNBits(Gather(x)): the [CLS] read of a
    quantized classifier computes B rows, not B·L; same outputs as the unfused graph."""
    m, _ = linear_model(form="transpose", final_relu=False)
    q, _ = quantize_model(m, bits=4, include=("lm_head",))
    q.graph.initializer.append(numpy_helper.from_array(np.array(0, np.int64), "cls"))
    y = q.graph.output[0]
    for n in q.graph.node:
        n.output[:] = ["z" if o == "y" else o for o in n.output]
    q.graph.node.append(helper.make_node("Gather", ["z", "cls"], ["y"], axis=1, name="/pool"))
    y.CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 40]))
    x = np.random.default_rng(0).standard_normal((3, 5, 64)).astype(np.float32)
    cfg = pyedge.LoraConfig(r=4, target_modules=["fc", "out"]) if lora else None
    kw = dict(lora=cfg, loss="mse" if lora else None)
    fused = pyedge.TrainingSession(q, **kw)
    plain = pyedge.TrainingSession(q, fuse=False, **kw)
    assert fused.fusions["gathered_rows"] == 3  # the two linears and the Relu between them
    if lora:
        for s in (fused, plain):
            for k, v in s.trainable_parameters().items():
                v[...] = np.random.default_rng(1).standard_normal(v.shape) * 0.1
    a, b = fused.run({"x": x})["y"], plain.run({"x": x})["y"]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if not lora:
        np.testing.assert_allclose(a, run_ort(q, {"x": x}), rtol=1e-4, atol=1e-5)


def test_float_zero_points_dequantize_like_onnxruntime():
    """MatMulNBits with float zero points (HQQ-style files): W = (code - zp)·scale."""
    from pyedge.quant_formats import quantize_nbits
    rng = np.random.default_rng(5)
    K, N, bs = 64, 24, 32
    packed, scales, _ = quantize_nbits(rng.standard_normal((N, K)).astype(np.float32), 4, bs)
    zp = (rng.random((N, K // bs)) * 15).astype(np.float32)
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "s"),
             numpy_helper.from_array(zp.reshape(-1), "zp")]
    node = helper.make_node("MatMulNBits", ["x", "B", "s", "zp"], ["y"], domain="com.microsoft",
                            name="q", K=K, N=N, bits=4, block_size=bs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                      [3, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                            helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    x = rng.standard_normal((3, K)).astype(np.float32)
    graph = load_onnx(m)
    W = dequantized_weight(graph, graph.nodes[0])
    np.testing.assert_allclose(x @ W.T, run_ort(m, {"x": x}), rtol=1e-4, atol=1e-5)
    if _core_has("com.microsoft.MatMulNBits"):
        out = pyedge.TrainingSession(m, loss=None).run({"x": x})["y"]
        np.testing.assert_allclose(out, run_ort(m, {"x": x}), rtol=1e-4, atol=1e-5)


@needs_quant_core
@pytest.mark.parametrize("lora", [False, True])
def test_bias_add_after_a_quantized_linear_becomes_its_bias_input(lora):
    """MatMulNBits(x) + b (how exports write a Linear's bias) -> MatMulNBits(x, ..., bias=b),
    also under LoRA; same outputs and gradients as the graph run op by op."""
    m, _ = linear_model(form="transpose", final_relu=False)
    rng = np.random.default_rng(4)
    m.graph.initializer.append(numpy_helper.from_array(
        (rng.standard_normal(48) * 0.1).astype(np.float32), "layers.0.fc.bias"))
    for n in m.graph.node:
        n.output[:] = ["h0" if o == "h" else o for o in n.output]  # the fc MatMul's
    m.graph.node.insert(2, helper.make_node("Add", ["h0", "layers.0.fc.bias"], ["h"],
                                            name="/layers.0/fc/Add"))
    q, _ = quantize_model(m, bits=4, include=("lm_head",))
    cfg = pyedge.LoraConfig(r=4, target_modules=["fc"]) if lora else None
    kw = dict(lora=cfg, loss="mse" if lora else None)
    fused, plain = pyedge.TrainingSession(q, **kw), pyedge.TrainingSession(q, fuse=False, **kw)
    assert fused.fusions["matmul_bias"] == 1
    (fc,) = [n for n in fused.graph.nodes if n.name.startswith("/layers.0.fc/")
             or n.name.startswith("/layers/0/fc/")]
    assert fc.inputs[-1] == "layers.0.fc.bias" and not any(n.op_type == "Add"
                                                           for n in fused.graph.nodes)
    x = rng.standard_normal((2, 5, 64)).astype(np.float32)
    if not lora:
        np.testing.assert_allclose(fused.run({"x": x})["y"], run_ort(q, {"x": x}), rtol=1e-4,
                                   atol=1e-5)
        return
    for s in (fused, plain):
        for v in s.trainable_parameters().values():
            v[...] = np.random.default_rng(1).standard_normal(v.shape) * 0.1
    y = rng.standard_normal((2, 5, 40)).astype(np.float32)
    la, lb = fused.step({"x": x}, y, update=False), plain.step({"x": x}, y, update=False)
    assert abs(la - lb) <= 1e-5 * abs(lb)
    ga, gb = fused.gradients(), plain.gradients()
    for k in gb:
        np.testing.assert_allclose(ga[k], gb[k], rtol=1e-4, atol=1e-6)


@needs_quant_core
def test_accuracy_level_files_compute_the_exact_dequantized_product():
    """ORT's accuracy_level=4 also quantizes activations; pyedge keeps them float32."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    m, _ = linear_model(form="matmul", final_relu=False)
    q = MatMulNBitsQuantizer(onnx.ModelProto.FromString(m.SerializeToString()), bits=4,
                             block_size=32, accuracy_level=4)
    q.process()
    qm = q.model.model
    g = load_onnx(qm)
    w0, w1 = (dequantized_weight(g, n) for n in quant_nodes(g))
    x = np.random.default_rng(0).standard_normal((2, 5, 64)).astype(np.float32)
    exact = np.maximum(x @ w0.T, 0) @ w1.T
    out = pyedge.TrainingSession(qm, loss=None).run({"x": x})["y"]
    np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-5)


@needs_quant_core
def test_whole_tensor_training_on_a_quantized_model_saves_a_peft_folder(tmp_path):
    """PEFT needs a LoRA target: the exact no-op adapter goes on a quantized linear."""
    m, _ = linear_model(form="transpose", final_relu=False)
    sess = pyedge.TrainingSession(quantize_model(m, bits=4)[0], train=["layers.1.out.*"],
                                  loss="mse")
    sess.save_adapters(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["layers.0.fc"] and cfg["modules_to_save"] == ["layers.1.out"]
    from safetensors.numpy import load_file
    t = load_file(tmp_path / "adapter_model.safetensors")
    assert t["base_model.model.layers.0.fc.lora_A.weight"].shape == (1, 64)
    assert t["base_model.model.layers.0.fc.lora_B.weight"].shape == (48, 1)
    assert not t["base_model.model.layers.0.fc.lora_B.weight"].any()
