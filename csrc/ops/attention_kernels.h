// Per-slice kernels of pyedge.Attention's fused path (attention.cpp), over the widest SIMD
// backend S (simd::Native): one (b, h) slice at a time, query rows in blocks of MR = 8 so that
// a block's scores [MR, Lk] (4 KiB on MiniLM) go from the score product through mask, max,
// exp and sum to the next product while they are in L1. Each product's rows are finished
// while its accumulators are in registers (strip_rows: mask, max or exp and sum, or the dot
// with E). Work that is exactly 0 is skipped: keys past the last one the mask keeps
// (key_ends) and, in the backward, row blocks whose dO rows are all 0.
//
// Why not small_gemm plus row passes over the whole tile (the general path): on MiniLM's
// slices (L = Lk = 128, D = Dv = 32, "blhd") the separate sweeps over a 64 KiB score tile, its
// round trips through L2, the 4x4 transposes and the strided K, V and Q rows (which thrash a
// few L1 sets, see pack_rows) cost about a third of the op's time.
//
// Sliding windows (Slice::window, with causal): row i keeps keys (i + coff − window, i + coff];
// a block of rows starts its keys at key_begin (a whole vector at or below its first row's
// first key), so the keys before the window cost nothing, forward and backward (dV and dK run
// per block of keys over the query rows that see them: band_t). Soft-capping (Slice::cap):
// scores c·tanh(x / c) before the mask (Gemma 2), the backward's dS times 1 − tanh², tanh
// recomputed with the scores (simd::tanh), never stored between forward and backward.
//
// Products: MR rows x NV vectors of C in registers accumulate over k from rows of a dense,
// row-major B; A is read by strides (A(r, k) = A[r * sr + k * sk]) and only feeds broadcasts,
// so a transposed A (Eᵀ·dO, dSᵀ·Q) costs nothing extra. Sums run in a fixed order per slice,
// so results do not depend on the thread count.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/simd.h"
#include "ops/fast_math.h"

namespace pyedge {
namespace attn {

#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int kRegs = 32;
#else
constexpr int kRegs = 16;
#endif

template <class S>
struct Blk {
  // 8 rows x 2 vectors = 16 accumulators + 2 B vectors + a broadcast fit 32 registers
  // (AVX-512: 8 x 32 floats, a block of MiniLM's 128 x 32 outputs); 4 x 2 fit 16.
  static constexpr int NV = 2;
  static constexpr int MR = kRegs >= 32 ? 8 : 4;
};

// e^x for x <= 0 (a score minus its row max or its LSE), simd::exp's polynomial without
// its overflow branch. Below -87.3 (masked keys) the result is exactly 0; NaN stays NaN.
template <class S>
PYEDGE_SIMD_INLINE typename S::V exp_le0(typename S::V x) {
  using V = typename S::V;
  const V lo = S::set1(-87.3f);
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<S, simd::Avx512>) {
    // 15 instead of 22 instructions: one rounding instruction for the magic-number pair, and
    // the 2^n scaling (with the zeroing of x < lo) as one masked vscalefps instead of the
    // exponent-bit construction, two multiplies and a blend. Differs from simd::exp only for
    // x in [-87.3, -87.0) (n = -126): ~1e-38 there, where simd::exp flushes to 0.
    // No clamp of x to lo first: the lanes below lo (where x·log2e may be -inf and the
    // reduction NaN) are zeroed by the mask, the others see the same x.
    const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ);  // x >= lo, or NaN
    const V nf = _mm512_roundscale_ps(S::mul(x, S::set1(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_maskz_scalef_ps(keep, simd::exp_reduced<S>(x, nf), nf);
  }
#endif
  const auto tiny = S::lt(x, lo);
  const V xc = S::max(lo, x);
  const V t = S::mul(xc, S::set1(1.44269504088896341f));
  const V magic = S::set1(12582912.f);
  const V nf = S::sub(S::add(t, magic), magic);
  const V p = simd::exp_reduced<S>(xc, nf);
  // 2^(n-1) * 2 so that n = 128 still has a valid exponent (as simd::exp)
  V v = S::mul(S::mul(p, S::pow2n(S::sub(nf, S::set1(1.f)))), S::set1(2.f));
  return S::select(tiny, S::set1(0.f), v);
}

// acc[r][v] = Σ_k A(r, k) · B[k * ldb + v * W], r < MR, v < NV.
template <class S, int MR, int NV>
PYEDGE_SIMD_INLINE void block(int64_t K, const float* A, int64_t sr, int64_t sk, const float* B,
                              int64_t ldb, typename S::V (&acc)[MR][NV]) {
  using V = typename S::V;
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = S::set1(0.f);
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = S::load(B + k * ldb + v * S::W);
    for (int r = 0; r < MR; ++r) {
      const V a = S::set1(A[r * sr + k * sk]);
      for (int v = 0; v < NV; ++v) acc[r][v] = S::fma(a, b[v], acc[r][v]);
    }
  }
}

// The column walk of both product kernels: the C tiles of R rows × NV vectors over [0, N)
// (N a multiple of W), then single vectors; each accumulator goes to f(r, j, acc) while it
// is in a register.
template <class S, int R, class F>
PYEDGE_SIMD_INLINE void tiles(int64_t N, int64_t K, const float* a, int64_t sr, int64_t sk,
                              const float* B, int64_t ldb, F&& f) {
  using V = typename S::V;
  constexpr int NV = Blk<S>::NV, W = S::W;
  int64_t j = 0;
  for (; j + NV * W <= N; j += NV * W) {
    V acc[R][NV];
    block<S, R, NV>(K, a, sr, sk, B + j, ldb, acc);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) f(r, j + v * W, acc[r][v]);
  }
  for (; j < N; j += W) {
    V acc[R][1];
    block<S, R, 1>(K, a, sr, sk, B + j, ldb, acc);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) f(r, j, acc[r][0]);
  }
}

