// pyedge.CachedAttention: causal attention of L new positions over a key/value cache, for
// incremental decoding (inference only: no backward).
//   inputs  Q [B,H,L,D], K [B,Hkv,L,D], V [B,Hkv,L,Dv]   (layout "bhld" or "blhd", as in
//           pyedge.Attention: the new positions' queries, keys and values, after rotary)
//           cache_k [B,Hkv,T,D], cache_v [B,Hkv,T,Dv]    (always "bhld": row t = position t)
//           past    int64 (1 element)                    (positions already in the cache)
//   output  O [B,H,L,Dv] in out_layout (default: layout)
// Forward: K and V are written into cache rows [past, past + L) IN PLACE, then query row i
// (position past + i) attends to cache rows 0 .. past + i (the causal mask aligned to the
// bottom right, as pyedge.Attention's causal flag with Lk = past + L):
//   O[b,h,i] = softmax_j(scale · Q[b,h,i] · cache_k[b,h/G,j]) · cache_v[b,h/G,j],  j <= past + i
// window = w > 0: row i attends to cache rows (past + i − w, past + i] only (pyedge.Attention's
// window at absolute positions: the sliding window of Mistral, Gemma 2/3); softcap = c > 0:
// scores c·tanh(scale·q·k / c) (Gemma 2), as in pyedge.Attention. With a window a step reads
// w rows of the cache, not past + 1.
// Why state in the inputs: the caches are buffers the caller owns (pyedge/kv_cache.py binds
// the same numpy arrays to every run), so a decoding step costs its L new rows, not the
// prefix; and `past` is a value read at run time, not a shape, so one plan (one input-shape
// signature) serves every decoding step whatever the length so far.
// Grouped-query heads: query head h reads key/value head h / (H / Hkv), never expanded.
// Per (b, h) slice, query rows in blocks of at most kRows: S = scale · Q·Kᵀ over the keys the
// block's last row sees (BLAS), each row's softmax over its own keys (later keys set to 0),
// O = (P · V) / l. Threads take whole slices with a scratch block each; every sum runs in a
// fixed order per slice, so results do not depend on the thread count.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/parallel.h"
#include "ops/attention_kernels.h"
#include "ops/blas.h"
#include "ops/op.h"
#include "ops/softmax_kernels.h"

