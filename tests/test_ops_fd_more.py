"""The `arm64` subset covers every registered op, and this file proves it.

1. Finite-difference cases (forward against float64 numpy, every input gradient the core
   returns against central differences of the reference) for the ops test_ops_fd.py and
   test_ops_fd_families.py leave out: the remaining activations and math, variadic Sum/Min,
   reductions, instance norm, global max pool, GatherND, Split (every output gets a
   gradient), the reshape-likes, Identity, Dropout, Cast, the losses, pyedge's fused ops
   (DoRA, RMSNorm, SwiGLU, Rotary, LinearCrossEntropy, LoRA on a quantized base) and the
   quantized MatMuls (gradient of the activation only: the packed weight is frozen).
2. Forward-only checks against numpy for the ops with no backward rule (comparisons, logic,
   ArgMax/ArgMin, rounding, Mod, the shape/constant ops, ReduceProd, ScatterND, the
   quantized embedding lookup, cached attention), each also asserting that the op gives no
   gradient, so an op that gains a backward rule must move to the FD cases.
3. test_every_registered_op_is_covered: every name in _core.registered_ops() is an op of an
   FD case (here or in the two modules above), of the forward-only table, or listed in
   OTHER_ARM64_TESTS with an existing `arm64`-marked test. A new op without such a check fails
   it, named.
4. test_gradient_buffer_modes: every FD case of the three modules also runs its backward into
   buffers holding ones (the op must accumulate) and NaN marked fresh (it must overwrite).

numpy only (no reference framework), so it runs on aarch64 under scripts/arm64-check.sh.
A case is (id, op, inputs, attrs, opset, float64 reference) as in test_ops_fd.py, run through
its check; or the same with a 7th element, a dict of options for _check_more:
  grads:   indices of the inputs that must get a gradient (exactly those); FD runs on them
  outputs: number of visible outputs the reference returns (a tuple) and that each get a
           random output gradient (default 1: the first)
  plus run_op's num_outputs, const_inputs, training, seed."""
import ast
import pathlib

import numpy as np
import pytest

import test_ops_fd
import test_ops_fd_families
from pyedge import _core
from quant_weights import Bnb4, pack_nibbles
from test_ops_import_breadth import np_instancenorm as _instancenorm
from test_ops_fd import R, _erf, _fd_grads, _softmax, test_backward_vs_finite_differences as _check

pytestmark = pytest.mark.arm64

HERE = pathlib.Path(__file__).resolve().parent


# ---------------------------------------------------------------- numpy references
def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _log_softmax(x, axis=-1):
    m = x.max(axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis, keepdims=True))


def _distinct(*shape, seed=0, step=0.1):
    """Values at least `step` apart (no ties for Min / ReduceMin / GlobalMaxPool under +-eps)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    return ((rng.permutation(n) - n / 2 + 0.25) * step).reshape(shape).astype(np.float32)


def _cross_entropy(logits, labels, shift=0, ignore=-100, smoothing=0.0, reduction="mean"):
    """F.cross_entropy over flattened rows (shift: logits[..., :-1, :] vs labels[..., 1:]);
    mean over counted rows, 0 when none count."""
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    C = logits.shape[-1]
    lp = _log_softmax(logits.reshape(-1, C))
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    keep = y != ignore
    rows = lp[keep]
    nll = -rows[np.arange(len(rows)), y[keep]]
    loss = (1 - smoothing) * nll + smoothing * -rows.mean(1)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / keep.sum() if keep.sum() else 0.0 * loss.sum()


def _sce_onnx(x, labels, w=None, ignore=None, reduction="mean"):
    """ONNX SoftmaxCrossEntropyLoss: scores [N, C, d...] (class axis 1) -> (loss, log_prob)."""
    lp = _log_softmax(x, axis=1)
    y = np.asarray(labels).astype(np.int64)
    valid = np.ones(y.shape, bool) if ignore is None else y != ignore
    yc = np.where(valid, y, 0)
    picked = np.take_along_axis(lp, yc[:, None], 1)[:, 0]
    wy = (np.ones(y.shape) if w is None else w[yc]) * valid
    loss = -wy * picked
    if reduction == "none":
        return loss, lp
    if reduction == "sum":
        return loss.sum(), lp
    return loss.sum() / wy.sum(), lp


def _rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], -1)


def _rotary(x, cos, sin, layout="bhtd"):
    """Half-split rotary on the first rd = cos.shape[-1] channels; cos/sin [Bc, T, rd]."""
    rd = cos.shape[-1]
    c, s = (cos[:, None], sin[:, None]) if layout == "bhtd" else (cos[:, :, None], sin[:, :, None])
    y = x.copy()
    y[..., :rd] = x[..., :rd] * c + _rotate_half(x[..., :rd]) * s
    return y


def _gelu(x):
    return 0.5 * x * (1 + _erf(x / np.sqrt(2)))


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _dora(z, m, w, a, b, bias=None, scale=1.0, trans_w=0):
    """PEFT's DoRA magnitude on a LoRA output: z * m / ||row j of (W + s B A)|| (+ bias)."""
    wf = (w if trans_w else w.T) + scale * b @ a  # [N, K]
    y = z * (m.reshape(-1) / np.sqrt((wf ** 2).sum(1)))
    return y if bias is None else y + bias


