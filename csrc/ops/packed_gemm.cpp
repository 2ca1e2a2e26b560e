#include "ops/packed_gemm.h"

#include <algorithm>

#include "common/parallel.h"
#include "ops/small_gemm.h"

namespace pyedge {

PackedWeight::PackedWeight(const float* B, int64_t K, int64_t N, bool trans_b, int64_t ldb)
    : K_(K), N_(N) {
  const int64_t np = (N + kPanel - 1) / kPanel;
  panels_.assign(size_t(np * K * kPanel), 0.f);
  for (int64_t p = 0; p < np; ++p) {
    float* dst = panels_.data() + p * K * kPanel;
    const int64_t w = std::min(kPanel, N - p * kPanel);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < w; ++j) {
        const int64_t n = p * kPanel + j;
        dst[k * kPanel + j] = trans_b ? B[n * ldb + k] : B[k * ldb + n];
      }
  }
}

bool PackedWeight::worth_it(int64_t M, int64_t N, int64_t K) {
  return M >= 1 && M <= 64 && N >= kPanel && K >= 16 && K * N * 4 <= kMaxPackedBytes;
}

void PackedWeight::gemm(int64_t M, const float* A, int64_t lda, float* C, int64_t ldc) const {
  const int64_t np = (N_ + kPanel - 1) / kPanel;
  // One panel per task: each streams its own [K, 64] slice of the weight.
  parallel_for(np, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t w = std::min(kPanel, N_ - p * kPanel);
      small_gemm(false, false, M, w, K_, A, lda, panels_.data() + p * K_ * kPanel, kPanel, 0.f,
                 C + p * kPanel, ldc);
    }
  });
}

}  // namespace pyedge
