// Row-major SGEMM on top of OpenBLAS (scipy-openblas32, symbols prefixed scipy_).
#pragma once
#include <cstddef>
#include <cstdint>

namespace pyedge {

// C[M,N] = alpha * op(A)[M,K] · op(B)[K,N] + beta * C; lda/ldb/ldc are row strides.
void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
           const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
           int64_t ldc);

// dX = dY·op(B) in a backward, where whole rows of dY may be exactly zero: the gradients of
// positions the loss never reads (all but the [CLS] rows of a sequence classifier's last
// layer, 16 of 2048 in MiniLM's bench). C[M,N] = A[M,K]·op(B) + beta·C with A's all-zero rows
// skipped: their C rows become 0 (beta 0) or stay (beta 1). When at most M/8 rows are
// non-zero they are gathered into `scratch` and multiplied there; otherwise this is sgemm.
// (A zero row times a B holding inf/NaN gives 0 here, NaN in a dense product.)
size_t skip_zero_rows_scratch_bytes(int64_t M, int64_t N, int64_t K);
void sgemm_skip_zero_rows(bool trans_b, int64_t M, int64_t N, int64_t K, const float* A,
                          int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                          int64_t ldc, void* scratch);

// Splits large products over the core's threads (OpenBLAS itself stays single-threaded);
// inside a parallel loop it runs on the calling thread.

// The kernel family OpenBLAS picked for this CPU at load time ("SkylakeX", "Haswell", ...).
const char* blas_core_name();

// Keeps OpenBLAS single-threaded whatever `n` is (the core owns all threading).
void blas_set_num_threads(int n);

}  // namespace pyedge
