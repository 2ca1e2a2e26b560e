// Portable SIMD: one float vector type and its operations per instruction set, chosen at
// compile time for the target, plus a scalar reference that tests compare against.
//
//   simd::Scalar  width 1, plain C++ (always available; the reference)
//   simd::Sse2    x86-64 baseline, 4 lanes (no FMA: fma = mul + add)
//   simd::Avx2    __AVX2__ && __FMA__, 8 lanes
//   simd::Avx512  __AVX512F__, 16 lanes
//   simd::Neon    aarch64 Advanced SIMD (mandatory there), 4 lanes
//   simd::Native  the widest of these the compile flags allow
//
// Each backend S is a struct of static functions over S::V (vector) and S::M (lane mask):
// load/store (unaligned), set1, add/sub/mul/div, fma(a, b, c) = a*b + c, max/min, abs,
// copysign, lt/gt/eq (masks), select(m, a, b) = m ? a : b, hsum/hmax (horizontal),
// pow2n(n) = 2^n for integral-valued n in [-126, 127], and frexp(x, e): the mantissa of a
// positive normal x in [0.5, 1) with its exponent e as a float (x = m·2^e). The math functions
// below (exp, log, log1p, expm1, tanh, erf, sigmoid) are written once over any backend and
// follow ops/fast_math.h (same polynomials, same special values), so a kernel's vector path and
// its Scalar instantiation agree to a few ulp.
//
// Flags: a default x86-64 build gets Sse2; PYEDGE_NATIVE (-march=native) picks AVX2/AVX-512
// on machines that have them. On aarch64, the default -march=armv8-a gets Neon; the CMake
// option PYEDGE_ARM_TARGET (e.g. armv8.2-a+fp16+dotprod) only lets the compiler schedule
// for newer cores.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__)) || defined(__SSE2__)
#include <immintrin.h>
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#define PYEDGE_SIMD_INLINE inline __attribute__((always_inline))

