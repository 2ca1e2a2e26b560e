// Small single-threaded SGEMM for attention's per-head products (e.g. 128x128x32 and
// 128x32x128, 192 of them per op on MiniLM), where OpenBLAS's per-call packing and dispatch
// cost about half the time. A is read in place (transposed or not: it only feeds
// broadcasts); a transposed B is first copied into a row-major panel (K*N floats,
// thread-local, grown once). The kernel keeps an MR x NR block of C in vector registers (GCC vector extensions: zmm with AVX-512, split into narrower
// registers elsewhere) and streams rows of B through it.
#include "ops/small_gemm.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace pyedge {
namespace {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

// C[MR, NV*16] (+)= A[MR, K] · B[K, NV*16] for one register block; A(r, k) is
// A[r * sr + k * sk] (a transposed A is read in place: it only feeds broadcasts).
template <int MR, int NV>
inline void block(int64_t K, const float* A, int64_t sr, int64_t sk, const float* B, int64_t ldb,
                  float beta, float* C, int64_t ldc) {
  vf acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vf{} ;
  for (int64_t k = 0; k < K; ++k) {
    vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * ldb + v * kLanes);
    for (int r = 0; r < MR; ++r) {
      const float a = A[r * sr + k * sk];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      float* c = C + r * ldc + v * kLanes;
      store(c, beta == 0.f ? acc[r][v] : acc[r][v] + beta * load(c));
    }
}

// Columns [0, N16) in blocks of NV vectors, rows in blocks of MR (then one at a time).
template <int NV>
void columns(int64_t M, int64_t N16, int64_t K, const float* A, int64_t sr, int64_t sk,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  // MR x NV accumulators + NV row vectors of B fit the 32 vector registers of AVX-512
  // (NV 2: 16 + 2, for attention's 32-wide outputs P·V, dS·K, dSᵀ·Q, Pᵀ·dO; 12 rows
  // measured no faster than 8, which divide its 128 rows).
  constexpr int MR = NV >= 4 ? 6 : 8;
  for (int64_t j = 0; j + NV * kLanes <= N16; j += NV * kLanes) {
    int64_t i = 0;
    for (; i + MR <= M; i += MR)
      block<MR, NV>(K, A + i * sr, sr, sk, B + j, ldb, beta, C + i * ldc + j, ldc);
    for (; i + 2 <= M; i += 2)
      block<2, NV>(K, A + i * sr, sr, sk, B + j, ldb, beta, C + i * ldc + j, ldc);
    for (; i < M; ++i)
      block<1, NV>(K, A + i * sr, sr, sk, B + j, ldb, beta, C + i * ldc + j, ldc);
  }
}

thread_local std::vector<float> b_panel;

}  // namespace

bool small_gemm_fits(int64_t M, int64_t N, int64_t K) {
  return M >= 1 && K >= 1 && N >= kLanes && M <= 512 && N <= 512 && K <= 512;
}

void small_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A,
                int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  // A(i, k) by strides; B row-major [K, N], a transposed B copied into a panel first.
  const int64_t sr = trans_a ? 1 : lda, sk = trans_a ? lda : 1;
  if (trans_b) {
    if (b_panel.size() < size_t(K * N)) b_panel.resize(size_t(K * N));
    for (int64_t j = 0; j < N; ++j)
      for (int64_t k = 0; k < K; ++k) b_panel[size_t(k * N + j)] = B[j * ldb + k];
    B = b_panel.data();
    ldb = N;
  }
  const int64_t n64 = N / 64 * 64, n32 = N / 32 * 32, n16 = N / kLanes * kLanes;
  columns<4>(M, n64, K, A, sr, sk, B, ldb, beta, C, ldc);
  if (n32 > n64)  // one 32-wide strip: 8x2 blocks use the registers 6x4 would leave idle
    columns<2>(M, n32 - n64, K, A, sr, sk, B + n64, ldb, beta, C + n64, ldc);
  if (n16 > n32)
    columns<1>(M, n16 - n32, K, A, sr, sk, B + n32, ldb, beta, C + n32, ldc);
  // The last N % 16 columns, plainly.
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = n16; j < N; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += A[i * sr + k * sk] * B[k * ldb + j];
      C[i * ldc + j] = beta == 0.f ? s : s + beta * C[i * ldc + j];
    }
}

namespace {

typedef double vd __attribute__((vector_size(kLanes * sizeof(float))));

// MR rows of C[., 8]: acc lanes 2q + j hold the even (j 0) and odd (j 1) k of column q.
template <int MR>
inline void skinny8_block(int64_t K, const float* X, int64_t ldx, const float* panel, float* C,
                          int64_t ldc) {
  vf acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = vf{};
  const int64_t pairs = K / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    const vf a = load(panel + p * kLanes);
    for (int r = 0; r < MR; ++r) {
      double two;  // x[r, 2p] and x[r, 2p+1], broadcast as one 64-bit lane
      std::memcpy(&two, X + r * ldx + 2 * p, sizeof(two));
      const vd d = {two, two, two, two, two, two, two, two};
      vf b;
      std::memcpy(&b, &d, sizeof(b));
      acc[r] += a * b;
    }
  }
  if (K % 2) {  // the last k alone: its panel row has zeros in the odd lanes
    const vf a = load(panel + pairs * kLanes);
    for (int r = 0; r < MR; ++r) acc[r] += a * X[r * ldx + K - 1];
  }
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < int(kSkinny); ++q) C[r * ldc + q] = acc[r][2 * q] + acc[r][2 * q + 1];
}

}  // namespace

void pack_skinny8(int64_t K, int64_t cols, const float* P, int64_t sk, int64_t sq, float scale,
                  float* panel) {
  std::memset(panel, 0, sizeof(float) * size_t(skinny8_panel_floats(K)));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t q = 0; q < cols; ++q)
      panel[(k / 2) * kLanes + 2 * q + (k % 2)] = scale * P[k * sk + q * sq];
}

void skinny8_gemm(int64_t M, int64_t K, const float* X, int64_t ldx, const float* panel,
                  float* C, int64_t ldc) {
  int64_t i = 0;
  for (; i + 8 <= M; i += 8) skinny8_block<8>(K, X + i * ldx, ldx, panel, C + i * ldc, ldc);
  for (; i < M; ++i) skinny8_block<1>(K, X + i * ldx, ldx, panel, C + i * ldc, ldc);
}

}  // namespace pyedge
