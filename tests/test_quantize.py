"""pyedge.quantize: output runs in onnxruntime close to the float model, its packed tensors equal
ORT's own quantizers' (same settings), dequantized weights follow the numpy round trip."""
import json

import numpy as np
import onnx
import pytest

from pyedge.quant_formats import (dequantize_bnb4, dequantize_nbits, pack_codes,
                                  quantize_bnb4, quantize_nbits, unpack_codes)
from pyedge.quantize import quantize, quantize_model
from quant_models import inits_of, linear_model, run_ort, tied_lm

ort = pytest.importorskip("onnxruntime")


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def x_for(form, K=64, seed=1):
    shape = (3, K) if form == "gemm" else (2, 5, K)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------- packed layout = ORT's quantizers
@pytest.mark.parametrize("bits,block,sym", [(4, 16, False), (4, 32, True), (4, 64, False),
                                            (4, 128, True), (8, 32, False), (8, 16, True),
                                            (4, 32, False)])
def test_matmulnbits_equals_ort_quantizer(bits, block, sym):
    """K=80 is not a multiple of 32/64/128 (padding), 80/16 = 5 blocks (odd zero-point tail)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    m, _ = linear_model(K=80, form="matmul", with_map=False)
    q = MatMulNBitsQuantizer(onnx.ModelProto.FromString(m.SerializeToString()), bits=bits,
                             block_size=block, is_symmetric=sym)
    q.process()
    theirs = inits_of(q.model.model)
    ours_model, rep = quantize_model(m, bits=bits, group_size=block, symmetric=sym,
                                     include=("lm_head",))
    ours = inits_of(ours_model)
    assert len(rep.layers) == 2
    for w in ("layers.0.fc.weight", "layers.1.out.weight"):
        for suffix in (f"_Q{bits}", "_scales") + (() if sym else ("_zero_points",)):
            np.testing.assert_array_equal(ours[w + suffix], theirs[w + suffix], err_msg=w + suffix)
        assert (w + "_zero_points" in ours) == (not sym)
    # same node attributes
    attrs = lambda model: sorted((n.name, tuple(sorted((a.name, a.i) for a in n.attribute)))  # noqa
                                 for n in model.graph.node if n.op_type == "MatMulNBits")
    assert attrs(ours_model) == attrs(q.model.model)


@pytest.mark.parametrize("quant_type,block", [(1, 64), (1, 32), (0, 64)])
def test_matmulbnb4_equals_ort_quantizer(quant_type, block):
    from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer
    m, _ = linear_model(K=80, form="matmul", with_map=False)
    q = MatMulBnb4Quantizer(onnx.ModelProto.FromString(m.SerializeToString()), quant_type, block)
    q.process()
    theirs = inits_of(q.model.model)
    ours = inits_of(quantize_model(m, scheme="nf4" if quant_type else "fp4", group_size=block,
                                   include=("lm_head",))[0])
    for w in ("layers.0.fc.weight", "layers.1.out.weight"):
        np.testing.assert_array_equal(ours[w + "_Bnb4"], theirs[w + "_Bnb4"])
        np.testing.assert_array_equal(ours[w + "_absmax"], theirs[w + "_absmax"])


def test_rounding_is_half_away_from_zero_like_mlas():
    """Values exactly between two codes: MLAS rounds with roundf (away from zero)."""
    w = np.array([[0.0, 1.0, 2.0, 3.0, -1.0, 14.0, 7.5, 0.5] * 2], np.float32)  # scale 1, zp 1
    packed, scales, zp = quantize_nbits(w, 4, 16, symmetric=False)
    codes = unpack_codes(packed.reshape(1, -1), 4, 16)[0]
    assert scales[0, 0] == 1.0 and unpack_codes(zp, 4, 1)[0, 0] == 1
    assert list(codes[:8]) == [1, 2, 3, 4, 0, 15, 9, 2]  # 8.5 -> 9, 1.5 -> 2 (not 8, 2)


def test_pack_unpack_roundtrip():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (3, 7)).astype(np.uint8)
    for high in (False, True):
        back = unpack_codes(pack_codes(codes, 4, high_first=high), 4, 7, high_first=high)
        np.testing.assert_array_equal(back, codes)
    assert pack_codes(np.array([[1, 2]], np.uint8), 4)[0, 0] == 0x21
    assert pack_codes(np.array([[1, 2]], np.uint8), 4, high_first=True)[0, 0] == 0x12


# ---------------------------------------------------------------- runs in ORT, close to float
KINDS = [dict(bits=4), dict(bits=4, symmetric=True), dict(bits=4, group_size=32),
         dict(bits=8), dict(bits=8, group_size=32), dict(scheme="nf4")]
TOL = {4: 0.15, 8: 0.02}


@pytest.mark.parametrize("form", ["transpose", "matmul", "gemm"])
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()))
def test_output_runs_in_onnxruntime_close_to_float(form, kind):
    m, weights = linear_model(form=form, bias=True)
    q, rep = quantize_model(m, include=("lm_head",), **kind)
    onnx.checker.check_model(q)
    x = x_for(form)
    ref = run_ort(m, {"x": x})
    out = run_ort(q, {"x": x})
    bits = 8 if kind.get("bits") == 8 else 4
    assert rel(out, ref) < TOL[bits], rel(out, ref)
    assert {lay.name for lay in rep.layers} == {"layers.0.fc", "layers.1.out"}
    assert not any(n.op_type in ("Transpose",) for n in q.graph.node) or bits == 8 and \
        "group_size" not in kind
    assert rep.bytes_after < rep.bytes_before / (3 if bits == 8 else 5)
    # ORT's result is the float model with the dequantized weights (numpy round trip)
    deq = {lay.name: _dequantized(q, lay) for lay in rep.layers}
    np.testing.assert_allclose(out, _float_forward(x, deq, m, form), rtol=1e-4, atol=1e-5)


def _dequantized(q, lay):
    """W [N, K] from the quantized file's tensors, by the formats' numpy definitions."""
    t = inits_of(q)
    w = lay.weight
    N, K = lay.shape
    if lay.format == "MatMulBnb4":
        return dequantize_bnb4(t[w + "_Bnb4"], t[w + "_absmax"], K, N, lay.block_size, 1)
    if lay.format == "MatMulNBits":
        return dequantize_nbits(t[f"{w}_Q{lay.bits}"], t[w + "_scales"],
                                t.get(w + "_zero_points"), K, N, lay.bits, lay.block_size)
    qi, s = t[w + "_Q8"].astype(np.float32), t[w + "_scales"]
    dq = next(n for n in q.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] == w + "_Q8")
    axis = dq.attribute[0].i
    W = qi * (s[:, None] if axis == 0 else s[None, :])
    return W if axis == 0 else W.T


def _float_forward(x, deq, m, form):
    t = inits_of(m)
    def lin(v, mod):
        y = v @ deq[mod].T
        if form == "gemm" and f"{mod}.bias" in t:
            y = y + t[f"{mod}.bias"]
        return y
    h = np.maximum(lin(x, "layers.0.fc"), 0)
    return np.maximum(lin(h, "layers.1.out"), 0)


def test_round_trip_errors_are_what_the_format_allows():
    """|W - deq(q(W))| <= scale/2 per block for int, <= absmax * max gap/2 for NF4."""
    rng = np.random.default_rng(3)
    W = rng.standard_normal((12, 96)).astype(np.float32)
    for bits, sym in ((4, False), (4, True), (8, False)):
        P, S, Z = quantize_nbits(W, bits, 32, sym)
        D = dequantize_nbits(P, S, Z, 96, 12, bits, 32)
        bound = np.repeat(np.abs(S), 32, axis=1)[:, :96] * 0.5 * (1 + 1e-5)
        if sym:  # the positive end may clip at 2^(bits-1)-1: one extra step there
            bound = bound * 2
        assert np.all(np.abs(D - W) <= bound + 1e-7)
    P, A = quantize_bnb4(W, 64, 1)
    D = dequantize_bnb4(P, A, 96, 12, 64, 1)
    gap = np.diff(np.sort(dequantize_bnb4(pack_codes(np.arange(16, dtype=np.uint8), 4, True),
                                          [1.0], 16, 1, 64, 1)[0])).max()
    assert np.all(np.abs(D - W).reshape(-1, 64) <= A[:, None] * gap / 2 * (1 + 1e-5))


# ---------------------------------------------------------------- what is kept, what is skipped
def test_param_map_moves_to_quantized_tensors():
    m, _ = linear_model(form="transpose", final_relu=False)
    q, rep = quantize_model(m, bits=4)
    meta = {p.key: p.value for p in q.metadata_props}
    pm = json.loads(meta["pyedge.param_map"])
    assert pm["layers.0.fc.weight_Q4"]["module"] == "layers.0.fc"
    assert pm["layers.0.fc.weight_Q4"]["quantized"]["bits"] == 4
    assert "layers.0.fc.weight" not in pm
    assert json.loads(meta["pyedge.quantization"])["block_size"] == 64
    # the output layer stays float by default and the report says why
    assert [w for w, _ in rep.skipped] == ["layers.1.out.weight"]
    assert "lm_head" in rep.skipped[0][1]
    names = {t.name for t in q.graph.initializer}
    assert "layers.0.fc.weight" not in names and "layers.1.out.weight" in names
    assert sum(n.op_type == "Transpose" for n in q.graph.node) == 1  # the float layer's
    lines = rep.lines()
    assert lines[0].startswith("  layers.0.fc  MatMulNBits 4-bit blocks of 64  [48, 64]")
    assert "left float" in lines[1]


def test_int8_per_channel_is_a_dequantizelinear_keeping_the_weight_name():
    m, weights = linear_model(form="transpose", final_relu=False)
    q, rep = quantize_model(m, bits=8)
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert [n.output[0] for n in dq] == ["layers.0.fc.weight"]
    assert {a.name: a.i for a in dq[0].attribute} == {"axis": 0}
    t = inits_of(q)
    q8 = t["layers.0.fc.weight_Q8"]
    assert q8.dtype == np.int8 and q8.shape == (48, 64)
    assert np.abs(q8).max() == 127
    W = weights["layers.0.fc"]
    np.testing.assert_allclose(t["layers.0.fc.weight_scales"], np.abs(W).max(1) / 127, rtol=1e-6)
    assert rep.layers[0].format == "DequantizeLinear" and rep.layers[0].block_size == 0


def test_tied_head_and_embeddings_are_opt_in():
    m = tied_lm()
    ids = np.random.default_rng(0).integers(0, 96, (2, 7)).astype(np.int64)
    ref = run_ort(m, {"ids": ids})
    q, rep = quantize_model(m, bits=4)
    assert [lay.name for lay in rep.layers] == ["fc"]
    assert any("tied" in why or "lm_head" in why for _, why in rep.skipped)
    # the head quantized, the embedding lookup stays float (a packed copy for the head)
    q, rep = quantize_model(m, bits=4, include=("lm_head",))
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MatMulNBits") == 2 and "Gather" in ops
    assert "embed.weight" in inits_of(q)
    assert rel(run_ort(q, {"ids": ids}), ref) < 0.2
    # 8-bit per channel with both: one int8 table serves the Gather and the head
    q, rep = quantize_model(m, bits=8, include=("lm_head", "embeddings"))
    t = inits_of(q)
    assert "embed.weight" not in t and t["embed.weight_Q8"].dtype == np.int8
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert sorted(n.output[0] for n in dq) == ["embed.weight", "fc.weight"]
    assert rel(run_ort(q, {"ids": ids}), ref) < 0.03
    # embeddings alone, 4-bit for the linears: the table is int8 per row whatever the bits
    q, rep = quantize_model(m, bits=4, include=("embeddings",))
    assert {lay.name: lay.format for lay in rep.layers} == {"fc": "MatMulNBits",
                                                            "embed": "DequantizeLinear"}
    out = run_ort(q, {"ids": ids})
    assert rel(out, ref) < 0.2


def test_bad_settings_are_clear_errors():
    m, _ = linear_model()
    with pytest.raises(ValueError, match="power of two"):
        quantize_model(m, bits=4, group_size=48)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_model(m, bits=3)
    with pytest.raises(ValueError, match="4-bit"):
        quantize_model(m, bits=8, scheme="nf4")
    with pytest.raises(ValueError, match="unknown"):
        quantize_model(m, include=("convs",))
    old, _ = linear_model(opset=11)
    with pytest.raises(ValueError, match="opset >= 13"):
        quantize_model(old, bits=8)


def test_exclude_leaves_modules_float():
    m, _ = linear_model()
    q, rep = quantize_model(m, bits=4, include=("lm_head",), exclude=("layers.0.*",))
    assert [lay.name for lay in rep.layers] == ["layers.1.out"]
    assert ("layers.0.fc.weight", "excluded") in rep.skipped


def test_quantizer_needs_no_torch_or_onnxruntime():
    """The device quantizes: numpy + onnx only (torch and onnxruntime made unimportable)."""
    import subprocess
    import sys
    code = ("import sys, numpy as np; sys.modules['torch'] = None; "
            "sys.modules['onnxruntime'] = None; from pyedge.quantize import quantize_model; "
            "import pyedge.quant_formats as f; "
            "f.quantize_nbits(np.ones((4, 32), np.float32)); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_cli_quantize(tmp_path, capsys):
    from pyedge.cli import main
    m, _ = linear_model()
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    dst = tmp_path / "q.onnx"
    assert main(["quantize", str(src), "-o", str(dst), "--bits", "4", "--group-size", "32",
                 "--include", "lm_head"]) == 0
    out = capsys.readouterr().out
    assert "layers.0.fc  MatMulNBits 4-bit blocks of 32" in out and "quantized 2 weights" in out
    q = onnx.load(dst)
    assert sum(n.op_type == "MatMulNBits" for n in q.graph.node) == 2
    x = x_for("transpose")
    assert rel(run_ort(q, {"x": x}), run_ort(m, {"x": x})) < 0.15
    assert main(["quantize", str(src), "-o", str(dst), "--bits", "8", "--scheme", "nf4"]) == 2
    assert quantize(src, tmp_path / "q8.onnx", bits=8).layers[0].format == "DequantizeLinear"


def test_inspect_shows_bits_and_resident_bytes(tmp_path, capsys):
    from pyedge.cli import inspect_report, main
    m, _ = linear_model(final_relu=False)
    onnx.save(quantize_model(m, bits=4, group_size=32)[0], tmp_path / "q.onnx")
    assert main(["inspect", str(tmp_path / "q.onnx")]) == 0
    out = capsys.readouterr().out
    assert "layers.0.fc  MatMulNBits [48, 64]  4-bit, blocks of 32, 1.9 KB resident" in out
    assert "quantized: 1 layers, 1.9 KB resident (float32: 12.0 KB)" in out
    rep = inspect_report(str(tmp_path / "q.onnx"))
    # parameters count the quantized weight's values, not its scales and zero points
    assert rep["parameters"] == 48 * 64 + 40 * 48
    assert rep["quantized"]["resident_bytes"] == 48 * 32 + 48 * 2 * 4 + 48


def _core_has_quant():
    import pyedge
    return {"com.microsoft.MatMulNBits", "pyedge.LoraQuantMatMul"} <= \
        set(pyedge._core.registered_ops())


@pytest.mark.skipif(not _core_has_quant(), reason="the core has no quantized kernels (qcore)")
def test_train_quantize_on_load_and_eval(tmp_path):
    from cli_inproc import run_cli
    m, _ = linear_model(final_relu=False)
    onnx.save(m, tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((16, 5, 64)).astype(np.float32),
             labels=rng.standard_normal((16, 5, 40)).astype(np.float32))

    def run(*a):   # `pyedge ...` in tmp_path, in this process
        return run_cli(*a, cwd=tmp_path)
    r = run("train", "m.onnx", "--data", "d.npz", "--target", "fc", "--quantize", "4",
            "--loss", "mse", "--max-steps", "3", "--batch-size", "4", "--out", "run", "-q")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["quantize"] == "4"
    r = run("eval", "m.onnx", "--adapters", "run/adapters", "--data", "d.npz", "--loss", "mse",
            "--json")
    assert r.returncode == 0, r.stderr
    r = run("merge", "m.onnx", "--adapters", "run/adapters", "-o", "merged.onnx")
    assert r.returncode == 0 and "trained on the model quantized on load" in r.stdout, r.stderr


def test_quantized_file_is_used_in_place(tmp_path):
    """pyedge.quantize writes every packed weight 64-byte aligned, so a device memory-maps it
    instead of copying it (onnx_wire); the file still runs in onnxruntime."""
    import pyedge
    from pyedge.memory_budget import mapped_bytes
    m, _ = linear_model(K=256, H=192, M=160)
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    dst = tmp_path / "q.onnx"
    quantize(src, dst, bits=4, group_size=32, include=("lm_head",))
    g = pyedge.load_onnx(str(dst))
    # packed codes (uint8) and their float32 scales: nothing of size is copied
    big = [a for a in g.initializers.values() if a.nbytes >= 1024]
    assert {a.dtype for a in big} >= {np.dtype(np.uint8), np.dtype(np.float32)}
    assert mapped_bytes(big) == sum(a.nbytes for a in big)
    x = x_for("transpose", K=256)
    assert rel(run_ort(onnx.load(dst), {"x": x}), run_ort(m, {"x": x})) < 0.15