namespace pyedge {
namespace simd {

// ---------------------------------------------------------------- scalar (the reference)
struct Scalar {
  using V = float;
  using M = bool;
  static constexpr int W = 1;
  static constexpr const char* name = "scalar";
  static PYEDGE_SIMD_INLINE V load(const float* p) { return *p; }
  static PYEDGE_SIMD_INLINE void store(float* p, V v) { *p = v; }
  static PYEDGE_SIMD_INLINE V set1(float a) { return a; }
  static PYEDGE_SIMD_INLINE V add(V a, V b) { return a + b; }
  static PYEDGE_SIMD_INLINE V sub(V a, V b) { return a - b; }
  static PYEDGE_SIMD_INLINE V mul(V a, V b) { return a * b; }
  static PYEDGE_SIMD_INLINE V div(V a, V b) { return a / b; }
  static PYEDGE_SIMD_INLINE V fma(V a, V b, V c) { return std::fma(a, b, c); }
  static PYEDGE_SIMD_INLINE V max(V a, V b) { return a > b ? a : b; }
  static PYEDGE_SIMD_INLINE V min(V a, V b) { return a < b ? a : b; }
  static PYEDGE_SIMD_INLINE V abs(V a) { return std::fabs(a); }
  static PYEDGE_SIMD_INLINE V copysign(V mag, V sgn) { return std::copysign(mag, sgn); }
  static PYEDGE_SIMD_INLINE M lt(V a, V b) { return a < b; }
  static PYEDGE_SIMD_INLINE M gt(V a, V b) { return a > b; }
  static PYEDGE_SIMD_INLINE M eq(V a, V b) { return a == b; }
  static PYEDGE_SIMD_INLINE V select(M m, V a, V b) { return m ? a : b; }
  static PYEDGE_SIMD_INLINE float hsum(V a) { return a; }
  static PYEDGE_SIMD_INLINE float hmax(V a) { return a; }
  static PYEDGE_SIMD_INLINE V pow2n(V n) {
    uint32_t bits = uint32_t(int32_t(n == n ? n : 0.f) + 127) << 23;  // NaN: no UB
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  static PYEDGE_SIMD_INLINE V frexp(V x, V& e) {
    int32_t bits;
    std::memcpy(&bits, &x, 4);
    e = float((bits >> 23) - 126);  // arithmetic shift, as the vector paths
    const int32_t m = (bits & 0x007fffff) | 0x3f000000;
    float f;
    std::memcpy(&f, &m, 4);
    return f;
  }
};

// ---------------------------------------------------------------- x86-64 SSE2 (baseline)
#if defined(__SSE2__)
struct Sse2 {
  using V = __m128;
  using M = __m128;
  static constexpr int W = 4;
  static constexpr const char* name = "sse2";
  static PYEDGE_SIMD_INLINE V load(const float* p) { return _mm_loadu_ps(p); }
  static PYEDGE_SIMD_INLINE void store(float* p, V v) { _mm_storeu_ps(p, v); }
  static PYEDGE_SIMD_INLINE V set1(float a) { return _mm_set1_ps(a); }
  static PYEDGE_SIMD_INLINE V add(V a, V b) { return _mm_add_ps(a, b); }
  static PYEDGE_SIMD_INLINE V sub(V a, V b) { return _mm_sub_ps(a, b); }
  static PYEDGE_SIMD_INLINE V mul(V a, V b) { return _mm_mul_ps(a, b); }
  static PYEDGE_SIMD_INLINE V div(V a, V b) { return _mm_div_ps(a, b); }
  static PYEDGE_SIMD_INLINE V fma(V a, V b, V c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
  static PYEDGE_SIMD_INLINE V max(V a, V b) { return _mm_max_ps(a, b); }
  static PYEDGE_SIMD_INLINE V min(V a, V b) { return _mm_min_ps(a, b); }
  static PYEDGE_SIMD_INLINE V abs(V a) { return _mm_andnot_ps(_mm_set1_ps(-0.f), a); }
  static PYEDGE_SIMD_INLINE V copysign(V mag, V sgn) {
    const V s = _mm_set1_ps(-0.f);
    return _mm_or_ps(_mm_andnot_ps(s, mag), _mm_and_ps(s, sgn));
  }
  static PYEDGE_SIMD_INLINE M lt(V a, V b) { return _mm_cmplt_ps(a, b); }
  static PYEDGE_SIMD_INLINE M gt(V a, V b) { return _mm_cmpgt_ps(a, b); }
  static PYEDGE_SIMD_INLINE M eq(V a, V b) { return _mm_cmpeq_ps(a, b); }
  static PYEDGE_SIMD_INLINE V select(M m, V a, V b) {
    return _mm_or_ps(_mm_and_ps(m, a), _mm_andnot_ps(m, b));
  }
  static PYEDGE_SIMD_INLINE float hsum(V a) {
    V s = _mm_add_ps(a, _mm_movehl_ps(a, a));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  static PYEDGE_SIMD_INLINE float hmax(V a) {
    V s = _mm_max_ps(a, _mm_movehl_ps(a, a));
    s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  static PYEDGE_SIMD_INLINE V pow2n(V n) {
    __m128i i = _mm_add_epi32(_mm_cvttps_epi32(n), _mm_set1_epi32(127));
    return _mm_castsi128_ps(_mm_slli_epi32(i, 23));
  }
  static PYEDGE_SIMD_INLINE V frexp(V x, V& e) {
    const __m128i b = _mm_castps_si128(x);
    e = _mm_cvtepi32_ps(_mm_sub_epi32(_mm_srai_epi32(b, 23), _mm_set1_epi32(126)));
    return _mm_castsi128_ps(_mm_or_si128(_mm_and_si128(b, _mm_set1_epi32(0x007fffff)),
                                         _mm_set1_epi32(0x3f000000)));
  }
};
#endif

// ---------------------------------------------------------------- x86-64 AVX2 + FMA
#if defined(__AVX2__) && defined(__FMA__)
struct Avx2 {
  using V = __m256;
  using M = __m256;
  static constexpr int W = 8;
  static constexpr const char* name = "avx2";
  static PYEDGE_SIMD_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
  static PYEDGE_SIMD_INLINE void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static PYEDGE_SIMD_INLINE V set1(float a) { return _mm256_set1_ps(a); }
  static PYEDGE_SIMD_INLINE V add(V a, V b) { return _mm256_add_ps(a, b); }
  static PYEDGE_SIMD_INLINE V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static PYEDGE_SIMD_INLINE V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static PYEDGE_SIMD_INLINE V div(V a, V b) { return _mm256_div_ps(a, b); }
  static PYEDGE_SIMD_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static PYEDGE_SIMD_INLINE V max(V a, V b) { return _mm256_max_ps(a, b); }
  static PYEDGE_SIMD_INLINE V min(V a, V b) { return _mm256_min_ps(a, b); }
  static PYEDGE_SIMD_INLINE V abs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
  static PYEDGE_SIMD_INLINE V copysign(V mag, V sgn) {
    const V s = _mm256_set1_ps(-0.f);
    return _mm256_or_ps(_mm256_andnot_ps(s, mag), _mm256_and_ps(s, sgn));
  }
  static PYEDGE_SIMD_INLINE M lt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static PYEDGE_SIMD_INLINE M gt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static PYEDGE_SIMD_INLINE M eq(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static PYEDGE_SIMD_INLINE V select(M m, V a, V b) { return _mm256_blendv_ps(b, a, m); }
  static PYEDGE_SIMD_INLINE float hsum(V a) {
    return Sse2::hsum(_mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1)));
  }
  static PYEDGE_SIMD_INLINE float hmax(V a) {
    return Sse2::hmax(_mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1)));
  }
  static PYEDGE_SIMD_INLINE V pow2n(V n) {
    __m256i i = _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(i, 23));
  }
  static PYEDGE_SIMD_INLINE V frexp(V x, V& e) {
    const __m256i b = _mm256_castps_si256(x);
    e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srai_epi32(b, 23), _mm256_set1_epi32(126)));
    return _mm256_castsi256_ps(_mm256_or_si256(
        _mm256_and_si256(b, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
  }
};
#endif

// ---------------------------------------------------------------- x86-64 AVX-512F
#if defined(__AVX512F__)
struct Avx512 {
  using V = __m512;
  using M = __mmask16;
  static constexpr int W = 16;
  static constexpr const char* name = "avx512";
  static PYEDGE_SIMD_INLINE V load(const float* p) { return _mm512_loadu_ps(p); }
  static PYEDGE_SIMD_INLINE void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static PYEDGE_SIMD_INLINE V set1(float a) { return _mm512_set1_ps(a); }
  static PYEDGE_SIMD_INLINE V add(V a, V b) { return _mm512_add_ps(a, b); }
  static PYEDGE_SIMD_INLINE V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static PYEDGE_SIMD_INLINE V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static PYEDGE_SIMD_INLINE V div(V a, V b) { return _mm512_div_ps(a, b); }
  static PYEDGE_SIMD_INLINE V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static PYEDGE_SIMD_INLINE V max(V a, V b) { return _mm512_max_ps(a, b); }
  static PYEDGE_SIMD_INLINE V min(V a, V b) { return _mm512_min_ps(a, b); }
  static PYEDGE_SIMD_INLINE V abs(V a) {
    return _mm512_castsi512_ps(
        _mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32(0x7fffffff)));
  }
  static PYEDGE_SIMD_INLINE V copysign(V mag, V sgn) {
    // bit select: sign bit from sgn, the rest from mag
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(
        _mm512_set1_epi32(0x7fffffff), _mm512_castps_si512(mag), _mm512_castps_si512(sgn),
        0xca));  // A ? B : C per bit, A = 0x7fffffff
  }
  static PYEDGE_SIMD_INLINE M lt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static PYEDGE_SIMD_INLINE M gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static PYEDGE_SIMD_INLINE M eq(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static PYEDGE_SIMD_INLINE V select(M m, V a, V b) { return _mm512_mask_blend_ps(m, b, a); }
  static PYEDGE_SIMD_INLINE float hsum(V a) {
    return Avx2Less::hsum8(_mm256_add_ps(_mm512_castps512_ps256(a),
                                         _mm256_castpd_ps(_mm512_extractf64x4_pd(
                                             _mm512_castps_pd(a), 1))));
  }
  static PYEDGE_SIMD_INLINE float hmax(V a) {
    return Avx2Less::hmax8(_mm256_max_ps(_mm512_castps512_ps256(a),
                                         _mm256_castpd_ps(_mm512_extractf64x4_pd(
                                             _mm512_castps_pd(a), 1))));
  }
  static PYEDGE_SIMD_INLINE V pow2n(V n) {
    __m512i i = _mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(i, 23));
  }
  static PYEDGE_SIMD_INLINE V frexp(V x, V& e) {
    const __m512i b = _mm512_castps_si512(x);
    e = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srai_epi32(b, 23), _mm512_set1_epi32(126)));
    return _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_and_si512(b, _mm512_set1_epi32(0x007fffff)), _mm512_set1_epi32(0x3f000000)));
  }

 private:
  struct Avx2Less {  // horizontal ops on 8 lanes with AVX only
    static PYEDGE_SIMD_INLINE float hsum8(__m256 a) {
      return Sse2::hsum(_mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1)));
    }
    static PYEDGE_SIMD_INLINE float hmax8(__m256 a) {
      return Sse2::hmax(_mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1)));
    }
  };
};
#endif

