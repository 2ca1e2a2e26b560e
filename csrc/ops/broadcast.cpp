#include "ops/broadcast.h"

#include <algorithm>

namespace pyedge {

Shape broadcast_shapes(const NodeInfo& n, const std::vector<Shape>& shapes) {
  size_t rank = 0;
  for (auto& s : shapes) rank = std::max(rank, s.size());
  Shape out(rank, 1);
  for (size_t i = 0; i < shapes.size(); ++i) {
    const Shape& s = shapes[i];
    size_t pad = rank - s.size();
    for (size_t d = 0; d < s.size(); ++d) {
      int64_t& o = out[pad + d];
      if (s[d] == o || s[d] == 1) continue;
      if (o == 1) {
        o = s[d];
        continue;
      }
      std::string all;
      for (size_t j = 0; j < shapes.size(); ++j) all += (j ? " and " : "") + shape_str(shapes[j]);
      throw Error(str_cat(n.where(), ": input shapes ", all,
                          " cannot be broadcast together (dimension ", int64_t(d) - int64_t(s.size()),
                          ": ", s[d], " vs ", o, ")"));
    }
  }
  return out;
}

namespace {
// Input shape left-padded with 1s to `rank`, and its C-contiguous strides.
void padded(const Shape& s, size_t rank, Shape& dims, Shape& strides) {
  dims.assign(rank - s.size(), 1);
  dims.insert(dims.end(), s.begin(), s.end());
  strides.assign(rank, 1);
  for (size_t d = rank; d-- > 1;) strides[d - 1] = strides[d] * dims[d];
}
}  // namespace

Broadcast::Broadcast(const NodeInfo& n, const std::vector<Shape>& shapes, const Shape& out)
    : out_shape(out), total(numel(out)), n_in(int(shapes.size())) {
  PYEDGE_CHECK(n_in >= 1 && n_in <= kMaxIn, "internal: Broadcast takes 1..3 inputs");
  const size_t rank = out.size();
  std::vector<Shape> pd(static_cast<size_t>(n_in)), ps(static_cast<size_t>(n_in));
  for (int k = 0; k < n_in; ++k) {
    PYEDGE_CHECK(shapes[size_t(k)].size() <= rank, n.where(), ": input ", k, " of shape ",
                 shape_str(shapes[size_t(k)]), " has more dims than the output ", shape_str(out));
    padded(shapes[size_t(k)], rank, pd[size_t(k)], ps[size_t(k)]);
    for (size_t d = 0; d < rank; ++d)
      PYEDGE_CHECK(pd[size_t(k)][d] == out[d] || pd[size_t(k)][d] == 1, n.where(), ": shape ",
                   shape_str(shapes[size_t(k)]), " cannot be broadcast to ", shape_str(out));
  }
  nd = 0;
  unsigned prev_pattern = ~0u;
  for (size_t d = 0; d < rank; ++d) {
    if (out[d] == 1) continue;  // contributes nothing to offsets
    unsigned pattern = 0;
    for (int k = 0; k < n_in; ++k)
      if (pd[size_t(k)][d] == 1) pattern |= 1u << k;
    if (nd > 0 && pattern == prev_pattern) {
      // Same broadcast pattern as the dim outside: fuse (inputs are contiguous across both).
      dims[size_t(nd - 1)] *= out[d];
      for (int k = 0; k < n_in; ++k)
        stride[size_t(nd - 1)][size_t(k)] = (pattern >> k & 1u) ? 0 : ps[size_t(k)][d];
      continue;
    }
    PYEDGE_CHECK(nd < kMaxMergedDims, n.where(), ": broadcast pattern too complex (more than ",
                 kMaxMergedDims, " alternating dims)");
    dims[size_t(nd)] = out[d];
    for (int k = 0; k < n_in; ++k)
      stride[size_t(nd)][size_t(k)] = (pattern >> k & 1u) ? 0 : ps[size_t(k)][d];
    prev_pattern = pattern;
    ++nd;
  }
  if (nd == 0) {  // every dim is 1: a single element
    nd = 1;
    dims[0] = 1;
    stride[0] = {0, 0, 0};
  }
}

float sum_floats(const float* p, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += p[i + j];
  float s = 0.f;
  for (int j = 0; j < 16; ++j) s += acc[j];
  for (; i < n; ++i) s += p[i];
  return s;
}

ReducePlan::ReducePlan(const Shape& out, const Shape& in) : total_(numel(out)), dst_n_(numel(in)) {
  const size_t rank = out.size();
  Shape pd, ps_unused, gs;
  padded(in, rank, pd, ps_unused);
  padded(out, rank, ps_unused, gs);  // g is out-shaped: its strides
  // Merged dims: (size, g stride, kept?)
  int64_t md[64], mstr[64];
  bool mk[64];
  int m = 0;
  for (size_t d = 0; d < rank; ++d) {
    if (out[d] == 1) continue;
    bool kept = pd[d] != 1;
    if (m > 0 && mk[m - 1] == kept) {
      md[m - 1] *= out[d];
      mstr[m - 1] = gs[d];
      continue;
    }
    PYEDGE_CHECK(m < kMaxMergedDims, "broadcast pattern too complex (more than ", kMaxMergedDims,
                 " alternating dims)");
    md[m] = out[d];
    mstr[m] = gs[d];
    mk[m] = kept;
    ++m;
  }
  identity_ = true;
  for (int i = 0; i < m; ++i) identity_ = identity_ && mk[i];
  if (identity_) return;
  inner_kept_ = mk[m - 1];
  inner_ = md[m - 1];
  for (int i = 0; i < m - 1; ++i) {
    if (mk[i]) {
      kdim_[nk_] = md[i];
      kstr_[nk_++] = mstr[i];
    } else {
      rdim_[nr_] = md[i];
      rstr_[nr_++] = mstr[i];
    }
  }
}

namespace {
// Calls f(offset) for every combination of the dims (sizes `dim`, strides `str`), row-major.
template <typename F>
inline void for_combos(int n, const int64_t* dim, const int64_t* str, F&& f) {
  int64_t count = 1;
  for (int d = 0; d < n; ++d) count *= dim[d];
  int64_t cnt[kMaxMergedDims] = {0};
  int64_t off = 0;
  for (int64_t t = 0; t < count; ++t) {
    f(off);
    for (int d = n - 1; d >= 0; --d) {
      off += str[d];
      if (++cnt[d] < dim[d]) break;
      cnt[d] = 0;
      off -= str[d] * dim[d];
    }
  }
}
// Offset in g of kept-index j (row-major over the kept dims).
inline int64_t kept_offset(int64_t j, int n, const int64_t* dim, const int64_t* str) {
  int64_t off = 0;
  for (int d = n - 1; d >= 0; --d) {
    off += (j % dim[d]) * str[d];
    j /= dim[d];
  }
  return off;
}
}  // namespace

void ReducePlan::accumulate(const float* g, float* dst, float alpha, bool assign) const {
  if (total_ <= 0) {
    if (assign) std::fill(dst, dst + dst_n_, 0.f);
    return;
  }
  if (identity_) {
    parallel_for(total_, 1 << 15, [&](int64_t b, int64_t e) {
      if (assign)
        for (int64_t i = b; i < e; ++i) dst[i] = alpha * g[i];
      else
        for (int64_t i = b; i < e; ++i) dst[i] += alpha * g[i];
    });
    return;
  }
  // Reduced: dst is smaller than g; clearing it first keeps one summation path.
  if (assign) std::fill(dst, dst + dst_n_, 0.f);
  if (dst_n_ == 1) {
    // Everything reduces to one value: fixed chunks (result independent of thread count).
    constexpr int64_t kChunk = 1 << 15;
    const int64_t nchunks = std::min<int64_t>(64, (total_ + kChunk - 1) / kChunk);
    const int64_t per = (total_ + nchunks - 1) / nchunks;
    double part[64];
    parallel_for(nchunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        int64_t lo = c * per, hi = std::min(total_, lo + per);
        part[c] = hi > lo ? sum_floats(g + lo, hi - lo) : 0.f;
      }
    });
    double s = 0;
    for (int64_t c = 0; c < nchunks; ++c) s += part[c];
    dst[0] += float(alpha * s);
    return;
  }
  const int64_t per_dst = total_ / dst_n_;  // elements summed into each dst element
  if (!inner_kept_) {
    // Each dst element sums runs of inner_ contiguous values: parallel over dst elements.
    parallel_for(dst_n_, std::max<int64_t>(1, (1 << 15) / per_dst), [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        const float* base = g + kept_offset(j, nk_, kdim_, kstr_);
        float s = 0.f;
        for_combos(nr_, rdim_, rstr_, [&](int64_t off) { s += sum_floats(base + off, inner_); });
        dst[j] += alpha * s;
      }
    });
    return;
  }
  // Innermost dim kept (bias pattern [.., C] -> [C]): each worker owns a column block of a
  // dst row and adds every reduced row into it.
  const int64_t nouter = dst_n_ / inner_;
  const int nt = num_threads();
  int64_t cs = inner_;
  if (nouter < nt && inner_ > 128)
    cs = std::max<int64_t>(64, ((inner_ + nt - 1) / nt + 15) / 16 * 16);
  const int64_t nchunk = (inner_ + cs - 1) / cs;
  const int64_t items = nouter * nchunk;
  parallel_for(items, std::max<int64_t>(1, (1 << 15) / (per_dst * cs)), [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      const int64_t j = w / nchunk, c0 = (w % nchunk) * cs, c1 = std::min(inner_, c0 + cs);
      const float* base = g + kept_offset(j, nk_, kdim_, kstr_) + c0;
      float* d = dst + j * inner_ + c0;
      const int64_t len = c1 - c0;
      for_combos(nr_, rdim_, rstr_, [&](int64_t off) {
        const float* p = base + off;
        for (int64_t i = 0; i < len; ++i) d[i] += alpha * p[i];
      });
    }
  });
}

}  // namespace pyedge
