// Row kernels of pyedge.Rotary (rotary.cpp), written once over a simd backend S (simd.h):
// simd::Native in the op, simd::Scalar as the reference the SIMD test compares against
// (_core.simd_kernel("rotary"...)). Full vectors with S, the tail with Scalar.
//
// One row is one head's vector x [D] at one position; c, s [rd] are that position's cos and
// sin (rd = rotary_dim <= D, even; h = rd / 2). The half-split convention (Llama's
// rotate_half(x) = [-x2, x1]):
//   forward   y[i]     = x[i]·c[i]         − x[i+h]·s[i]        i < h
//             y[i+h]   = x[i+h]·c[i+h]     + x[i]·s[i+h]
//             y[j]     = x[j]                                   j >= rd (partial rotary)
//   backward  dx[i]    = dy[i]·c[i]        + dy[i+h]·s[i+h]
//             dx[i+h]  = dy[i+h]·c[i+h]    − dy[i]·s[i]
//             dx[j]    = dy[j]
// The forward multiplies and then adds (no FMA), as the exporters' Mul → Mul → Add chain
// does, so the fused op gives the op-by-op graph's values (up to the compiler contracting).
#pragma once
#include <cstdint>
#include <cstring>

#include "common/simd.h"

namespace pyedge {
namespace rotk {

// y [D] from x [D], c, s [2h]; y may not alias x.
template <class S>
inline void fwd_row(const float* x, const float* c, const float* s, float* y, int64_t h,
                    int64_t D) {
  constexpr int W = S::W;
  auto at = [&](auto tag, int64_t i) {
    using T = decltype(tag);
    const auto x1 = T::load(x + i), x2 = T::load(x + i + h);
    T::store(y + i, T::sub(T::mul(x1, T::load(c + i)), T::mul(x2, T::load(s + i))));
    T::store(y + i + h, T::add(T::mul(x2, T::load(c + i + h)), T::mul(x1, T::load(s + i + h))));
  };
  int64_t i = 0;
  for (; i + W <= h; i += W) at(S{}, i);
  for (; i < h; ++i) at(simd::Scalar{}, i);
  if (D > 2 * h) std::memcpy(y + 2 * h, x + 2 * h, size_t(D - 2 * h) * sizeof(float));
}

// dx [D] (assigned when kAssign, else added) from dy [D], c, s [2h].
template <class S, bool kAssign>
inline void bwd_row(const float* dy, const float* c, const float* s, float* dx, int64_t h,
                    int64_t D) {
  constexpr int W = S::W;
  auto at = [&](auto tag, int64_t i) {
    using T = decltype(tag);
    const auto d1 = T::load(dy + i), d2 = T::load(dy + i + h);
    auto a = T::add(T::mul(d1, T::load(c + i)), T::mul(d2, T::load(s + i + h)));
    auto b = T::sub(T::mul(d2, T::load(c + i + h)), T::mul(d1, T::load(s + i)));
    if constexpr (!kAssign) {
      a = T::add(T::load(dx + i), a);
      b = T::add(T::load(dx + i + h), b);
    }
    T::store(dx + i, a);
    T::store(dx + i + h, b);
  };
  int64_t i = 0;
  for (; i + W <= h; i += W) at(S{}, i);
  for (; i < h; ++i) at(simd::Scalar{}, i);
  int64_t j = 2 * h;
  if constexpr (kAssign) {
    if (D > j) std::memcpy(dx + j, dy + j, size_t(D - j) * sizeof(float));
  } else {
    for (; j + W <= D; j += W) S::store(dx + j, S::add(S::load(dx + j), S::load(dy + j)));
    for (; j < D; ++j) dx[j] += dy[j];
  }
}

}  // namespace rotk
}  // namespace pyedge
