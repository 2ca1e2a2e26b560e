// pyedge.Attention: scaled dot-product attention in one op,
//   O = softmax(scale * Q·Kᵀ + mask) · V   (softmax over the keys)
// layout "bhld": Q [B,H,L,D], K [B,H,Lk,D], V [B,H,Lk,Dv], O [B,H,L,Dv]; layout "blhd": the
// same with L and H swapped in every tensor (the exporters' layout before their head-split
// Transpose), read with row strides; out_layout (default: layout) picks O's layout alone (the
// Llama exports split heads before the rotary embedding, so Q, K, V arrive as "bhld" while
// the output projection reads "blhd"). mask (optional, no gradient) is additive and broadcasts
// to the scores [B,H,L,Lk] whatever the layout.
// Grouped-query attention: K and V may have Hkv heads with H % Hkv == 0; query head h reads
// key/value head h / (H / Hkv), never expanded. Their gradients sum over the group's query
// heads: the backward takes one (b, kv head) at a time and adds the group's slices in order.
// causal = 1: row i keeps keys j <= i + Lk − L (needs Lk >= L; the last row sees every key),
// applied inside the kernels, so no mask tensor exists; it combines with a mask input.
// window = w > 0 (needs causal): row i also drops keys j <= i + Lk − L − w, i.e. keeps the last
// w keys up to the diagonal (transformers' sliding_window: kv > q − w); the keys before a
// row block's window are never computed. softcap = c > 0: the scores are c·tanh(scale·q·k / c)
// before the mask is added (Gemma 2's attn_logit_softcapping); the backward multiplies dS by
// 1 − tanh², tanh recomputed from the scores (nothing more is kept).
// Why: the chain MatMul → MaskedSoftmax → MatMul keeps the probabilities P [B,H,L,Lk] for its
// backward (12 MiB per MiniLM layer). This op keeps only LSE [B,H,L] (hidden output, the
// log-sum-exp of each score row) and recomputes P per (b, h) slice in the backward, with the
// L×Lk tile in a per-thread scratch (flash-attention style, one tile per slice).
// Forward per slice: S = scale·QKᵀ + mask, m = rowmax, P = exp(S − m), l = ΣP,
// LSE = m + log l, O = (P·V) / l (normalised after the product: L×Dv scalings, not L×Lk).
// Backward per slice: P = exp(S − LSE) renormalised by its row sum (exact where LSE absorbed
// log l: rows masked entirely with -3.4e38 give uniform P, as softmax does), dV = Pᵀ·dO,
// dP = dO·Vᵀ, Dᵢ = Σⱼ Pᵢⱼ dPᵢⱼ, dS = P ∘ (dP − D), dQ = scale·dS·K, dK = scale·dSᵀ·Q.
// (A row masked entirely with -inf gives NaN, as softmax does.) Threads take whole slices,
// each with its own scratch block, so results do not depend on the thread count.
// Slices whose Lk, D, Dv are whole SIMD vectors run attention_kernels.h's fused kernels (query
// rows in blocks of 8 kept in L1 from the score product to the next product; keys masked
// with -3.4e38 or -inf to the end of a row and, in the backward, rows whose dO is 0 skipped,
// exactly); the code below (small_gemm or BLAS products, row passes over the whole tile)
// takes the other shapes.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "common/parallel.h"
#include "ops/attention_kernels.h"
#include "ops/blas.h"
#include "ops/op.h"
#include "ops/region_copy.h"
#include "ops/small_gemm.h"
#include "ops/softmax_kernels.h"