namespace pyedge {
namespace {

constexpr int64_t kRows = 64;  // query rows per score block: scratch kRows × T per thread

struct Strides {  // in floats, of a [B, heads, rows, cols] operand in either layout
  int64_t b = 0, h = 0, r = 0;
  int64_t at(int64_t bi, int64_t hi) const { return bi * b + hi * h; }
};

Strides strides_of(bool blhd, int64_t heads, int64_t rows, int64_t cols) {
  if (blhd) return {rows * heads * cols, cols, heads * cols};
  return {heads * rows * cols, rows * cols, cols};
}

class CachedAttention : public Op {
 public:
  CachedAttention(const NodeInfo& n, const std::vector<Tensor>& in) : where_(n.where()) {
    check_num_inputs(n, in, 6, 6);
    const char* names[5] = {"Q", "K", "V", "cache_k", "cache_v"};
    for (size_t i = 0; i < 5; ++i) {
      PYEDGE_CHECK(n.has_input(i), n.where(), ": missing input ", names[i]);
      check_float(n, in[i], names[i]);
      PYEDGE_CHECK(in[i].rank() == 4, n.where(), ": ", names[i], " must have rank 4, got ",
                   shape_str(in[i].shape));
    }
    PYEDGE_CHECK(n.has_input(5) && (in[5].dtype == DType::i64 || in[5].dtype == DType::i32) &&
                     in[5].numel() == 1,
                 n.where(), ": past must be one int64 (the positions already in the cache)");
    scale_ = float(n.attrs.get_float("scale", 1.0));
    window_ = n.attrs.get_int("window", 0);
    const double cap = n.attrs.get_float("softcap", 0.0);
    PYEDGE_CHECK(window_ >= 0, n.where(), ": window must be 0 (none) or a positive number of ",
                 "keys, got ", window_);
    PYEDGE_CHECK(cap >= 0.0 && std::isfinite(cap), n.where(), ": softcap must be 0 (none) or ",
                 "a positive finite cap, got ", cap);
    cap_ = float(cap);
    const std::string layout = n.attrs.get_string("layout", "bhld");
    const std::string out_layout = n.attrs.get_string("out_layout", layout);
    for (const std::string& l : {layout, out_layout})
      PYEDGE_CHECK(l == "bhld" || l == "blhd", n.where(), ": layout and out_layout must be ",
                   "'bhld' or 'blhd', got '", l, "'");
    const bool blhd = layout == "blhd";
    auto dims = [&](const Shape& s) {
      return blhd ? Shape{s[0], s[2], s[1], s[3]} : Shape{s[0], s[1], s[2], s[3]};
    };
    const Shape q = dims(in[0].shape), k = dims(in[1].shape), v = dims(in[2].shape);
    const Shape &ck = in[3].shape, &cv = in[4].shape;
    const std::string shapes =
        str_cat("Q ", shape_str(in[0].shape), ", K ", shape_str(in[1].shape), ", V ",
                shape_str(in[2].shape), " (layout ", layout, "), cache_k ", shape_str(ck),
                ", cache_v ", shape_str(cv));
    PYEDGE_CHECK(q[0] == k[0] && q[0] == v[0] && k[1] == v[1] && k[1] >= 1 && q[1] % k[1] == 0,
                 n.where(), ": batch and head dims of Q, K and V must match (K and V may have ",
                 "a divisor of Q's heads): ", shapes);
    PYEDGE_CHECK(q[3] == k[3] && k[2] == q[2] && v[2] == q[2], n.where(),
                 ": Q and K need the same head size and Q, K, V the same positions: ", shapes);
    PYEDGE_CHECK(ck[0] == k[0] && ck[1] == k[1] && ck[3] == k[3] && cv[0] == v[0] &&
                     cv[1] == v[1] && cv[3] == v[3] && cv[2] == ck[2],
                 n.where(), ": the caches must be [B, Hkv, T, D] and [B, Hkv, T, Dv] for K and ",
                 "V: ", shapes);
    B_ = q[0];
    H_ = q[1];
    L_ = q[2];
    D_ = q[3];
    Dv_ = v[3];
    Hkv_ = k[1];
    G_ = H_ / Hkv_;
    T_ = ck[2];
    PYEDGE_CHECK(L_ <= T_, n.where(), ": ", L_, " new positions do not fit a cache of ", T_,
                 ": ", shapes);
    sq_ = strides_of(blhd, H_, L_, D_);
    sk_ = strides_of(blhd, Hkv_, L_, D_);
    sv_ = strides_of(blhd, Hkv_, L_, Dv_);
    so_ = strides_of(out_layout == "blhd", H_, L_, Dv_);
    slots_ = std::max<int64_t>(1, std::min<int64_t>(num_threads(), B_ * H_));
    outputs = {make_output(DType::f32, out_layout == "blhd" ? Shape{B_, L_, H_, Dv_}
                                                            : Shape{B_, H_, L_, Dv_})};
    n_visible = 1;
  }