// Where a product's C rows go: C[i, j] = rs[i] · acc + (add ? C[i, j] : 0), with rs absent
// meaning 1. add = false assigns (C is not read: a fresh gradient may hold anything).
struct Out {
  float* C;
  int64_t ldc;
  const float* rs = nullptr;
  bool add = false;
};

// Rows [i, i + MR) of C [M, N] = A · B, in tiles (tiles above); N is a
// multiple of W. Not inlined: in a function of its own the k loop
// keeps the accumulators, B vectors and row pointers in registers (inlined into a slice
// function, GCC spilled B vectors and row pointers to the stack).
template <class S, int MR>
__attribute__((noinline)) void rows_of(int64_t i, int64_t N, int64_t K, const float* A,
                                       int64_t sr, int64_t sk, const float* B, int64_t ldb,
                                       Out out) {
  using V = typename S::V;
  const float* a = A + i * sr;
  float* C = out.C + i * out.ldc;
  auto put = [&](int r, int64_t j, V x) {
    float* c = C + r * out.ldc + j;
    if (out.rs) x = S::mul(x, S::set1(out.rs[i + r]));
    S::store(c, out.add ? S::add(x, S::load(c)) : x);
  };
  tiles<S, MR>(N, K, a, sr, sk, B, ldb, put);
}

// C [M, N] = A [M, K] · B [K, N] into out, rows in blocks of MR, then 4, 2, 1.
template <class S>
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t sr, int64_t sk,
                 const float* B, int64_t ldb, Out out) {
  constexpr int MR = Blk<S>::MR;
  int64_t i = 0;
  for (; i + MR <= M; i += MR) rows_of<S, MR>(i, N, K, A, sr, sk, B, ldb, out);
  if (MR > 4 && i + 4 <= M) {
    rows_of<S, 4>(i, N, K, A, sr, sk, B, ldb, out);
    i += 4;
  }
  if (i + 2 <= M) {
    rows_of<S, 2>(i, N, K, A, sr, sk, B, ldb, out);
    i += 2;
  }
  if (i < M) rows_of<S, 1>(i, N, K, A, sr, sk, B, ldb, out);
}

// dst [cols, rows] (row stride ldd) = a · src [rows, cols] (row stride lds)ᵀ: the row-major
// B operand of the score products (K scaled, V). 16x16 blocks through AVX-512 registers
// (64 two-source shuffles per block), the edges element by element.
inline void pack_t(const float* src, int64_t lds, int64_t rows, int64_t cols, float a,
                   float* dst, int64_t ldd) {
  int64_t r16 = 0, c16 = 0;
#if defined(__AVX512F__)
  r16 = rows & ~int64_t(15);
  c16 = cols & ~int64_t(15);
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t r0 = 0; r0 < r16; r0 += 16)
    for (int64_t c0 = 0; c0 < c16; c0 += 16) {
      __m512 x[16], t[16];
      for (int i = 0; i < 16; ++i) x[i] = _mm512_mul_ps(_mm512_loadu_ps(src + (r0 + i) * lds + c0), va);
      // within each 128-bit lane: pairs of rows interleaved, then groups of four rows
      for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(x[i], x[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(x[i], x[i + 1]);
      }
      for (int g = 0; g < 16; g += 4) {
        x[g] = _mm512_shuffle_ps(t[g], t[g + 2], 0x44);
        x[g + 1] = _mm512_shuffle_ps(t[g], t[g + 2], 0xEE);
        x[g + 2] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0x44);
        x[g + 3] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0xEE);
      }
      // x[4g + c]: rows 4g..4g+3 of columns c, c+4, c+8, c+12 (one per lane); gather lanes
      for (int c = 0; c < 4; ++c) {
        const __m512 x0 = _mm512_shuffle_f32x4(x[c], x[4 + c], 0x88);
        const __m512 x1 = _mm512_shuffle_f32x4(x[c], x[4 + c], 0xDD);
        const __m512 y0 = _mm512_shuffle_f32x4(x[8 + c], x[12 + c], 0x88);
        const __m512 y1 = _mm512_shuffle_f32x4(x[8 + c], x[12 + c], 0xDD);
        _mm512_storeu_ps(dst + (c0 + c) * ldd + r0, _mm512_shuffle_f32x4(x0, y0, 0x88));
        _mm512_storeu_ps(dst + (c0 + c + 4) * ldd + r0, _mm512_shuffle_f32x4(x1, y1, 0x88));
        _mm512_storeu_ps(dst + (c0 + c + 8) * ldd + r0, _mm512_shuffle_f32x4(x0, y0, 0xDD));
        _mm512_storeu_ps(dst + (c0 + c + 12) * ldd + r0, _mm512_shuffle_f32x4(x1, y1, 0xDD));
      }
    }
#endif
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = r < r16 ? c16 : 0; c < cols; ++c) dst[c * ldd + r] = a * src[r * lds + c];
}

