#include "ops/blas.h"

#include <cblas.h>

#include <algorithm>
#include <cstring>

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

namespace {

constexpr int64_t kMinRowsToSkip = 64;  // below this a dense product is as cheap as the scan

// Rows at most M/8 of which are non-zero are gathered; beyond that the GEMM's own rate wins.
int64_t max_gathered_rows(int64_t M) { return M >= kMinRowsToSkip ? M / 8 : 0; }

// Whether any element of r[0, n) is not ±0 (NaN and inf count as non-zero). Dense gradient
// rows answer at their first block of 16, so the scan costs little when nothing is skipped.
bool row_nonzero(const float* r, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    uint32_t acc = 0;
    for (int64_t j = 0; j < 16; ++j) {
      uint32_t u;
      std::memcpy(&u, r + i + j, 4);
      acc |= u & 0x7fffffffu;
    }
    if (acc) return true;
  }
  for (; i < n; ++i)
    if (r[i] != 0.f || r[i] != r[i]) return true;
  return false;
}

size_t align64(size_t b) { return (b + 63) / 64 * 64; }

}  // namespace

size_t skip_zero_rows_scratch_bytes(int64_t M, int64_t N, int64_t K) {
  const int64_t g = max_gathered_rows(M);
  if (g == 0) return 0;
  return align64(size_t(M) * sizeof(int32_t)) + align64(size_t(g * K) * sizeof(float)) +
         size_t(g * N) * sizeof(float);
}

void sgemm_skip_zero_rows(bool trans_b, int64_t M, int64_t N, int64_t K, const float* A,
                          int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                          int64_t ldc, void* scratch) {
  PYEDGE_CHECK(beta == 0.f || beta == 1.f, "sgemm_skip_zero_rows: beta must be 0 or 1");
  const int64_t g = max_gathered_rows(M);
  if (g == 0 || scratch == nullptr || N == 0 || K == 0) {
    sgemm(false, trans_b, M, N, K, 1.f, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  char* p = static_cast<char*>(scratch);
  int32_t* rows = reinterpret_cast<int32_t*>(p);  // [M]: flags, then the kept row indices
  float* Ag = reinterpret_cast<float*>(p + align64(size_t(M) * sizeof(int32_t)));  // [g, K]
  float* Cg = Ag + align64(size_t(g * K) * sizeof(float)) / sizeof(float);         // [g, N]
  parallel_for(M, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) rows[i] = row_nonzero(A + i * lda, K) ? 1 : 0;
  });
  int64_t kept = 0;
  for (int64_t i = 0; i < M; ++i)
    if (rows[i]) {
      if (kept == g) break;
      rows[kept++] = int32_t(i);  // kept <= i: overwrites only flags already read
    }
  if (kept == g && g < M) {  // too many non-zero rows (the loop stopped at the cap)
    sgemm(false, trans_b, M, N, K, 1.f, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  for (int64_t j = 0; j < kept; ++j) std::memcpy(Ag + j * K, A + rows[j] * lda, size_t(K) * 4);
  if (kept > 0) sgemm(false, trans_b, kept, N, K, 1.f, Ag, K, B, ldb, 0.f, Cg, N);
  if (beta == 0.f) {
    parallel_for(M, 64, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    });
    for (int64_t j = 0; j < kept; ++j) std::memcpy(C + rows[j] * ldc, Cg + j * N, size_t(N) * 4);
  } else {  // beta 1: the plan's accumulation into an existing gradient
    for (int64_t j = 0; j < kept; ++j) {
      float* c = C + rows[j] * ldc;
      const float* cg = Cg + j * N;
      for (int64_t k = 0; k < N; ++k) c[k] += cg[k];
    }
  }
}

void blas_set_num_threads(int) { scipy_openblas_set_num_threads(1); }

}  // namespace pyedge