namespace pyedge {
namespace {

// Strides (in floats) of one [B, H, rows, cols] operand stored in either layout.
struct Strides {
  int64_t b = 0, h = 0, r = 0;  // batch, head, row; the last dim is contiguous
  int64_t at(int64_t bi, int64_t hi) const { return bi * b + hi * h; }
};

// r += mask row (m[j], or m[0] everywhere when `one`); returns max(r). Mask add and row max
// in one pass.
template <class S = simd::Native>
float add_mask_max(float* r, const float* m, bool one, int64_t n) {
  using V = typename S::V;
  constexpr int W = S::W, A = rowk::kAcc;
  const V m0 = S::set1(m[0]);
  float mx = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  if (n >= W) {
    V acc[A];
    for (int j = 0; j < A; ++j) acc[j] = S::set1(mx);
    auto step = [&](int64_t at, V& a) {
      const V v = S::add(S::load(r + at), one ? m0 : S::load(m + at));
      S::store(r + at, v);
      a = S::max(v, a);
    };
    for (; i + A * W <= n; i += A * W)
      for (int j = 0; j < A; ++j) step(i + j * W, acc[j]);
    for (; i + W <= n; i += W) step(i, acc[0]);
    for (int j = 1; j < A; ++j) acc[0] = S::max(acc[j], acc[0]);
    mx = S::hmax(acc[0]);
  }
  for (; i < n; ++i) {
    r[i] += one ? m[0] : m[i];
    mx = r[i] > mx ? r[i] : mx;
  }
  return mx;
}

// r = exp(r + mask row − c) (mask as above, or none); returns sum(r).
template <class S = simd::Native>
float add_mask_exp_sum(float* r, const float* m, bool one, float c, int64_t n) {
  if (!m) return rowk::exp_store_sum<S>(r, c, r, n);
  const typename S::V vc = S::set1(c), m0 = S::set1(m[0]);
  return rowk::row_reduce<S>(
      n,
      [&](int64_t i) {
        auto e = simd::exp<S>(S::sub(S::add(S::load(r + i), one ? m0 : S::load(m + i)), vc));
        S::store(r + i, e);
        return e;
      },
      [&](int64_t i) { return r[i] = simd::exp<simd::Scalar>((r[i] + (one ? m[0] : m[i])) - c); });
}

class Attention : public Op {
 public:
  Attention(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 3, 4);
    const char* names[3] = {"Q", "K", "V"};
    for (size_t i = 0; i < 3; ++i) {
      PYEDGE_CHECK(n.has_input(i), n.where(), ": missing input ", names[i]);
      check_float(n, in[i], names[i]);
      PYEDGE_CHECK(in[i].rank() == 4, n.where(), ": ", names[i], " must have rank 4, got ",
                   shape_str(in[i].shape));
    }
    scale_ = float(n.attrs.get_float("scale", 1.0));
    const std::string layout = n.attrs.get_string("layout", "bhld");
    const std::string out_layout = n.attrs.get_string("out_layout", layout);
    for (const std::string& l : {layout, out_layout})
      PYEDGE_CHECK(l == "bhld" || l == "blhd", n.where(), ": layout and out_layout must be ",
                   "'bhld' or 'blhd', got '", l, "'");
    const bool blhd = layout == "blhd", out_blhd = out_layout == "blhd";
    causal_ = n.attrs.get_int("causal", 0) != 0;
    window_ = n.attrs.get_int("window", 0);
    const double cap = n.attrs.get_float("softcap", 0.0);
    PYEDGE_CHECK(window_ >= 0 && (window_ == 0 || causal_), n.where(), ": window must be 0 ",
                 "(none) or a positive number of keys with causal = 1, got window ", window_,
                 " and causal ", int(causal_));
    PYEDGE_CHECK(cap >= 0.0 && std::isfinite(cap), n.where(), ": softcap must be 0 (none) or ",
                 "a positive finite cap, got ", cap);
    cap_ = float(cap);
    const Shape &qs = in[0].shape, &ks = in[1].shape, &vs = in[2].shape;
    // Logical dims: [B, H, rows, cols] from either layout.
    auto dims = [&](const Shape& s) {
      return blhd ? Shape{s[0], s[2], s[1], s[3]} : Shape{s[0], s[1], s[2], s[3]};
    };
    const Shape q = dims(qs), k = dims(ks), v = dims(vs);
    const std::string shapes = str_cat("Q ", shape_str(qs), ", K ", shape_str(ks), ", V ",
                                       shape_str(vs), " (layout ", layout, ")");
    PYEDGE_CHECK(q[0] == k[0] && q[0] == v[0] && k[1] == v[1] && k[1] >= 1 && q[1] % k[1] == 0,
                 n.where(), ": batch and head dims of Q, K and V must match (K and V may have ",
                 "fewer heads than Q, a divisor of Q's: grouped-query attention): ", shapes);
    PYEDGE_CHECK(q[3] == k[3], n.where(), ": Q and K must have the same head size D: ", shapes);
    PYEDGE_CHECK(k[2] == v[2], n.where(), ": K and V must have the same number of keys: ",
                 shapes);
    B_ = q[0];
    H_ = q[1];
    L_ = q[2];
    D_ = q[3];
    Lk_ = k[2];
    Dv_ = v[3];
    Hkv_ = k[1];
    G_ = H_ / Hkv_;
    PYEDGE_CHECK(!causal_ || Lk_ >= L_, n.where(), ": causal attention needs at least as many ",
                 "keys as queries: ", shapes);
    auto strides = [&](bool bl, int64_t heads, int64_t rows, int64_t cols) {
      Strides s;
      if (bl) s = {rows * heads * cols, cols, heads * cols};
      else s = {heads * rows * cols, rows * cols, cols};
      return s;
    };
    sq_ = strides(blhd, H_, L_, D_);
    sk_ = strides(blhd, Hkv_, Lk_, D_);
    sv_ = strides(blhd, Hkv_, Lk_, Dv_);
    so_ = strides(out_blhd, H_, L_, Dv_);