// ---------------------------------------------------------------- aarch64 NEON
#if defined(__aarch64__) && defined(__ARM_NEON)
struct Neon {
  using V = float32x4_t;
  using M = uint32x4_t;
  static constexpr int W = 4;
  static constexpr const char* name = "neon";
  static PYEDGE_SIMD_INLINE V load(const float* p) { return vld1q_f32(p); }
  static PYEDGE_SIMD_INLINE void store(float* p, V v) { vst1q_f32(p, v); }
  static PYEDGE_SIMD_INLINE V set1(float a) { return vdupq_n_f32(a); }
  static PYEDGE_SIMD_INLINE V add(V a, V b) { return vaddq_f32(a, b); }
  static PYEDGE_SIMD_INLINE V sub(V a, V b) { return vsubq_f32(a, b); }
  static PYEDGE_SIMD_INLINE V mul(V a, V b) { return vmulq_f32(a, b); }
  static PYEDGE_SIMD_INLINE V div(V a, V b) { return vdivq_f32(a, b); }
  static PYEDGE_SIMD_INLINE V fma(V a, V b, V c) { return vfmaq_f32(c, a, b); }
  static PYEDGE_SIMD_INLINE V max(V a, V b) { return vmaxq_f32(a, b); }
  static PYEDGE_SIMD_INLINE V min(V a, V b) { return vminq_f32(a, b); }
  static PYEDGE_SIMD_INLINE V abs(V a) { return vabsq_f32(a); }
  static PYEDGE_SIMD_INLINE V copysign(V mag, V sgn) {
    return vbslq_f32(vdupq_n_u32(0x80000000u), sgn, mag);
  }
  static PYEDGE_SIMD_INLINE M lt(V a, V b) { return vcltq_f32(a, b); }
  static PYEDGE_SIMD_INLINE M gt(V a, V b) { return vcgtq_f32(a, b); }
  static PYEDGE_SIMD_INLINE M eq(V a, V b) { return vceqq_f32(a, b); }
  static PYEDGE_SIMD_INLINE V select(M m, V a, V b) { return vbslq_f32(m, a, b); }
  static PYEDGE_SIMD_INLINE float hsum(V a) { return vaddvq_f32(a); }
  static PYEDGE_SIMD_INLINE float hmax(V a) { return vmaxvq_f32(a); }
  static PYEDGE_SIMD_INLINE V pow2n(V n) {
    int32x4_t i = vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127));
    return vreinterpretq_f32_s32(vshlq_n_s32(i, 23));
  }
  static PYEDGE_SIMD_INLINE V frexp(V x, V& e) {
    const int32x4_t b = vreinterpretq_s32_f32(x);
    e = vcvtq_f32_s32(vsubq_s32(vshrq_n_s32(b, 23), vdupq_n_s32(126)));
    return vreinterpretq_f32_s32(vorrq_s32(vandq_s32(b, vdupq_n_s32(0x007fffff)),
                                           vdupq_n_s32(0x3f000000)));
  }
};
#endif

