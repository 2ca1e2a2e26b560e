"""Quantized frozen weights in the core: com.microsoft.MatMulNBits, com.microsoft.MatMulBnb4 and
pyedge.LoraQuantMatMul (csrc/ops/quant_*.cpp), and the dequantization inner loops
(csrc/ops/quant_kernels.h).

References: onnxruntime running the same single node (the file formats are ORT's), numpy
dequantize-then-GEMM, torch autograd in float64 on the dequantized weight, and
pyedge.LoraMatMul on the dequantized weight for the LoRA op. The SIMD paths are compared with
the scalar reference bit for bit.
"""
import numpy as np
import pytest

from pyedge import _core
from opcheck import check_backward, ort_run
from quant_weights import FP4, NF4, Bnb4, pack_nibbles

MS = "com.microsoft"

def rng(seed):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- numpy packers / references
class NBits:
    """A random MatMulNBits weight: codes q [N, K], scales and zero points [N, n_blocks]."""

    def __init__(self, N, K, bits, block, zp="none", bias=False, seed=0):
        g = rng(seed)
        self.N, self.K, self.bits, self.block = N, K, bits, block
        self.nb = -(-K // block)
        self.q = g.integers(0, 2 ** bits, (N, K)).astype(np.uint8)
        self.scales = (g.random((N, self.nb)) * 0.1 + 0.01).astype(np.float32)
        self.zp_mode = zp
        if zp == "float":
            self.zp = (g.random((N, self.nb)) * (2 ** bits - 1)).astype(np.float32)
        else:
            self.zp = g.integers(0, 2 ** bits, (N, self.nb)).astype(np.uint8)
            if zp == "none":
                self.zp[:] = 2 ** (bits - 1)
        self.bias = g.standard_normal(N).astype(np.float32) if bias else None

    def packed(self):
        pad = np.zeros((self.N, self.nb * self.block), np.uint8)
        pad[:, :self.K] = self.q
        blocks = pad.reshape(self.N, self.nb, self.block)
        if self.bits == 8:
            return blocks.copy()
        return np.stack([pack_nibbles(b, hi_first=False) for b in blocks.reshape(-1, self.block)]
                        ).reshape(self.N, self.nb, -1)

    def zp_input(self):
        if self.zp_mode == "none":
            return None
        if self.zp_mode == "float":
            return self.zp.copy()
        if self.bits == 8:
            return self.zp.ravel().copy()
        return np.concatenate([pack_nibbles(r, hi_first=False) for r in self.zp])

    def inputs(self, scales_2d=False):
        ins = [self.packed(), self.scales.copy() if scales_2d else self.scales.ravel().copy(),
               self.zp_input()]
        if self.bias is not None:
            ins += [None, self.bias]
        return ins

    def attrs(self):
        return dict(K=self.K, N=self.N, bits=self.bits, block_size=self.block)

    def weight(self):
        """W [N, K] in float32, (q - zp) * scale as the op computes it."""
        rep = lambda a: np.repeat(a.astype(np.float32), self.block, axis=1)[:, :self.K]
        return (self.q.astype(np.float32) - rep(self.zp)) * rep(self.scales)


def rel_err(a, ref):
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


def run(op, inputs, attrs, domain=MS, **kw):
    return _core.run_op(op, list(inputs), attrs, domain=domain, **kw)


# ---------------------------------------------------------------- forward against onnxruntime
# ORT's CPU kernel refuses 8-bit weights with float zero points (numpy checks that case below).
@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("bits,zp", [(4, "none"), (4, "packed"), (4, "float"), (8, "none"),
                                     (8, "packed")])
def test_nbits_forward_matches_ort(bits, block, zp):
    w = NBits(N=24, K=2 * block + 5, bits=bits, block=block, zp=zp, seed=block + bits)
    a = rng(1).standard_normal((2, 3, w.K)).astype(np.float32)
    ins = [a] + w.inputs()
    ours = run("MatMulNBits", ins, w.attrs())[0][0]
    ref = ort_run("MatMulNBits", ins, w.attrs(), domain=MS)[0]
    assert ours.shape == ref.shape == (2, 3, w.N)
    assert rel_err(ours, ref) <= 1e-4


@pytest.mark.parametrize("bits", [4, 8])
def test_nbits_bias_and_2d_scales_match_ort(bits):
    w = NBits(N=40, K=100, bits=bits, block=32, zp="packed", bias=True, seed=7)
    a = rng(2).standard_normal((5, w.K)).astype(np.float32)
    ins = [a] + w.inputs()
    ref = ort_run("MatMulNBits", ins, w.attrs(), domain=MS)[0]
    ours = run("MatMulNBits", ins, w.attrs())[0][0]
    assert rel_err(ours, ref) <= 1e-4
    ours2d = run("MatMulNBits", [a] + w.inputs(scales_2d=True), w.attrs())[0][0]
    np.testing.assert_array_equal(ours2d, ours)


@pytest.mark.parametrize("qt", [0, 1])
@pytest.mark.parametrize("block,N,K", [(16, 8, 48), (32, 7, 45), (64, 5, 129), (128, 9, 200)])
def test_bnb4_forward_matches_ort(qt, block, N, K):
    w = Bnb4(N, K, block, qt, seed=block)
    a = rng(3).standard_normal((6, K)).astype(np.float32)
    ins = [a] + w.inputs()
    ours = run("MatMulBnb4", ins, w.attrs())[0][0]
    ref = ort_run("MatMulBnb4", ins, w.attrs(), domain=MS)[0]
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= 1e-4


@pytest.mark.parametrize("qt,table", [(0, FP4), (1, NF4)])
def test_bnb4_codebooks_match_ort(qt, table):
    """One code per column of an identity product: ORT's decoding of each code, ours, and the
    table above agree, and codes are read high nibble first."""
    codes = np.arange(16, dtype=np.uint8)
    ins = [np.eye(16, dtype=np.float32), pack_nibbles(codes, hi_first=True),
           np.ones(1, np.float32)]
    attrs = dict(K=16, N=1, block_size=16, quant_type=qt)
    ref = ort_run("MatMulBnb4", ins, attrs, domain=MS)[0][:, 0]
    ours = run("MatMulBnb4", ins, attrs)[0][0][:, 0]
    np.testing.assert_array_equal(ref, table)
    np.testing.assert_array_equal(ours, table)


# ---------------------------------------------------------------- forward against numpy
@pytest.mark.parametrize("M", [1, 7, 1024])
@pytest.mark.parametrize("bits,block,K,N,zp", [(4, 32, 200, 96, "packed"), (8, 64, 200, 96, "float"),
                                               (4, 7, 61, 33, "float"), (8, 61, 61, 33, "packed"),
                                               (4, 700, 700, 530, "none")])
def test_nbits_matches_numpy(M, bits, block, K, N, zp):
    """Odd block sizes, per-channel blocks (block == K) and sizes that take several panels."""
    w = NBits(N, K, bits, block, zp=zp, bias=True, seed=M + K)
    a = rng(4).standard_normal((M, K)).astype(np.float32)
    ours = run("MatMulNBits", [a] + w.inputs(), w.attrs())[0][0]
    ref = a.astype(np.float64) @ w.weight().T.astype(np.float64) + w.bias
    assert rel_err(ours, ref) <= 1e-6


@pytest.mark.parametrize("M", [1, 7, 1024])
@pytest.mark.parametrize("qt,block,N,K", [(1, 64, 97, 301), (0, 5, 33, 41), (1, 4096, 530, 700)])
def test_bnb4_matches_numpy(M, qt, block, N, K):
    w = Bnb4(N, K, block, qt, seed=M)
    a = rng(5).standard_normal((M, K)).astype(np.float32)
    ours = run("MatMulBnb4", [a] + w.inputs(), w.attrs())[0][0]
    ref = a.astype(np.float64) @ w.weight().T.astype(np.float64)
    assert rel_err(ours, ref) <= 1e-6


def test_bnb4_trans_b_0():
    """transB = 0 (ORT's training graphs): Y [M, K] = A [M, N] · W."""
    w = Bnb4(12, 37, 32, 1, seed=9)
    a = rng(6).standard_normal((5, 12)).astype(np.float32)
    ours = run("MatMulBnb4", [a] + w.inputs(), dict(w.attrs(), transB=0))[0][0]
    assert rel_err(ours, a.astype(np.float64) @ w.weight()) <= 1e-6
    check_backward("MatMulBnb4", [a] + w.inputs(), lambda x, *_: x @ _t(w.weight()),
                   dict(w.attrs(), transB=0), domain=MS)


# ---------------------------------------------------------------- backward
def _t(a):
    import torch
    return torch.tensor(np.asarray(a), dtype=torch.float64)


@pytest.mark.parametrize("bits,zp,M", [(4, "packed", 7), (8, "float", 300), (4, "none", 1)])
def test_nbits_backward_matches_torch(bits, zp, M):
    w = NBits(N=70, K=90, bits=bits, block=16, zp=zp, bias=True, seed=M)
    a = rng(7).standard_normal((M, w.K)).astype(np.float32)
    W = _t(w.weight())
    grads = check_backward("MatMulNBits", [a] + w.inputs(),
                           lambda x, B, s, z, g, b: x @ W.T + b, w.attrs(), domain=MS)
    assert grads[0] is not None and grads[5] is not None  # dA and dBias
    assert all(g is None for g in grads[1:5])             # packed, scales, zp: constants


@pytest.mark.parametrize("qt", [0, 1])
def test_bnb4_backward_matches_torch(qt):
    w = Bnb4(50, 67, 64, qt, seed=qt)
    a = rng(8).standard_normal((2, 9, 67)).astype(np.float32)
    W = _t(w.weight())
    grads = check_backward("MatMulBnb4", [a] + w.inputs(), lambda x, *_: x @ W.T, w.attrs(),
                           domain=MS)
    assert grads[1] is None and grads[2] is None


# ---------------------------------------------------------------- LoraQuantMatMul
def _lora_case(base, M=40, K=48, N=36, r=4, bias=True, seed=0):
    g = rng(seed)
    x = g.standard_normal((M, K)).astype(np.float32)
    A = g.standard_normal((r, K)).astype(np.float32) * 0.3
    B = g.standard_normal((N, r)).astype(np.float32) * 0.3
    if base == "MatMulNBits":
        w = NBits(N, K, 4, 16, zp="packed", bias=bias, seed=seed)
        q = w.inputs()
        q = q[:3] + [w.bias] if bias else q[:3]
    else:
        w = Bnb4(N, K, 64, 1, seed=seed)
        q = w.inputs()
    return x, A, B, w, q


@pytest.mark.parametrize("base", ["MatMulNBits", "MatMulBnb4"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("M", [40, 600])
def test_lora_quant_matches_lora_matmul(base, dropout, M):
    """Same outputs and gradients as pyedge.LoraMatMul on the dequantized weight (same mask
    stream with dropout), in the three gradient-buffer modes."""
    x, A, B, w, q = _lora_case(base, M=M, seed=M)
    attrs = dict(w.attrs(), base=base, scale=0.5, dropout=dropout, salt=11)
    ref_attrs = dict(scale=0.5, dropout=dropout, salt=11, trans_w=1)
    W = w.weight()
    ref_ins = [x, W, A, B] + ([w.bias] if base == "MatMulNBits" else [])
    g = rng(1).standard_normal((M, w.N)).astype(np.float32)
    for init in ("zeros", "ones", "fresh"):
        (y,), grads = run("LoraQuantMatMul", [x, A, B] + q, attrs, domain="pyedge",
                          training=True, seed=5, grad_outputs=[g, None, None], grad_init=init)
        (yr,), gr = run("LoraMatMul", ref_ins, ref_attrs, domain="pyedge", training=True,
                        seed=5, grad_outputs=[g, None, None], const_inputs=[1], grad_init=init)
        assert rel_err(y, yr.astype(np.float64)) <= 1e-5
        for ours, ref, name in ((grads[0], gr[0], "dx"), (grads[1], gr[2], "dA"),
                                (grads[2], gr[3], "dB")):
            assert rel_err(ours, ref.astype(np.float64)) <= 1e-5, (name, init)
        if base == "MatMulNBits":
            assert rel_err(grads[6], gr[4].astype(np.float64)) <= 1e-5


@pytest.mark.parametrize("base", ["MatMulNBits", "MatMulBnb4"])
@pytest.mark.parametrize("r,M", [(4, 30), (12, 200)])  # r > 8: the adapter pass's BLAS path
def test_lora_quant_backward_matches_torch(base, r, M):
    x, A, B, w, q = _lora_case(base, M=M, r=r, seed=3)
    attrs = dict(w.attrs(), base=base, scale=2.0)
    W = _t(w.weight())

    def ref(x, A, B, *rest):
        y = x @ W.T + 2.0 * (x @ A.T) @ B.T
        return y + rest[3] if base == "MatMulNBits" else y
    grads = check_backward("LoraQuantMatMul", [x, A, B] + q, ref, attrs, domain="pyedge")
    assert grads[0] is not None and grads[1] is not None and grads[2] is not None


def test_lora_quant_dropout_eval_is_plain():
    """Outside training, dropout does nothing: y = x·Wqᵀ + b + s·(x·Aᵀ)·Bᵀ."""
    x, A, B, w, q = _lora_case("MatMulNBits", M=20, seed=4)
    attrs = dict(w.attrs(), base="MatMulNBits", scale=0.25, dropout=0.5)
    y = run("LoraQuantMatMul", [x, A, B] + q, attrs, domain="pyedge")[0][0]
    x64 = x.astype(np.float64)
    ref = x64 @ w.weight().T + w.bias + 0.25 * (x64 @ A.T) @ B.T
    assert rel_err(y, ref) <= 1e-6


# ---------------------------------------------------------------- errors name the node
def _nbits_ins(w, a=None):
    a = np.zeros((2, w.K), np.float32) if a is None else a
    return [a] + w.inputs()


@pytest.mark.parametrize("mutate,msg", [
    (lambda ins, at: ins.__setitem__(1, ins[1][:, :-1]), "B must be uint8"),
    (lambda ins, at: ins.__setitem__(2, ins[2][:-1]), "scales must have"),
    (lambda ins, at: ins.__setitem__(3, ins[3][:-1]), "zero_points must have"),
    (lambda ins, at: ins.__setitem__(3, np.zeros(5, np.float32)), "zero_points must have"),
    (lambda ins, at: ins.__setitem__(3, ins[3].astype(np.int32)), "zero_points must be uint8"),
    (lambda ins, at: at.__setitem__("bits", 3), "bits must be 4 or 8"),
    (lambda ins, at: at.__setitem__("block_size", 0), "block_size must be >= 1"),
    (lambda ins, at: at.__setitem__("K", 65), r"B must be uint8 \[N, ceil\(K/block_size\)"),
    (lambda ins, at: ins.__setitem__(0, np.zeros((2, 63), np.float32)), "must end in K = 64"),
    (lambda ins, at: ins.extend([np.zeros(64, np.int32)]), "g_idx"),
    (lambda ins, at: ins.__setitem__(1, ins[1].astype(np.float32)), "B \\(packed weight\\) must be uint8, got float32"),
    (lambda ins, at: ins.__setitem__(2, ins[2].astype(np.int64)), "scales must be float32, got int64"),
    (lambda ins, at: ins.extend([None, np.zeros(7, np.float32)]), "bias must have"),
])
def test_nbits_bad_inputs_are_clear_errors(mutate, msg):
    w = NBits(N=8, K=64, bits=4, block=16, zp="packed")
    ins, attrs = _nbits_ins(w), w.attrs()
    mutate(ins, attrs)
    with pytest.raises(_core.PyedgeError, match=msg) as e:
        run("MatMulNBits", ins, attrs)
    assert "MatMulNBits node 'test'" in str(e.value)


@pytest.mark.parametrize("mutate,msg", [
    (lambda ins, at: ins.__setitem__(1, ins[1][:-1]), r"B must hold \(N\*K \+ 1\) / 2"),
    (lambda ins, at: ins.__setitem__(2, ins[2][:-1]), "absmax must have"),
    (lambda ins, at: at.__setitem__("quant_type", 2), "quant_type must be 0"),
    (lambda ins, at: at.pop("block_size"), "'block_size' is required"),
])
def test_bnb4_bad_inputs_are_clear_errors(mutate, msg):
    w = Bnb4(8, 33, 16, 1)
    ins, attrs = [np.zeros((2, 33), np.float32)] + w.inputs(), w.attrs()
    mutate(ins, attrs)
    with pytest.raises(_core.PyedgeError, match=msg) as e:
        run("MatMulBnb4", ins, attrs)
    assert "MatMulBnb4 node 'test'" in str(e.value)


def test_lora_quant_bad_inputs_are_clear_errors():
    x, A, B, w, q = _lora_case("MatMulNBits")
    base = dict(w.attrs(), base="MatMulNBits", scale=1.0)
    cases = [(dict(base, base="MatMul"), [x, A, B] + q, "attribute 'base'"),
             (base, [x, A[:, :-1], B] + q, "lora_A must be"),
             (base, [x, A, B[:-1]] + q, "lora_B must be"),
             (base, [x, A, B, q[0][:-1]] + q[1:], "B must be uint8"),
             (dict(base, bits=2), [x, A, B] + q, "bits must be 4 or 8")]
    for attrs, ins, msg in cases:
        with pytest.raises(_core.PyedgeError, match=msg) as e:
            run("LoraQuantMatMul", ins, attrs, domain="pyedge")
        assert "LoraQuantMatMul node 'test'" in str(e.value)


# ---------------------------------------------------------------- SIMD paths vs scalar
@pytest.mark.arm64
@pytest.mark.parametrize("n", [0, 1, 2, 7, 8, 15, 16, 17, 31, 32, 33, 100, 1027])
def test_dequant_simd_paths_equal_scalar(n):
    paths = _core.quant_paths()
    assert paths[0] == "scalar"
    import platform
    if platform.machine() in ("aarch64", "arm64"):
        assert "neon" in paths
    g = rng(n)
    codes = g.integers(0, 256, max(n, 1)).astype(np.uint8)
    lut = g.standard_normal(16).astype(np.float32)
    zp_scale = np.array([g.integers(0, 256), g.random() * 0.1 + 1e-3], np.float32)
    for kind, params in (("lut4_lo", lut), ("lut4_hi", lut), ("u8", zp_scale),
                         ("u8", np.array([127.37, 0.0123], np.float32))):
        ref = _core.quant_dequant_kernel(kind, codes, n, params, path="scalar")
        for p in paths[1:] + ["native"]:
            got = _core.quant_dequant_kernel(kind, codes, n, params, path=p)
            np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32),
                                          err_msg=f"{kind} on {p}, n={n}")


@pytest.mark.arm64
def test_dequant_scalar_reference_decodes_codes():
    """The scalar reference itself: nibble order and the (q - zp)·scale formula."""
    codes = np.array([0x21, 0x43, 0xF5], np.uint8)
    lut = np.arange(16, dtype=np.float32) * 10
    lo = _core.quant_dequant_kernel("lut4_lo", codes, 5, lut, path="scalar")
    hi = _core.quant_dequant_kernel("lut4_hi", codes, 5, lut, path="scalar")
    np.testing.assert_array_equal(lo, [10, 20, 30, 40, 50])
    np.testing.assert_array_equal(hi, [20, 10, 40, 30, 150])
    u8 = _core.quant_dequant_kernel("u8", codes, 3, np.array([3, 0.5], np.float32), path="scalar")
    np.testing.assert_array_equal(u8, (codes.astype(np.float32) - 3) * np.float32(0.5))


@pytest.mark.arm64
@pytest.mark.parametrize("bits,zp", [(4, "packed"), (8, "float")])
def test_nbits_forward_matches_numpy_torch_free(bits, zp):
    """The op against numpy only (runs on the arm64 root without torch or onnxruntime)."""
    w = NBits(N=45, K=77, bits=bits, block=32, zp=zp, bias=True, seed=bits)
    a = rng(9).standard_normal((33, w.K)).astype(np.float32)
    ours = run("MatMulNBits", [a] + w.inputs(), w.attrs())[0][0]
    ref = a.astype(np.float64) @ w.weight().T.astype(np.float64) + w.bias
    assert rel_err(ours, ref) <= 1e-6


def test_neon_path_equals_scalar_under_qemu(tmp_path):
    """The NEON inner loops, checked on x86 machines: tests/native/quant_kernels_check.cpp
    built with the aarch64 cross compiler and run under qemu (each path vs the scalar
    reference, bit for bit). Needs g++-aarch64-linux-gnu and qemu-user-static."""
    import os
    import shutil
    import subprocess
    cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64-static")
    if not (cxx and qemu):
        pytest.skip("needs aarch64-linux-gnu-g++ and qemu-aarch64-static")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = str(tmp_path / "quant_kernels_check")
    subprocess.run([cxx, "-std=c++17", "-O2", "-static", "-march=armv8-a",
                    "-I", os.path.join(root, "csrc"),
                    os.path.join(root, "tests", "native", "quant_kernels_check.cpp"), "-o", exe],
                   check=True, capture_output=True)
    res = subprocess.run([qemu, exe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok neon" in res.stdout


# ---------------------------------------------------------------- in a training plan
def _session_pair(quant_nodes, float_nodes, inits_q, inits_f, train, N):
    """Two one-input graphs (x [8, 40] -> y [8, N]) trained 3 SGD steps on MSE; returns the
    losses and final trainable tensors of each."""
    import pyedge
    from onnx import TensorProto, helper, numpy_helper
    x = rng(11).standard_normal((8, 40)).astype(np.float32)
    labels = rng(12).standard_normal((8, N)).astype(np.float32)
    res = []
    for nodes, inits in ((quant_nodes, inits_q), (float_nodes, inits_f)):
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 40])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, N])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                                helper.make_opsetid(MS, 1),
                                                helper.make_opsetid("pyedge", 1)])
        sess = pyedge.TrainingSession(m, train=train, loss="mse",
                                      optimizer=pyedge.SGD(lr=0.05), fuse=False)
        losses = [sess.step({"x": x}, labels) for _ in range(3)]
        res.append((losses, {k: sess.parameters()[k] for k in train}))
    return res


