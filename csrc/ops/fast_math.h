// Branch-free float32 exp / tanh / sigmoid / erf built from arithmetic and bit operations only,
// so loops over them vectorise (libm calls do not without -ffast-math). Accuracy: exp ~1-2 ulp
// (Cephes polynomial), tanh/sigmoid a few ulp, erf <= ~2e-7 absolute.
#pragma once
#include <cstdint>
#include <cstring>

namespace pyedge {
namespace fm {

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}

// e^x; inputs are clamped to [-87.3, 88.3] (results stay finite and normal).
inline float exp(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
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
  return p * bits_to_float((int32_t(nf) + 127) << 23);
}

inline float sigmoid(float x) { return 1.f / (1.f + exp(-x)); }

inline float tanh(float x) {
  const float ax = x < 0.f ? -x : x;
  // small |x|: odd polynomial (Cephes tanhf); large: 1 - 2 / (e^{2|x|} + 1)
  const float z = x * x;
  float p = -5.70498872745E-3f;
  p = p * z + 2.06390887954E-2f;
  p = p * z - 5.37397155531E-2f;
  p = p * z + 1.33314422036E-1f;
  p = p * z - 3.33332819422E-1f;
  const float small = x + x * z * p;
  const float big = 1.f - 2.f / (exp(2.f * ax) + 1.f);
  const float sbig = x < 0.f ? -big : big;
  return ax < 0.625f ? small : sbig;
}

inline float erf(float x) {
  const float ax = x < 0.f ? -x : x;
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
  const float t = 1.f / (1.f + 0.3275911f * ax);
  float q = 1.061405429f;
  q = q * t - 1.453152027f;
  q = q * t + 1.421413741f;
  q = q * t - 0.284496736f;
  q = q * t + 0.254829592f;
  const float big = 1.f - q * t * exp(-z);
  const float sbig = x < 0.f ? -big : big;
  return ax < 0.5f ? small : sbig;
}

}  // namespace fm
}  // namespace pyedge
