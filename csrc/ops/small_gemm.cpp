// Small single-threaded SGEMM for attention's per-head products (e.g. 128x128x32 and
// 128x32x128, 192 of them per op on MiniLM), where OpenBLAS's per-call packing and dispatch
// cost about half the time. A is read in place (transposed or not: it only feeds
// broadcasts); a transposed B is first copied into a row-major panel (K*N floats,
// thread-local, grown once). The kernel keeps an MR x NV-vector block of C in vector
// registers (GCC vector extensions) and streams rows of B through it.
// The vector width and the blocks follow the target: a vector wider than the registers
// (16 floats on AVX2 or NEON) is split by GCC into several, and blocks sized for AVX-512's
// 32 zmm then spill on every FMA (measured 35-100x slower in an AVX2 or SSE2 build).
#include "ops/small_gemm.h"

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

namespace pyedge {
namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16, kRegs = 32;
#elif defined(__AVX__)
constexpr int kLanes = 8, kRegs = 16;
#elif defined(__aarch64__)
constexpr int kLanes = 4, kRegs = 32;  // NEON: 32 q registers
#else
constexpr int kLanes = 4, kRegs = 16;  // SSE2, or anything else with 128-bit vectors
#endif
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
// Vectors per column block for the bulk of C: 4 where 32 registers hold 6x4 accumulators.
constexpr int kWide = kRegs >= 32 ? 4 : 2;

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
  // MR x NV accumulators + NV row vectors of B fit the registers: 6x4 or 8x2 (+ 4 or 2) of
  // 32 (on AVX-512, 8x2 for attention's 32-wide outputs P·V, dS·K, dSᵀ·Q, Pᵀ·dO; 12 rows
  // measured no faster than 8, which divide its 128 rows), 6x2 or 8x1 of 16.
  constexpr int MR = kRegs >= 32 ? (NV >= 4 ? 6 : 8) : (NV >= 2 ? 6 : 8);
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
  return M >= 1 && K >= 1 && N >= 16 && M <= 512 && N <= 512 && K <= 512;
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
  // Column strips of 4, 2 and 1 vectors (AVX-512: 64, 32, 16 floats; a 32-wide strip in
  // 8x2 blocks uses the registers 6x4 would leave idle).
  constexpr int64_t V = kLanes;
  const int64_t n4 = kWide >= 4 ? N / (4 * V) * (4 * V) : 0, n2 = N / (2 * V) * (2 * V),
                n1 = N / V * V;
  if (n4 > 0) columns<4>(M, n4, K, A, sr, sk, B, ldb, beta, C, ldc);
  if (n2 > n4) columns<2>(M, n2 - n4, K, A, sr, sk, B + n4, ldb, beta, C + n4, ldc);
  if (n1 > n2) columns<1>(M, n1 - n2, K, A, sr, sk, B + n2, ldb, beta, C + n2, ldc);
  // The last N % kLanes columns, plainly.
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = n1; j < N; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += A[i * sr + k * sk] * B[k * ldb + j];
      C[i * ldc + j] = beta == 0.f ? s : s + beta * C[i * ldc + j];
    }
}

namespace {

typedef double vd __attribute__((vector_size(kLanes * sizeof(float))));
constexpr int kRowVecs = 16 / kLanes;  // vectors per 16-float panel row (8 columns x 2 k)

// {x, x, ...}: an initializer list (one broadcast instruction), not lane-by-lane inserts.
template <size_t... I>
inline vd broadcast(double x, std::index_sequence<I...>) {
  return vd{(void(I), x)...};
}

// MR rows of C[., 8]: panel lane 2q + j (of 16, over kRowVecs vectors) accumulates the even
// (j 0) or odd (j 1) k of column q.
template <int MR>
inline void skinny8_block(int64_t K, const float* X, int64_t ldx, const float* panel, float* C,
                          int64_t ldc) {
  constexpr int R = kRowVecs;
  vf acc[MR][R];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < R; ++v) acc[r][v] = vf{};
  const int64_t pairs = K / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    vf a[R];
    for (int v = 0; v < R; ++v) a[v] = load(panel + p * 16 + v * kLanes);
    for (int r = 0; r < MR; ++r) {
      double two;  // x[r, 2p] and x[r, 2p+1], broadcast as one 64-bit lane
      std::memcpy(&two, X + r * ldx + 2 * p, sizeof(two));
      const vd d = broadcast(two, std::make_index_sequence<kLanes / 2>());
      vf b;
      std::memcpy(&b, &d, sizeof(b));
      for (int v = 0; v < R; ++v) acc[r][v] += a[v] * b;
    }
  }
  if (K % 2) {  // the last k alone: its panel row has zeros in the odd lanes
    for (int v = 0; v < R; ++v) {
      const vf a = load(panel + pairs * 16 + v * kLanes);
      for (int r = 0; r < MR; ++r) acc[r][v] += a * X[r * ldx + K - 1];
    }
  }
  for (int r = 0; r < MR; ++r) {
    float lanes[16];
    for (int v = 0; v < R; ++v) store(lanes + v * kLanes, acc[r][v]);
    for (int q = 0; q < int(kSkinny); ++q) C[r * ldc + q] = lanes[2 * q] + lanes[2 * q + 1];
  }
}
// Rows per block: MR x kRowVecs accumulators + kRowVecs panel vectors fit the registers.
constexpr int kSkinnyRows = std::min(8, (kRegs - kRowVecs - 2) / kRowVecs);

}  // namespace

void pack_skinny8(int64_t K, int64_t cols, const float* P, int64_t sk, int64_t sq, float scale,
                  float* panel) {
  std::memset(panel, 0, sizeof(float) * size_t(skinny8_panel_floats(K)));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t q = 0; q < cols; ++q)
      panel[(k / 2) * 16 + 2 * q + (k % 2)] = scale * P[k * sk + q * sq];
}

void skinny8_gemm(int64_t M, int64_t K, const float* X, int64_t ldx, const float* panel,
                  float* C, int64_t ldc) {
  constexpr int MR = kSkinnyRows;
  int64_t i = 0;
  for (; i + MR <= M; i += MR) skinny8_block<MR>(K, X + i * ldx, ldx, panel, C + i * ldc, ldc);
  for (; i < M; ++i) skinny8_block<1>(K, X + i * ldx, ldx, panel, C + i * ldc, ldc);
}

}  // namespace pyedge
