// Dequantization inner loops of the quantized GEMM (ops/quant_gemm.cpp): codes -> float32 over
// a run of consecutive weights that share one scale (one quantization block, or part of one).
//
//   lut4: 4-bit codes, two per byte, through a 16-entry table. The table holds the block's
//         dequantized values, lut[q] = (q − zp)·scale for MatMulNBits' int4 and
//         lut[q] = codebook[q]·absmax for MatMulBnb4's NF4/FP4, built once per block with the
//         same float operations as the element formula, so the lookup is exact data movement.
//         Nibble order: low nibble first (MatMulNBits) or high nibble first (MatMulBnb4).
//   u8:   8-bit codes, w = (q − zp)·scale (a subtraction then a product, never an FMA, so
//         every path rounds exactly as the scalar reference).
//
// Paths: scalar (the reference), AVX2, AVX-512, NEON, written with intrinsics behind the
// same #if structure as common/simd.h (the table lookup needs permutes simd.h does not
// offer). Every path writes bit-identical floats; tests/test_quant_ops.py checks that through
// _core.quant_dequant_kernel. A build compiles every path its flags allow (an AVX-512 build
// also has the AVX2 one), so one machine tests all x86 paths.
#pragma once
#include <cstdint>
#include <cstring>

#include "common/simd.h"

namespace pyedge {
namespace qk {

enum class Path { scalar, avx2, avx512, neon };

// The widest path this build has.
constexpr Path native_path() {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  return Path::avx512;
#elif defined(__AVX2__)
  return Path::avx2;
#elif defined(__aarch64__) && defined(__ARM_NEON)
  return Path::neon;
#else
  return Path::scalar;
#endif
}

constexpr bool path_available(Path p) {
  switch (p) {
    case Path::scalar: return true;
#if defined(__AVX2__)
    case Path::avx2: return true;
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
    case Path::avx512: return true;
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
    case Path::neon: return true;
#endif
    default: return false;
  }
}

// Code i of a 4-bit run starting at the first nibble of p[0].
template <bool kHiFirst>
PYEDGE_SIMD_INLINE unsigned nibble(const uint8_t* p, int64_t i) {
  const unsigned b = p[i >> 1];
  const bool second = (i & 1) != 0;
  return (kHiFirst != second) ? (b >> 4) : (b & 15u);
}

// ---------------------------------------------------------------- scalar reference
template <bool kHiFirst>
inline void lut4_scalar(const uint8_t* p, int64_t n, const float* lut, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = lut[nibble<kHiFirst>(p, i)];
}
inline void u8_scalar(const uint8_t* p, int64_t n, float zp, float scale, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = (float(p[i]) - zp) * scale;
}

// ---------------------------------------------------------------- AVX2
#if defined(__AVX2__)
// 8 codes from 4 bytes: each byte twice, then a per-lane shift picks its nibble; the table's
// two halves are two 8-entry permutes, bit 3 of the code chooses between them.
template <bool kHiFirst>
inline void lut4_avx2(const uint8_t* p, int64_t n, const float* lut, float* out) {
  const __m256 lo = _mm256_loadu_ps(lut), hi = _mm256_loadu_ps(lut + 8);
  const __m256i shift = kHiFirst ? _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0)
                                 : _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
  const __m256i m15 = _mm256_set1_epi32(15);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    int32_t four;
    std::memcpy(&four, p + (i >> 1), 4);
    const __m128i b = _mm_cvtsi32_si128(four);
    const __m256i q = _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)), shift), m15);
    const __m256 vlo = _mm256_permutevar8x32_ps(lo, q), vhi = _mm256_permutevar8x32_ps(hi, q);
    _mm256_storeu_ps(out + i, _mm256_blendv_ps(vlo, vhi, _mm256_castsi256_ps(_mm256_slli_epi32(q, 28))));
  }
  lut4_scalar<kHiFirst>(p + (i >> 1), n - i, lut, out + i);
}
inline void u8_avx2(const uint8_t* p, int64_t n, float zp, float scale, float* out) {
  const __m256 z = _mm256_set1_ps(zp), s = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + i));
    const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_sub_ps(q, z), s));
  }
  u8_scalar(p + i, n - i, zp, scale, out + i);
}
#endif

