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

namespace pyedge {
namespace rowk {

constexpr int kLanes = 8;

// exp(x), ~2 ulp on [-87.3, 88]; exactly 0 below -87.3 (so exp(-inf) = 0); clamps above 88
// (callers pass x - max <= 0). Cephes-style range reduction x = n*ln2 + r, |r| <= ln2/2.
inline float exp_f(float x) {
  const float lo = -87.3365478515625f, hi = 88.0f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  int32_t bits = (int32_t(n) + 127) << 23;
  float s;
  std::memcpy(&s, &bits, sizeof s);
  float y = p * s;
  return x < lo ? 0.f : y;
}

inline float row_max(const float* x, int64_t n) {
  float acc[kLanes];
  for (int j = 0; j < kLanes; ++j) acc[j] = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] = x[i + j] > acc[j] ? x[i + j] : acc[j];
  float m = acc[0];
  for (int j = 1; j < kLanes; ++j) m = acc[j] > m ? acc[j] : m;
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

inline float row_sum(const float* x, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j];
  float s = 0.f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  for (; i < n; ++i) s += x[i];
  return s;
}

inline float row_dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0.f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y = exp(x - m); returns sum(y).
inline float exp_store_sum(const float* x, float m, float* y, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      float e = exp_f(x[i + j] - m);
      y[i + j] = e;
      acc[j] += e;
    }
  float s = 0.f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  for (; i < n; ++i) {
    y[i] = exp_f(x[i] - m);
    s += y[i];
  }
  return s;
}

// sum(exp(x - m)) without storing.
inline float exp_sum(const float* x, float m, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += exp_f(x[i + j] - m);
  float s = 0.f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  for (; i < n; ++i) s += exp_f(x[i] - m);
  return s;
}

// log(sum(exp(x))) of a row, stable.
inline float row_logsumexp(const float* x, int64_t n) {
  float m = row_max(x, n);
  if (std::isinf(m)) return m;  // all -inf (or +inf present)
  return m + std::log(exp_sum(x, m, n));
}

}  // namespace rowk
}  // namespace pyedge
