// Branch-free float32 exp / log / tanh / sigmoid / erf built from arithmetic and bit operations
// only, so loops over them vectorise (libm calls do not without -ffast-math). Accuracy: exp and
// log ~1-2 ulp (Cephes polynomials), tanh/sigmoid a few ulp, erf <= ~3e-7 absolute. exp flushes
// results below FLT_MIN (x < -87.3) to 0.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// Hot loops are compiled for baseline x86-64 (SSE2), AVX2+FMA and AVX-512 and picked at load
// time (glibc ifunc), so portable builds still use the wide units. Elsewhere (aarch64: NEON is
// baseline) this is empty.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
#define PYEDGE_SIMD_CLONES \
  __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define PYEDGE_SIMD_CLONES
#endif

// Always inlined: a call in the loop body would stop vectorisation.
#define PYEDGE_FM_INLINE inline __attribute__((always_inline))

namespace pyedge {
namespace fm {

PYEDGE_FM_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}

// Branch-free select. GCC will not if-convert `c ? a : b` on floats (comparisons "may trap"
// without -fno-trapping-math), which keeps loops scalar; bit operations always vectorise.
PYEDGE_FM_INLINE float sel(bool c, float a, float b) {
  uint32_t ia, ib;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  const uint32_t m = 0u - uint32_t(c);
  const uint32_t r = (ia & m) | (ib & ~m);
  float f;
  std::memcpy(&f, &r, 4);
  return f;
}
// clamp(x, lo, hi); NaN passes through
PYEDGE_FM_INLINE float clampf(float x, float lo, float hi) { return sel(x < lo, lo, sel(x > hi, hi, x)); }

// e^x: +inf above ln(FLT_MAX), 0 below -87.3 where e^x would be denormal (denormal
// arithmetic is ~100x slower on x86), NaN for NaN.
PYEDGE_FM_INLINE float exp(float x) {
  const bool tiny = x < -87.3f, huge = x > 88.72283f;
  x = clampf(x, -87.3f, 88.72283f);
  // n = round(x / ln2) with the 1.5*2^23 trick (exact without -ffast-math).
  const float t = x * 1.44269504088896341f;
  const float nf = (t + 12582912.f) - 12582912.f;
  const float r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;  // x - n*ln2, two-part ln2
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.f;
  // scale by 2^(n-1) * 2 so that n = 128 (x near ln(FLT_MAX)) still has a valid exponent
  // NaN input: n = 0 (int32_t(NaN) and a negative left shift are UB); p keeps the NaN.
  const int32_t n = int32_t(nf == nf ? nf : 0.f);
  const float v = p * bits_to_float(int32_t(uint32_t(n + 126) << 23)) * 2.f;
  return sel(tiny, 0.f, sel(huge, __builtin_inff(), v));
}

// log(x) (Cephes logf): NaN for x < 0, -inf at 0, +inf at +inf; denormal inputs are scaled.
PYEDGE_FM_INLINE float log(float x) {
  const bool denorm = x < 1.17549435e-38f;
  const float xs = sel(denorm, x * 8388608.f, x);  // * 2^23
  int32_t bits;
  std::memcpy(&bits, &xs, 4);
  float e = float((bits >> 23) - 126) - sel(denorm, 23.f, 0.f);
  float m = bits_to_float((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = sel(small, e - 1.f, e);
  m = sel(small, m + m - 1.f, m - 1.f);
  const float z = m * m;
  float y = 7.0376836292E-2f;
  y = y * m - 1.1514610310E-1f;
  y = y * m + 1.1676998740E-1f;
  y = y * m - 1.2420140846E-1f;
  y = y * m + 1.4249322787E-1f;
  y = y * m - 1.6668057665E-1f;
  y = y * m + 2.0000714765E-1f;
  y = y * m - 2.4999993993E-1f;
  y = y * m + 3.3333331174E-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  float r = m + y + 0.693359375f * e;
  r = sel(x == 0.f, -__builtin_inff(), r);
  r = sel(x < 0.f, __builtin_nanf(""), r);
  r = sel(x == __builtin_inff(), x, r);
  return sel(x != x, x, r);
}

// log(1 + u) without losing u when 1 + u rounds: log(w) * u / (w - 1) with w = 1 + u.
PYEDGE_FM_INLINE float log1p(float u) {
  const float w = 1.f + u;
  const float r = log(w) * (u / (w - 1.f));
  return sel(w == 1.f, u, sel(w == __builtin_inff(), w, r));
}

// e^x - 1, accurate near 0 (Taylor series for |x| < 0.1).
PYEDGE_FM_INLINE float expm1(float x) {
  const float t = x * (1.f + x * (0.5f + x * (1.f / 6.f + x * (1.f / 24.f + x * (1.f / 120.f)))));
  return sel(std::fabs(x) < 0.1f, t, exp(x) - 1.f);
}

PYEDGE_FM_INLINE float sigmoid(float x) { return 1.f / (1.f + exp(-x)); }

PYEDGE_FM_INLINE float tanh(float x) {
  const float ax = std::fabs(x);
  // small |x|: odd polynomial (Cephes tanhf); large: 1 - 2 / (e^{2|x|} + 1)
  const float z = x * x;
  float p = -5.70498872745E-3f;
  p = p * z + 2.06390887954E-2f;
  p = p * z - 5.37397155531E-2f;
  p = p * z + 1.33314422036E-1f;
  p = p * z - 3.33332819422E-1f;
  const float small = x + x * z * p;
  const float big = 1.f - 2.f / (exp(2.f * ax) + 1.f);
  return sel(ax < 0.625f, small, std::copysign(big, x));
}

// Abramowitz & Stegun 7.1.26: erfc(a) = f(a)·e^(−a²) for a >= 0 with |error| <= 1.5e-7;
// this returns f(a) = q(t)·t, t = 1/(1 + 0.3275911·a).
PYEDGE_FM_INLINE float erfc_as_factor(float a) {
  const float t = 1.f / (1.f + 0.3275911f * a);
  float q = 1.061405429f;
  q = q * t - 1.453152027f;
  q = q * t + 1.421413741f;
  q = q * t - 0.284496736f;
  q = q * t + 0.254829592f;
  return q * t;
}

PYEDGE_FM_INLINE float erf(float x) {
  const float ax = std::fabs(x);
  // |x| < 0.5: Maclaurin series 2/sqrt(pi) * x * (1 - z/3 + z^2/10 - z^3/42 + z^4/216 - z^5/1320)
  const float z = x * x;
  float s = -1.f / 1320.f;
  s = s * z + 1.f / 216.f;
  s = s * z - 1.f / 42.f;
  s = s * z + 1.f / 10.f;
  s = s * z - 1.f / 3.f;
  s = s * z + 1.f;
  const float small = 1.12837916709551257f * x * s;
  // otherwise Abramowitz & Stegun 7.1.26
  const float big = 1.f - erfc_as_factor(ax) * exp(-z);
  return sel(ax < 0.5f, small, std::copysign(big, x));
}

// select for any element type (bit-select for floats, so loops still vectorise)
template <typename T>
PYEDGE_FM_INLINE T pick(bool c, T a, T b) {
  if constexpr (std::is_same_v<T, float>) {
    return sel(c, a, b);
  } else if constexpr (std::is_same_v<T, double>) {
    uint64_t ia, ib;
    std::memcpy(&ia, &a, 8);
    std::memcpy(&ib, &b, 8);
    const uint64_t m = 0ull - uint64_t(c);
    const uint64_t r = (ia & m) | (ib & ~m);
    double f;
    std::memcpy(&f, &r, 8);
    return f;
  } else {
    return c ? a : b;
  }
}

}  // namespace fm
}  // namespace pyedge
