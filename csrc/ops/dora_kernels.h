// Row kernels of pyedge.DoraScale (dora.cpp), written once over a simd backend S (simd.h):
// simd::Native in the op, simd::Scalar as the reference the SIMD test compares against
// (_core.simd_kernel("dora_scale"...)). Full vectors with S, the column tail with Scalar.
//   forward  y = z ∘ c (+ b)            c = m / ‖W + s·B·A‖ per output column [N]
//   backward dz (+)= dy ∘ c,  acc += dy ∘ z   (dm = acc / ‖·‖ after all rows)
#pragma once
#include <cstdint>

#include "common/simd.h"

namespace pyedge {
namespace dorak {

// Σ x² over a row [n] (a row of the merged weight: its norm).
template <class S>
inline float sum_sq(const float* x, int64_t n) {
  using V = typename S::V;
  constexpr int W = S::W;
  V a = S::set1(0.f);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V v = S::load(x + i);
    a = S::fma(v, v, a);
  }
  float s = S::hsum(a);
  for (; i < n; ++i) s = simd::Scalar::fma(x[i], x[i], s);
  return s;
}

// One row [N]: y = z ∘ c (+ b when b is not null).
template <class S>
inline void scale_row(const float* z, const float* c, const float* b, float* y, int64_t N) {
  constexpr int W = S::W;
  int64_t j = 0;
  if (b) {
    for (; j + W <= N; j += W)
      S::store(y + j, S::fma(S::load(z + j), S::load(c + j), S::load(b + j)));
    for (; j < N; ++j) y[j] = simd::Scalar::fma(z[j], c[j], b[j]);
  } else {
    for (; j + W <= N; j += W) S::store(y + j, S::mul(S::load(z + j), S::load(c + j)));
    for (; j < N; ++j) y[j] = z[j] * c[j];
  }
}

// One row [N] of the backward: dz = dy ∘ c (assign) or dz += dy ∘ c; acc += dy ∘ z.
// dz or acc may be null (that gradient is not wanted).
template <class S>
inline void scale_row_bwd(const float* dy, const float* z, const float* c, float* dz,
                          bool assign, float* acc, int64_t N) {
  constexpr int W = S::W;
  int64_t j = 0;
  for (; j + W <= N; j += W) {
    const typename S::V g = S::load(dy + j);
    if (dz) S::store(dz + j, assign ? S::mul(g, S::load(c + j))
                                    : S::fma(g, S::load(c + j), S::load(dz + j)));
    if (acc) S::store(acc + j, S::fma(g, S::load(z + j), S::load(acc + j)));
  }
  for (; j < N; ++j) {
    if (dz) dz[j] = assign ? dy[j] * c[j] : simd::Scalar::fma(dy[j], c[j], dz[j]);
    if (acc) acc[j] = simd::Scalar::fma(dy[j], z[j], acc[j]);
  }
}

}  // namespace dorak
}  // namespace pyedge
