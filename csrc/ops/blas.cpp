#include "ops/blas.h"

#include <cblas.h>

#include "common/error.h"
#include "common/parallel.h"

namespace pyedge {
namespace {

// OpenBLAS always runs single-threaded: the core parallelises GEMMs itself with the same
// OpenMP threads as every other kernel, so BLAS threads and OpenMP threads never compete
// for the cores (alternating the two pools cost 10-40x on 2 busy cores).
struct BlasSingleThreaded {
  BlasSingleThreaded() { scipy_openblas_set_num_threads(1); }
} blas_single_threaded;

void sgemm_serial(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                  const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                  int64_t ldc) {
  scipy_cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                    trans_b ? CblasTrans : CblasNoTrans, int(M), int(N), int(K), alpha, A,
                    int(lda), B, int(ldb), beta, C, int(ldc));
}

}  // namespace

const char* blas_core_name() { return scipy_openblas_get_corename(); }

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
  // Small products, or a call from inside a parallel loop: one thread.
  const double flops = double(M) * double(N) * double(K);
  if (num_threads() <= 1 || flops < 64.0 * 64 * 64 || (M < 32 && N < 32)) {
    sgemm_serial(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  // Split the larger of M and N into one block per thread (multiples of 16 for the kernels).
  const int64_t nt = num_threads();
  if (M >= N) {
    int64_t block = ((M + nt - 1) / nt + 15) / 16 * 16;
    int64_t blocks = (M + block - 1) / block;
    parallel_for(blocks, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        int64_t m0 = i * block, m = std::min(block, M - m0);
        const float* Ai = trans_a ? A + m0 : A + m0 * lda;
        sgemm_serial(trans_a, trans_b, m, N, K, alpha, Ai, lda, B, ldb, beta, C + m0 * ldc, ldc);
      }
    });
  } else {
    int64_t block = ((N + nt - 1) / nt + 15) / 16 * 16;
    int64_t blocks = (N + block - 1) / block;
    parallel_for(blocks, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        int64_t n0 = i * block, n = std::min(block, N - n0);
        const float* Bi = trans_b ? B + n0 * ldb : B + n0;
        sgemm_serial(trans_a, trans_b, M, n, K, alpha, A, lda, Bi, ldb, beta, C + n0, ldc);
      }
    });
  }
}

void blas_set_num_threads(int) { scipy_openblas_set_num_threads(1); }

}  // namespace pyedge