// ---------------------------------------------------------------- AVX-512
#if defined(__AVX512F__) && defined(__AVX512BW__)
// 16 codes from 8 bytes; the whole 16-entry table fits one register (vpermps).
template <bool kHiFirst>
inline void lut4_avx512(const uint8_t* p, int64_t n, const float* lut, float* out) {
  const __m512 t = _mm512_loadu_ps(lut);
  const __m512i shift = kHiFirst
      ? _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0)
      : _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  const __m512i m15 = _mm512_set1_epi32(15);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + (i >> 1)));
    const __m512i q = _mm512_and_si512(
        _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)), shift), m15);
    _mm512_storeu_ps(out + i, _mm512_permutexvar_ps(q, t));
  }
  lut4_scalar<kHiFirst>(p + (i >> 1), n - i, lut, out + i);
}
inline void u8_avx512(const uint8_t* p, int64_t n, float zp, float scale, float* out) {
  const __m512 z = _mm512_set1_ps(zp), s = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i));
    const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_sub_ps(q, z), s));
  }
  u8_scalar(p + i, n - i, zp, scale, out + i);
}
#endif

// ---------------------------------------------------------------- NEON
#if defined(__aarch64__) && defined(__ARM_NEON)
// 16 codes from 8 bytes (nibbles split and zipped into order), then per 4 outputs a byte
// shuffle of the 64-byte table: lane j of output float f takes table byte 4·code[f] + j.
template <bool kHiFirst>
inline void lut4_neon(const uint8_t* p, int64_t n, const float* lut, float* out) {
  uint8x16x4_t t;
  t.val[0] = vld1q_u8(reinterpret_cast<const uint8_t*>(lut));
  t.val[1] = vld1q_u8(reinterpret_cast<const uint8_t*>(lut + 4));
  t.val[2] = vld1q_u8(reinterpret_cast<const uint8_t*>(lut + 8));
  t.val[3] = vld1q_u8(reinterpret_cast<const uint8_t*>(lut + 12));
  static const uint8_t kRep[4][16] = {
      {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3},
      {4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7},
      {8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11},
      {12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15}};
  static const uint8_t kByte[16] = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3};
  const uint8x16_t byte = vld1q_u8(kByte);
  const uint8x8_t m15 = vdup_n_u8(15);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const uint8x8_t b = vld1_u8(p + (i >> 1));
    const uint8x8_t lo = vand_u8(b, m15), hi = vshr_n_u8(b, 4);
    const uint8x8x2_t z = kHiFirst ? vzip_u8(hi, lo) : vzip_u8(lo, hi);
    const uint8x16_t q = vcombine_u8(z.val[0], z.val[1]);  // 16 codes in order
    for (int f = 0; f < 4; ++f) {
      const uint8x16_t c = vqtbl1q_u8(q, vld1q_u8(kRep[f]));
      const uint8x16_t idx = vaddq_u8(vshlq_n_u8(c, 2), byte);
      vst1q_f32(out + i + 4 * f, vreinterpretq_f32_u8(vqtbl4q_u8(t, idx)));
    }
  }
  lut4_scalar<kHiFirst>(p + (i >> 1), n - i, lut, out + i);
}
inline void u8_neon(const uint8_t* p, int64_t n, float zp, float scale, float* out) {
  const float32x4_t z = vdupq_n_f32(zp), s = vdupq_n_f32(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const uint16x8_t w = vmovl_u8(vld1_u8(p + i));
    const float32x4_t a = vcvtq_f32_u32(vmovl_u16(vget_low_u16(w)));
    const float32x4_t b = vcvtq_f32_u32(vmovl_u16(vget_high_u16(w)));
    vst1q_f32(out + i, vmulq_f32(vsubq_f32(a, z), s));
    vst1q_f32(out + i + 4, vmulq_f32(vsubq_f32(b, z), s));
  }
  u8_scalar(p + i, n - i, zp, scale, out + i);
}
#endif

// ---------------------------------------------------------------- dispatch
// n codes starting at the first nibble of p[0] -> out[0, n). A path this build lacks falls
// back to the scalar reference (callers ask path_available first when it matters).
template <bool kHiFirst>
inline void lut4(Path path, const uint8_t* p, int64_t n, const float* lut, float* out) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (path == Path::avx512) return lut4_avx512<kHiFirst>(p, n, lut, out);
#endif
#if defined(__AVX2__)
  if (path == Path::avx2) return lut4_avx2<kHiFirst>(p, n, lut, out);
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
  if (path == Path::neon) return lut4_neon<kHiFirst>(p, n, lut, out);
#endif
  lut4_scalar<kHiFirst>(p, n, lut, out);
}

inline void u8(Path path, const uint8_t* p, int64_t n, float zp, float scale, float* out) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (path == Path::avx512) return u8_avx512(p, n, zp, scale, out);
#endif
#if defined(__AVX2__)
  if (path == Path::avx2) return u8_avx2(p, n, zp, scale, out);
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
  if (path == Path::neon) return u8_neon(p, n, zp, scale, out);
#endif
  u8_scalar(p, n, zp, scale, out);
}

}  // namespace qk
}  // namespace pyedge
