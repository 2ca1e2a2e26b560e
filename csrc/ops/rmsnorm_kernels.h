// Row kernels of pyedge.RMSNorm (rmsnorm.cpp), written once over a simd backend S (simd.h):
// simd::Native in the op, simd::Scalar as the reference the SIMD test compares against
// (_core.simd_kernel("rmsnorm"...)). Full vectors with S, the column tail with Scalar.
//   forward  y = w' ∘ (x · r),  r = 1/sqrt(mean(x²) + eps)
//   backward dx = r·(dy∘w') − x·r³·mean(dy∘w'∘x),  dw += dy∘x·r
// w' is the weight (kW = kWeight), 1 + weight (kW = kOnePlus, Gemma's form) or 1 (kW = kNone:
// no weight input).
#pragma once
#include <cstdint>

#include "common/simd.h"

namespace pyedge {
namespace rmsk {

enum WeightForm { kNone = 0, kWeight = 1, kOnePlus = 2 };

// w' at columns [i, i + W) of backend T.
template <int kW, class T>
PYEDGE_SIMD_INLINE typename T::V wv(const float* w, int64_t i) {
  if constexpr (kW == kNone) return T::set1(1.f);
  else if constexpr (kW == kWeight) return T::load(w + i);
  else return T::add(T::set1(1.f), T::load(w + i));
}

// Σ x² over a row [n]: two accumulators for latency, lanes summed at the end.
template <class S>
inline float sum_sq(const float* x, int64_t n) {
  using V = typename S::V;
  constexpr int W = S::W;
  V a = S::set1(0.f), b = a;
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const V x0 = S::load(x + i), x1 = S::load(x + i + W);
    a = S::fma(x0, x0, a);
    b = S::fma(x1, x1, b);
  }
  if (i + W <= n) {
    const V x0 = S::load(x + i);
    a = S::fma(x0, x0, a);
    i += W;
  }
  float s = S::hsum(S::add(a, b));
  for (; i < n; ++i) s += x[i] * x[i];
  return s;
}

// y [n] = w' ∘ (x · r): the product in the exporters' order (x · rsqrt first, then the weight).
template <class S, int kW>
inline void apply_row(const float* x, const float* w, float r, float* y, int64_t n) {
  constexpr int W = S::W;
  auto at = [&](auto tag, int64_t i) {
    using T = decltype(tag);
    T::store(y + i, T::mul(wv<kW, T>(w, i), T::mul(T::load(x + i), T::set1(r))));
  };
  int64_t i = 0;
  for (; i + W <= n; i += W) at(S{}, i);
  for (; i < n; ++i) at(simd::Scalar{}, i);
}

// Σ dy∘w'∘x over a row: the backward's one reduction.
template <class S, int kW>
inline float dot_row(const float* x, const float* w, const float* dy, int64_t n) {
  using V = typename S::V;
  constexpr int W = S::W;
  V a = S::set1(0.f), b = a;
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    a = S::fma(S::mul(S::load(dy + i), wv<kW, S>(w, i)), S::load(x + i), a);
    b = S::fma(S::mul(S::load(dy + i + W), wv<kW, S>(w, i + W)), S::load(x + i + W), b);
  }
  if (i + W <= n) {
    a = S::fma(S::mul(S::load(dy + i), wv<kW, S>(w, i)), S::load(x + i), a);
    i += W;
  }
  float s = S::hsum(S::add(a, b));
  for (; i < n; ++i) s += dy[i] * wv<kW, simd::Scalar>(w, i) * x[i];
  return s;
}

// One row's backward given r and c = −r³·mean(dy∘w'∘x):
//   dx (assigned when kAssign, else added; skipped when null) = r·dy∘w' + c·x
//   pw (this row block's dw partial; skipped when null) += dy∘x·r
template <class S, int kW, bool kAssign>
inline void bwd_row(const float* x, const float* w, const float* dy, float r, float c, float* dx,
                    float* pw, int64_t n) {
  constexpr int W = S::W;
  auto at = [&](auto tag, int64_t i) {
    using T = decltype(tag);
    const auto d = T::load(dy + i), xv = T::load(x + i);
    if (dx) {
      auto v = T::fma(T::mul(d, wv<kW, T>(w, i)), T::set1(r), T::mul(xv, T::set1(c)));
      if constexpr (!kAssign) v = T::add(T::load(dx + i), v);
      T::store(dx + i, v);
    }
    if (pw) T::store(pw + i, T::fma(T::mul(d, xv), T::set1(r), T::load(pw + i)));
  };
  int64_t i = 0;
  for (; i + W <= n; i += W) at(S{}, i);
  for (; i < n; ++i) at(simd::Scalar{}, i);
}

}  // namespace rmsk
}  // namespace pyedge
