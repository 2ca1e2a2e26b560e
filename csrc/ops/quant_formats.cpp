// Plan-time parsing and checking of the quantized weight formats (ops/quant_gemm.h): every
// size, dtype and attribute of a MatMulNBits or MatMulBnb4 weight is checked here, once, so
// the kernels can trust their pointers. Errors name the node.
#include <string>

#include "ops/quant_gemm.h"

namespace pyedge {
namespace {

int64_t required_int(const NodeInfo& n, const char* name) {
  PYEDGE_CHECK(n.attrs.has(name), n.where(), ": attribute '", name, "' is required");
  return n.attrs.get_int(name, 0);
}

const Tensor& required_input(const NodeInfo& n, const std::vector<Tensor>& in, size_t i,
                             const char* what) {
  PYEDGE_CHECK(i < in.size() && n.has_input(i), n.where(), ": input ", i, " (", what,
               ") is required");
  return in[i];
}

void check_dtype(const NodeInfo& n, const Tensor& t, DType want, const char* what) {
  PYEDGE_CHECK(t.dtype == want, n.where(), ": ", what, " must be ", dtype_name(want), ", got ",
               dtype_name(t.dtype));
}

// K, N and block_size as attributes, all >= 1.
void read_dims(const NodeInfo& n, QuantWeightSpec& s) {
  s.K = required_int(n, "K");
  s.N = required_int(n, "N");
  s.block = required_int(n, "block_size");
  PYEDGE_CHECK(s.K >= 1 && s.N >= 1, n.where(), ": K and N must be >= 1, got K=", s.K, " N=",
               s.N);
  PYEDGE_CHECK(s.block >= 1, n.where(), ": block_size must be >= 1, got ", s.block);
}

}  // namespace

QuantWeightSpec nbits_spec(const NodeInfo& n, const std::vector<Tensor>& in, size_t first) {
  QuantWeightSpec d;
  read_dims(n, d);
  return nbits_spec_at(n, in, d.K, d.N, int(n.attrs.get_int("bits", 4)), d.block, first,
                       first + 1, first + 2);
}

QuantWeightSpec nbits_spec_at(const NodeInfo& n, const std::vector<Tensor>& in, int64_t K,
                              int64_t N, int bits, int64_t block, size_t i_packed,
                              size_t i_scales, size_t i_zp) {
  QuantWeightSpec s;
  s.format = QuantFormat::nbits;
  s.K = K;
  s.N = N;
  s.block = block;
  PYEDGE_CHECK(s.K >= 1 && s.N >= 1, n.where(), ": K and N must be >= 1, got K=", s.K, " N=",
               s.N);
  PYEDGE_CHECK(s.block >= 1, n.where(), ": block_size must be >= 1, got ", s.block);
  s.bits = bits;
  PYEDGE_CHECK(s.bits == 4 || s.bits == 8, n.where(), ": bits must be 4 or 8, got ", s.bits);
  s.n_blocks = (s.K + s.block - 1) / s.block;
  s.blob = (s.block * s.bits + 7) / 8;  // an odd 4-bit block leaves its last nibble unused
  const Tensor& packed = required_input(n, in, i_packed, "B");
  check_dtype(n, packed, DType::u8, "B (packed weight)");
  PYEDGE_CHECK(packed.numel() == s.N * s.n_blocks * s.blob &&
                   (packed.rank() != 3 || (packed.shape[0] == s.N &&
                                           packed.shape[1] == s.n_blocks &&
                                           packed.shape[2] == s.blob)),
               n.where(), ": B must be uint8 [N, ceil(K/block_size), block_size*bits/8] = [",
               s.N, ", ", s.n_blocks, ", ", s.blob, "] for K=", s.K, " N=", s.N,
               " block_size=", s.block, " bits=", s.bits, ", got ", shape_str(packed.shape));
  const Tensor& scales = required_input(n, in, i_scales, "scales");
  check_dtype(n, scales, DType::f32, "scales");
  PYEDGE_CHECK(scales.numel() == s.N * s.n_blocks, n.where(), ": scales must have N * n_blocks = ",
               s.N, " * ", s.n_blocks, " elements ([N * n_blocks] or [N, n_blocks]), got ",
               shape_str(scales.shape));
  s.in_packed = int(i_packed);
  s.in_scales = int(i_scales);
  if (i_zp < in.size() && n.has_input(i_zp)) {
    const Tensor& zp = in[i_zp];
    s.in_zp = int(i_zp);
    if (zp.dtype == DType::f32) {
      s.zp_float = true;
      PYEDGE_CHECK(zp.numel() == s.N * s.n_blocks, n.where(),
                   ": float zero_points must have scales' size ", s.N * s.n_blocks, ", got ",
                   shape_str(zp.shape));
    } else {
      PYEDGE_CHECK(zp.dtype == DType::u8, n.where(), ": zero_points must be uint8 (packed) or "
                   "float, got ", dtype_name(zp.dtype));
      s.zp_row_bytes = (s.n_blocks * s.bits + 7) / 8;
      PYEDGE_CHECK(zp.numel() == s.N * s.zp_row_bytes, n.where(),
                   ": packed zero_points must have N * ceil(n_blocks * bits / 8) = ", s.N, " * ",
                   s.zp_row_bytes, " bytes, got ", shape_str(zp.shape));
    }
  }
  return s;
}

QuantWeightSpec bnb4_spec(const NodeInfo& n, const std::vector<Tensor>& in, size_t first) {
  QuantWeightSpec s;
  s.format = QuantFormat::bnb4;
  read_dims(n, s);
  s.bits = 4;
  s.quant_type = int(required_int(n, "quant_type"));
  PYEDGE_CHECK(s.quant_type == 0 || s.quant_type == 1, n.where(),
               ": quant_type must be 0 (FP4) or 1 (NF4), got ", s.quant_type);
  const Tensor& packed = required_input(n, in, first, "B");
  check_dtype(n, packed, DType::u8, "B (packed weight)");
  PYEDGE_CHECK(packed.numel() == (s.N * s.K + 1) / 2, n.where(),
               ": B must hold (N*K + 1) / 2 = ", (s.N * s.K + 1) / 2, " bytes for K=", s.K,
               " N=", s.N, ", got ", shape_str(packed.shape));
  const Tensor& absmax = required_input(n, in, first + 1, "absmax");
  check_dtype(n, absmax, DType::f32, "absmax");
  const int64_t blocks = (s.N * s.K + s.block - 1) / s.block;
  PYEDGE_CHECK(absmax.numel() == blocks, n.where(), ": absmax must have ceil(N*K / block_size) = ",
               blocks, " elements, got ", shape_str(absmax.shape));
  s.in_packed = int(first);
  s.in_scales = int(first + 1);
  return s;
}

}  // namespace pyedge