    has_mask_ = in.size() > 3 && n.has_input(3);
    if (has_mask_) {
      check_float(n, in[3], "mask");
      const Shape& ms = in[3].shape;
      const Shape scores = {B_, H_, L_, Lk_};
      PYEDGE_CHECK(ms.size() <= 4, n.where(), ": mask ", shape_str(ms),
                   " has a higher rank than the scores ", shape_str(scores));
      int64_t st[4] = {0, 0, 0, 0}, s = 1;
      const size_t lead = 4 - ms.size();
      for (size_t d = 4; d-- > lead;) {
        const int64_t md = ms[d - lead];
        PYEDGE_CHECK(md == scores[d] || md == 1, n.where(), ": mask ", shape_str(ms),
                     " does not broadcast to the scores ", shape_str(scores), " (", shapes, ")");
        st[d] = md == 1 ? 0 : s;
        s *= md;
      }
      mb_ = st[0];
      mh_ = st[1];
      ml_ = st[2];
      mk_ = st[3];
    }
    // The fused per-slice kernels (attention_kernels.h) where every product is small_gemm
    // sized and the rows are whole vectors (MiniLM: L = Lk = 128, D = Dv = 32); the
    // small_gemm / BLAS products with row passes below otherwise.
    // Causal attention without a mask input runs the windowed kernels with a window of Lk
    // (which cuts no key): the same forward, and a backward whose dV and dK skip the query rows
    // above the diagonal (band_t) and whose zero fills stay near it; sequences past 512 then
    // take the fused path too (1024 x 1024, H 8, D 64: 183 -> 68 ms forward + backward).
    kwin_ = window_ > 0 ? window_ : (causal_ && !has_mask_ ? Lk_ : 0);
    fused_ = attn::fits<simd::Native>(L_, Lk_, D_, Dv_, kwin_ > 0);
    const int64_t slices = B_ * H_;
    slots_ = std::max<int64_t>(1, std::min<int64_t>(num_threads(), slices));
    Shape os = out_blhd ? Shape{B_, L_, H_, Dv_} : Shape{B_, H_, L_, Dv_};
    outputs = {make_output(DType::f32, os), make_output(DType::f32, {B_, H_, L_})};
    n_visible = 1;
  }

