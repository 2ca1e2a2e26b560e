"""Quantized weights for the op tests, packed in numpy in ONNX Runtime's formats (see
csrc/ops/quant_gemm.h): the 4-bit codebooks, the nibble packer and MatMulBnb4 weights. numpy
only, so the torch-free `arm64` tests (test_ops_fd_more.py) share them with test_quant_ops.py."""
import numpy as np

# What onnxruntime's MatMulBnb4 decodes each 4-bit code to (test_bnb4_codebooks_match_ort
# probes it code by code): FP4 (bitsandbytes) and NF4 (QLoRA).
FP4 = np.array([0, 0.00520833349, 0.666666687, 1, 0.333333343, 0.5, 0.166666672, 0.25,
                0, -0.00520833349, -0.666666687, -1, -0.333333343, -0.5, -0.166666672, -0.25],
               np.float32)
NF4 = np.array([-1, -0.696192801, -0.525073051, -0.394917488, -0.284441382, -0.18477343,
                -0.0910500363, 0, 0.0795802996, 0.160930201, 0.246112302, 0.337915242,
                0.440709829, 0.562617004, 0.722956836, 1], np.float32)


def pack_nibbles(codes, hi_first=False):
    """Two 4-bit codes per byte, in order (the first in the low nibble unless hi_first: Bnb4's
    layout); odd counts get a zero pad nibble."""
    c = np.asarray(codes, np.uint8).ravel()
    if c.size % 2:
        c = np.concatenate([c, np.zeros(1, np.uint8)])
    a, b = c[0::2], c[1::2]
    return ((a << 4) | b if hi_first else a | (b << 4)).astype(np.uint8)


class Bnb4:
    """A random MatMulBnb4 weight: codes q [N, K], one absmax per flattened block."""

    def __init__(self, N, K, block, quant_type, seed=0):
        g = np.random.default_rng(seed)
        self.N, self.K, self.block, self.qt = N, K, block, quant_type
        self.q = g.integers(0, 16, (N, K)).astype(np.uint8)
        self.absmax = (g.random(-(-N * K // block)) + 0.5).astype(np.float32)

    def inputs(self):
        return [pack_nibbles(self.q, hi_first=True), self.absmax.copy()]

    def attrs(self):
        return dict(K=self.K, N=self.N, block_size=self.block, quant_type=self.qt)

    def weight(self):
        """[N, K] float32: what the kernel dequantizes to (code * absmax in float32)."""
        code = (FP4 if self.qt == 0 else NF4)[self.q.ravel()]
        return (code * np.repeat(self.absmax, self.block)[:self.N * self.K]).reshape(self.N, self.K)
