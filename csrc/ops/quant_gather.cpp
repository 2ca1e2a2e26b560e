// com.microsoft.GatherBlockQuantized: an embedding lookup on a 4/8-bit table that stays packed.
// Only the gathered rows are dequantized (with the MatMulNBits row kernels of quant_gemm.cpp,
// which have scalar, AVX2, AVX-512 and NEON paths), so a [V, D] table costs V·D·bits/8 bytes
// plus its scales instead of V·D·4.
//
//   GatherBlockQuantized(data, indices, scales, zero_points?; bits, block_size, gather_axis=0,
//                        quantize_axis=1) -> y [indices..., K] float32
//   data uint8 [V, K·bits/8] (ORT's layout: 4-bit codes two per byte, low nibble first) or
//        [V, n_blocks, block·bits/8] (MatMulNBits' B: a tied LM head's packed bytes, shared);
//   scales float [V, n_blocks]; zero_points uint8 [V, ceil(n_blocks·bits/8)] packed like
//   MatMulNBits' (absent: 2^(bits−1)). y[i, k] = (q[idx_i, k] − zp) · scale[idx_i, k / block].
// Both layouts hold the same bytes when block divides K, which is required here (ORT's layout
// otherwise runs the codes on across blocks, MatMulNBits' pads each block).
// The table is frozen: no gradient flows to data, scales or zero points (nor the indices).
#include <algorithm>
#include <string>

#include "common/parallel.h"
#include "ops/op.h"
#include "ops/quant_gemm.h"

namespace pyedge {
namespace {

class GatherBlockQuantized : public Op {
 public:
  GatherBlockQuantized(const NodeInfo& n, const std::vector<Tensor>& in) : where_(n.where()) {
    check_num_inputs(n, in, 3, 4);
    const Tensor& data = in[0];
    const Tensor& idx = in[1];
    PYEDGE_CHECK(n.attrs.get_int("gather_axis", 0) == 0, where_,
                 ": only gather_axis = 0 (an embedding lookup) is supported");
    PYEDGE_CHECK(data.dtype == DType::u8, where_,
                 ": data must be uint8 (packed codes), got ", dtype_name(data.dtype),
                 " (int4/uint4 tensors are not supported; write uint8)");
    PYEDGE_CHECK(data.rank() == 2 || data.rank() == 3, where_,
                 ": data must be [V, K*bits/8] or [V, n_blocks, block_size*bits/8], got ",
                 shape_str(data.shape));
    const int64_t qaxis = n.attrs.get_int("quantize_axis", 1);
    PYEDGE_CHECK(qaxis == 1 || qaxis == -1 || (data.rank() == 3 && qaxis == 2), where_,
                 ": only quantize_axis = last (blocks along each row) is supported, got ", qaxis);
    PYEDGE_CHECK(idx.dtype == DType::i64 || idx.dtype == DType::i32, where_,
                 ": indices must be int64 or int32, got ", dtype_name(idx.dtype));
    const int bits = int(n.attrs.get_int("bits", 4));
    const int64_t block = n.attrs.get_int("block_size", 128);
    PYEDGE_CHECK(bits == 4 || bits == 8, where_, ": bits must be 4 or 8, got ", bits);
    // (any block for 8 bits: pyedge's import turns per-row int8 tables into one block per row)
    PYEDGE_CHECK(block >= 1 && (bits == 8 || block % 2 == 0), where_,
                 ": block_size must be >= 1 (and even for 4 bits), got ", block);
    const int64_t V = data.shape[0];
    const int64_t row_bytes = data.rank() == 2 ? data.shape[1] : data.shape[1] * data.shape[2];
    const int64_t K = row_bytes * 8 / bits;
    PYEDGE_CHECK(K % block == 0, where_, ": the row length K = ", K, " must be a multiple of "
                 "block_size = ", block, " (data ", shape_str(data.shape), ")");
    spec_ = nbits_spec_at(n, in, K, V, bits, block, 0, 2, 3);
    V_ = V;
    K_ = K;
    ni_ = idx.numel();
    Shape ys = idx.shape;
    ys.push_back(K);
    outputs = {make_output(DType::f32, ys)};
    n_visible = 1;
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    const Tensor& idx = in[1];
    // every index checked before the parallel loop (an exception must not leave it)
    if (idx.dtype == DType::i64) check(idx.ptr<int64_t>());
    else check(idx.ptr<int32_t>());
    const QuantWeight w = view(spec_, in);
    float* y = out[0].ptr<float>();
    const int64_t K = K_, V = V_;
    auto row = [&](int64_t j) {
      const int64_t v = idx.dtype == DType::i64 ? idx.ptr<int64_t>()[j]
                                                : int64_t(idx.ptr<int32_t>()[j]);
      const int64_t r = v < 0 ? v + V : v;
      dequantize_panel(w, r, r + 1, 0, K, y + j * K, K);
    };
    parallel_for(ni_, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)),
                 [&](int64_t b, int64_t e) {
                   for (int64_t j = b; j < e; ++j) row(j);
                 });
  }

  // Frozen table, integer indices: nothing here takes a gradient.
  bool differentiable_input(size_t) const override { return false; }
  double flops() const override { return double(ni_) * double(K_); }

 private:
  template <typename I>
  void check(const I* p) const {
    for (int64_t i = 0; i < ni_; ++i) {
      const int64_t v = int64_t(p[i]);
      if (v < -V_ || v >= V_)
        throw Error(str_cat(where_, ": index ", v, " (at position ", i,
                            ") is out of range for a table of ", V_, " rows"));
    }
  }

  std::string where_;
  QuantWeightSpec spec_;
  int64_t V_ = 0, K_ = 0, ni_ = 0;
};
PYEDGE_REGISTER_OP("com.microsoft.GatherBlockQuantized", GatherBlockQuantized);

}  // namespace
}  // namespace pyedge