# ---- quantized weights (ONNX Runtime's formats, see csrc/ops/quant_gemm.h), packed here from
# random codes (MatMulBnb4 weights, codebooks, nibbles: tests/quant_weights.py, shared with
# test_quant_ops.py); the reference is the dequantized weight in float64 arithmetic.
class _NBits:
    """MatMulNBits weight W [N, K] = (q - zp) * scale per block of K; zp None (2^(bits-1)),
    "packed" (uint8 codes) or "float"."""

    def __init__(self, N, K, bits, block, zp=None, seed=0):
        g = np.random.default_rng(seed)
        self.N, self.K, self.bits, self.block = N, K, bits, block
        self.nb = -(-K // block)
        self.q = g.integers(0, 2 ** bits, (N, K)).astype(np.uint8)
        self.scales = (g.random((N, self.nb)) * 0.2 + 0.05).astype(np.float32)
        self.zp_mode = zp
        if zp == "float":
            self.zp = (g.random((N, self.nb)) * (2 ** bits - 1)).astype(np.float32)
        elif zp == "packed":
            self.zp = g.integers(0, 2 ** bits, (N, self.nb)).astype(np.uint8)
        else:
            self.zp = np.full((N, self.nb), 2 ** (bits - 1), np.uint8)

    def packed(self):
        """[N, n_blocks, blob]: each block padded to block_size codes (odd 4-bit: a pad nibble)."""
        pad = np.zeros((self.N, self.nb * self.block), np.uint8)
        pad[:, :self.K] = self.q
        blocks = pad.reshape(-1, self.block)
        if self.bits == 8:
            return blocks.reshape(self.N, self.nb, self.block).copy()
        return np.stack([pack_nibbles(b) for b in blocks]).reshape(self.N, self.nb, -1)

    def zero_points(self):
        if self.zp_mode == "float":
            return self.zp.ravel().copy()
        if self.zp_mode == "packed":
            rows = [r if self.bits == 8 else pack_nibbles(r) for r in self.zp]
            return np.concatenate(rows).astype(np.uint8)
        return None

    def attrs(self):
        return {"K": self.K, "N": self.N, "bits": self.bits, "block_size": self.block}

    def weight(self):
        rep = lambda a: np.repeat(a.astype(np.float64), self.block, 1)[:, :self.K]
        return (self.q.astype(np.float64) - rep(self.zp)) * rep(self.scales)


W4 = _NBits(17, 33, 4, 16, zp="packed", seed=1)   # 3 blocks, the last one padded
W8 = _NBits(11, 20, 8, 8, zp="float", seed=2)
B_NF4 = Bnb4(17, 33, 64, 1, seed=3)               # blocks run on across rows
B_FP4 = Bnb4(9, 14, 32, 0, seed=4)
W_HEAD = _NBits(13, 6, 4, 4, zp=None, seed=5)      # a 4-bit LM head: V = 13, D = 6


# ---------------------------------------------------------------- FD cases
LBL = np.array([[3, 0, 16, 5, -100], [7, 7, 1, 12, 2]], np.int64)      # one ignored
LBL13 = np.array([[3, 0, 12, 5, -100], [7, 7, 1, 12, 2]], np.int64)
GND_IDX = np.array([[1, 2], [3, 0], [1, 2]], np.int64)                  # a repeated slice
GND_B = np.array([[[2], [0]], [[1], [1]]], np.int64)                    # batch_dims=1
SCE_Y = np.array([[0, 4, 2], [1, 3, 1]], np.int64)
RD = 6  # rotary dim of X's 8 channels (partial rotary)
_ang = np.arange(3)[:, None] * (0.5 ** np.arange(RD // 2))[None] + 0.3
COS1 = np.cos(np.concatenate([_ang, _ang], -1))[None].astype(np.float32)     # [1, T=3, rd]
SIN1 = np.sin(np.concatenate([_ang, _ang], -1))[None].astype(np.float32)
COS2, SIN2 = R(2, 3, 8, seed=7), R(2, 3, 8, seed=8)                          # per sequence

SELU_A, SELU_G = 1.67326319217681884765625, 1.05070102214813232421875  # ONNX's defaults

CASES = [
    # activations and math (test_simd_unary.py checks their SIMD paths over 4099 elements)
    ("elu", "Elu", [R(3, 17, scale=2) + 0.01], {"alpha": 0.7}, 17,
     lambda x: np.where(x > 0, x, 0.7 * np.expm1(x))),
    ("selu", "Selu", [R(3, 17, scale=2) + 0.01], {}, 17,
     lambda x: SELU_G * np.where(x > 0, x, SELU_A * np.expm1(x))),
    ("softplus", "Softplus", [R(3, 17, scale=3)], {}, 17, lambda x: np.logaddexp(0, x)),
    ("exp", "Exp", [R(3, 17)], {}, 17, np.exp),
    ("log", "Log", [np.abs(R(3, 17)) + 0.3], {}, 17, np.log),
    # variadic Sum / Min with broadcasting (Min: no ties)
    ("sum3", "Sum", [R(3, 17), R(17, seed=1), R(3, 1, seed=2)], {}, 17,
     lambda a, b, c: a + b + c),
    ("min2", "Min", [_distinct(3, 17), _distinct(3, 17, seed=1, step=0.13)], {}, 17, np.minimum),
    ("min3_broadcast", "Min", [_distinct(2, 9), _distinct(9, seed=1, step=0.17),
                               _distinct(2, 1, seed=2, step=0.29)], {}, 17,
     lambda a, b, c: np.minimum(np.minimum(a, b), c)),
    # reductions: L2 over the last axis, Min over two non-adjacent axes (the table path)
    ("reducel2", "ReduceL2", [R(3, 17)], {"axes": [1], "keepdims": 0}, 17,
     lambda x: np.sqrt((x * x).sum(1))),
    ("reducemin_axes02", "ReduceMin", [_distinct(3, 4, 5)], {"axes": [0, 2], "keepdims": 1},
     17, lambda x: x.min((0, 2), keepdims=True)),
    ("reducel2_axes_input", "ReduceL2", [R(2, 3, 5), np.array([0, 2], np.int64)],
     {"keepdims": 1}, 18, lambda x, a: np.sqrt((x * x).sum((0, 2), keepdims=True))),
    # normalisation, pooling
    ("instancenorm", "InstanceNormalization",
     [R(2, 3, 17, scale=2, shift=0.5), R(3, seed=1, shift=1), R(3, seed=2)], {"epsilon": 1e-5},
     17, _instancenorm),
    ("instancenorm_2d", "InstanceNormalization",
     [R(1, 2, 3, 5), R(2, seed=1, shift=1), R(2, seed=2)], {}, 17, _instancenorm),
    ("globalmaxpool", "GlobalMaxPool", [_distinct(2, 3, 4, 5)], {}, 17,
     lambda x: x.max((2, 3), keepdims=True)),
    # indexing (GatherND: a repeated index accumulates; batch_dims)
    ("gathernd", "GatherND", [R(4, 3, 5), GND_IDX], {}, 17,
     lambda x, i: x[GND_IDX[:, 0], GND_IDX[:, 1]]),
    ("gathernd_batch", "GatherND", [R(2, 3, 4), GND_B], {"batch_dims": 1}, 17,
     lambda x, i: np.stack([x[b][GND_B[b, :, 0]] for b in range(2)])),
    # reshape-likes, Identity, Dropout in inference (y = x, mask all true)
    ("squeeze", "Squeeze", [R(3, 1, 17), np.array([1], np.int64)], {}, 13,
     lambda x, a: x[:, 0]),
    ("squeeze_attr", "Squeeze", [R(1, 3, 1, 5)], {"axes": [0, 2]}, 11, lambda x: x[0, :, 0]),
    ("unsqueeze", "Unsqueeze", [R(3, 17), np.array([0, -1], np.int64)], {}, 13,
     lambda x, a: x[None, :, :, None]),
    ("flatten", "Flatten", [R(2, 3, 2, 5)], {"axis": 2}, 17, lambda x: x.reshape(6, 10)),
    ("identity", "Identity", [R(3, 17)], {}, 17, lambda x: x),
    ("dropout_inference", "Dropout", [R(3, 17), np.array(0.3, np.float32)], {}, 13,
     lambda x, r: x),
    # Cast float -> float passes the gradient (and converts it back)
    ("cast_f64", "Cast", [R(3, 17)], {"to": 11}, 17, lambda x: x),
    ("castlike_f64", "CastLike", [R(3, 17), np.zeros(1, np.float64)], {}, 19,
     lambda x, like: x, {"grads": [0], "const_inputs": [1]}),
    # A float64 value takes a float32 gradient buffer, as in a plan (Cast back to float,
    # a float64 residual Add, a float64 Identity)
    ("cast_from_f64", "Cast", [R(3, 17).astype(np.float64)], {"to": 1}, 17, lambda x: x),
    ("add_f64", "Add", [R(3, 17).astype(np.float64), R(3, 17, seed=1).astype(np.float64)], {},
     17, lambda a, b: a + b),
    ("identity_f64", "Identity", [R(3, 17).astype(np.float64)], {}, 17, lambda x: x),
    # Split: every output gets a gradient
    ("split_sizes", "Split", [R(3, 17), np.array([2, 5, 10], np.int64)], {"axis": 1}, 13,
     lambda x, s: (x[:, :2], x[:, 2:7], x[:, 7:]), {"grads": [0], "outputs": 3}),
    ("split_num_outputs", "Split", [R(17, 3)], {"axis": 0, "num_outputs": 3}, 18,
     lambda x: (x[:6], x[6:12], x[12:]), {"grads": [0], "outputs": 3, "num_outputs": 3}),
    # losses
    ("mseloss", "pyedge.MSELoss", [R(6, 1), R(6, seed=1)], {}, 17,
     lambda p, t: ((p[:, 0] - t) ** 2).mean(), {"grads": [0, 1]}),
    ("mseloss_sum", "pyedge.MSELoss", [R(3, 17), R(3, 17, seed=1)], {"reduction": "sum"}, 17,
     lambda p, t: ((p - t) ** 2).sum(), {"grads": [0, 1]}),
    ("crossentropy_shift_smooth", "pyedge.CrossEntropyLoss", [R(2, 5, 17, scale=2), LBL],
     {"shift": 1, "label_smoothing": 0.1}, 17,
     lambda x, y: _cross_entropy(x, LBL, shift=1, smoothing=0.1), {"grads": [0]}),
    ("crossentropy_sum_int32", "pyedge.CrossEntropyLoss",
     [R(4, 17, scale=2), np.array([0, 16, 3, 9], np.int32)], {"reduction": "sum"}, 17,
     lambda x, y: _cross_entropy(x, np.array([0, 16, 3, 9]), reduction="sum"), {"grads": [0]}),
    # ONNX's loss with weights, an ignored class, [N, C, d] scores: loss and log_prob both
    # take an output gradient
    ("softmaxcrossentropy_weighted", "SoftmaxCrossEntropyLoss",
     [R(2, 5, 3, scale=2), SCE_Y, np.abs(R(5, seed=1)) + 0.5], {"ignore_index": 1}, 13,
     lambda x, y, w: _sce_onnx(x, SCE_Y, w, ignore=1), {"grads": [0], "outputs": 2}),
    ("softmaxcrossentropy_none", "SoftmaxCrossEntropyLoss", [R(2, 5, 3, scale=2), SCE_Y],
     {"reduction": "none"}, 13, lambda x, y: _sce_onnx(x, SCE_Y, reduction="none"),
     {"grads": [0], "outputs": 2}),
    # LM head + cross-entropy over row chunks: a trained head with bias and LoRA (recompute
    # path), a frozen one (gradients taken in the forward), a 4-bit head (activation only)
    ("linearcrossentropy_trained", "pyedge.LinearCrossEntropy",
     [R(2, 5, 6), R(17, 6, seed=1, scale=0.7), LBL, R(17, seed=2), R(3, 6, seed=3, scale=0.5),
      R(17, 3, seed=4, scale=0.5)], {"shift": 1, "lora_scale": 0.5, "label_smoothing": 0.1,
                                     "chunk": 3}, 17,
     lambda h, w, y, b, a, bb: _cross_entropy(h @ w.T + b + 0.5 * (h @ a.T) @ bb.T, LBL, shift=1,
                                              smoothing=0.1), {"grads": [0, 1, 3, 4, 5]}),
    ("linearcrossentropy_frozen_w", "pyedge.LinearCrossEntropy",
     [R(2, 5, 6), R(6, 17, seed=1, scale=0.7), LBL, None, R(3, 6, seed=3, scale=0.5),
      R(17, 3, seed=4, scale=0.5)], {"trans_w": 0, "lora_scale": 2.0, "chunk": 4}, 17,
     lambda h, w, y, b, a, bb: _cross_entropy(h @ w + 2.0 * (h @ a.T) @ bb.T, LBL),
     {"grads": [0, 4, 5], "const_inputs": [1]}),
    ("linearcrossentropy_4bit_head", "pyedge.LinearCrossEntropy",
     [R(2, 5, 6), W_HEAD.packed(), LBL13, R(13, seed=2), None, None, W_HEAD.scales.ravel()],
     dict(W_HEAD.attrs(), chunk=3), 17,
     lambda h, w, y, b, a, bb, s: _cross_entropy(h @ W_HEAD.weight().T + b, LBL13),
     {"grads": [0, 3], "const_inputs": [6]}),
    # pyedge's fused ops
    ("dorascale", "pyedge.DoraScale",
     [R(5, 17), np.abs(R(17, seed=1)) + 0.5, R(17, 9, seed=2), R(3, 9, seed=3),
      R(17, 3, seed=4), R(17, seed=5)], {"scale": 0.5, "trans_w": 1}, 17,
     lambda z, m, w, a, b, bias: _dora(z, m, w, a, b, bias, 0.5, 1), {"grads": [0, 1, 5]}),
    ("dorascale_kn", "pyedge.DoraScale",
     [R(2, 3, 17), np.abs(R(1, 17, seed=1)) + 0.5, R(9, 17, seed=2), R(3, 9, seed=3),
      R(17, 3, seed=4)], {"scale": 2.0}, 17,
     lambda z, m, w, a, b: _dora(z, m, w, a, b, None, 2.0, 0), {"grads": [0, 1]}),
    ("rmsnorm", "pyedge.RMSNorm", [R(3, 33, shift=0.3), R(33, seed=1)], {"epsilon": 1e-6}, 17,
     lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w),
    ("rmsnorm_add_one", "pyedge.RMSNorm", [R(2, 2, 17), R(17, seed=1)],
     {"epsilon": 1e-5, "add_one": 1}, 17,
     lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * (1 + w)),
    ("rmsnorm_no_weight", "pyedge.RMSNorm", [R(3, 17)], {}, 17,
     lambda x: x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)),
    ("swiglu", "pyedge.SwiGLU", [R(3, 17, scale=2), R(3, 17, seed=1)], {}, 17,
     lambda g, u: g * _sigmoid(g) * u),
    ("geglu", "pyedge.SwiGLU", [R(3, 17, scale=2), R(3, 17, seed=1)], {"act": "gelu"}, 17,
     lambda g, u: _gelu(g) * u),
    ("geglu_tanh", "pyedge.SwiGLU", [R(3, 17, scale=2), R(3, 17, seed=1)],
     {"act": "gelu_tanh"}, 17, lambda g, u: _gelu_tanh(g) * u),
    ("rotary_partial_bhtd", "pyedge.Rotary", [R(2, 2, 3, 8), COS1, SIN1], {}, 17,
     lambda x, c, s: _rotary(x, COS1.astype(np.float64), SIN1.astype(np.float64)),
     {"grads": [0], "const_inputs": [1, 2]}),
    ("rotary_bthd_per_sequence", "pyedge.Rotary", [R(2, 3, 2, 8), COS2, SIN2],
     {"layout": "bthd"}, 17, lambda x, c, s: _rotary(x, c, s, "bthd"),
     {"grads": [0], "const_inputs": [1, 2]}),
    # quantized frozen weights: only the activation (and a float bias) take a gradient
    ("matmulnbits_4bit_bias", "com.microsoft.MatMulNBits",
     [R(5, 33), W4.packed(), W4.scales.ravel(), W4.zero_points(), None, R(17, seed=9)],
     W4.attrs(), 1, lambda a, *rest: a @ W4.weight().T + rest[-1],
     {"grads": [0, 5], "const_inputs": [2]}),
    ("matmulnbits_8bit", "com.microsoft.MatMulNBits",
     [R(2, 3, 20), W8.packed(), W8.scales.ravel(), W8.zero_points()], W8.attrs(), 1,
     lambda a, *rest: a @ W8.weight().T, {"grads": [0], "const_inputs": [2, 3]}),
    ("matmulbnb4_nf4", "com.microsoft.MatMulBnb4", [R(5, 33)] + B_NF4.inputs(), B_NF4.attrs(), 1,
     lambda a, *rest: a @ B_NF4.weight().T, {"grads": [0], "const_inputs": [2]}),
    ("matmulbnb4_fp4_transB0", "com.microsoft.MatMulBnb4", [R(4, 9)] + B_FP4.inputs(),
     dict(B_FP4.attrs(), transB=0), 1, lambda a, *rest: a @ B_FP4.weight(),
     {"grads": [0], "const_inputs": [2]}),
    ("loraquantmatmul_nbits", "pyedge.LoraQuantMatMul",
     [R(7, 33), R(3, 33, seed=1, scale=0.3), R(17, 3, seed=2, scale=0.3), W4.packed(),
      W4.scales.ravel(), W4.zero_points(), R(17, seed=3)],
     dict(W4.attrs(), base="MatMulNBits", scale=0.5), 17,
     lambda x, a, b, *rest: x @ W4.weight().T + rest[-1] + 0.5 * (x @ a.T) @ b.T,
     {"grads": [0, 1, 2, 6], "const_inputs": [4]}),
    ("loraquantmatmul_bnb4", "pyedge.LoraQuantMatMul",
     [R(2, 3, 33), R(4, 33, seed=1, scale=0.3), R(17, 4, seed=2, scale=0.3)] + B_NF4.inputs(),
     dict(B_NF4.attrs(), base="MatMulBnb4", scale=2.0), 17,
     lambda x, a, b, *rest: x @ B_NF4.weight().T + 2.0 * (x @ a.T) @ b.T,
     {"grads": [0, 1, 2], "const_inputs": [4]}),
]


def _f64(x):
    return None if x is None else x.astype(np.float64) if x.dtype.kind == "f" else x


def _check_more(case):
    """test_ops_fd's check, extended: inputs may be None (absent optional inputs), several
    outputs may take a gradient, exactly the inputs in `grads` must get one (a frozen or
    integer input none), and FD runs on those alone (the others stay fixed)."""
    _, op, inputs, attrs, opset, ref, opt = case
    domain, _, op = op.rpartition(".")
    kw = {k: opt[k] for k in ("num_outputs", "const_inputs", "training", "seed") if k in opt}
    n_out = opt.get("outputs", 1)
    xs = [_f64(x) for x in inputs]

    def ref_outs(*args):
        y = ref(*args)
        return list(y) if n_out > 1 else [y]
    outs, _ = _core.run_op(op, inputs, attrs, opset=opset, domain=domain, **kw)
    for j, want in enumerate(ref_outs(*xs)):
        np.testing.assert_allclose(outs[j], want, rtol=2e-5, atol=2e-5,
                                   err_msg=f"{op} forward, output {j}")
    rng = np.random.default_rng(1)
    gs = [np.asarray(rng.standard_normal(np.shape(outs[j])), np.float32) for j in range(n_out)]
    _, grads = _core.run_op(op, inputs, attrs, opset=opset, domain=domain,
                            grad_outputs=gs + [None] * (len(outs) - n_out), **kw)
    wrt = opt.get("grads", [i for i, x in enumerate(inputs) if x is not None and x.dtype.kind == "f"])
    assert [i for i, g in enumerate(grads) if g is not None] == wrt, f"{op}: inputs with a gradient"

    def objective(*sub):  # sum_j <f_j, g_j> as a function of the inputs in wrt
        full = list(xs)
        for i, x in zip(wrt, sub):
            full[i] = x
        return sum(np.sum(y * g.astype(np.float64)) for y, g in zip(ref_outs(*full), gs))
    fd = _fd_grads(objective, [inputs[i] for i in wrt], np.float64(1.0))
    for i, want in zip(wrt, fd):
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(grads[i], want, rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=f"{op} grad of input {i}")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_more_backward_vs_finite_differences(case):
    if len(case) == 6:
        _check(case)
    else:
        _check_more(case)


ALL_FD = ([("fd." + c[0], c) for c in test_ops_fd.CASES]
          + [("families." + c[0], c) for c in test_ops_fd_families.CASES]
          + [("more." + c[0], c) for c in CASES])


@pytest.mark.parametrize("case", [c for _, c in ALL_FD], ids=[i for i, _ in ALL_FD])
def test_gradient_buffer_modes(case):
    """The FD checks fill zeroed gradient buffers. A plan also hands an op buffers that hold
    earlier writers' sums (the op must add: grad_init="ones") and, to ops that assign fresh
    gradients, uninitialised ones (NaN here: every element must be overwritten). Same
    gradients all three ways, for every FD case (the torch-based opcheck does this on x86)."""
    _, op, inputs, attrs, opset, _, *opt = case
    opt = opt[0] if opt else {}
    domain, _, op = op.rpartition(".")
    kw = {k: opt[k] for k in ("num_outputs", "const_inputs", "training", "seed") if k in opt}
    outs, _ = _core.run_op(op, inputs, attrs, opset=opset, domain=domain, **kw)
    rng = np.random.default_rng(2)
    n_out = opt.get("outputs", 1)
    gs = [np.asarray(rng.standard_normal(np.shape(outs[j])), np.float32) for j in range(n_out)]
    gs += [None] * (len(outs) - n_out)
    runs = {init: _core.run_op(op, inputs, attrs, opset=opset, domain=domain, grad_outputs=gs,
                               grad_init=init, **kw)[1] for init in ("zeros", "ones", "fresh")}
    assert any(g is not None for g in runs["zeros"])
    for init, off in (("ones", 1.0), ("fresh", 0.0)):
        for i, (g0, g) in enumerate(zip(runs["zeros"], runs[init])):
            assert (g0 is None) == (g is None)
            if g0 is not None:
                np.testing.assert_allclose(g - off, g0, rtol=1e-5,
                                           atol=1e-5 * max(1.0, float(np.abs(g0).max(initial=0))),
                                           err_msg=f"{op} grad of input {i}, grad_init={init}")


def _float64_stretch(scale_in_float64):
    """x·W, Cast up, a float64 Add (a + a), ×0.75 (a float64 Mul, or a float32 one after the
    Cast down), Cast down: out = 1.5·(x·W)."""
    from onnx import TensorProto, helper, numpy_helper
    w = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]),
             helper.make_node("Cast", ["a"], ["a64"], to=TensorProto.DOUBLE),
             helper.make_node("Add", ["a64", "a64"], ["b64"], name="add64")]
    if scale_in_float64:
        nodes += [helper.make_node("Mul", ["b64", "c"], ["m64"], name="mul64"),
                  helper.make_node("Cast", ["m64"], ["out"], to=TensorProto.FLOAT)]
        c = np.array(0.75)
    else:
        nodes += [helper.make_node("Cast", ["b64"], ["b"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["b", "c"], ["out"])]
        c = np.array(0.75, np.float32)
    graph = helper.make_graph(
        nodes, "f64", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [3, 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(c, "c")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w


def test_plan_passes_gradients_through_float64_values():
    """The planner gives float64 values float32 gradient buffers (as run_op does in the cases
    above): a Cast up, a float64 Add and a Cast down train like float32; the MSE gradient
    against numpy's closed form."""
    import pyedge
    model, w = _float64_stretch(scale_in_float64=False)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5)).astype(np.float32)
    t = rng.standard_normal((3, 4)).astype(np.float32)
    sess = pyedge.TrainingSession(model, train=["w"], loss="mse", fuse=False)
    loss = sess.step({"x": x}, t, update=False)
    x64 = x.astype(np.float64)
    out = 1.5 * x64 @ w.astype(np.float64)
    np.testing.assert_allclose(loss, np.mean((out - t) ** 2), rtol=1e-5)
    want = x64.T @ (2 * (out - t) / out.size * 1.5)
    np.testing.assert_allclose(sess.gradients()["w"], want, rtol=1e-5, atol=1e-6)


def test_plan_refuses_a_backward_that_reads_float64():
    """Mul by a float64 constant on the trained path: its backward needs the factor as float32
    data. A clear error naming the node and the value at planning, not an internal one in the
    first step."""
    import pyedge
    model, _ = _float64_stretch(scale_in_float64=True)
    with pytest.raises(pyedge.UnsupportedOpError, match=r"mul64.*float64 \('c'\).*float32"):
        pyedge.TrainingSession(model, train=["w"], loss="mse", fuse=False).step(
            {"x": np.ones((3, 5), np.float32)}, np.zeros((3, 4), np.float32), update=False)


@pytest.mark.parametrize("ratio", [0.3, 0.0])
def test_dropout_training_vs_finite_differences(ratio):
    """Training mode: y = x * mask / (1 - ratio) with the op's own mask (ratio 0 keeps all)."""
    x = R(4, 17)
    (y, mask), _ = _core.run_op("Dropout", [x, np.array(ratio, np.float32)], opset=13,
                                training=True, seed=3)
    assert mask.dtype == bool and (mask.all() if ratio == 0 else 0 < mask.mean() < 1)
    keep = mask.astype(np.float64) / (1 - ratio)
    _check_more(("dropout_training", "Dropout", [x, np.array(ratio, np.float32)], {}, 13,
                 lambda x, r: x * keep, {"grads": [0], "training": True, "seed": 3}))


# ---------------------------------------------------------------- forward-only ops
NAN, INF = np.float32(np.nan), np.float32(np.inf)
SPECIAL = np.array([-2.5, -1.5, -0.5, -0.0, 0.0, 0.5, 1.5, 2.5, 0.49999997, -3.7, 1e8 + 1, NAN,
                    INF, -INF, 2.2, -0.2, 7.5], np.float32)
CMP_A = np.array([[1.0, NAN, 3.0, -INF, 0.0, 2.0, INF]], np.float32)
CMP_B = np.array([[1.0], [NAN], [-0.0], [INF]], np.float32)            # broadcast to [4, 7]
BOOL_A = np.array([[True, False, True, False]])
BOOL_B = np.array([[True], [False], [True]])
IDX_I = np.array([[2, 1, 0], [1, 2, 2]], np.int64)
TIES = np.array([[1.0, 3.0, 3.0, -1.0], [-2.0, -2.0, 0.5, 0.5], [7.0, 7.0, 7.0, 7.0]], np.float32)
SCAT_IDX = np.array([[1, 2], [0, 0], [1, 2]], np.int64)
GBQ = _NBits(5, 32, 4, 16, zp="packed", seed=6)   # embedding table V=5, K=32
GBQ8 = _NBits(4, 24, 8, 8, zp=None, seed=7)
GBQ_IDX = np.array([[4, 0, -1], [2, 2, 1]], np.int64)


MOD_A = np.array([5.5, -5.5, 5.5, -5.5, 3.0, INF, 2.5, -0.0], np.float32)
MOD_B = np.array([2.0, 2.0, -2.0, -2.0, INF, 3.0, 0.5, 3.0], np.float32)
with np.errstate(invalid="ignore"):
    MOD_WANT = np.fmod(MOD_A, MOD_B)  # [1.5, -1.5, 1.5, -1.5, 3, nan, 0, -0]


def _argext(x, axis, fn, keepdims=1, last=0):
    if last:  # the last of the extreme values: search the reversed axis
        r = np.flip(x, axis)
        out = x.shape[axis] - 1 - fn(r, axis)
    else:
        out = fn(x, axis)
    return np.expand_dims(out, axis) if keepdims else out


def _scatter_nd(data, idx, upd, reduction="none"):
    out = data.copy()
    for t in range(idx.shape[0]):
        k = tuple(idx[t])
        if reduction == "add":
            out[k] += upd[t]
        elif reduction == "mul":
            out[k] *= upd[t]
        else:
            out[k] = upd[t]
    return out


def _ort_nbits_table(w):
    """GatherBlockQuantized's 4-bit data in ORT's own layout [V, K / 2] (codes along the row)."""
    return np.stack([pack_nibbles(r) for r in w.q])


def _cached_attention_ref(q, k, v, ck, cv, past, scale, layout="bhld"):
    """The caches with rows [past, past + L) written, and softmax over cache rows <= past + i."""
    t = (lambda a: a.transpose(0, 2, 1, 3)) if layout == "blhd" else (lambda a: a)
    q, k, v = t(q), t(k), t(v)
    L, H, Hkv = q.shape[2], q.shape[1], k.shape[1]
    ck, cv = ck.copy(), cv.copy()
    ck[:, :, past:past + L], cv[:, :, past:past + L] = k, v
    kk = np.repeat(ck[:, :, :past + L], H // Hkv, 1).astype(np.float64)
    vv = np.repeat(cv[:, :, :past + L], H // Hkv, 1).astype(np.float64)
    s = scale * q.astype(np.float64) @ np.swapaxes(kk, -1, -2)
    s = s + np.where(np.arange(past + L)[None] <= past + np.arange(L)[:, None], 0, -np.inf)
    return t(_softmax(s) @ vv), ck, cv


# (id, op, inputs, attrs, opset, expected outputs (a list), run_op options)
FORWARD = [
    ("equal_nan_broadcast", "Equal", [CMP_A, CMP_B], {}, 17, [np.equal(CMP_A, CMP_B)], {}),
    ("equal_int", "Equal", [IDX_I, np.array([2], np.int64)], {}, 17, [IDX_I == 2], {}),
    ("greater", "Greater", [CMP_A, CMP_B], {}, 17, [np.greater(CMP_A, CMP_B)], {}),
    ("greaterorequal", "GreaterOrEqual", [CMP_A, CMP_B], {}, 17,
     [np.greater_equal(CMP_A, CMP_B)], {}),
    ("less", "Less", [CMP_A, CMP_B], {}, 17, [np.less(CMP_A, CMP_B)], {}),
    ("lessorequal", "LessOrEqual", [CMP_A, CMP_B], {}, 17, [np.less_equal(CMP_A, CMP_B)], {}),
    ("less_int32", "Less", [IDX_I.astype(np.int32), np.array([[1], [2]], np.int32)], {}, 17,
     [IDX_I < np.array([[1], [2]])], {}),
    ("and", "And", [BOOL_A, BOOL_B], {}, 17, [BOOL_A & BOOL_B], {}),
    ("or", "Or", [BOOL_A, BOOL_B], {}, 17, [BOOL_A | BOOL_B], {}),
    ("xor", "Xor", [BOOL_A, BOOL_B], {}, 17, [BOOL_A ^ BOOL_B], {}),
    ("not", "Not", [BOOL_B], {}, 17, [~BOOL_B], {}),
    ("isnan", "IsNaN", [SPECIAL], {}, 17, [np.isnan(SPECIAL)], {}),
    ("isnan_f64", "IsNaN", [SPECIAL.astype(np.float64)], {}, 17, [np.isnan(SPECIAL)], {}),
    ("isinf", "IsInf", [SPECIAL], {}, 17, [np.isinf(SPECIAL)], {}),
    ("isinf_positive_only", "IsInf", [SPECIAL], {"detect_negative": 0}, 17,
     [SPECIAL == np.inf], {}),
    ("isinf_negative_only", "IsInf", [SPECIAL.astype(np.float64)], {"detect_positive": 0}, 17,
     [SPECIAL == -np.inf], {}),
    ("argmax", "ArgMax", [TIES], {"axis": 1}, 17, [_argext(TIES, 1, np.argmax)], {}),
    ("argmax_last_index", "ArgMax", [TIES], {"axis": 1, "select_last_index": 1, "keepdims": 0},
     17, [_argext(TIES, 1, np.argmax, 0, 1)], {}),
    ("argmin", "ArgMin", [TIES], {"axis": 0, "keepdims": 0}, 17,
     [_argext(TIES, 0, np.argmin, 0)], {}),
    ("argmin_last_index_int", "ArgMin", [IDX_I], {"axis": -1, "select_last_index": 1}, 17,
     [_argext(IDX_I, 1, np.argmin, 1, 1)], {}),
    # rounding: NaN, infinities and -0.0 come back as they are; Round halves to even
    ("ceil", "Ceil", [SPECIAL], {}, 17, [np.ceil(SPECIAL)], {}),
    ("floor", "Floor", [SPECIAL], {}, 17, [np.floor(SPECIAL)], {}),
    ("round_half_even", "Round", [SPECIAL], {}, 17, [np.round(SPECIAL)], {}),
    ("sign", "Sign", [SPECIAL[~np.isnan(SPECIAL)]], {}, 17, [np.sign(SPECIAL[~np.isnan(SPECIAL)])],
     {}),
    ("sign_int", "Sign", [np.array([-5, 0, 3], np.int64)], {}, 17, [np.array([-1, 0, 1])], {}),
    # Mod: fmod=1 keeps the dividend's sign (C fmod: fmod(x, inf) = x, fmod(inf, y) = NaN);
    # integer fmod=0 the divisor's (Python %)
    ("mod_fmod", "Mod", [MOD_A, MOD_B], {"fmod": 1}, 17, [MOD_WANT], {}),
    ("mod_int_python", "Mod", [np.array([[7, -7, 7, -7, 6]], np.int64),
                               np.array([[3], [-3]], np.int64)], {}, 17,
     [np.mod(np.array([[7, -7, 7, -7, 6]]), np.array([[3], [-3]]))], {}),
    ("mod_int_fmod", "Mod", [np.array([7, -7, 7, -7], np.int32), np.array([3, 3, -3, -3], np.int32)],
     {"fmod": 1}, 17, [np.array([1, -1, 1, -1], np.int32)], {}),
    # shape and constants (values known at plan time)
    ("shape", "Shape", [R(2, 3, 4, 5)], {}, 17, [np.array([2, 3, 4, 5])], {}),
    ("shape_start_end", "Shape", [R(2, 3, 4, 5)], {"start": 1, "end": -1}, 15,
     [np.array([3, 4])], {}),
    ("shape_clamped", "Shape", [R(2, 3)], {"start": -9, "end": 9}, 15, [np.array([2, 3])], {}),
    ("size", "Size", [R(2, 3, 4)], {}, 17, [np.array(24)], {}),
    ("range_int", "Range", [np.array(10, np.int64), np.array(-3, np.int64),
                            np.array(-4, np.int64)], {}, 17, [np.array([10, 6, 2, -2])], {}),
    ("range_float", "Range", [np.array(0.5, np.float32), np.array(2.0, np.float32),
                              np.array(0.3, np.float32)], {}, 17,
     [np.float32(0.5) + np.arange(5, dtype=np.float32) * np.float32(0.3)],
     {"const_inputs": [0, 1, 2]}),
    ("range_empty", "Range", [np.array(3, np.int32), np.array(3, np.int32),
                              np.array(1, np.int32)], {}, 17, [np.zeros(0, np.int32)], {}),
    ("constantofshape_default", "ConstantOfShape", [np.array([2, 3], np.int64)], {}, 17,
     [np.zeros((2, 3), np.float32)], {}),
    ("constantofshape_int", "ConstantOfShape", [np.array([3, 1, 2], np.int64)],
     {"value": np.array([7], np.int64)}, 17, [np.full((3, 1, 2), 7, np.int64)], {}),
    ("constant_tensor", "Constant", [], {"value": R(2, 3)}, 17, [R(2, 3)], {}),
    ("constant_value_float", "Constant", [], {"value_float": 2.5}, 17, [np.float32(2.5)], {}),
    ("constant_value_ints", "Constant", [], {"value_ints": [4, -1, 0]}, 17,
     [np.array([4, -1, 0], np.int64)], {}),
    ("constant_value_floats", "Constant", [], {"value_floats": [0.5, -1.25]}, 17,
     [np.array([0.5, -1.25], np.float32)], {}),
    ("constant_value_int", "Constant", [], {"value_int": -3}, 17, [np.array(-3, np.int64)], {}),
    # no backward rule in the core (yet): a graph that needs one gets a clear error
    ("reduceprod", "ReduceProd", [R(3, 4, 5) + 0.5], {"axes": [1], "keepdims": 0}, 17,
     [(R(3, 4, 5).astype(np.float64) + 0.5).prod(1)], {}),
    ("reduceprod_int_all", "ReduceProd", [np.array([[2, -3], [1, 4]], np.int64)],
     {"keepdims": 0}, 17, [np.array(-24)], {}),
    ("scatternd", "ScatterND", [R(3, 4, 5), SCAT_IDX[:2], R(2, 5, seed=1)], {}, 17,
     [_scatter_nd(R(3, 4, 5), SCAT_IDX[:2], R(2, 5, seed=1))], {}),
    ("scatternd_add_repeated", "ScatterND", [R(3, 4, 5), SCAT_IDX, R(3, 5, seed=1)],
     {"reduction": "add"}, 17, [_scatter_nd(R(3, 4, 5), SCAT_IDX, R(3, 5, seed=1), "add")], {}),
    ("scatternd_mul_rows", "ScatterND", [R(3, 4), np.array([[2], [0]], np.int64), R(2, 4, seed=1)],
     {"reduction": "mul"}, 17,
     [_scatter_nd(R(3, 4), np.array([[2], [0]]), R(2, 4, seed=1), "mul")], {}),
    # a quantized embedding table: ORT's [V, K*bits/8] layout and MatMulNBits' [V, nb, blob]
    ("gatherblockquantized_4bit", "com.microsoft.GatherBlockQuantized",
     [_ort_nbits_table(GBQ), GBQ_IDX, GBQ.scales, GBQ.zero_points()],
     {"bits": 4, "block_size": 16}, 1, [GBQ.weight()[GBQ_IDX]], {}),
    ("gatherblockquantized_8bit_nbits_layout", "com.microsoft.GatherBlockQuantized",
     [GBQ8.packed(), GBQ_IDX[:, 1:].astype(np.int32), GBQ8.scales],
     {"bits": 8, "block_size": 8}, 1, [GBQ8.weight()[GBQ_IDX[:, 1:]]], {}),
]


def _cached_attention_case(layout):
    """GQA (4 query heads on 2 key/value heads), L = 3 new positions after past = 4, a cache
    of 9 rows whose unwritten rows are NaN (never read)."""
    B, H, Hkv, L, D, Dv, T, past = 2, 4, 2, 3, 5, 3, 9, 4
    perm = (lambda s: (s[0], s[2], s[1], s[3])) if layout == "blhd" else (lambda s: s)
    q = R(*perm((B, H, L, D)), scale=1.5)
    k, v = R(*perm((B, Hkv, L, D)), seed=1, scale=1.5), R(*perm((B, Hkv, L, Dv)), seed=2)
    ck = np.full((B, Hkv, T, D), np.nan, np.float32)
    cv = np.full((B, Hkv, T, Dv), np.nan, np.float32)
    ck[:, :, :past], cv[:, :, :past] = R(B, Hkv, past, D, seed=3), R(B, Hkv, past, Dv, seed=4)
    o, ck_want, cv_want = _cached_attention_ref(q, k, v, ck, cv, past, 0.45, layout)
    return ((f"cachedattention_{layout}", "pyedge.CachedAttention",
             [q, k, v, ck, cv, np.array([past], np.int64)], {"scale": 0.45, "layout": layout},
             17, [o], {}), ck_want, cv_want)


CACHED = [_cached_attention_case("bhld"), _cached_attention_case("blhd")]
FORWARD += [c[0] for c in CACHED]


@pytest.mark.parametrize("case", FORWARD, ids=[c[0] for c in FORWARD])
def test_forward_only_ops_vs_numpy(case):
    _, op, inputs, attrs, opset, want, kw = case
    domain, _, op = op.rpartition(".")
    outs, _ = _core.run_op(op, inputs, attrs, opset=opset, domain=domain, **kw)
    assert len(outs) == len(want), f"{op}: {len(outs)} outputs"
    for j, (got, exp) in enumerate(zip(outs, want)):
        exp = np.asarray(exp)
        assert got.shape == exp.shape, f"{op} output {j}: shape {got.shape}, want {exp.shape}"
        if exp.dtype.kind == "f":
            assert got.dtype.kind == "f", f"{op} output {j}: dtype {got.dtype}"
            np.testing.assert_allclose(got, exp, rtol=2e-6, atol=1e-6, equal_nan=True,
                                       err_msg=f"{op} output {j}")
            # signed zeros and NaN exactly where numpy has them
            np.testing.assert_array_equal(np.signbit(got[got == 0]), np.signbit(exp[exp == 0]))
        else:
            assert got.dtype == exp.dtype, f"{op} output {j}: dtype {got.dtype}, want {exp.dtype}"
            np.testing.assert_array_equal(got, exp, err_msg=f"{op} output {j}")
    # no gradient: a backward rule added later must come with an FD case above. (Not asked
    # with float64 inputs: run_op's gradient buffers are float32 only; the float32 cases of
    # the same ops ask.)
    if any(x.dtype == np.float64 for x in inputs):
        return
    floats = [i for i, x in enumerate(inputs) if x.dtype.kind == "f"]
    gouts = [np.zeros(o.shape, np.float32) for o in outs]
    try:
        _, grads = _core.run_op(op, inputs, attrs, opset=opset, domain=domain,
                                grad_outputs=gouts, **kw)
    except _core.UnsupportedOpError as e:
        assert "has no backward rule" in str(e) and floats, str(e)
    else:
        assert all(g is None for g in grads), f"{op} gives a gradient: move it to CASES"


@pytest.mark.parametrize("which", range(len(CACHED)), ids=[c[0][0] for c in CACHED])
def test_cached_attention_writes_the_new_rows_into_the_caches(which):
    case, ck_want, cv_want = CACHED[which]
    _, op, inputs, attrs, opset, _, _ = case
    inputs = [x.copy() for x in inputs]
    _core.run_op(op.split(".")[1], inputs, attrs, opset=opset, domain="pyedge")
    np.testing.assert_array_equal(inputs[3], ck_want)  # in place, NaN rows past past + L kept
    np.testing.assert_array_equal(inputs[4], cv_want)


# ---------------------------------------------------------------- coverage of every op
# Ops checked on arm64 by a test elsewhere: "tests/<file>::<test> (why)". Each named test
# must exist and carry the arm64 marker (checked below by parsing its file, which need not
# be importable here).
OTHER_ARM64_TESTS = {
    "SoftmaxCrossEntropyLoss": "tests/test_ops_fd.py::test_softmax_cross_entropy_vs_finite_differences "
                               "(mean loss, gradient by FD)",
    "Cast": "tests/test_ops_elementwise.py::test_cast_all_pairs (every dtype pair; "
            "test_cast_out_of_range_float_saturates: NaN/inf/out of range to integers)",
    "CastLike": "tests/test_ops_elementwise.py::test_cast_out_of_range_float_saturates "
                "(CastLike to each integer type)",
    "pyedge.CachedAttention": "tests/test_op_attention_window.py::test_cached_attention_window_softcap "
                              "(prefill + decoding steps with window and softcap vs numpy)",
}




def _covered():
    fd = {c[1] for c in test_ops_fd.CASES + test_ops_fd_families.CASES + CASES}
    fd |= {"Dropout"}  # test_dropout_training_vs_finite_differences (also a CASES entry)
    return fd, {c[1] for c in FORWARD}


def _is_arm64_marker(node):
    """pytest.mark.arm64 (an Attribute chain), bare or in a list/tuple."""
    if isinstance(node, (ast.List, ast.Tuple)):
        return any(_is_arm64_marker(e) for e in node.elts)
    return (isinstance(node, ast.Attribute) and node.attr == "arm64"
            and isinstance(node.value, ast.Attribute) and node.value.attr == "mark")


def _arm64_test_exists(ref):
    """ref "tests/test_x.py::test_y (why)": the file defines test_y and marks it (or the whole
    module) arm64. Returns an error message or None."""
    path, _, name = ref.split(" ", 1)[0].partition("::")
    file = HERE.parent / path
    if not file.is_file():
        return f"{path} does not exist"
    tree = ast.parse(file.read_text())
    module_marked = any(isinstance(s, ast.Assign) and any(getattr(t, "id", "") == "pytestmark"
                                                          for t in s.targets)
                        and _is_arm64_marker(s.value) for s in tree.body)
    for s in tree.body:
        if isinstance(s, ast.FunctionDef) and s.name == name:
            if module_marked or any(_is_arm64_marker(d) for d in s.decorator_list):
                return None
            return f"{path}::{name} is not marked arm64"
    return f"{path} has no test {name}"


def test_other_arm64_tests_exist_and_are_marked():
    errors = [f"{op}: {msg}" for op, ref in OTHER_ARM64_TESTS.items()
              if (msg := _arm64_test_exists(ref))]
    assert not errors, "\n".join(errors)


def test_every_registered_op_is_covered():
    fd, fwd = _covered()
    missing = sorted(op for op in _core.registered_ops()
                     if op not in fd and op not in fwd and op not in OTHER_ARM64_TESTS)
    assert not missing, (
        f"registered ops without an arm64 check: {', '.join(missing)}. Add a finite-difference "
        "case (tests/test_ops_fd_more.py CASES) if the op has a backward rule, a FORWARD entry "
        "if it has none, or name an existing arm64-marked test in OTHER_ARM64_TESTS")


def test_covered_names_are_registered_ops():
    """A misspelt op in a table would otherwise count for nothing (or for another op)."""
    fd, fwd = _covered()
    unknown = sorted((fd | fwd | set(OTHER_ARM64_TESTS)) - set(_core.registered_ops()))
    assert not unknown, f"not registered: {unknown}"


def test_forward_only_table_lists_no_op_with_a_gradient_case():
    fd, fwd = _covered()
    both = sorted(fd & fwd)
    assert not both, f"ops with an FD case also in FORWARD: {both}"