#if defined(__AVX512F__)
using Native = Avx512;
#elif defined(__AVX2__) && defined(__FMA__)
using Native = Avx2;
#elif defined(__SSE2__)
using Native = Sse2;
#elif defined(__aarch64__) && defined(__ARM_NEON)
using Native = Neon;
#else
using Native = Scalar;
#endif

// ---------------------------------------------------------------- math over any backend
// e^(x - n·ln2) for n = round(x / ln2) given as nf (Cephes expf: two-part ln2, then a
// polynomial on |r| <= ln2/2): what every exp here computes before scaling by 2^n.
template <class S>
PYEDGE_SIMD_INLINE typename S::V exp_reduced(typename S::V x, typename S::V nf) {
  using V = typename S::V;
  V r = S::fma(nf, S::set1(-0.693359375f), x);
  r = S::fma(nf, S::set1(2.12194440e-4f), r);
  V p = S::set1(1.9875691500E-4f);
  p = S::fma(p, r, S::set1(1.3981999507E-3f));
  p = S::fma(p, r, S::set1(8.3334519073E-3f));
  p = S::fma(p, r, S::set1(4.1665795894E-2f));
  p = S::fma(p, r, S::set1(1.6666665459E-1f));
  p = S::fma(p, r, S::set1(5.0000001201E-1f));
  return S::fma(S::mul(p, r), r, S::add(r, S::set1(1.f)));
}