// dst [rows, cols] (row stride cols) = src [rows, cols] (row stride lds): a strided operand
// made dense. In the "blhd" layout a slice's rows are 1.5 KiB apart (H·D floats): 128 such
// rows fall into 16 of L1's 64 sets, more lines than those sets hold, so a product streaming
// them through every row block misses L1 each time (and evicts the Kᵀ panel's lines).
template <class S>
inline void pack_rows(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst) {
  if (lds == cols) {
    std::memcpy(dst, src, sizeof(float) * size_t(rows * cols));
    return;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; c += S::W) S::store(dst + r * cols + c, S::load(src + r * lds + c));
}

// One slice's operands: row pointers and row strides, sizes, the mask rows (row i at
// mask + i * ldm; `one`: a single value per row, else Lk values), the score scale.
struct Slice {
  int64_t L = 0, Lk = 0, D = 0, Dv = 0;
  const float *q = nullptr, *k = nullptr, *v = nullptr, *mask = nullptr;
  int64_t ldq = 0, ldk = 0, ldv = 0, ldm = 0;
  bool one = false;
  float scale = 1.f;
  // causal: row i keeps keys j <= i + coff (coff = Lk − L: the last query row sees every key)
  bool causal = false;
  int64_t coff = 0;
  // window (> 0, with causal): row i also drops keys j <= i + coff − window
  int64_t window = 0;
  // cap (> 0): scores c·tanh(x / c) of the scaled products x, before the mask
  float cap = 0.f;
};

// Soft-capped score c·tanh(x / c) of x = scale·q·k; *d (when given) = 1 − tanh², what dS is
// multiplied by on the way back to x. inv_c = 1 / c (a multiply, not a divide per score).
template <class S>
PYEDGE_SIMD_INLINE typename S::V softcap(typename S::V x, float c, float inv_c,
                                         typename S::V* d = nullptr) {
  const typename S::V t = simd::tanh<S>(S::mul(x, S::set1(inv_c)));
  if (d) *d = S::fma(S::sub(S::set1(0.f), t), t, S::set1(1.f));
  return S::mul(S::set1(c), t);
}

// x [n] = c·tanh(x / c) in place, d [n] = 1 − tanh² when given: the general paths' rows (the
// tail past the last whole vector on the scalar reference, as simd::map).
template <class S>
inline void softcap_row(float* x, int64_t n, float c, float* d = nullptr) {
  using V = typename S::V;
  const float inv = 1.f / c;
  int64_t i = 0;
  for (; i + S::W <= n; i += S::W) {
    V dt;
    S::store(x + i, softcap<S>(S::load(x + i), c, inv, d ? &dt : nullptr));
    if (d) S::store(d + i, dt);
  }
  for (; i < n; ++i) {
    float dt;
    x[i] = softcap<simd::Scalar>(x[i], c, inv, d ? &dt : nullptr);
    if (d) d[i] = dt;
  }
}

// No causal limit (strip_rows' climit when the slice is not causal).
constexpr int64_t kNoLimit = int64_t(1) << 40;

// What strip_rows does to a block's scores besides the mask, in key columns counted from the
// strip's first column: row r drops keys j > hi + r (the causal limit) and j <= lo + r (the
// window's; kNoLimit / -kNoLimit: none) and, with cap > 0, takes c·tanh(x / c) first, with
// 1 − tanh² stored into dcap's rows (row stride that of the strip) when dcap is given.
struct Cut {
  int64_t hi = kNoLimit, lo = -kNoLimit;
  float cap = 0.f;
  float* dcap = nullptr;
  Cut row(int64_t r, int64_t ld) const { return {hi + r, lo + r, cap, dcap ? dcap + r * ld : nullptr}; }
};

// The first key of the block of rows from query row i0 the strip computes, a multiple of the
// vector width: 0, or with a window the first key its first row keeps rounded down.
template <class S>
inline int64_t key_begin(const Slice& s, int64_t i0) {
  if (s.window <= 0) return 0;
  const int64_t first = std::max<int64_t>(0, i0 + s.coff - s.window + 1);
  return first / S::W * S::W;
}

// The Cut of the block from query row i0 whose strip starts at key kb.
inline Cut cut_of(const Slice& s, int64_t i0, int64_t kb, float* dcap = nullptr) {
  Cut c;
  if (s.causal) c.hi = i0 + s.coff - kb;
  if (s.window > 0) c.lo = i0 + s.coff - s.window - kb;
  c.cap = s.cap;
  c.dcap = dcap;
  return c;
}

// An operand of the next slice to bring towards L2 while this slice computes: [rows, cols]
// at p with row stride ld, to be read (or written: prefetchw, so the stores find the lines
// owned). Software prefetch because a slice's rows are scattered lines (blhd: 128 rows of
// 128 bytes, 1.5 KiB apart) that the hardware prefetchers did not bring in time.
struct Ahead {
  const float* p = nullptr;
  int64_t ld = 0, rows = 0, cols = 0;
  bool write = false;
};

// Part `part` of `parts` of each operand's rows (a part per row block of this slice).
// Always inlined: GCC takes a function made of prefetches for a pure one and drops calls.
PYEDGE_SIMD_INLINE void prefetch_part(const Ahead* a, int n, int64_t part, int64_t parts) {
  for (int t = 0; t < n; ++t) {
    const Ahead& x = a[t];
    for (int64_t r = x.rows * part / parts, r1 = x.rows * (part + 1) / parts; r < r1; ++r)
      for (int64_t c = 0; c < x.cols; c += 16) {
        if (x.write) __builtin_prefetch(x.p + r * x.ld + c, 1, 2);
        else __builtin_prefetch(x.p + r * x.ld + c, 0, 2);
      }
  }
}

