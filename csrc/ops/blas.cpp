#include "ops/blas.h"

#include <cblas.h>

#include "common/error.h"

namespace pyedge {

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
           const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
           int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // BLAS leaves C untouched when K == 0 only for beta == 1
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.f ? 0.f : beta * C[i * ldc + j];
    return;
  }
  PYEDGE_CHECK(M < (int64_t(1) << 31) && N < (int64_t(1) << 31) && K < (int64_t(1) << 31),
               "matrix too large for 32-bit BLAS: ", M, "x", N, "x", K);
  scipy_cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                    trans_b ? CblasTrans : CblasNoTrans, int(M), int(N), int(K), alpha, A,
                    int(lda), B, int(ldb), beta, C, int(ldc));
}

void blas_set_num_threads(int n) { scipy_openblas_set_num_threads(n); }

}  // namespace pyedge