def test_matmul_nbits_trains_upstream_weight_in_a_plan():
    """A frozen MatMulNBits between a trainable MatMul and the loss: the plan's gradient
    flows through dA exactly as through a float MatMul on the dequantized weight."""
    from onnx import helper
    w = NBits(N=16, K=40, bits=4, block=16, zp="packed", bias=True, seed=1)
    packed, scales, zp, _, bias = w.inputs()
    W0 = (rng(2).standard_normal((40, 40)) * 0.2).astype(np.float32)
    q = [helper.make_node("MatMul", ["x", "W0"], ["h"]),
         helper.make_node("MatMulNBits", ["h", "B", "S", "Z", "", "bias"], ["y"], domain=MS,
                          **w.attrs())]
    f = [helper.make_node("MatMul", ["x", "W0"], ["h"]),
         helper.make_node("MatMul", ["h", "Wt"], ["hw"]), helper.make_node("Add", ["hw", "bias"], ["y"])]
    (lq, pq), (lf, pf) = _session_pair(
        q, f, dict(W0=W0, B=packed, S=scales, Z=zp, bias=bias),
        dict(W0=W0, Wt=np.ascontiguousarray(w.weight().T), bias=bias), ["W0"], 16)
    np.testing.assert_allclose(lq, lf, rtol=1e-5)
    assert lq[2] < lq[0]
    assert rel_err(pq["W0"], pf["W0"].astype(np.float64)) <= 1e-5