// Whether the fused path takes these sizes: whole vectors along Lk, D and Dv, every dim
// within small_gemm's range (larger products go to BLAS, see attention.cpp); with a sliding
// window, sequences up to kMaxWindowed (the products then span the window, not the sequence,
// and skipping the keys before it is the point).
constexpr int64_t kMaxFused = 512, kMaxWindowed = 4096;
template <class S>
inline bool fits(int64_t L, int64_t Lk, int64_t D, int64_t Dv, bool windowed = false) {
  constexpr int W = S::W;
  const int64_t rows = windowed ? kMaxWindowed : kMaxFused;
  return L >= 1 && Lk >= 1 && D >= 1 && Dv >= 1 && Lk % W == 0 && D % W == 0 && Dv % W == 0 &&
         L <= rows && Lk <= rows && D <= kMaxFused && Dv <= kMaxFused;
}

// Skipping keys the mask removes (padded sequences: the last keys of a row masked with the
// exporters' -3.4e38 or -inf). A row drops keys [j, Lk) when its mask is below kHard on all
// of them and above kReal on some key before j: the row max (of kept keys) is then above
// -1e30 - |s| and a dropped key's score + mask below -1e37 + |s|, so for
// scores |s| < 1e36 its exp is exactly 0 (below exp_le0's -87.3) in the forward and in the
// backward's recompute, it never is the max, and the products, sums, dS, dQ, dK and dV it
// would enter are unchanged to the bit (dK and dV rows of keys every row removes are 0).
// Rows masked entirely (uniform P) keep every key. NaN or inf in a removed key's K or V rows
// no longer reaches the output (as it would through 0·inf).
constexpr float kHard = -1e37f, kReal = -1e30f;

// Keys [0, kend) that mask row m [Lk] keeps; 0 when the row keeps no key above kReal (masked
// entirely: the caller keeps every key then). The products along keys (P·V, dS·k, the dV and
// dK rows) stop at kend, those with keys in vectors (scores, dP) at vec_end(kend).
template <class S>
inline int64_t row_key_end(const float* m, int64_t Lk) {
  constexpr int W = S::W;
  const typename S::V hard = S::set1(kHard), zero = S::set1(0.f), one = S::set1(1.f);
  int64_t j = Lk;
  // a vector is all removed when no lane is >= kHard (NaN counts as kept)
  while (j > 0 && S::hmax(S::select(S::lt(S::load(m + j - W), hard), zero, one)) == 0.f) j -= W;
  while (j > 0 && m[j - 1] < kHard) --j;
  for (int64_t i = 0; i < j; ++i)
    if (!(m[i] <= kReal)) return j;
  return 0;
}

// The keys [0, ke[b]) each block b of MR query rows needs (ke: (L + MR - 1) / MR entries),
// returns their maximum: the rows of V (and, in whole vectors, of K) the slice reads.
template <class S>
inline int64_t key_ends_mask(const Slice& s, int MR, int64_t* ke);

// key_ends_mask's ends, cut where the causal limit removes every later key of the block.
template <class S>
inline int64_t key_ends(const Slice& s, int MR, int64_t* ke) {
  int64_t mx = key_ends_mask<S>(s, MR, ke);
  if (!s.causal) return mx;
  mx = 0;
  for (int64_t b = 0, nb = (s.L + MR - 1) / MR; b < nb; ++b) {
    const int64_t last = std::min<int64_t>(s.L, (b + 1) * MR) - 1;  // the block's last row
    ke[b] = std::min(ke[b], std::min(s.Lk, last + s.coff + 1));
    mx = std::max(mx, ke[b]);
  }
  return mx;
}

template <class S>
inline int64_t key_ends_mask(const Slice& s, int MR, int64_t* ke) {
  const int64_t nb = (s.L + MR - 1) / MR;
  // one value per row removes every key of a row or none; with a window, a row whose window
  // keys the mask removes entirely may still have kept keys before the window (then its
  // uniform weights over the window are what the general path gives): no mask-based ends
  if (!s.mask || s.one || s.window > 0) {
    std::fill(ke, ke + nb, s.Lk);
    return s.Lk;
  }
  auto rows_end = [&](const float* m, int64_t rows) {
    int64_t e = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t x = row_key_end<S>(m + r * s.ldm, s.Lk);
      if (x == 0) return s.Lk;
      e = std::max(e, x);
    }
    return e;
  };
  if (s.ldm == 0) {  // the same mask row for every query (key padding)
    std::fill(ke, ke + nb, rows_end(s.mask, 1));
    return ke[0];
  }
  int64_t mx = 0;
  for (int64_t b = 0; b < nb; ++b) {
    ke[b] = rows_end(s.mask + b * MR * s.ldm, std::min<int64_t>(MR, s.L - b * MR));
    mx = std::max(mx, ke[b]);
  }
  return mx;
}

// n keys rounded up to whole vectors.
template <class S>
constexpr int64_t vec_end(int64_t n) {
  return (n + S::W - 1) / S::W * S::W;
}

