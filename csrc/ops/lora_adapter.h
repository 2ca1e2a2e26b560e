// Pieces of the LoRA adapter shared by the ops that fuse it into a base projection
// (pyedge.LoraMatMul on a float W, pyedge.LoraQuantMatMul on a quantized one): the dropout
// mask stream and the adapter-gradient pass. One definition, so both ops draw the same masks
// and compute dA, dB in the same order.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/hash.h"
#include "common/parallel.h"
#include "ops/blas.h"
#include "ops/small_gemm.h"

namespace pyedge {

// drop(x) of the adapter's input, x [n] (n = M·K): keep[i] = hash(seed, salt, i) >= p·2^64,
// xd[i] = keep[i] ? x[i] / (1 − p) : 0. The stream depends on the step seed, the op's salt and
// the element index only (not on the thread count).
inline void lora_dropout(const float* x, int64_t n, float p, uint64_t step_seed, uint64_t salt,
                         float* xd, uint8_t* keep) {
  uint64_t seed = splitmix64(step_seed ^ splitmix64(salt));
  float inv = 1.f / (1.f - p);
  uint64_t threshold = uint64_t(double(p) * 18446744073709551616.0);
  parallel_for(n, 1 << 14, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) {
      keep[i] = splitmix64(seed + uint64_t(i)) >= threshold;
      xd[i] = keep[i] ? x[i] * inv : 0.f;
    }
  });
}

// dx [M, K] += keep ∘ (dt · A) / (1 − p): the adapter's share of dx under dropout, dt [M, r]
// (= s·dY·B), A [r, K], keep [M, K].
inline void lora_dropout_dx(const float* dt, const float* A, const uint8_t* keep, float p,
                            int64_t M, int64_t K, int64_t r, float* dx) {
  const float inv = 1.f / (1.f - p);
  parallel_for(M, 16, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i)
      for (int64_t k = 0; k < K; ++k) {
        if (!keep[i * K + k]) continue;
        float acc = 0.f;
        for (int64_t q = 0; q < r; ++q) acc += dt[i * r + q] * A[q * K + k];
        dx[i * K + k] += acc * inv;
      }
  });
}

// dA [r, K] and dB [N, r] of the adapter from xa [M, K] (the adapter's input: x, or x after
// dropout), dY [M, N], A [r, K] and B [N, r]:
//   t = xa·Aᵀ [M, r], dt = s·dY·B [M, r], dB (+)= s·dYᵀ·t, dA (+)= dtᵀ·xa.
// For r <= 8, one pass over row chunks (xa and dY are read once, while in cache) instead of
// four skinny BLAS calls that each stream them: t and dt of a chunk come from skinny8_gemm
// (Aᵀ and s·B packed once per call), the chunk's dBᵀ [r, N] and dA [r, K] shares from
// small_gemm into a partial sum per partition. Partitions are fixed row ranges (not one per
// thread) summed in order, so the result does not depend on the thread count.
class AdapterGrads {
 public:
  static constexpr int64_t kChunk = 128, kMaxParts = 12;
  AdapterGrads() = default;
  AdapterGrads(int64_t M, int64_t K, int64_t N, int64_t r)
      : M_(M), K_(K), N_(N), r_(r),
        parts_(std::max<int64_t>(1, std::min<int64_t>(kMaxParts, (M + 31) / 32))) {}
  // Whether the chunked pass applies (else four sgemm calls).
  bool chunked() const { return r_ <= kSkinny; }
  size_t scratch_floats() const {
    if (!chunked()) return size_t(M_ * r_ * 2);  // t and dt, whole
    return size_t(skinny8_panel_floats(K_) + skinny8_panel_floats(N_) + parts_ * per_part());
  }

  // dA, dB: nullptr when not wanted; assign (fresh) or add.
  void run(const float* xa, const float* dy, const float* A, const float* B, float s, float* dA,
           bool fresh_a, float* dB, bool fresh_b, float* scratch) const {
    const int64_t M = M_, K = K_, N = N_, r = r_;
    if (!chunked()) {
      float* t = scratch;
      float* dt = t + M * r;
      if (dB) {  // dB [N, r] (+)= s · dYᵀ · t
        sgemm(false, true, M, r, K, 1.f, xa, K, A, K, 0.f, t, r);
        sgemm(true, false, N, r, M, s, dy, N, t, r, fresh_b ? 0.f : 1.f, dB, r);
      }
      if (dA) {  // dA [r, K] (+)= dtᵀ · xa
        sgemm(false, false, M, r, N, s, dy, N, B, r, 0.f, dt, r);
        sgemm(true, false, r, K, M, 1.f, dt, r, xa, K, fresh_a ? 0.f : 1.f, dA, K);
      }
      return;
    }
    constexpr int64_t L = kSkinny;
    float* at = scratch;                          // Aᵀ [K, 8], packed
    float* bs = at + skinny8_panel_floats(K);     // s·B [N, 8], packed
    float* part = bs + skinny8_panel_floats(N);   // per partition: t, dt [kChunk, 8], dBᵀ, dA
    pack_skinny8(K, r, A, 1, K, 1.f, at);
    pack_skinny8(N, r, B, r, 1, s, bs);
    parallel_for(parts_, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        float* t = part + p * per_part();
        float* dt = t + kChunk * L;
        float* dbt = dt + kChunk * L;  // [r, N]
        float* da = dbt + r * N;       // [r, K]
        const int64_t lo = M * p / parts_, hi = M * (p + 1) / parts_;
        for (int64_t i = lo; i < hi; i += kChunk) {
          const int64_t c = std::min(kChunk, hi - i);
          const float beta = i == lo ? 0.f : 1.f;
          const float* xc = xa + i * K;
          const float* dyc = dy + i * N;
          if (dB) {  // t = xa·Aᵀ, dBᵀ += tᵀ·dY (s applied when the partitions are summed)
            skinny8_gemm(c, K, xc, K, at, t, L);
            small_gemm(true, false, r, N, c, t, L, dyc, N, beta, dbt, N);
          }
          if (dA) {  // dt = dY·(s·B), dA += dtᵀ·xa
            skinny8_gemm(c, N, dyc, N, bs, dt, L);
            small_gemm(true, false, r, K, c, dt, L, xc, K, beta, da, K);
          }
        }
      }
    });
    auto sum_parts = [&](int64_t off, int64_t n, auto&& put) {  // put(j, Σ_p part_p[off + j])
      parallel_for(n, 1024, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          float acc = 0.f;
          for (int64_t p = 0; p < parts_; ++p) acc += part[p * per_part() + off + j];
          put(j, acc);
        }
      });
    };
    const int64_t off_dbt = 2 * kChunk * L, off_da = off_dbt + r * N;
    if (dB)  // dB[n, q] from dBᵀ[q, n]
      sum_parts(off_dbt, r * N, [&](int64_t j, float v) {
        float& d = dB[(j % N) * r + j / N];
        d = fresh_b ? s * v : d + s * v;
      });
    if (dA)
      sum_parts(off_da, r * K, [&](int64_t j, float v) { dA[j] = fresh_a ? v : dA[j] + v; });
  }

 private:
  int64_t per_part() const { return 2 * kChunk * kSkinny + r_ * (N_ + K_); }
  int64_t M_ = 0, K_ = 0, N_ = 0, r_ = 0, parts_ = 1;
};

}  // namespace pyedge