  // Per slot: the score tile [L, Lk], 1/l per row and a panel for the transposed K.
  size_t forward_scratch_bytes() const override {
    return size_t(slots_ * fwd_slot()) * sizeof(float);
  }
  size_t backward_scratch_bytes(const std::vector<bool>& ng) const override {
    return size_t(slots_ * bwd_slot(want_ds(ng), ng.size() > 2 && ng[2])) * sizeof(float);
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext& ctx) override {
    const float* Q = in[0].ptr<float>();
    const float* K = in[1].ptr<float>();
    const float* V = in[2].ptr<float>();
    const float* M = has_mask_ ? in[3].ptr<float>() : nullptr;
    float* O = out[0].ptr<float>();
    float* LSE = out[1].ptr<float>();
    const int64_t L = L_, Lk = Lk_, Dv = Dv_;
    if (Lk == 0) {  // softmax over no keys: O = 0 (an empty sum), LSE = -inf
      for (int64_t s = 0; s < B_ * H_; ++s)
        for (int64_t i = 0; i < L; ++i) {
          std::memset(O + so_.at(s / H_, s % H_) + i * so_.r, 0, sizeof(float) * size_t(Dv));
          LSE[s * L + i] = -std::numeric_limits<float>::infinity();
        }
      return;
    }
    float* scratch = static_cast<float*>(ctx.scratch);
    if (fused_) {
      over_slices([&](int64_t s0, int64_t s1, int64_t slot) {
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t b = s / H_, h = s % H_;
          // the next slice's operands (and O rows, which would cost a read for ownership
          // at the store) on their way to L2 while this slice computes: with the other core
          // busy the first touches missed L3 (forward 3.0 -> 2.4 ms on MiniLM)
          attn::Ahead ahead[4];
          int na = 0;
          if (s + 1 < s1) {
            const int64_t b1 = (s + 1) / H_, h1 = (s + 1) % H_;
            ahead[na++] = {K + sk_.at(b1, h1 / G_), sk_.r, Lk, D_};
            ahead[na++] = {V + sv_.at(b1, h1 / G_), sv_.r, Lk, Dv};
            ahead[na++] = {Q + sq_.at(b1, h1), sq_.r, L, D_};
            ahead[na++] = {O + so_.at(b1, h1), so_.r, L, Dv, true};
          }
          attn::forward_slice<simd::Native>(slice(Q, K, V, M, b, h), O + so_.at(b, h), so_.r,
                                            LSE + s * L, scratch + slot * fwd_slot(), ahead, na);
        }
      });
      return;
    }
    over_slices([&](int64_t s0, int64_t s1, int64_t slot) {
      float* S = scratch + slot * fwd_slot();
      float* inv_l = S + tile();
      float* pan = inv_l + L;
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t b = s / H_, h = s % H_;
        const float* m = mask_at(M, b, h);
        float* lse = LSE + s * L;
        scores(Q + sq_.at(b, h), K + sk_.at(b, h / G_), S, pan);
        if (cap_ > 0.f) attn::softcap_row<simd::Native>(S, tile(), cap_);
        remove_future(S);
        for (int64_t i = 0; i < L; ++i) {  // lse = row max, inv_l = row sum for now
          float* r = S + i * Lk;
          lse[i] = m ? add_mask_max(r, m + i * ml_, mk_ == 0, Lk) : rowk::row_max(r, Lk);
          inv_l[i] = rowk::exp_store_sum(r, lse[i], r, Lk);
        }
        for (int64_t i = 0; i < L; ++i) {  // a vector loop (fm::log is branch-free)
          lse[i] += fm::log(inv_l[i]);
          inv_l[i] = 1.f / inv_l[i];
        }
        // O = (P · V) / l
        float* o = O + so_.at(b, h);
        mm(false, L, Dv, Lk, S, Lk, V + sv_.at(b, h / G_), sv_.r, 0.f, o, so_.r);
        for (int64_t i = 0; i < L; ++i) rowk::row_scale(o + i * so_.r, inv_l[i], o + i * so_.r, Dv);
      }
    });
  }

  bool has_backward() const override { return true; }
  bool assigns_fresh_grads() const override { return true; }
  bool differentiable_input(size_t i) const override { return i < 3; }

  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    const float* Q = in[0].ptr<float>();
    const float* K = in[1].ptr<float>();
    const float* V = in[2].ptr<float>();
    const float* M = has_mask_ ? in[3].ptr<float>() : nullptr;
    const float* LSE = out[1].ptr<float>();
    const float* dO = dout[0].ptr<float>();
    float* dQ = din[0].data ? din[0].ptr<float>() : nullptr;
    float* dK = din[1].data ? din[1].ptr<float>() : nullptr;
    float* dV = din[2].data ? din[2].ptr<float>() : nullptr;
    if (!dQ && !dK && !dV) return;
    // beta 0 assigns a fresh gradient (small_gemm and BLAS then do not read it), 1 adds. dK
    // and dV of a key/value head sum its group's query heads: the first assigns (when fresh),
    // the others add.
    const float bq = ctx.fresh(0) ? 0.f : 1.f, bk0 = ctx.fresh(1) ? 0.f : 1.f,
                bv0 = ctx.fresh(2) ? 0.f : 1.f;
    const int64_t L = L_, Lk = Lk_, D = D_, Dv = Dv_, G = G_;
    if (Lk == 0) {  // O did not depend on Q: dQ = 0; dK, dV are empty
      if (dQ && bq == 0.f)
        for (int64_t s = 0; s < B_ * H_; ++s)
          for (int64_t i = 0; i < L; ++i)
            std::memset(dQ + sq_.at(s / H_, s % H_) + i * sq_.r, 0, sizeof(float) * size_t(D));
      return;
    }
    const bool ds_wanted = dQ || dK;
    const int64_t per_slot = bwd_slot(ds_wanted, dV != nullptr);
    const float sc = scale_;
    float* scratch = static_cast<float*>(ctx.scratch);
    // Units of work are (b, key/value head): a thread owns the dK, dV rows of its units.
    const int64_t units = B_ * Hkv_;
    if (fused_) {
      over_units(units, [&](int64_t u0, int64_t u1, int64_t slot) {
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t b = u / Hkv_, kh = u % Hkv_;
          for (int64_t g = 0; g < G; ++g) {
            const int64_t h = kh * G + g, s = b * H_ + h;
            const bool first = g == 0;
            const attn::Out oq{dQ ? dQ + sq_.at(b, h) : nullptr, sq_.r, nullptr, bq != 0.f},
                ok{dK ? dK + sk_.at(b, kh) : nullptr, sk_.r, nullptr, !first || bk0 != 0.f},
                ov{dV ? dV + sv_.at(b, kh) : nullptr, sv_.r, nullptr, !first || bv0 != 0.f};
            // the next slice's operands on their way to L2, as in the forward
            attn::Ahead ahead[7];
            int na = 0;
            int64_t b1 = b, h1 = h + 1;
            if (g + 1 == G) {
              b1 = (u + 1) / Hkv_;
              h1 = ((u + 1) % Hkv_) * G;
            }
            if (g + 1 < G || u + 1 < u1) {
              const int64_t k1 = h1 / G;
              ahead[na++] = {K + sk_.at(b1, k1), sk_.r, Lk, D};
              ahead[na++] = {Q + sq_.at(b1, h1), sq_.r, L, D};
              ahead[na++] = {dO + so_.at(b1, h1), so_.r, L, Dv};
              if (dQ || dK) ahead[na++] = {V + sv_.at(b1, k1), sv_.r, Lk, Dv};
              if (dQ) ahead[na++] = {dQ + sq_.at(b1, h1), sq_.r, L, D, true};
              if (dK && g + 1 == G) ahead[na++] = {dK + sk_.at(b1, k1), sk_.r, Lk, D, true};
              if (dV && g + 1 == G) ahead[na++] = {dV + sv_.at(b1, k1), sv_.r, Lk, Dv, true};
            }
            attn::backward_slice<simd::Native>(slice(Q, K, V, M, b, h), LSE + s * L,
                                               dO + so_.at(b, h), so_.r, dQ ? &oq : nullptr,
                                               dK ? &ok : nullptr, dV ? &ov : nullptr,
                                               scratch + slot * per_slot, ahead, na);
          }
        }
      });
      return;
    }
    over_units(units, [&](int64_t u0, int64_t u1, int64_t slot) {
      // E [L, Lk] = exp(S − LSE), dS [L, Lk], the panel, 1/rowsum(E) [L], dO/rowsum(E) [L, Dv],
      // 1 − tanh² [L, Lk] of a soft cap
      float* E = scratch + slot * per_slot;
      float* dS = E + tile();
      float* pan = dS + (ds_wanted ? tile() : 0);
      float* inv = pan + panel();
      float* dOs = inv + L;
      float* dcap = cap_ > 0.f && ds_wanted ? dOs + (dV ? L * Dv : 0) : nullptr;
      for (int64_t u = u0; u < u1; ++u)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t b = u / Hkv_, kh = u % Hkv_, h = kh * G + g, s = b * H_ + h;
          const float bk = g > 0 ? 1.f : bk0, bv = g > 0 ? 1.f : bv0;
          const float* q = Q + sq_.at(b, h);
          const float* k = K + sk_.at(b, kh);
          const float* m = mask_at(M, b, h);
          const float* dov = dO + so_.at(b, h);
          const float* lse = LSE + s * L;
          // P = E / rowsum(E): rowsum(E) is 1 up to LSE's rounding, and exactly what makes P
          // uniform in rows LSE cannot tell from their max (all keys masked with -3.4e38).
          // 1/rowsum goes into dO (for dV) and into dS instead of a pass over E.
          scores(q, k, E, pan);
          if (cap_ > 0.f) attn::softcap_row<simd::Native>(E, tile(), cap_, dcap);
          remove_future(E);
          for (int64_t i = 0; i < L; ++i)
            inv[i] = 1.f / add_mask_exp_sum(E + i * Lk, m ? m + i * ml_ : nullptr, mk_ == 0,
                                            lse[i], Lk);
          if (dV) {  // dV [Lk, Dv] = Pᵀ · dO = Eᵀ · (dO / rowsum(E))
            for (int64_t i = 0; i < L; ++i) rowk::row_scale(dov + i * so_.r, inv[i], dOs + i * Dv, Dv);
            mm(true, Lk, Dv, L, E, Lk, dOs, Dv, bv, dV + sv_.at(b, kh), sv_.r);
          }
          if (!ds_wanted) continue;
          // dP [L, Lk] = dO · Vᵀ, then dS = scale · P ∘ (dP − rowsum(P ∘ dP)) in place
          transpose(V + sv_.at(b, kh), sv_.r, Lk, Dv, pan);
          mm(false, L, Lk, Dv, dov, so_.r, pan, Lk, 0.f, dS, Lk);
          for (int64_t i = 0; i < L; ++i) {
            const float* e = E + i * Lk;
            float* gr = dS + i * Lk;
            const float di = inv[i] * rowk::row_dot(e, gr, Lk), c = sc * inv[i];
            for (int64_t j = 0; j < Lk; ++j) gr[j] = c * (e[j] * (gr[j] - di));
            if (dcap)  // through the cap: dS of the scaled product
              for (int64_t j = 0; j < Lk; ++j) gr[j] *= dcap[i * Lk + j];
          }
          if (dQ)  // dQ [L, D] = dS · K
            mm(false, L, D, Lk, dS, Lk, k, sk_.r, bq, dQ + sq_.at(b, h), sq_.r);
          if (dK)  // dK [Lk, D] = dSᵀ · Q
            mm(true, Lk, D, L, dS, Lk, q, sq_.r, bk, dK + sk_.at(b, kh), sk_.r);
        }
    });
  }

  // Q and K always (P is recomputed), V only for dP (dQ, dK), the mask when given; of the
  // outputs only LSE.
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    std::vector<bool> r(ng.size(), false);
    r[0] = r[1] = true;
    r[2] = want_ds(ng);
    if (r.size() > 3) r[3] = has_mask_;
    return r;
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return {false, true};
  }
  // Q·Kᵀ and P·V per head, plus the softmax (a few operations per score).
  double flops() const override {
    return double(B_ * H_) * double(L_ * Lk_) * (2.0 * double(D_ + Dv_) + 5.0);
  }

 private:
  int64_t tile() const { return L_ * Lk_; }

  // Scores [L, Lk] of keys the causal limit (and the window) removes set to -inf (exp 0): the
  // general path's causal mask.
  void remove_future(float* S) const {
    if (!causal_) return;
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < L_; ++i) {
      const int64_t keep = std::min(Lk_, i + Lk_ - L_ + 1);
      std::fill(S + i * Lk_ + keep, S + (i + 1) * Lk_, ninf);
      if (window_ > 0) std::fill(S + i * Lk_, S + i * Lk_ + std::max<int64_t>(0, keep - window_), ninf);
    }
  }
  // K [Lk, D] or V [Lk, Dv] transposed, the row-major B of small_gemm (which would otherwise
  // transpose into a buffer of its own).
  int64_t panel() const { return std::max(D_, Dv_) * Lk_; }
  int64_t fwd_slot() const {
    return fused_ ? attn::forward_floats<simd::Native>(L_, Lk_, D_, Dv_) : tile() + L_ + panel();
  }
  int64_t bwd_slot(bool ds, bool dv) const {
    const bool cap = cap_ > 0.f;
    return fused_ ? attn::backward_floats(L_, Lk_, D_, Dv_, ds, dv, cap)
                  : (ds ? 2 : 1) * tile() + panel() + L_ + (dv ? L_ * Dv_ : 0) +
                        (ds && cap ? tile() : 0);
  }
  static bool want_ds(const std::vector<bool>& ng) {
    return (ng.size() > 0 && ng[0]) || (ng.size() > 1 && ng[1]);
  }

  const float* mask_at(const float* M, int64_t b, int64_t h) const {
    return M ? M + b * mb_ + h * mh_ : nullptr;
  }

  // Slice (b, h) for the fused kernels.
  attn::Slice slice(const float* Q, const float* K, const float* V, const float* M, int64_t b,
                    int64_t h) const {
    attn::Slice x;
    x.L = L_;
    x.Lk = Lk_;
    x.D = D_;
    x.Dv = Dv_;
    x.q = Q + sq_.at(b, h);
    x.k = K + sk_.at(b, h / G_);
    x.v = V + sv_.at(b, h / G_);
    x.ldq = sq_.r;
    x.ldk = sk_.r;
    x.ldv = sv_.r;
    x.mask = mask_at(M, b, h);
    x.ldm = ml_;
    x.one = mk_ == 0;
    x.scale = scale_;
    x.causal = causal_;
    x.coff = Lk_ - L_;
    x.window = kwin_;
    x.cap = cap_;
    return x;
  }

  // S [L, Lk] = scale · q·kᵀ (the scale folded into the transposed k).
  void scores(const float* q, const float* k, float* S, float* pan) const {
    const int64_t L = L_, Lk = Lk_, D = D_;
    if (L == 0) return;
    if (!small_gemm_fits(L, Lk, D)) {
      sgemm(false, true, L, Lk, D, scale_, q, sq_.r, k, sk_.r, 0.f, S, Lk);
      return;
    }
    transpose(k, sk_.r, Lk, D, pan);
    if (scale_ != 1.f) rowk::row_scale(pan, scale_, pan, D * Lk);
    small_gemm(false, false, L, Lk, D, q, sq_.r, pan, Lk, 0.f, S, Lk);
  }

  // dst [cols, rows] = src [rows, cols] (row stride lds)ᵀ, 4x4 blocks through registers.
  static void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst) {
    using namespace region_detail;
    const int64_t c4 = cols & ~int64_t(3), r4 = rows & ~int64_t(3);
    for (int64_t c = 0; c < c4; c += 4)
      for (int64_t r = 0; r < r4; r += 4)
        block4<float, false>(dst + c * rows + r, rows, src + r * lds + c, lds);
    block_scalar<float, false>(dst + r4, rows, src + r4 * lds, lds, c4, rows - r4);
    block_scalar<float, false>(dst + c4 * rows, rows, src + c4, lds, cols - c4, rows);
  }

  // C [M, N] = op(A) · B + beta · C on the calling thread (B row-major [K, N]): small_gemm
  // where it fits, serial BLAS otherwise.
  static void mm(bool ta, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
    if (M == 0 || N == 0) return;
    if (small_gemm_fits(M, N, K)) small_gemm(ta, false, M, N, K, A, lda, B, ldb, beta, C, ldc);
    else sgemm(ta, false, M, N, K, 1.f, A, lda, B, ldb, beta, C, ldc);
  }

  // body(first slice, end slice, slot): slot s owns scratch block s and runs on one thread.
  template <typename F>
  void over_slices(F&& body) const { over_units(B_ * H_, body); }
  // The same over n units (slices, or (b, kv head) groups of slices in the backward).
  template <typename F>
  void over_units(int64_t n, F&& body) const {
    const int64_t S = std::min(slots_, std::max<int64_t>(n, 1));
    if (S == 1) return body(int64_t(0), n, int64_t(0));
    parallel_for(S, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t s = lo; s < hi; ++s) body(n * s / S, n * (s + 1) / S, s);
    });
  }

  float scale_ = 1.f;
  int64_t B_ = 0, H_ = 0, L_ = 0, Lk_ = 0, D_ = 0, Dv_ = 0;
  int64_t Hkv_ = 0, G_ = 1;  // key/value heads, query heads per key/value head
  bool causal_ = false;
  int64_t window_ = 0;  // keys per row up to the diagonal (0: all)
  int64_t kwin_ = 0;    // the fused kernels' window: window_, or Lk for plain causal
  float cap_ = 0.f;     // soft cap c (0: none)
  Strides sq_, sk_, sv_, so_;
  bool has_mask_ = false;
  bool fused_ = false;  // attention_kernels.h's per-slice path
  int64_t mb_ = 0, mh_ = 0, ml_ = 0, mk_ = 0;  // mask strides over [B, H, L, Lk] (0: broadcast)
  int64_t slots_ = 1;                          // scratch blocks, one per thread (<= B·H)
};
PYEDGE_REGISTER_OP("pyedge.Attention", Attention);

}  // namespace
}  // namespace pyedge
