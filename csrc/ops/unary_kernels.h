// The vector halves of the transcendental pointwise ops: y = f(x) and dx = df(x, y, dy) per
// op, written once over a simd backend S (common/simd.h) and instantiated twice:
//   simd::Native (NEON on aarch64, AVX2/AVX-512 on x86-64 v3/v4 and native builds): the ops'
//     vector path (UnaryOp's kVector, ops/unary.h; activations.cpp, elementwise_math.cpp);
//   simd::Scalar: the reference the tests compare it with, through
//     _core.simd_kernel("unary_<name>[_bwd]", x, dy, scalar=True/False) (run_named below).
// Each struct: template <class S> V fv(V x) const, template <class S> V dfv(V x, V y, V dy)
// const; df reads only what the op's kernel declares (reads_x / reads_y; the other is 0).
// The scalar f/df of the portable SSE2 x86-64 build stay in the op files (fast_math.h,
// auto-vectorised in the AVX2/AVX-512 clones): that build's results are unchanged.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "common/simd.h"

namespace pyedge {
namespace uk {

constexpr float kSqrt2OverPi = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kInvSqrt2Pi = 0.3989422804014327f;   // 1/sqrt(2*pi)
constexpr float kTwoOverSqrtPi = 1.1283791670955126f;

#define PYEDGE_UK_V typename S::V

// simd::Scalar with fma(a, b, c) = a·b + c: an FMA instruction where the target or clone has
// one (GCC contracts it), never a libm fma() call (slow without hardware FMA). For kernels
// written over simd backends whose scalar form must auto-vectorise.
struct ScalarC : simd::Scalar {
  static PYEDGE_SIMD_INLINE float fma(float a, float b, float c) { return a * b + c; }
};

// Exp: dy·y.
struct Exp {
  template <class S> PYEDGE_SIMD_INLINE PYEDGE_UK_V fv(PYEDGE_UK_V x) const { return simd::exp<S>(x); }
  template <class S>
  PYEDGE_SIMD_INLINE PYEDGE_UK_V dfv(PYEDGE_UK_V, PYEDGE_UK_V y, PYEDGE_UK_V dy) const {
    return S::mul(dy, y);
  }
};

// Log: dy / x.
struct Log {
  template <class S> PYEDGE_SIMD_INLINE PYEDGE_UK_V fv(PYEDGE_UK_V x) const { return simd::log<S>(x); }
  template <class S>
  PYEDGE_SIMD_INLINE PYEDGE_UK_V dfv(PYEDGE_UK_V x, PYEDGE_UK_V, PYEDGE_UK_V dy) const {
    return S::div(dy, x);
  }
};

// Sigmoid: dy·y·(1 − y).
struct Sigmoid {
  template <class S> PYEDGE_SIMD_INLINE PYEDGE_UK_V fv(PYEDGE_UK_V x) const { return simd::sigmoid<S>(x); }
  template <class S>
  PYEDGE_SIMD_INLINE PYEDGE_UK_V dfv(PYEDGE_UK_V, PYEDGE_UK_V y, PYEDGE_UK_V dy) const {
    return S::mul(S::mul(dy, y), S::sub(S::set1(1.f), y));
  }
};

// Tanh: dy·(1 − y²).
struct Tanh {
  template <class S> PYEDGE_SIMD_INLINE PYEDGE_UK_V fv(PYEDGE_UK_V x) const { return simd::tanh<S>(x); }
  template <class S>
  PYEDGE_SIMD_INLINE PYEDGE_UK_V dfv(PYEDGE_UK_V, PYEDGE_UK_V y, PYEDGE_UK_V dy) const {
    return S::mul(dy, S::sub(S::set1(1.f), S::mul(y, y)));
  }
};

// Erf: dy·2/√π·e^(−x²).
struct Erf {
  template <class S> PYEDGE_SIMD_INLINE PYEDGE_UK_V fv(PYEDGE_UK_V x) const { return simd::erf<S>(x); }
  template <class S>
  PYEDGE_SIMD_INLINE PYEDGE_UK_V dfv(PYEDGE_UK_V x, PYEDGE_UK_V, PYEDGE_UK_V dy) const {
    const PYEDGE_UK_V e = simd::exp<S>(S::sub(S::set1(0.f), S::mul(x, x)));
    return S::mul(S::mul(dy, S::set1(kTwoOverSqrtPi)), e);
  }
};

// 2^v for v <= 0 on simd vectors: 0 below -125 (where 2^v would come close to denormals),
// NaN for NaN. Base 2 saves simd::exp's ln2 reduction (n = round(v), f = v - n is exact) and
// it has no overflow side (one clamp, not two clamps and two selects). 2^f on [-1/2, 1/2]:
// degree-6 polynomial fitted to relative error (1.9e-9; ~8e-8 after float32 rounding).
template <class S>
PYEDGE_SIMD_INLINE typename S::V exp2_le0(typename S::V v) {
  using V = typename S::V;
  const V lo = S::set1(-125.f);
  const V vc = S::max(lo, v);  // x86 max returns its second operand for NaN: keeps it
  auto poly = [](V f) {
    V p = S::set1(1.534573530e-4f);
    p = S::fma(p, f, S::set1(1.339993090e-3f));
    p = S::fma(p, f, S::set1(9.618489072e-3f));
    p = S::fma(p, f, S::set1(5.550328642e-2f));
    p = S::fma(p, f, S::set1(2.402264625e-1f));
    p = S::fma(p, f, S::set1(6.931471825e-1f));
    return S::fma(p, f, S::set1(1.f));
  };
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<S, simd::Avx512>) {
    // n by one rounding instruction; p·2^n and the zeroing below lo by one masked vscalefps
    const V nf = _mm512_roundscale_ps(vc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __mmask16 keep = _mm512_cmp_ps_mask(v, lo, _CMP_NLT_UQ);  // v >= lo, or NaN
    return _mm512_maskz_scalef_ps(keep, poly(S::sub(vc, nf)), nf);
  }
#endif
  const V magic = S::set1(12582912.f);  // round to nearest by 1.5·2^23
  const V nf = S::sub(S::add(vc, magic), magic);
  const V p = S::mul(poly(S::sub(vc, nf)), S::pow2n(nf));  // n in [-125, 0]
  return S::select(S::lt(v, lo), S::set1(0.f), p);
}

// Gelu with approximate = "none": x·Phi(x).
// Phi(x) = 1/2 + copysign(1/2 − h, x) with h = erfc(a)/2, a = |x|/√2, by Abramowitz &
// Stegun 7.1.26 alone (|error| <= 1.5e-7; fm::erf's series for small |x| keeps a relative
// accuracy 1 + erf does not need): h = f(a)·e^(−a²)/2. Its exponential is GELU's density
// term, so the backward evaluates one. With b = |x|·sqrt(log2(e)/2), e^(−a²)/2 = 2^(−b²−1)
// (exp2_le0: no ln2 reduction, no overflow side; the 1/2 for free) and a = b/sqrt(log2 e)
// folded into the rational's constant. A true division for t: a reciprocal estimate +
// Newton step was no faster on Zen 5, and its last-bit error grows ~3x through f.
// Its scalar form (GeluErfK's f/df) is this with ScalarC, auto-vectorised in the clones.
struct GeluErf {
  template <class S>
  static PYEDGE_SIMD_INLINE PYEDGE_UK_V cdf(PYEDGE_UK_V x, PYEDGE_UK_V& eh) {
    using V = typename S::V;
    const V b = S::mul(S::abs(x), S::set1(0.8493218002880191f));
    eh = exp2_le0<S>(S::sub(S::set1(-1.f), S::mul(b, b)));  // e^(−x²/2)/2
    // b <= 11.17 (a <= 9.3) keeps the divisor finite (x = inf, NaN); beyond, h < 2^-26
    const V one = S::set1(1.f), half = S::set1(0.5f);
    const V t = S::div(one, S::fma(S::set1(0.2727374808792225f),  // 0.3275911/sqrt(log2 e)
                                   S::min(b, S::set1(11.17f)), one));
    const V h = S::mul(simd::erfc_as_factor_t<S>(t), eh);
    return S::add(half, S::copysign(S::sub(half, h), x));
  }
  template <class S> PYEDGE_SIMD_INLINE PYEDGE_UK_V fv(PYEDGE_UK_V x) const {
    PYEDGE_UK_V eh;
    return S::mul(x, cdf<S>(x, eh));
  }
  // dx = dy·(Phi + x·e^(−x²/2)/√(2π))
  template <class S>
  PYEDGE_SIMD_INLINE PYEDGE_UK_V dfv(PYEDGE_UK_V x, PYEDGE_UK_V, PYEDGE_UK_V dy) const {
    PYEDGE_UK_V eh;
    const PYEDGE_UK_V c = cdf<S>(x, eh);
    return S::mul(dy, S::fma(S::mul(x, eh), S::set1(2.f * kInvSqrt2Pi), c));
  }
};

// Gelu with approximate = "tanh": x/2·(1 + tanh(u)), u = √(2/π)·(x + 0.044715·x³).
struct GeluTanh {
  template <class S> static PYEDGE_SIMD_INLINE PYEDGE_UK_V inner_tanh(PYEDGE_UK_V x) {
    const PYEDGE_UK_V x3 = S::mul(S::mul(x, x), x);
    return simd::tanh<S>(S::mul(S::set1(kSqrt2OverPi), S::fma(S::set1(0.044715f), x3, x)));
  }
  template <class S> PYEDGE_SIMD_INLINE PYEDGE_UK_V fv(PYEDGE_UK_V x) const {
    const PYEDGE_UK_V half = S::set1(0.5f);
    return S::mul(S::mul(half, x), S::add(S::set1(1.f), inner_tanh<S>(x)));
  }
  // dx = dy·((1 + t)/2 + x/2·(1 − t²)·du), du = √(2/π)·(1 + 3·0.044715·x²)
  template <class S>
  PYEDGE_SIMD_INLINE PYEDGE_UK_V dfv(PYEDGE_UK_V x, PYEDGE_UK_V, PYEDGE_UK_V dy) const {
    using V = typename S::V;
    const V t = inner_tanh<S>(x), one = S::set1(1.f), half = S::set1(0.5f);
    const V du = S::mul(S::set1(kSqrt2OverPi),
                        S::fma(S::set1(3.f * 0.044715f), S::mul(x, x), one));
    const V a = S::mul(half, S::add(one, t));
    const V b = S::mul(S::mul(S::mul(half, x), S::sub(one, S::mul(t, t))), du);
    return S::mul(dy, S::add(a, b));
  }
};

// Softplus: max(x, 0) + log1p(e^−|x|) (no overflow); dx = dy·sigmoid(x).
struct Softplus {
  template <class S> PYEDGE_SIMD_INLINE PYEDGE_UK_V fv(PYEDGE_UK_V x) const {
    const PYEDGE_UK_V zero = S::set1(0.f);
    const PYEDGE_UK_V pos = S::select(S::gt(x, zero), x, zero);
    return S::add(pos, simd::log1p<S>(simd::exp<S>(S::sub(zero, S::abs(x)))));
  }
  template <class S>
  PYEDGE_SIMD_INLINE PYEDGE_UK_V dfv(PYEDGE_UK_V x, PYEDGE_UK_V, PYEDGE_UK_V dy) const {
    return S::mul(dy, simd::sigmoid<S>(x));
  }
};

// Elu: x (x > 0) else alpha·(e^x − 1). The gradient from y (alpha > 0: dy·(y + alpha) below 0)
// or from x (dy·alpha·e^x), as the op's kernel reads.
struct Elu {
  float alpha = 1.f;
  bool grad_from_y = true;
  template <class S> PYEDGE_SIMD_INLINE PYEDGE_UK_V fv(PYEDGE_UK_V x) const {
    return S::select(S::gt(x, S::set1(0.f)), x, S::mul(S::set1(alpha), simd::expm1<S>(x)));
  }
  template <class S>
  PYEDGE_SIMD_INLINE PYEDGE_UK_V dfv(PYEDGE_UK_V x, PYEDGE_UK_V y, PYEDGE_UK_V dy) const {
    const PYEDGE_UK_V zero = S::set1(0.f), a = S::set1(alpha);
    if (grad_from_y) return S::select(S::gt(y, zero), dy, S::mul(dy, S::add(y, a)));
    return S::select(S::gt(x, zero), dy, S::mul(S::mul(dy, a), simd::exp<S>(x)));
  }
};

// Selu: gamma·(x > 0 ? x : alpha·(e^x − 1)).
struct Selu {
  float alpha = 1.67326319217681884765625f, gamma = 1.05070102214813232421875f;
  template <class S> PYEDGE_SIMD_INLINE PYEDGE_UK_V fv(PYEDGE_UK_V x) const {
    const PYEDGE_UK_V neg = S::mul(S::set1(alpha), simd::expm1<S>(x));
    return S::mul(S::set1(gamma), S::select(S::gt(x, S::set1(0.f)), x, neg));
  }
  template <class S>
  PYEDGE_SIMD_INLINE PYEDGE_UK_V dfv(PYEDGE_UK_V x, PYEDGE_UK_V, PYEDGE_UK_V dy) const {
    const PYEDGE_UK_V g = S::mul(dy, S::set1(gamma));
    return S::select(S::gt(x, S::set1(0.f)), g,
                     S::mul(S::mul(g, S::set1(alpha)), simd::exp<S>(x)));
  }
};

#undef PYEDGE_UK_V

// y = K::fv(x) over n elements; the last partial vector runs padded through the vector code
// (as UnaryOp does), then with dy given (bwd) dx = K::dfv(x, y, dy) instead of y.
template <class S, class K>
void run_kernel(const K& k, const float* x, const float* dy, float* out, int64_t n) {
  using V = typename S::V;
  for (int64_t i = 0; i < n; i += S::W) {
    const int64_t m = n - i < S::W ? n - i : S::W;
    float bx[S::W] = {}, bdy[S::W] = {}, bo[S::W];
    std::memcpy(bx, x + i, sizeof(float) * m);
    const V xv = S::load(bx), yv = k.template fv<S>(xv);
    if (dy) {
      std::memcpy(bdy, dy + i, sizeof(float) * m);
      S::store(bo, k.template dfv<S>(xv, yv, S::load(bdy)));
    } else {
      S::store(bo, yv);
    }
    std::memcpy(out + i, bo, sizeof(float) * m);
  }
}

// The test hook: kernel `name` (exp log sigmoid tanh erf gelu gelu_tanh softplus elu elu_x
// selu; elu_x = Elu's gradient from x, as with alpha < 0) with backend S; false if unknown.
template <class S>
bool run_named(const std::string& name, const float* x, const float* dy, float* out, int64_t n) {
  if (name == "exp") run_kernel<S>(Exp{}, x, dy, out, n);
  else if (name == "log") run_kernel<S>(Log{}, x, dy, out, n);
  else if (name == "sigmoid") run_kernel<S>(Sigmoid{}, x, dy, out, n);
  else if (name == "tanh") run_kernel<S>(Tanh{}, x, dy, out, n);
  else if (name == "erf") run_kernel<S>(Erf{}, x, dy, out, n);
  else if (name == "gelu") run_kernel<S>(GeluErf{}, x, dy, out, n);
  else if (name == "gelu_tanh") run_kernel<S>(GeluTanh{}, x, dy, out, n);
  else if (name == "softplus") run_kernel<S>(Softplus{}, x, dy, out, n);
  else if (name == "elu") run_kernel<S>(Elu{}, x, dy, out, n);
  else if (name == "elu_x") run_kernel<S>(Elu{1.f, false}, x, dy, out, n);
  else if (name == "selu") run_kernel<S>(Selu{}, x, dy, out, n);
  else return false;
  return true;
}

}  // namespace uk
}  // namespace pyedge
