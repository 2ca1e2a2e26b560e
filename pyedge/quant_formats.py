"""ONNX Runtime's quantized weight formats in numpy: quantize, pack, unpack, dequantize, check.

Pure numpy (the device quantizes and merges with it). Two formats, both ORT contrib ops:

* ``com.microsoft.MatMulNBits`` (attrs K, N, bits 4|8, block_size): the weight W [N, K]
  (PyTorch's nn.Linear layout) is cut into blocks of ``block_size`` along K, K padded to
  ``n_blocks·block_size``. ``B`` uint8 [N, n_blocks, block_size·bits/8], 4-bit codes two per
  byte, low nibble first along K; ``scales`` [N·n_blocks] (ORT writes [N, n_blocks]);
  ``zero_points`` uint8 [N, ceil(n_blocks·bits/8)] packed the same way (absent: 2^(bits-1)).
  W[n, k] = (code - zp) · scale of (n, k // block_size).
* ``com.microsoft.MatMulBnb4`` (attrs K, N, block_size, quant_type 0 FP4 | 1 NF4): W [N, K]
  flattened row-major, cut into blocks of ``block_size`` values, each scaled by its absmax;
  codes two per byte, *high* nibble first. W = table[code] · absmax.

The quantizers reproduce ORT's own (MLAS ``BlockwiseQuantizer`` and the bnb4 kernels) bit for
bit: float32 arithmetic in the same order, ``roundf`` (half away from zero), asymmetric
ranges widened to include 0, symmetric scale = -(signed value of largest magnitude)/2^(bits-1)
(so the largest magnitude maps to code 0 and scales may be negative), NF4/FP4 codes chosen by
comparing against midpoints of the code table. Codes past K are written 0 as ORT does, except
that for an odd K ORT's kernel leaves a stale nibble after the last value of a column: that
nibble (never read) may differ.
"""
from __future__ import annotations

import math

import numpy as np

NF4_TABLE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
# FP4 (sign bit + e2m1 with bias 3, scaled so that the largest magnitude is 1), code -> value
FP4_TABLE = np.array([0.0, 0.005208333333, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25,
                      -0.0, -0.005208333333, -0.66666667, -1.0, -0.33333333, -0.5, -0.16666667,
                      -0.25], np.float32)
QUANT_TYPES = {"fp4": 0, "nf4": 1}


class QuantFormatError(ValueError):
    """A quantized weight whose tensors do not fit its attributes."""


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf (what MLAS uses), not numpy's round-half-to-even."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