  // Per slot: scores [min(L, kRows), T] and 1/l per row.
  size_t forward_scratch_bytes() const override {
    return size_t(slots_ * slot_floats()) * sizeof(float);
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext& ctx) override {
    const int64_t past = in[5].dtype == DType::i64 ? in[5].ptr<int64_t>()[0]
                                                    : int64_t(in[5].ptr<int32_t>()[0]);
    PYEDGE_CHECK(past >= 0 && past + L_ <= T_, where_, ": the key/value cache holds ", T_,
                 " positions; ", past, " cached + ", L_, " new do not fit");
    const float* Q = in[0].ptr<float>();
    float* Kc = in[3].ptr<float>();
    float* Vc = in[4].ptr<float>();
    append(in[1].ptr<float>(), sk_, D_, Kc, past);
    append(in[2].ptr<float>(), sv_, Dv_, Vc, past);
    float* O = out[0].ptr<float>();
    float* scratch = static_cast<float*>(ctx.scratch);
    const int64_t slices = B_ * H_, S = std::min(slots_, slices);
    auto body = [&](int64_t s0, int64_t s1, int64_t slot) {
      float* sc = scratch + slot * slot_floats();
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t b = s / H_, h = s % H_, kh = h / G_;
        slice(Q + sq_.at(b, h), Kc + (b * Hkv_ + kh) * T_ * D_,
              Vc + (b * Hkv_ + kh) * T_ * Dv_, O + so_.at(b, h), past, sc);
      }
    };
    if (S <= 1) return body(0, slices, 0);
    parallel_for(S, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) body(slices * t / S, slices * (t + 1) / S, t);
    });
  }

  // The cache is state the forward changes: never folded at plan time, never re-run.
  bool foldable() const override { return false; }
  bool recomputable() const override { return false; }
  bool differentiable_input(size_t) const override { return false; }
  double flops() const override {  // with a half-full cache
    return double(B_ * H_) * double(L_) * double(T_) * double(D_ + Dv_);
  }

 private:
  int64_t block_rows() const { return std::min(L_, kRows); }
  int64_t slot_floats() const { return block_rows() * (T_ + 1); }

  // cache [B, Hkv, T, cols] rows [past, past + L) = x [B, Hkv, L, cols] (strides st).
  void append(const float* x, const Strides& st, int64_t cols, float* cache, int64_t past) const {
    for (int64_t b = 0; b < B_; ++b)
      for (int64_t kh = 0; kh < Hkv_; ++kh) {
        float* dst = cache + ((b * Hkv_ + kh) * T_ + past) * cols;
        const float* src = x + st.at(b, kh);
        for (int64_t i = 0; i < L_; ++i)
          std::memcpy(dst + i * cols, src + i * st.r, sizeof(float) * size_t(cols));
      }
  }

  // One (b, h) slice: q rows [L, D] (row stride sq_.r), the cache's k [T, D] and v [T, Dv],
  // o rows [L, Dv] (row stride so_.r).
  void slice(const float* q, const float* k, const float* v, float* o, int64_t past,
             float* sc) const {
    const int64_t R = block_rows();
    float* inv_l = sc + R * T_;
    for (int64_t i0 = 0; i0 < L_; i0 += R) {
      const int64_t rows = std::min(R, L_ - i0), keys = past + i0 + rows;  // the last row's
      // keys [k0, keys): from the first row's window on (k0 = 0 without a window)
      const int64_t k0 = window_ > 0 ? std::max<int64_t>(0, past + i0 + 1 - window_) : 0;
      const int64_t nk = keys - k0;
      float* S = sc;  // [rows, nk]: column c is key k0 + c
      sgemm(false, true, rows, nk, D_, scale_, q + i0 * sq_.r, sq_.r, k + k0 * D_, D_, 0.f, S,
            nk);
      for (int64_t r = 0; r < rows; ++r) {
        float* row = S + r * nk;
        const int64_t n = past + i0 + r + 1 - k0;  // keys this row sees: [lo, n)
        const int64_t lo = window_ > 0 ? std::max<int64_t>(0, n - window_) : 0;
        if (cap_ > 0.f) attn::softcap_row<simd::Native>(row + lo, n - lo, cap_);
        const float mx = rowk::row_max(row + lo, n - lo);
        inv_l[r] = 1.f / rowk::exp_store_sum(row + lo, mx, row + lo, n - lo);
        std::fill(row, row + lo, 0.f);
        std::fill(row + n, row + nk, 0.f);
      }
      float* out = o + i0 * so_.r;
      sgemm(false, false, rows, Dv_, nk, 1.f, S, nk, v + k0 * Dv_, Dv_, 0.f, out, so_.r);
      for (int64_t r = 0; r < rows; ++r)
        rowk::row_scale(out + r * so_.r, inv_l[r], out + r * so_.r, Dv_);
    }
  }

  std::string where_;
  float scale_ = 1.f;
  int64_t window_ = 0;  // keys per row up to the diagonal (0: all)
  float cap_ = 0.f;     // soft cap (0: none)
  int64_t B_ = 0, H_ = 0, L_ = 0, D_ = 0, Dv_ = 0, Hkv_ = 0, G_ = 1, T_ = 0;
  Strides sq_, sk_, sv_, so_;
  int64_t slots_ = 1;
};
PYEDGE_REGISTER_OP("pyedge.CachedAttention", CachedAttention);

}  // namespace
}  // namespace pyedge
