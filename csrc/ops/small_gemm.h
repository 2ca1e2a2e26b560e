// Serial SGEMM for small products (all dims <= 512), see small_gemm.cpp.
#pragma once
#include <cstdint>

namespace pyedge {

// Whether small_gemm handles this size (and is worth it over OpenBLAS).
bool small_gemm_fits(int64_t M, int64_t N, int64_t K);

// C[M,N] = op(A)[M,K] · op(B)[K,N] + beta * C (beta 0: C is not read); row-major strides.
void small_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A,
                int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// Skinny products C[M, q<8] = X[M, K] · P[K, 8] (the LoRA adapter's x·Aᵀ and dY·B, r <= 8).
// P is packed by pack_skinny8 in pairs of rows, panel[p*16 + 2q + j] = P[2p + j, q], so one
// 16-lane FMA takes two k at once against a broadcast pair (x[i,2p], x[i,2p+1]): half the
// FMAs of a 16-wide product with 8 zero columns.
constexpr int64_t kSkinny = 8;
// Floats pack_skinny8 writes for K rows.
inline int64_t skinny8_panel_floats(int64_t K) { return (K + 1) / 2 * 16; }
// P(k, q) = scale * P[k*sk + q*sq] for q < cols (<= 8); the other columns are 0.
void pack_skinny8(int64_t K, int64_t cols, const float* P, int64_t sk, int64_t sq, float scale,
                  float* panel);
// C[i, q] = Σ_k X[i, k] P(k, q) for q < 8 (ldc >= 8).
void skinny8_gemm(int64_t M, int64_t K, const float* X, int64_t ldx, const float* panel,
                  float* C, int64_t ldc);

}  // namespace pyedge