// e^x (fast_math.h's fm::exp): 0 below -87.3, +inf above ln(FLT_MAX), NaN for NaN.
template <class S>
PYEDGE_SIMD_INLINE typename S::V exp(typename S::V x) {
  using V = typename S::V;
  const V lo = S::set1(-87.3f), hi = S::set1(88.72283f);
  const auto tiny = S::lt(x, lo), huge = S::gt(x, hi);
  // operand order keeps NaN: x86 max/min return the second operand when either is NaN
  const V xc = S::min(hi, S::max(lo, x));
  const V t = S::mul(xc, S::set1(1.44269504088896341f));
  const V magic = S::set1(12582912.f);
  const V nf = S::sub(S::add(t, magic), magic);
  const V p = exp_reduced<S>(xc, nf);
  // 2^(n-1) * 2 so that n = 128 still has a valid exponent
  V v = S::mul(S::mul(p, S::pow2n(S::sub(nf, S::set1(1.f)))), S::set1(2.f));
  return S::select(tiny, S::set1(0.f), S::select(huge, S::set1(INFINITY), v));
}

template <class S>
PYEDGE_SIMD_INLINE typename S::V sigmoid(typename S::V x) {
  const auto one = S::set1(1.f);
  return S::div(one, S::add(one, exp<S>(S::sub(S::set1(0.f), x))));
}