# --------------------------------------------------------------------------------------------
# MatMulNBits
# --------------------------------------------------------------------------------------------
def nbits_shapes(K: int, N: int, bits: int, block_size: int) -> dict[str, tuple]:
    """Shapes ORT's quantizer writes: B [N, n_blocks, blob], scales [N, n_blocks],
    zero_points [N, ceil(n_blocks·bits/8)]."""
    n_blocks = -(-K // block_size)
    return {"B": (N, n_blocks, -(-block_size * bits // 8)), "scales": (N, n_blocks),
            "zero_points": (N, -(-n_blocks * bits // 8)), "n_blocks": n_blocks}


def pack_codes(codes: np.ndarray, bits: int, high_first: bool = False, pad: int = 0) -> np.ndarray:
    """uint8 codes [..., L] -> bytes [..., ceil(L·bits/8)]; 4-bit pairs low nibble first
    (MatMulNBits) or high nibble first (MatMulBnb4); an odd tail is padded with code `pad`."""
    codes = np.asarray(codes, np.uint8)
    if bits == 8:
        return codes.copy()
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.full(codes.shape[:-1] + (1,), pad, np.uint8)], -1)
    first, second = codes[..., 0::2], codes[..., 1::2]
    if high_first:
        return ((first << 4) | (second & 0xF)).astype(np.uint8)
    return ((first & 0xF) | (second << 4)).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, count: int, high_first: bool = False) -> np.ndarray:
    """Inverse of pack_codes: bytes [..., m] -> codes [..., count] (uint8)."""
    packed = np.asarray(packed, np.uint8)
    if bits == 8:
        return packed[..., :count].copy()
    lo, hi = packed & 0xF, packed >> 4
    pair = (hi, lo) if high_first else (lo, hi)
    return np.stack(pair, -1).reshape(packed.shape[:-1] + (-1,))[..., :count]


def quantize_nbits(w: np.ndarray, bits: int = 4, block_size: int = 64, symmetric: bool = False):
    """W [N, K] float -> (B [N, n_blocks, blob] uint8, scales [N, n_blocks] float32,
    zero_points [N, ceil(n_blocks·bits/8)] uint8 or None when symmetric), as ORT's
    ``quantize_matmul_{4,8}bits`` computes them (its input is Wᵀ [K, N])."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    w = np.asarray(w, np.float32)
    N, K = w.shape
    nb = -(-K // block_size)
    blocks = np.zeros((N, nb * block_size), np.float32)
    blocks[:, :K] = w
    blocks = blocks.reshape(N, nb, block_size)
    kmax = np.float32((1 << bits) - 1)
    if symmetric:
        lo, hi = blocks.min(-1), blocks.max(-1)
        signed_max = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        scales = (-signed_max / np.float32(1 << (bits - 1))).astype(np.float32)
        zp = np.full((N, nb), 1 << (bits - 1), np.float32)
    else:
        lo = np.minimum(blocks.min(-1), np.float32(0))
        hi = np.maximum(blocks.max(-1), np.float32(0))
        scales = ((hi - lo) / kmax).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            zp_f = np.where(scales != 0, np.float32(0) - lo / scales, lo).astype(np.float32)
        zp = np.clip(_round_half_away(zp_f), 0, kmax).astype(np.float32)
    with np.errstate(divide="ignore"):
        recip = np.where(scales != 0, np.float32(1) / scales, np.float32(0)).astype(np.float32)
    q = blocks * recip[..., None] + zp[..., None]
    codes = np.clip(_round_half_away(q.astype(np.float32)), 0, kmax).astype(np.uint8)
    codes.reshape(N, -1)[:, K:] = 0  # ORT leaves the padding past K zero
    packed = pack_codes(codes, bits)
    # ORT fills the unused nibble of an odd block count with the default zero point
    zero_points = None if symmetric else pack_codes(zp.astype(np.uint8), bits,
                                                    pad=1 << (bits - 1))
    return packed, scales, zero_points


def dequantize_nbits(B, scales, zero_points, K: int, N: int, bits: int, block_size: int,
                     dtype=np.float32) -> np.ndarray:
    """MatMulNBits tensors -> W [N, K] (float32, or float64 for exact sums)."""
    nb = -(-K // block_size)
    codes = unpack_codes(np.asarray(B, np.uint8).reshape(N, nb, -1), bits, block_size)
    s = np.asarray(scales).reshape(N, nb).astype(dtype)
    if zero_points is None:
        zp = np.full((N, nb), 1 << (bits - 1), dtype)
    elif np.asarray(zero_points).dtype == np.uint8:
        zp = unpack_codes(np.asarray(zero_points).reshape(N, -1), bits, nb).astype(dtype)
    else:  # float zero points: W = (code - zp)·scale with zp in the scales' type
        zp = np.asarray(zero_points).reshape(N, nb).astype(dtype)
    w = (codes.astype(dtype) - zp[..., None]) * s[..., None]
    return w.reshape(N, nb * block_size)[:, :K]


def check_nbits(name: str, K: int, N: int, bits: int, block_size: int, B, scales,
                zero_points=None, bias=None, g_idx=None, op: str = "MatMulNBits") -> None:
    """Raises QuantFormatError naming the node when a tensor does not fit K, N, bits, block."""
    where = f"{op} node '{name}'"
    if bits not in (4, 8):
        raise QuantFormatError(f"{where}: bits={bits} is not supported (pyedge runs 4 and 8)")
    if K < 1 or N < 1 or block_size < 1:
        raise QuantFormatError(f"{where}: K={K}, N={N}, block_size={block_size} must be >= 1")
    if g_idx is not None:
        raise QuantFormatError(f"{where}: g_idx (act-order GPTQ) is not supported")
    sh = nbits_shapes(K, N, bits, block_size)
    nb = sh["n_blocks"]

    def need(arr, what, count, dtypes):
        a = np.asarray(arr)
        if a.dtype.name not in dtypes:
            raise QuantFormatError(f"{where}: {what} is {a.dtype}, expected {' or '.join(dtypes)}")
        if a.size != count:
            raise QuantFormatError(
                f"{where}: {what} holds {a.size} values {list(a.shape)}, K={K}, N={N}, "
                f"bits={bits}, block_size={block_size} need {count}")
    need(B, "B (packed weight)", math.prod(sh["B"]), ("uint8",))
    if np.asarray(B).ndim == 3 and tuple(np.asarray(B).shape) != sh["B"]:
        raise QuantFormatError(f"{where}: B has shape {list(np.asarray(B).shape)}, expected "
                               f"{list(sh['B'])}")
    need(scales, "scales", N * nb, ("float32", "float16"))
    if zero_points is not None:
        if np.asarray(zero_points).dtype == np.uint8:
            need(zero_points, "zero_points", math.prod(sh["zero_points"]), ("uint8",))
        else:
            need(zero_points, "zero_points", N * nb, ("float32", "float16"))
    if bias is not None:
        need(bias, "bias", N, ("float32", "float16"))


# --------------------------------------------------------------------------------------------
# MatMulBnb4
# --------------------------------------------------------------------------------------------
def _table(quant_type: int) -> np.ndarray:
    if quant_type not in (0, 1):
        raise ValueError(f"quant_type must be 0 (FP4) or 1 (NF4), got {quant_type}")
    return NF4_TABLE if quant_type == 1 else FP4_TABLE


def quantize_bnb4(w: np.ndarray, block_size: int = 64, quant_type: int = 1):
    """W [N, K] -> (packed uint8 [ceil(N·K/2)], absmax float32 [ceil(N·K/block_size)]), as
    ORT's ``quantize_matmul_bnb4`` (and bitsandbytes) computes them."""
    if block_size < 2 or block_size % 2:
        raise ValueError(f"MatMulBnb4 block_size must be even and >= 2, got {block_size}")
    flat = np.asarray(w, np.float32).reshape(-1)
    n = flat.size
    nblk = -(-n // block_size)
    padded = np.zeros(nblk * block_size, np.float32)
    padded[:n] = flat
    blocks = padded.reshape(nblk, block_size)
    absmax = np.abs(blocks).max(-1).astype(np.float32)
    recip = np.where(absmax != 0, np.float32(1) / np.where(absmax != 0, absmax, 1),
                     np.float32(0)).astype(np.float32)
    x = (blocks * recip[:, None]).reshape(-1)[:n]
    if quant_type == 1:
        # code = how many midpoints of the sorted table x exceeds (ORT's decision tree)
        mids = ((NF4_TABLE[:-1].astype(np.float64) + NF4_TABLE[1:]) / 2).astype(np.float32)
        codes = np.searchsorted(mids, x, side="left").astype(np.uint8)
    else:
        # FP4 magnitudes 0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1 have these codes; ORT's
        # pivots between them (its binary search) pick one, the sign adds 8
        pos_codes = np.array([0, 1, 6, 7, 4, 5, 2, 3], np.uint8)
        pivots = np.array([0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667,
                           0.583333, 0.8333333], np.float32)
        mag = pos_codes[np.searchsorted(pivots, np.abs(x), side="left")]
        codes = (mag + np.where(x < 0, 8, 0)).astype(np.uint8)
    return pack_codes(codes, 4, high_first=True), absmax


def dequantize_bnb4(packed, absmax, K: int, N: int, block_size: int, quant_type: int,
                    dtype=np.float32) -> np.ndarray:
    """MatMulBnb4 tensors -> W [N, K]."""
    n = N * K
    codes = unpack_codes(np.asarray(packed, np.uint8).reshape(-1), 4, n, high_first=True)
    nblk = -(-n // block_size)
    scale = np.repeat(np.asarray(absmax).reshape(-1)[:nblk].astype(dtype), block_size)[:n]
    return (_table(quant_type)[codes].astype(dtype) * scale).reshape(N, K)


def check_bnb4(name: str, K: int, N: int, block_size: int, quant_type: int, B, absmax) -> None:
    where = f"MatMulBnb4 node '{name}'"
    if quant_type not in (0, 1):
        raise QuantFormatError(f"{where}: quant_type={quant_type} (0 FP4 or 1 NF4 expected)")
    if K < 1 or N < 1 or block_size < 1:
        raise QuantFormatError(f"{where}: K={K}, N={N}, block_size={block_size} must be >= 1")
    B, absmax = np.asarray(B), np.asarray(absmax)
    want_b, want_a = -(-N * K // 2), -(-N * K // block_size)
    if B.dtype != np.uint8 or B.size != want_b:
        raise QuantFormatError(f"{where}: B holds {B.size} {B.dtype} values, K={K}, N={N} need "
                               f"{want_b} uint8")
    if absmax.dtype.kind != "f" or absmax.size != want_a:
        raise QuantFormatError(f"{where}: absmax holds {absmax.size} values, K={K}, N={N}, "
                               f"block_size={block_size} need {want_a}")


def resident_bytes(*arrays) -> int:
    """Bytes the arrays occupy (absent ones count 0)."""
    return int(sum(np.asarray(a).nbytes for a in arrays if a is not None))
