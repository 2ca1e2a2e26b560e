// Products with a frozen weight and few rows (an MLP on a small batch): the weight is packed
// once, at plan time, into 64-column row-major panels, so each step streams it contiguously
// through small_gemm's register blocks instead of OpenBLAS re-packing it on every call
// (measured on the 32x784x256 MLP layer). Costs one copy of the weight, so only weights up
// to kMaxPackedBytes are packed: the extra memory stays small next to the model (MiniLM at
// batch x sequence <= 64: its 24 384x384 projections, 14 MB; the FFN weights are larger).
#pragma once
#include <cstdint>
#include <vector>

namespace pyedge {

class PackedWeight {
 public:
  static constexpr int64_t kPanel = 64;
  static constexpr int64_t kMaxPackedBytes = int64_t(1) << 20;

  PackedWeight() = default;
  // B is op(B) [K, N]: stored [K, N] (ldb >= N) or, with trans_b, [N, K] (ldb >= K).
  PackedWeight(const float* B, int64_t K, int64_t N, bool trans_b, int64_t ldb);

  // Whether packing pays for an M x K · K x N product (and its copy fits the cap).
  static bool worth_it(int64_t M, int64_t N, int64_t K);

  bool empty() const { return panels_.empty(); }
  // C[M, N] = A[M, K] · B, A row-major (row stride lda); panels spread over the threads.
  void gemm(int64_t M, const float* A, int64_t lda, float* C, int64_t ldc) const;

 private:
  int64_t K_ = 0, N_ = 0;
  std::vector<float> panels_;  // [ceil(N / 64)][K][64], the last panel zero-padded
};

}  // namespace pyedge