// log (fm::log, Cephes logf): NaN below 0, -inf at 0, +inf at +inf, denormals scaled by 2^23.
template <class S>
PYEDGE_SIMD_INLINE typename S::V log(typename S::V x) {
  using V = typename S::V;
  const auto denorm = S::lt(x, S::set1(1.17549435e-38f));
  const V xs = S::select(denorm, S::mul(x, S::set1(8388608.f)), x);
  V e;
  V m = S::frexp(xs, e);  // m in [0.5, 1)
  e = S::sub(e, S::select(denorm, S::set1(23.f), S::set1(0.f)));
  const auto small = S::lt(m, S::set1(0.707106781186547524f));
  const V one = S::set1(1.f);
  e = S::select(small, S::sub(e, one), e);
  m = S::select(small, S::sub(S::add(m, m), one), S::sub(m, one));
  const V z = S::mul(m, m);
  V y = S::set1(7.0376836292E-2f);
  y = S::fma(y, m, S::set1(-1.1514610310E-1f));
  y = S::fma(y, m, S::set1(1.1676998740E-1f));
  y = S::fma(y, m, S::set1(-1.2420140846E-1f));
  y = S::fma(y, m, S::set1(1.4249322787E-1f));
  y = S::fma(y, m, S::set1(-1.6668057665E-1f));
  y = S::fma(y, m, S::set1(2.0000714765E-1f));
  y = S::fma(y, m, S::set1(-2.4999993993E-1f));
  y = S::fma(y, m, S::set1(3.3333331174E-1f));
  y = S::mul(S::mul(y, m), z);
  y = S::fma(S::set1(-2.12194440e-4f), e, y);
  y = S::fma(S::set1(-0.5f), z, y);
  V r = S::fma(S::set1(0.693359375f), e, S::add(m, y));
  const V zero = S::set1(0.f), inf = S::set1(INFINITY);
  r = S::select(S::eq(x, zero), S::set1(-INFINITY), r);
  r = S::select(S::lt(x, zero), S::set1(NAN), r);
  r = S::select(S::eq(x, inf), x, r);
  return S::select(S::eq(x, x), r, x);  // NaN in, NaN out
}

// log(1 + u) (fm::log1p): log(w)·u/(w − 1) with w = 1 + u keeps u when 1 + u rounds.
template <class S>
PYEDGE_SIMD_INLINE typename S::V log1p(typename S::V u) {
  using V = typename S::V;
  const V one = S::set1(1.f);
  const V w = S::add(one, u);
  const V r = S::mul(log<S>(w), S::div(u, S::sub(w, one)));
  return S::select(S::eq(w, one), u, S::select(S::eq(w, S::set1(INFINITY)), w, r));
}

// e^x − 1 (fm::expm1): Taylor series below |x| = 0.1, exp(x) − 1 above.
template <class S>
PYEDGE_SIMD_INLINE typename S::V expm1(typename S::V x) {
  using V = typename S::V;
  V t = S::set1(1.f / 120.f);
  t = S::fma(t, x, S::set1(1.f / 24.f));
  t = S::fma(t, x, S::set1(1.f / 6.f));
  t = S::fma(t, x, S::set1(0.5f));
  t = S::fma(t, x, S::set1(1.f));
  t = S::mul(t, x);
  return S::select(S::lt(S::abs(x), S::set1(0.1f)), t, S::sub(exp<S>(x), S::set1(1.f)));
}

// tanh (fm::tanh): odd polynomial below 0.625, 1 - 2 / (e^{2|x|} + 1) above.
template <class S>
PYEDGE_SIMD_INLINE typename S::V tanh(typename S::V x) {
  using V = typename S::V;
  const V ax = S::abs(x);
  const V z = S::mul(x, x);
  V p = S::set1(-5.70498872745E-3f);
  p = S::fma(p, z, S::set1(2.06390887954E-2f));
  p = S::fma(p, z, S::set1(-5.37397155531E-2f));
  p = S::fma(p, z, S::set1(1.33314422036E-1f));
  p = S::fma(p, z, S::set1(-3.33332819422E-1f));
  const V small = S::fma(S::mul(x, z), p, x);
  const V one = S::set1(1.f);
  const V big = S::sub(one, S::div(S::set1(2.f), S::add(exp<S>(S::add(ax, ax)), one)));
  return S::select(S::lt(ax, S::set1(0.625f)), small, S::copysign(big, x));
}

