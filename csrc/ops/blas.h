// Row-major SGEMM on top of OpenBLAS (scipy-openblas32, symbols prefixed scipy_).
#pragma once
#include <cstdint>

namespace pyedge {

// C[M,N] = alpha * op(A)[M,K] · op(B)[K,N] + beta * C; lda/ldb/ldc are row strides.
void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
           const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
           int64_t ldc);

// Splits large products over the core's threads (OpenBLAS itself stays single-threaded);
// inside a parallel loop it runs on the calling thread.

// The kernel family OpenBLAS picked for this CPU at load time ("SkylakeX", "Haswell", ...).
const char* blas_core_name();

// Keeps OpenBLAS single-threaded whatever `n` is (the core owns all threading).
void blas_set_num_threads(int n);

}  // namespace pyedge