// Floats of scratch forward_slice needs: the scaled Kᵀ panel [D, Lk], dense V [Lk, Dv], a
// score strip [MR, Lk] and the row sums [L].
template <class S>
inline int64_t forward_floats(int64_t L, int64_t Lk, int64_t D, int64_t Dv) {
  return D * Lk + Lk * Dv + Blk<S>::MR * Lk + L;
}

// Passes over R rows of a strip in L1 (row stride ld, n columns, n a multiple of W), the rows
// interleaved: one row at a time, each row's chain (max, then exp, then the sum) left the
// core idle between rows (~2x slower). Sums run in a fixed order.

// Columns [j, j + W) of mask row r at m + r * ldm (Lk values, or one value when `one`).
template <class S>
PYEDGE_SIMD_INLINE typename S::V mask_vec(const float* m, int64_t ldm, bool one, int r,
                                         int64_t j) {
  return one ? S::set1(m[r * ldm]) : S::load(m + r * ldm + j);
}

// How strip_rows finishes a product's rows while its accumulators are in registers (no pass
// reading the strip back). Reductions per lane in column order, then across lanes.
enum class Fin {
  Max,  // scores plus mask stored, red[r] = their max (the forward: the exp needs the max)
  Exp,  // e = exp(scores + mask − aux[r]) stored (aux: LSE), red[r] = Σ e (the backward's E)
  Dot,  // dP stored, red[r] = Σ_j e_j dP_j with e the rows of E at aux (row stride ldx)
};

// Rows [R] of x = a·b, columns [0, n): a rows at a + r * lda ([K] each), b [K, n] with row
// stride ldb, x rows at x + r * ldx; finished as F says (the mask rows as in mask_vec). The
// running reductions go through memory, lanes [R, W] from the caller: kept in registers
// across the k loops, GCC spilled the loop's B vectors instead (forward 1.5x slower).
// cut: the soft cap, then (after the mask) the keys the causal limit and the window remove
// (-inf: exp 0), without a mask tensor; only the vectors crossing a limit pay for it.
template <class S, int R, Fin F>
__attribute__((noinline)) void strip_rows(int64_t n, int64_t K, const float* a, int64_t lda,
                                          const float* b, int64_t ldb, const float* m,
                                          int64_t ldm, bool one, const float* aux, float* x,
                                          int64_t ldx, float* lanes, float* red,
                                          const Cut& cut = Cut()) {
  using V = typename S::V;
  constexpr int W = S::W;
  alignas(64) static const float kIota[16] = {0, 1, 2,  3,  4,  5,  6,  7,
                                              8, 9, 10, 11, 12, 13, 14, 15};
  float* rd[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    rd[r] = lanes + r * W;
    S::store(rd[r], S::set1(F == Fin::Max ? -std::numeric_limits<float>::infinity() : 0.f));
  }
  const int64_t climit = cut.hi, wlimit = cut.lo;
  const float inv_cap = cut.cap > 0.f ? 1.f / cut.cap : 0.f;
  auto finish = [&](int r, int64_t j, V v) {
    if constexpr (F != Fin::Dot) {
      if (cut.cap > 0.f) {
        if (cut.dcap) {
          V d;
          v = softcap<S>(v, cut.cap, inv_cap, &d);
          S::store(cut.dcap + r * ldx + j, d);
        } else {
          v = softcap<S>(v, cut.cap, inv_cap);
        }
      }
      if (m) v = S::add(v, mask_vec<S>(m, ldm, one, r, j));
      const V ninf = S::set1(-std::numeric_limits<float>::infinity());
      if (j + W - 1 > climit + r)  // lanes j + l > climit + r: removed
        v = S::select(S::gt(S::add(S::load(kIota), S::set1(float(j - climit - r))), S::set1(0.f)),
                      ninf, v);
      if (j <= wlimit + r)  // lanes j + l <= wlimit + r: before the window, removed
        v = S::select(S::gt(S::add(S::load(kIota), S::set1(float(j - wlimit - r))), S::set1(0.f)),
                      v, ninf);
    }
    if constexpr (F == Fin::Max) {
      S::store(rd[r], S::max(v, S::load(rd[r])));
    } else if constexpr (F == Fin::Exp) {
      v = exp_le0<S>(S::sub(v, S::set1(aux[r])));
      S::store(rd[r], S::add(S::load(rd[r]), v));
    } else {
      S::store(rd[r], S::fma(S::load(aux + r * ldx + j), v, S::load(rd[r])));
    }
    S::store(x + r * ldx + j, v);
  };
  tiles<S, R>(n, K, a, lda, 1, b, ldb, finish);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const V v = S::load(rd[r]);
    red[r] = F == Fin::Max ? S::hmax(v) : S::hsum(v);
  }
}

// strip_rows over a block of rows <= MR (one row at a time below MR); aux as F says.
template <class S, Fin F>
inline void strip_block(int64_t rows, int64_t n, int64_t K, const float* a, int64_t lda,
                        const float* b, int64_t ldb, const float* m, int64_t ldm, bool one,
                        const float* aux, float* x, int64_t ldx, float* red,
                        const Cut& cut = Cut()) {
  constexpr int MR = Blk<S>::MR;
  alignas(64) float lanes[MR * S::W];
  if (rows == MR)
    return strip_rows<S, MR, F>(n, K, a, lda, b, ldb, m, ldm, one, aux, x, ldx, lanes, red,
                                cut);
  for (int64_t r = 0; r < rows; ++r)
    strip_rows<S, 1, F>(n, K, a + r * lda, lda, b, ldb, m ? m + r * ldm : nullptr, ldm, one,
                        F == Fin::Exp ? aux + r : F == Fin::Dot ? aux + r * ldx : nullptr,
                        x + r * ldx, ldx, lanes, red + r, cut.row(r, ldx));
}