// Abramowitz & Stegun 7.1.26: erfc(a) = f(a)·e^(−a²) for a >= 0 with |error| <= 1.5e-7, where
// f(a) = q(t)·t, t = 1/(1 + 0.3275911·a). This returns f from t (callers form t: fm's
// erfc_as_factor is the scalar form from a).
template <class S>
PYEDGE_SIMD_INLINE typename S::V erfc_as_factor_t(typename S::V t) {
  using V = typename S::V;
  V q = S::set1(1.061405429f);
  q = S::fma(q, t, S::set1(-1.453152027f));
  q = S::fma(q, t, S::set1(1.421413741f));
  q = S::fma(q, t, S::set1(-0.284496736f));
  q = S::fma(q, t, S::set1(0.254829592f));
  return S::mul(q, t);
}

// erf (fm::erf): Maclaurin series below 0.5, Abramowitz & Stegun 7.1.26 above.
template <class S>
PYEDGE_SIMD_INLINE typename S::V erf(typename S::V x) {
  using V = typename S::V;
  const V ax = S::abs(x);
  const V z = S::mul(x, x);
  V s = S::set1(-1.f / 1320.f);
  s = S::fma(s, z, S::set1(1.f / 216.f));
  s = S::fma(s, z, S::set1(-1.f / 42.f));
  s = S::fma(s, z, S::set1(1.f / 10.f));
  s = S::fma(s, z, S::set1(-1.f / 3.f));
  s = S::fma(s, z, S::set1(1.f));
  const V small = S::mul(S::mul(S::set1(1.12837916709551257f), x), s);
  const V one = S::set1(1.f);
  const V t = S::div(one, S::fma(S::set1(0.3275911f), ax, one));
  const V big = S::sub(one, S::mul(erfc_as_factor_t<S>(t), exp<S>(S::sub(S::set1(0.f), z))));
  return S::select(S::lt(ax, S::set1(0.5f)), small, S::copysign(big, x));
}

// ---------------------------------------------------------------- array kernels
// y[i] = f(x[i]) over n elements: full vectors with S, the tail with Scalar.
template <class S, class FV, class FS>
PYEDGE_SIMD_INLINE void map(const float* x, float* y, int64_t n, FV fv, FS fs) {
  int64_t i = 0;
  for (; i + S::W <= n; i += S::W) S::store(y + i, fv(S::load(x + i)));
  for (; i < n; ++i) y[i] = fs(x[i]);
}

template <class S>
inline void exp_array(const float* x, float* y, int64_t n) {
  map<S>(x, y, n, [](typename S::V v) { return exp<S>(v); }, [](float v) { return exp<Scalar>(v); });
}
template <class S>
inline void tanh_array(const float* x, float* y, int64_t n) {
  map<S>(x, y, n, [](typename S::V v) { return tanh<S>(v); }, [](float v) { return tanh<Scalar>(v); });
}
template <class S>
inline void erf_array(const float* x, float* y, int64_t n) {
  map<S>(x, y, n, [](typename S::V v) { return erf<S>(v); }, [](float v) { return erf<Scalar>(v); });
}
template <class S>
inline void log_array(const float* x, float* y, int64_t n) {
  map<S>(x, y, n, [](typename S::V v) { return log<S>(v); }, [](float v) { return log<Scalar>(v); });
}
template <class S>
inline void sigmoid_array(const float* x, float* y, int64_t n) {
  map<S>(x, y, n, [](typename S::V v) { return sigmoid<S>(v); },
         [](float v) { return sigmoid<Scalar>(v); });
}

}  // namespace simd
}  // namespace pyedge
