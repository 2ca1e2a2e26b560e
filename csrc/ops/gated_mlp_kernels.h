// Elementwise kernels of pyedge.SwiGLU (gated_mlp.cpp), written once over a simd backend S
// (simd.h): simd::Native in the op, simd::Scalar as the reference the SIMD test compares
// against (_core.simd_kernel("gated_silu"...)). Full vectors with S, the tail with Scalar.
//   forward  y = act(g) · u
//   backward dg = dy · u · act'(g),  du = dy · act(g)   (act recomputed from g)
// act: silu g·σ(g) (SwiGLU: Llama, Qwen2, Mistral), gelu g·Φ(g) with Φ by erf, gelu_tanh
// 0.5·g·(1 + tanh(√(2/π)(g + 0.044715 g³))) (GeGLU: Gemma's gelu_pytorch_tanh).
#pragma once
#include <cstdint>

#include "common/simd.h"

namespace pyedge {
namespace gmk {

enum Act { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

constexpr float kSqrt2OverPi = 0.7978845608028654f;  // √(2/π)
constexpr float kInvSqrt2 = 0.7071067811865476f;     // 1/√2
constexpr float kInvSqrt2Pi = 0.3989422804014327f;   // 1/√(2π)
constexpr float kCubic = 0.044715f;

// act(g) and, when kDeriv, act'(g) into *d.
template <class T, int kA, bool kDeriv>
PYEDGE_SIMD_INLINE typename T::V act(typename T::V g, typename T::V* d) {
  using V = typename T::V;
  const V one = T::set1(1.f), half = T::set1(0.5f);
  if constexpr (kA == kSilu) {
    const V s = simd::sigmoid<T>(g);
    // σ'(g) = σ(1 − σ): (g·σ)' = σ·(1 + g·(1 − σ))
    if constexpr (kDeriv) *d = T::mul(s, T::fma(g, T::sub(one, s), one));
    return T::mul(g, s);
  } else if constexpr (kA == kGelu) {
    const V phi = T::mul(half, T::add(one, simd::erf<T>(T::mul(g, T::set1(kInvSqrt2)))));
    if constexpr (kDeriv) {
      // Φ + g·e^(−g²/2)/√(2π)
      const V dens = simd::exp<T>(T::mul(T::set1(-0.5f), T::mul(g, g)));
      *d = T::fma(T::mul(g, dens), T::set1(kInvSqrt2Pi), phi);
    }
    return T::mul(g, phi);
  } else {
    const V g2 = T::mul(g, g);
    const V inner = T::mul(T::set1(kSqrt2OverPi), T::fma(T::mul(T::set1(kCubic), g2), g, g));
    const V t = simd::tanh<T>(inner);
    const V hp = T::mul(half, T::add(one, t));  // 0.5·(1 + t)
    if constexpr (kDeriv) {
      // 0.5(1 + t) + 0.5·g·(1 − t²)·√(2/π)(1 + 3·0.044715·g²)
      const V du = T::mul(T::set1(kSqrt2OverPi), T::fma(T::set1(3.f * kCubic), g2, one));
      *d = T::fma(T::mul(T::mul(half, g), T::sub(one, T::mul(t, t))), du, hp);
    }
    return T::mul(g, hp);
  }
}

// y [n] = act(g) · u.
template <class S, int kA>
inline void forward(const float* g, const float* u, float* y, int64_t n) {
  auto at = [&](auto tag, int64_t i) {
    using T = decltype(tag);
    T::store(y + i, T::mul(act<T, kA, false>(T::load(g + i), nullptr), T::load(u + i)));
  };
  int64_t i = 0;
  for (; i + S::W <= n; i += S::W) at(S{}, i);
  for (; i < n; ++i) at(simd::Scalar{}, i);
}

// dg = dy·u·act'(g), du = dy·act(g) over [n]; either may be null (not wanted). kAssign:
// written (a fresh gradient); else added.
template <class S, int kA, bool kAssign>
inline void backward(const float* g, const float* u, const float* dy, float* dg, float* du,
                     int64_t n) {
  auto at = [&](auto tag, int64_t i) {
    using T = decltype(tag);
    typename T::V d;
    const auto a = act<T, kA, true>(T::load(g + i), &d);
    const auto dyv = T::load(dy + i);
    if (dg) {
      auto v = T::mul(T::mul(dyv, T::load(u + i)), d);
      if constexpr (!kAssign) v = T::add(T::load(dg + i), v);
      T::store(dg + i, v);
    }
    if (du) {
      auto v = T::mul(dyv, a);
      if constexpr (!kAssign) v = T::add(T::load(du + i), v);
      T::store(du + i, v);
    }
  };
  int64_t i = 0;
  for (; i + S::W <= n; i += S::W) at(S{}, i);
  for (; i < n; ++i) at(simd::Scalar{}, i);
}

}  // namespace gmk
}  // namespace pyedge