// x = exp(x − c_r) in place, sum[r] = Σ x: the forward's exp after strip_rows' max.
template <class S, int R>
inline void exp_rows(float* x, int64_t ld, int64_t n, const float* cmax, float* sum) {
  using V = typename S::V;
  constexpr int W = S::W;
  V c[R], acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    c[r] = S::set1(cmax[r]);
    acc[r] = S::set1(0.f);
  }
  for (int64_t j = 0; j < n; j += W)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V v = exp_le0<S>(S::sub(S::load(x + r * ld + j), c[r]));
      S::store(x + r * ld + j, v);
      acc[r] = S::add(acc[r], v);
    }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) sum[r] = S::hsum(acc[r]);
}

// g = scale · (e / sum_r) ∘ (g − dot_r / sum_r) [∘ dc] in place, inv[r] = 1 / sum_r,
// dot_r = Σⱼ eⱼ gⱼ (strip_rows' Dot): dS from dP and E (times 1 − tanh² of a soft cap: dc,
// row stride ld, when given).
template <class S, int R>
inline void ds_rows(float* g, const float* e, int64_t ld, int64_t n, const float* inv,
                    const float* dot, float scale, const float* dc = nullptr) {
  using V = typename S::V;
  constexpr int W = S::W;
  V di[R], c[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    di[r] = S::set1(inv[r] * dot[r]);
    c[r] = S::set1(scale * inv[r]);
  }
  for (int64_t j = 0; j < n; j += W)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V v = S::sub(S::load(g + r * ld + j), di[r]);
      V x = S::mul(c[r], S::mul(S::load(e + r * ld + j), v));
      if (dc) x = S::mul(x, S::load(dc + r * ld + j));
      S::store(g + r * ld + j, x);
    }
}

// Forward of one slice: O [L, Dv] (row stride ldo) = softmax(scale·q·kᵀ + mask) · v and
// LSE [L], as attention.cpp's header describes. Per block of MR query rows, over the keys the
// block keeps (key_ends): scores plus mask into the strip with their row max (strip_rows),
// exp and sum in place, O rows = strip · v scaled by 1/sum on the way out of the registers.
// The rows' logs go in one vector loop at the end.
template <class S>
void forward_slice(const Slice& s, float* o, int64_t ldo, float* lse, float* scratch,
                   const Ahead* ahead = nullptr, int n_ahead = 0) {
  constexpr int MR = Blk<S>::MR;
  const int64_t L = s.L, Lk = s.Lk, D = s.D, Dv = s.Dv;
  float* kt = scratch;           // [D, Lk]
  float* vp = kt + D * Lk;       // [Lk, Dv]
  float* strip = vp + Lk * Dv;   // [MR, Lk]
  float* sum = strip + MR * Lk;  // [L]
  int64_t ke[kMaxWindowed / 4];  // keys per row block (L <= kMaxWindowed, MR >= 4)
  const int64_t kn = key_ends<S>(s, MR, ke);
  pack_t(s.k, s.ldk, vec_end<S>(kn), D, s.scale, kt, Lk);
  pack_rows<S>(s.v, s.ldv, kn, Dv, vp);
  float inv[MR];
  for (int64_t i0 = 0; i0 < L; i0 += MR) {
    // keys [n, nv) of the strip: exactly 0 after the exp; keys [0, kb) are not computed (the
    // window's: 0 as well)
    const int64_t rows = std::min<int64_t>(MR, L - i0), n = ke[i0 / MR], nv = vec_end<S>(n);
    const int64_t kb = key_begin<S>(s, i0), nk = nv - kb;
    const float* m = s.mask ? s.mask + i0 * s.ldm + (s.one ? 0 : kb) : nullptr;
    float* st = strip + kb;
    prefetch_part(ahead, n_ahead, i0 / MR, (L + MR - 1) / MR);
    strip_block<S, Fin::Max>(rows, nk, D, s.q + i0 * s.ldq, s.ldq, kt + kb, Lk, m, s.ldm, s.one,
                             nullptr, st, Lk, lse + i0,  // lse = row max for now
                             cut_of(s, i0, kb));
    if (rows == MR) {
      exp_rows<S, MR>(st, Lk, nk, lse + i0, sum + i0);
    } else {
      for (int64_t r = 0; r < rows; ++r)
        exp_rows<S, 1>(st + r * Lk, Lk, nk, lse + i0 + r, sum + i0 + r);
    }
    for (int64_t r = 0; r < rows; ++r) inv[r] = 1.f / sum[i0 + r];
    gemm<S>(rows, Dv, n - kb, st, Lk, 1, vp + kb * Dv, Dv, {o + i0 * ldo, ldo, inv});
  }
  for (int64_t i = 0; i < L; ++i) lse[i] += fm::log(sum[i]);
}

// Rows [r0, r1) of a gradient [.., cols] that is 0 there: assigned, or left as it is.
inline void zero_rows(const Out& out, int64_t r0, int64_t r1, int64_t cols) {
  if (!out.add)
    for (int64_t r = r0; r < r1; ++r)
      std::fill(out.C + r * out.ldc, out.C + r * out.ldc + cols, 0.f);
}