@pytest.mark.parametrize("base", ["MatMulNBits", "MatMulBnb4"])
def test_lora_quant_trains_like_lora_matmul_in_a_plan(base):
    """QLoRA in a plan: LoraQuantMatMul's adapters train exactly as LoraMatMul's on the
    dequantized weight (same losses, same A and B after 3 steps)."""
    from onnx import helper
    x, A, B, w, q = _lora_case(base, M=8, K=40, N=24, r=4, seed=5)
    names = ["B_q", "S_q", "Z_q", "bias"][:len(q)] if base == "MatMulNBits" else ["B_q", "S_q"]
    attrs = dict(w.attrs(), base=base, scale=0.5)
    qn = [helper.make_node("LoraQuantMatMul", ["x", "lora_A", "lora_B"] + names, ["y"],
                           domain="pyedge", **attrs)]
    fin = ["x", "W", "lora_A", "lora_B"] + (["bias"] if base == "MatMulNBits" else [])
    fn = [helper.make_node("LoraMatMul", fin, ["y"], domain="pyedge", scale=0.5, trans_w=1)]
    inits_q = dict(lora_A=A, lora_B=B, **dict(zip(names, q)))
    inits_f = dict(lora_A=A, lora_B=B, W=w.weight())
    if base == "MatMulNBits":
        inits_f["bias"] = w.bias
    (lq, pq), (lf, pf) = _session_pair(qn, fn, inits_q, inits_f, ["lora_A", "lora_B"], 24)
    np.testing.assert_allclose(lq, lf, rtol=1e-5)
    assert lq[2] < lq[0]
    for k in ("lora_A", "lora_B"):
        assert rel_err(pq[k], pf[k].astype(np.float64)) <= 1e-5, k


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("N,K", [(96, 200), (530, 300)])  # narrow: parts split rows; wide: columns
def test_quant_gemm_any_thread_count(threads, N, K):
    """Forward and dA at M = 300 with 1-3 parts, narrow and wide outputs, against numpy."""
    w = NBits(N, K, 4, 32, zp="packed", seed=threads)
    a = rng(10).standard_normal((300, K)).astype(np.float32)
    g = rng(11).standard_normal((300, N)).astype(np.float32)
    before = _core.num_threads()
    _core.set_num_threads(threads)
    try:
        (y,), grads = run("MatMulNBits", [a] + w.inputs(), w.attrs(), grad_outputs=[g])
    finally:
        _core.set_num_threads(before)
    W = w.weight().astype(np.float64)
    assert rel_err(y, a.astype(np.float64) @ W.T) <= 1e-6
    assert rel_err(grads[0], g.astype(np.float64) @ W) <= 1e-6
