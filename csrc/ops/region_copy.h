// Strided N-d copies, the one kernel behind the layout ops (Transpose, Concat, Split, Slice,
// Tile, Pad): for every index i of `shape`,
//     dst[doff + sum_k i_k * ds_k]  =  (or +=)  src[soff + sum_k i_k * ss_k]
// Strides are in elements and may be negative (Slice with negative steps) or zero (Tile).
// A Region is built once at plan time (axes coalesced, size-1 axes dropped); running it does
// no allocation and no per-element division.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/parallel.h"
#include "tensor/tensor.h"

namespace pyedge {

struct Region {
  static constexpr int kMaxRank = 16;
  int rank = 1;
  int64_t n = 0;  // number of elements
  int64_t shape[kMaxRank] = {1};
  int64_t ds[kMaxRank] = {0};
  int64_t ss[kMaxRank] = {0};
  int64_t doff = 0, soff = 0;
  // Axis a < rank-1 with ss[a] == 1 while the innermost src stride is not 1 (a transpose of
  // the two innermost "contiguous" axes): copied in cache-sized tiles.
  int tile_axis = -1;

  static Region make(const Shape& shape, const std::vector<int64_t>& ds,
                     const std::vector<int64_t>& ss, int64_t doff = 0, int64_t soff = 0) {
    Region r;
    r.doff = doff;
    r.soff = soff;
    r.n = numel(shape);
    if (r.n == 0) return r;
    std::vector<int64_t> sh, d, s;
    for (size_t k = 0; k < shape.size(); ++k) {
      if (shape[k] == 1) continue;
      if (!sh.empty() && d.back() == ds[k] * shape[k] && s.back() == ss[k] * shape[k]) {
        sh.back() *= shape[k];  // axis k continues the previous one in both tensors
        d.back() = ds[k];
        s.back() = ss[k];
        continue;
      }
      sh.push_back(shape[k]);
      d.push_back(ds[k]);
      s.push_back(ss[k]);
    }
    if (sh.empty()) { sh = {1}; d = {1}; s = {1}; }
    PYEDGE_CHECK(sh.size() <= size_t(kMaxRank), "tensor layout of rank ", sh.size(),
                 " is too complex (at most ", kMaxRank, " non-mergeable axes)");
    r.rank = int(sh.size());
    for (int k = 0; k < r.rank; ++k) { r.shape[k] = sh[k]; r.ds[k] = d[k]; r.ss[k] = s[k]; }
    int last = r.rank - 1;
    if (r.ds[last] == 1 && r.ss[last] != 1)
      for (int k = last - 1; k >= 0; --k)
        if (r.ss[k] == 1) { r.tile_axis = k; break; }
    return r;
  }
};

// Row-major strides of a contiguous tensor.
inline std::vector<int64_t> contiguous_strides(const Shape& s) {
  std::vector<int64_t> st(s.size());
  int64_t acc = 1;
  for (size_t k = s.size(); k-- > 0;) { st[k] = acc; acc *= s[k]; }
  return st;
}

namespace region_detail {
constexpr int64_t kGrain = 1 << 15;  // elements per parallel chunk, at least
constexpr int64_t kTile = 32;

template <typename T, bool Acc>
inline void put(T* d, T v) {
  if constexpr (Acc) *d += v; else *d = v;
}

// d[i*da + j] (=|+=) s[i + j*sl] for i < ni, j < nj: a small transposed block.
template <typename T, bool Acc>
inline void block_scalar(T* d, int64_t da, const T* s, int64_t sl, int64_t ni, int64_t nj) {
  for (int64_t i = 0; i < ni; ++i)
    for (int64_t j = 0; j < nj; ++j) put<T, Acc>(d + i * da + j, s[i + j * sl]);
}

// The same for a 4x4 block in vector registers (GCC/Clang vector extensions: SSE, NEON).
template <typename T, bool Acc>
inline void block4(T* d, int64_t da, const T* s, int64_t sl) {
  typedef T V __attribute__((vector_size(4 * sizeof(T))));
  V r0, r1, r2, r3;  // rows j..j+3 of the source, each 4 consecutive i
  std::memcpy(&r0, s, sizeof(V));
  std::memcpy(&r1, s + sl, sizeof(V));
  std::memcpy(&r2, s + 2 * sl, sizeof(V));
  std::memcpy(&r3, s + 3 * sl, sizeof(V));
  V t0 = __builtin_shufflevector(r0, r1, 0, 4, 1, 5);
  V t1 = __builtin_shufflevector(r0, r1, 2, 6, 3, 7);
  V t2 = __builtin_shufflevector(r2, r3, 0, 4, 1, 5);
  V t3 = __builtin_shufflevector(r2, r3, 2, 6, 3, 7);
  V c[4] = {__builtin_shufflevector(t0, t2, 0, 1, 4, 5), __builtin_shufflevector(t0, t2, 2, 3, 6, 7),
            __builtin_shufflevector(t1, t3, 0, 1, 4, 5), __builtin_shufflevector(t1, t3, 2, 3, 6, 7)};
  for (int ii = 0; ii < 4; ++ii) {
    if constexpr (Acc) {
      V o;
      std::memcpy(&o, d + ii * da, sizeof(V));
      o += c[ii];
      std::memcpy(d + ii * da, &o, sizeof(V));
    } else {
      std::memcpy(d + ii * da, &c[ii], sizeof(V));
    }
  }
}

// Transpose-like regions: dst inner stride 1, src stride 1 along tile_axis. Tiles of
// kTile x kTile keep both sides in L1; 4-byte and 8-byte elements go 4x4 through registers.
template <typename T, bool Acc>
void run_tiled(const Region& R, T* dst, const T* src) {
  const int last = R.rank - 1, a = R.tile_axis;
  const int64_t L = R.shape[last], M = R.shape[a];
  const int64_t sl = R.ss[last], da = R.ds[a];
  const int64_t tiles_a = (M + kTile - 1) / kTile;
  const int64_t outer = R.n / (L * M);
  parallel_for(outer * tiles_a, std::max<int64_t>(1, kGrain / (kTile * L)),
               [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      int64_t o = w / tiles_a, ta = w % tiles_a;
      int64_t d = R.doff, s = R.soff;
      for (int k = last - 1; k >= 0; --k) {  // outer axes: all but a and last
        if (k == a) continue;
        int64_t i = o % R.shape[k];
        o /= R.shape[k];
        d += i * R.ds[k];
        s += i * R.ss[k];
      }
      const int64_t i0 = ta * kTile, i1 = std::min(M, i0 + kTile);
      for (int64_t j0 = 0; j0 < L; j0 += kTile) {
        const int64_t j1 = std::min(L, j0 + kTile);
        T* db = dst + d + i0 * da + j0;
        const T* sb = src + s + i0 + j0 * sl;
        int64_t ni = i1 - i0, nj = j1 - j0;
        if constexpr (sizeof(T) >= 4) {
          int64_t ni4 = ni & ~int64_t(3), nj4 = nj & ~int64_t(3);
          for (int64_t i = 0; i < ni4; i += 4)
            for (int64_t j = 0; j < nj4; j += 4)
              block4<T, Acc>(db + i * da + j, da, sb + i + j * sl, sl);
          block_scalar<T, Acc>(db + nj4, da, sb + nj4 * sl, sl, ni4, nj - nj4);
          block_scalar<T, Acc>(db + ni4 * da, da, sb + ni4, sl, ni - ni4, nj);
        } else {
          block_scalar<T, Acc>(db, da, sb, sl, ni, nj);
        }
      }
    }
  });
}

template <typename T, bool Acc>
void run(const Region& R, T* dst, const T* src) {
  if (R.n == 0) return;
  if (R.tile_axis >= 0) { run_tiled<T, Acc>(R, dst, src); return; }
  const int last = R.rank - 1;
  const int64_t L = R.shape[last], dl = R.ds[last], sl = R.ss[last];
  const int64_t rows = R.n / L;
  parallel_for(rows, std::max<int64_t>(1, kGrain / L), [&](int64_t b, int64_t e) {
    int64_t idx[Region::kMaxRank];
    int64_t d = R.doff, s = R.soff, rem = b;
    for (int k = last - 1; k >= 0; --k) {
      idx[k] = rem % R.shape[k];
      rem /= R.shape[k];
      d += idx[k] * R.ds[k];
      s += idx[k] * R.ss[k];
    }
    for (int64_t row = b; row < e; ++row) {
      T* dp = dst + d;
      const T* sp = src + s;
      if (dl == 1 && sl == 1) {
        if constexpr (Acc) {
          for (int64_t j = 0; j < L; ++j) dp[j] += sp[j];
        } else {
          std::memcpy(dp, sp, size_t(L) * sizeof(T));
        }
      } else {
        for (int64_t j = 0; j < L; ++j) put<T, Acc>(dp + j * dl, sp[j * sl]);
      }
      for (int k = last - 1; k >= 0; --k) {  // odometer over the row index
        d += R.ds[k];
        s += R.ss[k];
        if (++idx[k] < R.shape[k]) break;
        d -= R.ds[k] * R.shape[k];
        s -= R.ss[k] * R.shape[k];
        idx[k] = 0;
      }
    }
  });
}
}  // namespace region_detail

// dst = src over the region, any dtype (bytes are moved by element size).
inline void copy_region(const Region& R, size_t esize, void* dst, const void* src) {
  switch (esize) {
    case 1: region_detail::run<uint8_t, false>(R, static_cast<uint8_t*>(dst),
                                               static_cast<const uint8_t*>(src)); break;
    case 2: region_detail::run<uint16_t, false>(R, static_cast<uint16_t*>(dst),
                                                static_cast<const uint16_t*>(src)); break;
    case 4: region_detail::run<uint32_t, false>(R, static_cast<uint32_t*>(dst),
                                                static_cast<const uint32_t*>(src)); break;
    case 8: region_detail::run<uint64_t, false>(R, static_cast<uint64_t*>(dst),
                                                static_cast<const uint64_t*>(src)); break;
    default: PYEDGE_CHECK(false, "internal: element size ", esize);
  }
}

// dst += src over the region (float32 gradients). The caller guarantees distinct dst
// positions for distinct region indices (no stride-0 dst axes), so rows run in parallel.
inline void add_region(const Region& R, float* dst, const float* src) {
  region_detail::run<float, true>(R, dst, src);
}

}  // namespace pyedge