// Whether rows [rows, cols] at p (row stride ld) hold anything but zeros (NaN counts).
inline bool any_nonzero(const float* p, int64_t ld, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      if (p[r * ld + c] != 0.f) return true;
  return false;
}

// Floats of scratch backward_slice needs: E [L, Lk], Kᵀ·scale [D, Lk], 1/rowsum(E) [L];
// dO/rowsum(E) [L, Dv] (dv); dS [L, Lk], Vᵀ [Dv, Lk], dense k [Lk, D], dense q [L, D] (ds);
// a block's 1 − tanh² [kMaxMR, Lk] (ds with a soft cap).
constexpr int kMaxMR = 8;
inline int64_t backward_floats(int64_t L, int64_t Lk, int64_t D, int64_t Dv, bool ds, bool dv,
                               bool cap = false) {
  return L * Lk + D * Lk + L + (dv ? L * Dv : 0) +
         (ds ? L * Lk + Dv * Lk + Lk * D + L * D + (cap ? kMaxMR * Lk : 0) : 0);
}

// C [kn, N] (into out) = Aᵀ · B over the rows of A that reach each key with a window: A [L, Lk]
// (row stride Lk: E or dS), B [L, N] (row stride N); key rows in blocks of MR, block [j0, j1)
// summing query rows [j0 − coff, j1 − 1 − coff + window) ∩ [0, qend) (the rows whose causal
// window holds one of its keys; A is 0 elsewhere in those columns, so this is exact: the dV
// and dK of a sliding window cost O(window), not O(L)).
template <class S>
inline void band_t(const Slice& s, int64_t kn, int64_t qend, int64_t N, const float* A,
                   const float* B, const Out& out) {
  constexpr int MR = Blk<S>::MR;
  const int64_t Lk = s.Lk;
  for (int64_t j0 = 0; j0 < kn; j0 += MR) {
    const int64_t rows = std::min<int64_t>(MR, kn - j0);
    const int64_t q0 = std::max<int64_t>(0, j0 - s.coff);
    const int64_t q1 = std::min<int64_t>(qend, j0 + rows - 1 - s.coff + s.window);
    const Out o{out.C + j0 * out.ldc, out.ldc, nullptr, out.add};
    if (q1 <= q0) {
      zero_rows(o, 0, rows, N);
      continue;
    }
    gemm<S>(rows, N, q1 - q0, A + q0 * Lk + j0, 1, Lk, B + q0 * N, N, o);
  }
}

