// Serial SGEMM for small products (all dims <= 512), see small_gemm.cpp.
#pragma once
#include <cstdint>

namespace pyedge {

// Whether small_gemm handles this size (and is worth it over OpenBLAS).
bool small_gemm_fits(int64_t M, int64_t N, int64_t K);

// C[M,N] = op(A)[M,K] · op(B)[K,N] + beta * C (beta 0: C is not read); row-major strides.
void small_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A,
                int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

}  // namespace pyedge
