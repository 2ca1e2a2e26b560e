// GEMM against a quantized frozen weight W [N, K] that stays packed: W is dequantized one
// panel (rows n0..n1, columns k0..k1) at a time into a cache-sized float buffer and each
// panel is fed to the float SGEMM (ops/blas.h). No float copy of the whole W ever exists.
//
//   quant_gemm_xwt:  Y [M, N] = X [M, K] · Wᵀ (+ Y)     forward of MatMulNBits / MatMulBnb4
//   quant_gemm_xw:   dX [M, K] = dY [M, N] · W (+ dX)   their backward for the activation
//
// Formats (ONNX Runtime's contrib ops, see the op files for the input checks):
//   nbits: packed [N, n_blocks, blob] uint8, n_blocks = ceil(K / block), blob =
//          ceil(block·bits/8) (ORT's block·bits/8; an odd 4-bit block, which ORT never
//          writes, leaves its last nibble unused), 4-bit codes low nibble first along K; scales [N·n_blocks]; zero points packed uint8
//          [N · ceil(n_blocks·bits/8)] (4-bit: low nibble first) or float [N·n_blocks], or
//          absent (2^(bits−1)). W[n, k] = (q[n, k] − zp[n, b]) · scale[n, b], b = k / block.
//   bnb4:  packed [(N·K + 1) / 2] uint8, the [N, K] codes flattened row-major, high nibble
//          first; absmax [ceil(N·K / block)]. W[n, k] = codebook[q] · absmax[(n·K + k) / block].
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "ops/op.h"
#include "ops/quant_kernels.h"

namespace pyedge {

enum class QuantFormat { nbits, bnb4 };

// Everything about a quantized weight except where its bytes are: built at plan time from the
// node (attributes and input shapes), bound to the run's input tensors by view().
struct QuantWeightSpec {
  QuantFormat format = QuantFormat::nbits;
  int64_t K = 0, N = 0, block = 0;
  int bits = 4;
  int quant_type = 1;            // bnb4: 0 = FP4, 1 = NF4
  int64_t n_blocks = 0, blob = 0;  // nbits: blocks per row, bytes per block
  int64_t zp_row_bytes = 0;      // nbits, packed zero points: bytes per row
  // Input indices (in the node's input list) of the packed codes, the scales (absmax), the
  // zero points (-1: absent) and whether those are float.
  int in_packed = -1, in_scales = -1, in_zp = -1;
  bool zp_float = false;
};

// A bound weight: the spec plus this run's pointers.
struct QuantWeight {
  const QuantWeightSpec* spec = nullptr;
  const uint8_t* packed = nullptr;
  const float* scales = nullptr;
  const uint8_t* zp_packed = nullptr;
  const float* zp_float = nullptr;
};
QuantWeight view(const QuantWeightSpec& spec, const std::vector<Tensor>& in);

// Builds the spec from a MatMulNBits-style input list: in[first] packed, in[first+1] scales,
// in[first+2] zero points (optional); attributes K, N, bits, block_size. Clear errors naming
// the node for every size, dtype and attribute mismatch. (g_idx is the caller's to refuse:
// its slot differs between MatMulNBits and LoraQuantMatMul.) Defined in quant_formats.cpp.
QuantWeightSpec nbits_spec(const NodeInfo& n, const std::vector<Tensor>& in, size_t first);
// The same with the dimensions given and the inputs at any slots (i_zp past the inputs or
// empty: no zero points): GatherBlockQuantized and a quantized LinearCrossEntropy head.
QuantWeightSpec nbits_spec_at(const NodeInfo& n, const std::vector<Tensor>& in, int64_t K,
                              int64_t N, int bits, int64_t block, size_t i_packed,
                              size_t i_scales, size_t i_zp);
// The same for MatMulBnb4: in[first] packed, in[first+1] absmax; attributes K, N, block_size,
// quant_type (transB is the caller's). Defined in quant_formats.cpp.
QuantWeightSpec bnb4_spec(const NodeInfo& n, const std::vector<Tensor>& in, size_t first);

// The 16-entry code books of MatMulBnb4 (bitsandbytes' FP4 and QLoRA's NF4).
const float* bnb4_codebook(int quant_type);

// out[(n − n0)·ldo + (k − k0)] = W[n, k] for n in [n0, n1), k in [k0, k1).
void dequantize_panel(const QuantWeight& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1,
                      float* out, int64_t ldo, qk::Path path = qk::native_path());

// Panel sizes and the scratch they need. Panels tile W; the output columns (N for the forward,
// K for the backward) or, for narrow outputs, the rows are split across parts, so parts never
// write the same output element.
struct QuantGemmTiling {
  int64_t parts = 1;     // independent workers (each with its own panel buffer)
  // The output is too narrow to split (under 128 columns per part, a k/v projection): the
  // parts split the rows of X instead when there are enough (each dequantizes every panel).
  bool narrow = false;
  int64_t out_tile = 0;  // panel extent along the output dimension
  int64_t red_tile = 0;  // panel extent along the reduction dimension
  size_t scratch_floats() const { return size_t(parts * out_tile * red_tile); }
};
// forward: output dim N, reduction K; backward: output dim K, reduction N.
QuantGemmTiling quant_gemm_tiling(int64_t out_dim, int64_t red_dim);

// Y [M, N] (ldy) = X [M, K] · Wᵀ + beta·Y (beta 0 or 1). scratch: tiling.scratch_floats().
void quant_gemm_xwt(const QuantWeight& w, int64_t M, const float* X, float beta, float* Y,
                    int64_t ldy, const QuantGemmTiling& tiling, float* scratch);
// dX [M, K] = dY [M, N] · W + beta·dX (beta 0 or 1). scratch: tiling.scratch_floats().
void quant_gemm_xw(const QuantWeight& w, int64_t M, const float* dY, float beta, float* dX,
                   const QuantGemmTiling& tiling, float* scratch);

// The bias gradient of the quantized ops: db [N] (=, fresh; else +=) the column sums of
// dY [M, N]. Defined in quant_matmul.cpp.
void quant_bias_grad(const float* dy, int64_t M, int64_t N, bool fresh, float* db);

}  // namespace pyedge