// Backward of one slice (attention.cpp's header has the formulas), gradients into Out
// (add: beta 1). Per block of MR query rows, while its rows are in L1, over the keys the block
// keeps: E = exp(scale·q·kᵀ + mask − LSE) and its row sums, dP = dO·vᵀ, dS = scale·P∘(dP −
// Σⱼ Pᵢⱼ dPᵢⱼ), the block's dQ rows = dS·k. Then dV = Eᵀ·(dO/rowsum(E)) and dK = dSᵀ·q over
// all rows and the keys any block keeps.
template <class S>
void backward_slice(const Slice& s, const float* lse, const float* dO, int64_t lddo,
                    const Out* dq, const Out* dk, const Out* dv, float* scratch,
                    const Ahead* ahead = nullptr, int n_ahead = 0) {
  using V = typename S::V;
  constexpr int MR = Blk<S>::MR, W = S::W;
  const int64_t L = s.L, Lk = s.Lk, D = s.D, Dv = s.Dv;
  const bool ds_wanted = dq || dk;
  float* E = scratch;           // [L, Lk]
  float* kt = E + L * Lk;       // [D, Lk]
  float* inv = kt + D * Lk;     // [L]
  float* dOs = inv + L;         // [L, Dv] (dv)
  float* dS = nullptr;          // [L, Lk] (ds), then Vᵀ [Dv, Lk], k [Lk, D], q [L, D]
  float *vt = nullptr, *kc = nullptr, *qc = nullptr;
  float* dcap = nullptr;        // [MR, Lk] (ds with a soft cap): 1 − tanh² of a block
  static_assert(MR <= kMaxMR, "backward_floats sizes the soft cap's block for kMaxMR rows");
  int64_t ke[kMaxWindowed / 4];  // keys per row block, as in the forward
  const int64_t kn = key_ends<S>(s, MR, ke);
  // Row blocks whose dO rows are all 0 (positions the loss does not see: padding, or all but
  // [CLS] in a classifier's last layer): their dP, dS and dQ rows and their terms of dV and
  // dK are exactly 0 (for finite V), so they are skipped; dV and dK sum rows [0, qend).
  bool live[kMaxWindowed / 4];
  int64_t qend = 0;
  for (int64_t i0 = 0; i0 < L; i0 += MR) {
    const int64_t rows = std::min<int64_t>(MR, L - i0);
    live[i0 / MR] = any_nonzero(dO + i0 * lddo, lddo, rows, Dv);
    if (live[i0 / MR]) qend = i0 + rows;
  }
  pack_t(s.k, s.ldk, vec_end<S>(kn), D, s.scale, kt, Lk);
  if (ds_wanted) {
    dS = dOs + (dv ? L * Dv : 0);
    vt = dS + L * Lk;
    kc = vt + Dv * Lk;
    qc = kc + Lk * D;
    if (s.cap > 0.f) dcap = qc + L * D;
    pack_t(s.v, s.ldv, vec_end<S>(kn), Dv, 1.f, vt, Lk);
    pack_rows<S>(s.k, s.ldk, kn, D, kc);
    pack_rows<S>(s.q, s.ldq, qend, D, qc);
  }
  for (int64_t i0 = 0; i0 < L; i0 += MR) {
    // keys [n, nv) of E and dS: exactly 0 after the exp; keys [0, kb) not computed (a window's)
    const int64_t rows = std::min<int64_t>(MR, L - i0), n = ke[i0 / MR], nv = vec_end<S>(n);
    const int64_t kb = key_begin<S>(s, i0), nk = nv - kb;
    const float* m = s.mask ? s.mask + i0 * s.ldm + (s.one ? 0 : kb) : nullptr;
    float* e = E + i0 * Lk;
    prefetch_part(ahead, n_ahead, i0 / MR, (L + MR - 1) / MR);
    if (!live[i0 / MR]) {  // dQ rows 0; E, dS, dOs rows 0 where dV and dK read them
      if (dq) zero_rows(*dq, i0, i0 + rows, D);
      if (i0 < qend) {
        std::fill(e, e + rows * Lk, 0.f);
        if (ds_wanted) std::fill(dS + i0 * Lk, dS + (i0 + rows) * Lk, 0.f);
        if (dv) std::fill(dOs + i0 * Dv, dOs + (i0 + rows) * Dv, 0.f);
      }
      continue;
    }
    // P = E / rowsum(E): rowsum(E) is 1 up to LSE's rounding, and exactly what makes P
    // uniform in rows LSE cannot tell from their max (all keys masked with -3.4e38).
    strip_block<S, Fin::Exp>(rows, nk, D, s.q + i0 * s.ldq, s.ldq, kt + kb, Lk, m, s.ldm,
                             s.one, lse + i0, e + kb, Lk, inv + i0,
                             cut_of(s, i0, kb, dcap ? dcap + kb : nullptr));
    // keys [nv, kn) that other blocks keep: E and dS 0 there for the dV and dK products; with
    // a window, only the keys band_t's key blocks read: [z0, kb) before the block's strip and
    // [nv, z1) after it (the key blocks holding a key within MR − 1 of a row's window)
    const int64_t z0 = std::max<int64_t>(0, i0 + s.coff - s.window - MR + 2);
    const int64_t z1 = s.window > 0 ? std::min<int64_t>(kn, i0 + rows - 1 + s.coff + MR) : kn;
    for (int64_t r = 0; r < rows; ++r) {
      if (nv < z1) std::fill(e + r * Lk + nv, e + r * Lk + z1, 0.f);
      if (nv < z1 && ds_wanted) std::fill(dS + (i0 + r) * Lk + nv, dS + (i0 + r) * Lk + z1, 0.f);
      if (s.window > 0 && z0 < kb) {
        std::fill(e + r * Lk + z0, e + r * Lk + kb, 0.f);
        if (ds_wanted) std::fill(dS + (i0 + r) * Lk + z0, dS + (i0 + r) * Lk + kb, 0.f);
      }
    }
    for (int64_t r = 0; r < rows; ++r) inv[i0 + r] = 1.f / inv[i0 + r];
    const float* go = dO + i0 * lddo;
    if (dv)
      for (int64_t r = 0; r < rows; ++r) {
        const V c = S::set1(inv[i0 + r]);
        for (int64_t j = 0; j < Dv; j += W)
          S::store(dOs + (i0 + r) * Dv + j, S::mul(S::load(go + r * lddo + j), c));
      }
    if (!ds_wanted) continue;
    float* g = dS + i0 * Lk;
    float dot[MR];
    // dP = dO·vᵀ with its row dots Σⱼ Eᵢⱼ dPᵢⱼ
    strip_block<S, Fin::Dot>(rows, nk, Dv, go, lddo, vt + kb, Lk, nullptr, 0, false, e + kb,
                             g + kb, Lk, dot);
    // (times 1 − tanh² with a soft cap: dS of the scaled product under the cap)
    const float* dc = dcap ? dcap + kb : nullptr;
    if (rows == MR) {
      ds_rows<S, MR>(g + kb, e + kb, Lk, nk, inv + i0, dot, s.scale, dc);
    } else {
      for (int64_t r = 0; r < rows; ++r)
        ds_rows<S, 1>(g + r * Lk + kb, e + r * Lk + kb, Lk, nk, inv + i0 + r, dot + r, s.scale,
                      dc ? dc + r * Lk : nullptr);
    }
    if (dq)  // dQ rows [rows, D] = dS rows · k
      gemm<S>(rows, D, n - kb, g + kb, Lk, 1, kc + kb * D, D,
              {dq->C + i0 * dq->ldc, dq->ldc, nullptr, dq->add});
  }
  if (dv) {  // dV [Lk, Dv] = Eᵀ · dOs
    if (s.window > 0) band_t<S>(s, kn, qend, Dv, E, dOs, *dv);
    else gemm<S>(kn, Dv, qend, E, 1, Lk, dOs, Dv, *dv);
    zero_rows(*dv, kn, Lk, Dv);
  }
  if (dk) {  // dK [Lk, D] = dSᵀ · q
    if (s.window > 0) band_t<S>(s, kn, qend, D, dS, qc, *dk);
    else gemm<S>(kn, D, qend, dS, 1, Lk, qc, D, *dk);
    zero_rows(*dk, kn, Lk, D);
  }
}

}  // namespace attn
}  // namespace pyedge
