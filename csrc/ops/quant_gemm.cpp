#include "ops/quant_gemm.h"

#include <algorithm>

#include "common/parallel.h"
#include "common/simd.h"
#include "ops/blas.h"

namespace pyedge {

QuantWeight view(const QuantWeightSpec& spec, const std::vector<Tensor>& in) {
  QuantWeight w;
  w.spec = &spec;
  w.packed = in[size_t(spec.in_packed)].ptr<uint8_t>();
  w.scales = in[size_t(spec.in_scales)].ptr<float>();
  if (spec.in_zp >= 0) {
    if (spec.zp_float) w.zp_float = in[size_t(spec.in_zp)].ptr<float>();
    else w.zp_packed = in[size_t(spec.in_zp)].ptr<uint8_t>();
  }
  return w;
}

const float* bnb4_codebook(int quant_type) {
  // Values as onnxruntime's MatMulBnb4 decodes them (probed code by code, the table in
  // tests/test_quant_ops.py): FP4 = bitsandbytes' sign + 3-bit float, NF4 = QLoRA's normal
  // quantiles.
  static const float kFp4[16] = {0.f, 0.00520833349f, 0.666666687f, 1.f, 0.333333343f, 0.5f,
                                 0.166666672f, 0.25f, -0.f, -0.00520833349f, -0.666666687f,
                                 -1.f, -0.333333343f, -0.5f, -0.166666672f, -0.25f};
  static const float kNf4[16] = {-1.f, -0.696192801f, -0.525073051f, -0.394917488f,
                                 -0.284441382f, -0.18477343f, -0.0910500363f, 0.f,
                                 0.0795802996f, 0.160930201f, 0.246112302f, 0.337915242f,
                                 0.440709829f, 0.562617004f, 0.722956836f, 1.f};
  return quant_type == 0 ? kFp4 : kNf4;
}

namespace {

float nbits_zero_point(const QuantWeight& w, int64_t n, int64_t b) {
  const QuantWeightSpec& s = *w.spec;
  if (w.zp_float) return w.zp_float[n * s.n_blocks + b];
  if (!w.zp_packed) return float(1 << (s.bits - 1));
  const uint8_t* row = w.zp_packed + n * s.zp_row_bytes;
  if (s.bits == 8) return float(row[b]);
  const unsigned byte = row[b >> 1];
  return float((b & 1) ? byte >> 4 : byte & 15u);
}

// A block's 16-entry table, a whole vector at a time (one AVX-512 op): lut[q] = (q − zp)·scale
// (a = 0..15, off = zp) or code[q]·absmax (a = code, off = 0); the same two IEEE operations
// as the scalar formula, so every width gives the same table.
void block_lut(const float* a, float off, float scale, float* lut) {
  using S = simd::Native;
  static_assert(16 % S::W == 0, "16 table entries in whole vectors");
  for (int q = 0; q < 16; q += S::W)
    S::store(lut + q, S::mul(S::sub(S::load(a + q), S::set1(off)), S::set1(scale)));
}
constexpr float kIota16[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// Row n of a MatMulNBits weight, columns [k0, k1), block by block.
void nbits_row(const QuantWeight& w, int64_t n, int64_t k0, int64_t k1, float* out,
               qk::Path path) {
  const QuantWeightSpec& s = *w.spec;
  for (int64_t k = k0; k < k1;) {
    const int64_t b = k / s.block, e = std::min(k1, (b + 1) * s.block);
    int64_t j = k - b * s.block, cnt = e - k;
    const float scale = w.scales[n * s.n_blocks + b], zp = nbits_zero_point(w, n, b);
    const uint8_t* blob = w.packed + (n * s.n_blocks + b) * s.blob;
    float* o = out + (k - k0);
    if (s.bits == 8) {
      qk::u8(path, blob + j, cnt, zp, scale, o);
    } else {
      float lut[16];
      block_lut(kIota16, zp, scale, lut);
      if (j & 1) {  // the run starts at a high nibble
        *o++ = lut[blob[j >> 1] >> 4];
        ++j, --cnt;
      }
      qk::lut4<false>(path, blob + (j >> 1), cnt, lut, o);
    }
    k = e;
  }
}

// Row n of a MatMulBnb4 weight, columns [k0, k1): blocks run over the flattened index n·K + k.
void bnb4_row(const QuantWeight& w, int64_t n, int64_t k0, int64_t k1, float* out,
              qk::Path path) {
  const QuantWeightSpec& s = *w.spec;
  const float* code = bnb4_codebook(s.quant_type);
  const int64_t base = n * s.K;
  for (int64_t f = base + k0, fe = base + k1; f < fe;) {
    const int64_t blk = f / s.block, e = std::min(fe, (blk + 1) * s.block);
    int64_t cnt = e - f;
    const float absmax = w.scales[blk];
    float lut[16];
    block_lut(code, 0.f, absmax, lut);  // code[q] − 0 is exact: code[q]·absmax
    float* o = out + (f - base - k0);
    const uint8_t* p = w.packed + (f >> 1);
    if (f & 1) {  // the run starts at a low (second) nibble
      *o++ = lut[*p & 15u];
      ++p, --cnt;
    }
    qk::lut4<true>(path, p, cnt, lut, o);
    f = e;
  }
}

// Floats of one part's panel buffer: 128 Ki floats (512 KiB), about one core's L2, so a panel
// is written by the dequantization and read by the GEMM's packing while still in cache.
constexpr int64_t kPanelFloats = 128 * 1024;
constexpr int64_t kMaxOutTile = 512, kMaxParts = 16;

// Walks a part's output range [lo, hi) in tiles of t.out_tile, and each tile's reduction
// range [0, red) in tiles of t.red_tile: f(o0, o1, r0, r1, beta) with beta = `beta` for the
// first reduction tile (fresh output or accumulate) and 1 after it.
template <typename F>
void walk_part(const QuantGemmTiling& t, int64_t lo, int64_t hi, int64_t red, float beta, F&& f) {
  for (int64_t o0 = lo; o0 < hi; o0 += t.out_tile) {
    const int64_t o1 = std::min(hi, o0 + t.out_tile);
    for (int64_t r0 = 0; r0 < red; r0 += t.red_tile)
      f(o0, o1, r0, std::min(red, r0 + t.red_tile), r0 == 0 ? beta : 1.f);
  }
}

// Parts in one chunk (on the calling thread) when the whole product is small: waking a second
// thread costs more than it saves there (~0.5 ms on a busy 2-core machine against 0.02 ms of
// work for Qwen2.5-0.5B's k/v projection at M = 1). Work counts the dequantization of each
// weight as 8 multiply-adds.
int64_t part_grain(const QuantGemmTiling& t, int64_t M, int64_t N, int64_t K) {
  return (double(M) + 8.0) * double(N) * double(K) < double(1 << 21) ? t.parts : 1;
}

// Part p's rows [m0, m1) of X and output columns [lo, hi) of `out` columns.
struct PartRange {
  int64_t m0, m1, lo, hi;
};
PartRange part_range(const QuantGemmTiling& t, int64_t p, int64_t M, int64_t out) {
  if (t.narrow && M >= 64 * t.parts)
    return {M * p / t.parts, M * (p + 1) / t.parts, 0, out};
  return {0, M, out * p / t.parts, out * (p + 1) / t.parts};
}

}  // namespace

void dequantize_panel(const QuantWeight& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1,
                      float* out, int64_t ldo, qk::Path path) {
  const bool nbits = w.spec->format == QuantFormat::nbits;
  for (int64_t n = n0; n < n1; ++n) {
    if (nbits) nbits_row(w, n, k0, k1, out + (n - n0) * ldo, path);
    else bnb4_row(w, n, k0, k1, out + (n - n0) * ldo, path);
  }
}

QuantGemmTiling quant_gemm_tiling(int64_t out_dim, int64_t red_dim) {
  // Parts split the output dimension (at least 16 columns each); within a part the output
  // tile is as wide as allowed (the GEMM re-packs X's [M, red_tile] slice once per output
  // tile: the wider the tile, the rarer), the reduction tile fills the panel budget. The
  // tiles do not depend on M: at M = 1024 dequantizing costs ~0.5% of the float GEMM
  // (bench/quant_micro.py), and at M = 1 the panels are what streams from memory anyway.
  QuantGemmTiling t;
  t.parts = std::max<int64_t>(
      1, std::min<int64_t>({int64_t(num_threads()), kMaxParts, (out_dim + 15) / 16}));
  const int64_t per_part = (out_dim + t.parts - 1) / t.parts;
  t.narrow = t.parts > 1 && per_part < 128;
  t.out_tile = std::max<int64_t>(1, std::min(t.narrow ? out_dim : per_part, kMaxOutTile));
  t.red_tile = std::min(red_dim, std::max<int64_t>(16, kPanelFloats / t.out_tile / 16 * 16));
  t.red_tile = std::max<int64_t>(1, t.red_tile);
  return t;
}

void quant_gemm_xwt(const QuantWeight& w, int64_t M, const float* X, float beta, float* Y,
                    int64_t ldy, const QuantGemmTiling& t, float* scratch) {
  const int64_t K = w.spec->K, N = w.spec->N;
  if (M == 0 || N == 0) return;
  if (K == 0 && beta == 0.f)
    for (int64_t i = 0; i < M; ++i) std::fill(Y + i * ldy, Y + i * ldy + N, 0.f);
  parallel_for(t.parts, part_grain(t, M, N, K), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* panel = scratch + p * t.out_tile * t.red_tile;  // W[n0:n1, k0:k1], ld k1 - k0
      const PartRange r = part_range(t, p, M, N);
      walk_part(t, r.lo, r.hi, K, beta,
                [&](int64_t n0, int64_t n1, int64_t k0, int64_t k1, float b) {
                  dequantize_panel(w, n0, n1, k0, k1, panel, k1 - k0);
                  // Y[m0:m1, n0:n1] (+)= X[m0:m1, k0:k1] · panelᵀ
                  sgemm(false, true, r.m1 - r.m0, n1 - n0, k1 - k0, 1.f, X + r.m0 * K + k0, K,
                        panel, k1 - k0, b, Y + r.m0 * ldy + n0, ldy);
                });
    }
  });
}

void quant_gemm_xw(const QuantWeight& w, int64_t M, const float* dY, float beta, float* dX,
                   const QuantGemmTiling& t, float* scratch) {
  const int64_t K = w.spec->K, N = w.spec->N;
  if (M == 0 || K == 0) return;
  if (N == 0 && beta == 0.f) std::fill(dX, dX + M * K, 0.f);
  parallel_for(t.parts, part_grain(t, M, N, K), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* panel = scratch + p * t.out_tile * t.red_tile;  // W[n0:n1, k0:k1], ld k1 - k0
      const PartRange r = part_range(t, p, M, K);
      walk_part(t, r.lo, r.hi, N, beta,
                [&](int64_t k0, int64_t k1, int64_t n0, int64_t n1, float b) {
                  dequantize_panel(w, n0, n1, k0, k1, panel, k1 - k0);
                  // dX[m0:m1, k0:k1] (+)= dY[m0:m1, n0:n1] · panel
                  sgemm(false, false, r.m1 - r.m0, k1 - k0, n1 - n0, 1.f, dY + r.m0 * N + n0, N,
                        panel, k1 - k0, b, dX + r.m0 * K + k0, K);
                });
    }
  });
}

}  // namespace pyedge
