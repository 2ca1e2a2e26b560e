// Row kernels shared by Softmax/LogSoftmax and the cross-entropy losses. Plain loops written
// so the compiler vectorises them at the baseline ISA: reductions keep 8 independent
// accumulators (float adds are not reassociated without -ffast-math), and exp is a
// branch-free polynomial instead of a libm call. GCC only if-converts the float selects here
// under -fno-trapping-math: includers set it with `#pragma GCC optimize` at the top of the .cpp.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/simd.h"
#include "ops/fast_math.h"

namespace pyedge {
namespace rowk {

constexpr int kLanes = 8;

// exp(x) for the row kernels: the shared polynomial of fast_math.h (0 below -87.3, so
// exp(-inf) = 0; callers pass x - max <= 0).
inline float exp_f(float x) { return fm::exp(x); }

// The row kernels below run on simd::Native (NEON on aarch64, SSE2/AVX2/AVX-512 on x86-64);
// instantiated with simd::Scalar they are the reference the SIMD paths are tested against.
// Reductions keep kAcc independent vector accumulators.
constexpr int kAcc = 4;

template <class S = simd::Native>
inline float row_max(const float* x, int64_t n) {
  using V = typename S::V;
  constexpr int W = S::W;
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  if (n >= kAcc * W) {
    V acc[kAcc];
    for (int j = 0; j < kAcc; ++j) acc[j] = S::set1(m);
    for (; i + kAcc * W <= n; i += kAcc * W)
      for (int j = 0; j < kAcc; ++j) acc[j] = S::max(S::load(x + i + j * W), acc[j]);
    for (; i + W <= n; i += W) acc[0] = S::max(S::load(x + i), acc[0]);
    for (int j = 1; j < kAcc; ++j) acc[0] = S::max(acc[j], acc[0]);
    m = S::hmax(acc[0]);
  }
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// sum(f(x[i])) with f given on vectors and on scalars
template <class S, class FV, class FS>
inline float row_reduce(int64_t n, FV fv, FS fs) {
  using V = typename S::V;
  constexpr int W = S::W;
  float s = 0.f;
  int64_t i = 0;
  if (n >= W) {
    V acc[kAcc];
    for (int j = 0; j < kAcc; ++j) acc[j] = S::set1(0.f);
    for (; i + kAcc * W <= n; i += kAcc * W)
      for (int j = 0; j < kAcc; ++j) acc[j] = S::add(acc[j], fv(i + j * W));
    for (; i + W <= n; i += W) acc[0] = S::add(acc[0], fv(i));
    acc[0] = S::add(S::add(acc[0], acc[1]), S::add(acc[2], acc[3]));
    s = S::hsum(acc[0]);
  }
  for (; i < n; ++i) s += fs(i);
  return s;
}

template <class S = simd::Native>
inline float row_sum(const float* x, int64_t n) {
  return row_reduce<S>(n, [&](int64_t i) { return S::load(x + i); }, [&](int64_t i) { return x[i]; });
}

template <class S = simd::Native>
inline float row_dot(const float* a, const float* b, int64_t n) {
  return row_reduce<S>(
      n, [&](int64_t i) { return S::mul(S::load(a + i), S::load(b + i)); },
      [&](int64_t i) { return a[i] * b[i]; });
}

// sum((x - mu)^2)
template <class S = simd::Native>
inline float row_sqdev(const float* x, float mu, int64_t n) {
  const typename S::V vmu = S::set1(mu);
  return row_reduce<S>(
      n,
      [&](int64_t i) {
        auto c = S::sub(S::load(x + i), vmu);
        return S::mul(c, c);
      },
      [&](int64_t i) { return (x[i] - mu) * (x[i] - mu); });
}

// y = exp(x - m); returns sum(y).
template <class S = simd::Native>
inline float exp_store_sum(const float* x, float m, float* y, int64_t n) {
  const typename S::V vm = S::set1(m);
  return row_reduce<S>(
      n,
      [&](int64_t i) {
        auto e = simd::exp<S>(S::sub(S::load(x + i), vm));
        S::store(y + i, e);
        return e;
      },
      [&](int64_t i) { return y[i] = simd::exp<simd::Scalar>(x[i] - m); });
}

// sum(exp(x - m)) without storing.
template <class S = simd::Native>
inline float exp_sum(const float* x, float m, int64_t n) {
  const typename S::V vm = S::set1(m);
  return row_reduce<S>(
      n, [&](int64_t i) { return simd::exp<S>(S::sub(S::load(x + i), vm)); },
      [&](int64_t i) { return simd::exp<simd::Scalar>(x[i] - m); });
}

// y = x * a (in place allowed)
template <class S = simd::Native>
inline void row_scale(const float* x, float a, float* y, int64_t n) {
  const typename S::V va = S::set1(a);
  simd::map<S>(x, y, n, [&](typename S::V v) { return S::mul(v, va); }, [&](float v) { return v * a; });
}

// LayerNorm apply: y = (x - mu) * rs * g (+ b)
template <class S = simd::Native>
inline void ln_apply(const float* x, float mu, float rs, const float* g, const float* b, float* y,
                     int64_t n) {
  using V = typename S::V;
  constexpr int W = S::W;
  const V vmu = S::set1(mu), vrs = S::set1(rs);
  int64_t i = 0;
  if (b) {
    for (; i + W <= n; i += W)
      S::store(y + i, S::fma(S::mul(S::sub(S::load(x + i), vmu), vrs), S::load(g + i), S::load(b + i)));
    for (; i < n; ++i) y[i] = (x[i] - mu) * rs * g[i] + b[i];
  } else {
    for (; i + W <= n; i += W)
      S::store(y + i, S::mul(S::mul(S::sub(S::load(x + i), vmu), vrs), S::load(g + i)));
    for (; i < n; ++i) y[i] = (x[i] - mu) * rs * g[i];
  }
}

// Softmax (or log-softmax) of one contiguous row.
template <class S = simd::Native>
inline void softmax_row(const float* x, float* y, int64_t n, bool log) {
  float m = row_max<S>(x, n);
  if (log) {
    // (x - m) - log(s), not x - (m + log(s)): keeps precision when |m| is large
    float ls = std::log(exp_sum<S>(x, m, n));
    for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - m) - ls;
  } else {
    row_scale<S>(y, 1.f / exp_store_sum<S>(x, m, y, n), y, n);
  }
}

// log(sum(exp(x))) of a row, stable.
inline float row_logsumexp(const float* x, int64_t n) {
  float m = row_max(x, n);
  if (std::isinf(m)) return m;  // all -inf (or +inf present)
  return m + std::log(exp_sum(x, m, n));
}

}  // namespace rowk
}  // namespace pyedge
