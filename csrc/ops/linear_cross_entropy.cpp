// pyedge.LinearCrossEntropy: an LM head fused with its cross-entropy loss, over row chunks,
// so the [rows, V] logits (and their gradient) never exist whole. For a 151,936-word
// vocabulary at 4 x 256 tokens those are 622 MB each; here one chunk of chunk x V floats is
// computed at a time (a trained head recomputes it in the backward; a frozen one takes its
// gradients in the forward, see the end of this comment).
//
// pyedge.LinearCrossEntropy(h [..., D], W, labels [...] int64/int32, bias [V]?, A [r, D]?,
//                           B [V, r]?, scales?, zero_points?) -> loss []
//   logits = h·op(W) (+ bias) (+ lora_scale·(h·Aᵀ)·Bᵀ)    (the LoRA of pyedge.LoraMatMul)
//   W: [V, D] with trans_w=1 (nn.Linear / tied embedding layout, the default), [D, V] with 0.
//   loss == pyedge.CrossEntropyLoss(logits, labels) with the same attributes: shift (causal
//   LM: logits[..., :-1, :] against labels[..., 1:]), ignore_index, label_smoothing,
//   reduction (mean/sum). Like it, mean over zero counted rows gives 0 (torch: NaN) and a
//   zero gradient.
//   chunk: rows per chunk (0 = automatic: chunk·V·4 bytes near kChunkBytes, >= kMinChunk).
// Only live rows are computed: rows whose label is ignore_index, and under shift the last
// position of each sequence, are dropped before the GEMMs (their h rows are gathered).
// Hidden outputs: per counted row (max, log(sum(exp(x - max)))) [rows, 2], as
// CrossEntropyLoss saves, so the backward's recomputed chunk needs no second reduction; with
// a frozen W also the gradients taken in the forward (below).
//
// Backward per chunk: recompute the chunk's logits Z [c, V], turn them into
// dZ = g·(softmax(Z) − (1−eps)·onehot(y) − eps/V) with g = dloss / count, then
//   dh_c = dZ·W (+ s·(dZ·B)·A)      scattered back to the live rows of dh
//   dW (+)= dZᵀ·h_c (trans_w) or h_cᵀ·dZ    only when W takes a gradient (a trained head)
//   dbias (+)= column sums of dZ;  dA (+)= (s·dZ·B)ᵀ·h_c;  dB (+)= s·dZᵀ·(h_c·Aᵀ)
// Chunks run in order and the GEMMs split their work over the threads without changing any
// element's order of summation, so results do not depend on the thread count.
//
// A frozen head (W a plan-time constant: no dW can be wanted) whose backward is planned
// takes the gradients in the forward instead: each chunk's dZ is made right after its loss
// terms and multiplied out there, into hidden outputs dh [rows of h, D], dbias [V], dA [r, D]
// and dB [V, r] computed for dloss = 1; the backward only scales them by dloss. That saves
// the recompute (one of the three head GEMMs), and h is not kept for the backward. A trained
// W would need a [V, D] hidden output: it takes the recompute path.
//
// A quantized head (W uint8: MatMulNBits' packed B [V, n_blocks, blob], a 4/8-bit LM head or
// the tied embedding table kept packed) reads its scales and zero points as inputs 6 and 7
// and its format from the attributes K (= D), N (= V), bits and block_size, as MatMulNBits
// does; trans_w must be 1. Its chunk GEMMs dequantize W a panel at a time (ops/quant_gemm.h):
// logits = h_c·Wᵀ with quant_gemm_xwt, dh_c = dZ·W with quant_gemm_xw. It is always frozen,
// so it always takes its gradients in the forward.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "common/parallel.h"
#include "ops/blas.h"
#include "ops/op.h"
#include "ops/quant_gemm.h"
#include "ops/softmax_kernels.h"

namespace pyedge {
namespace {

using rowk::exp_f;

// Automatic chunk: ~32 MiB of logits, but at least 128 rows: thinner GEMMs re-pack W for too
// few rows (Qwen2.5-0.5B's head, 4 x 256 tokens, frozen: 48 rows 12.0 s per step, 128 rows
// 8.8 s, the unfused head 8.4 s), at 78 MB of logits per chunk for its 151,936 words.
constexpr int64_t kChunkBytes = int64_t(32) << 20;
constexpr int64_t kMinChunk = 128, kMaxChunk = 4096;

size_t align64(size_t b) { return (b + 63) / 64 * 64; }

// Input slots.
enum : size_t { kH = 0, kW = 1, kLabels = 2, kBias = 3, kA = 4, kB = 5, kScales = 6, kZp = 7 };

class LinearCrossEntropy : public Op {
 public:
  LinearCrossEntropy(const NodeInfo& n, const std::vector<Tensor>& in) : where_(n.where()) {
    check_num_inputs(n, in, 3, 8);
    check_float(n, in[kH], "h");
    const Tensor& h = in[kH];
    const Tensor& w = in[kW];
    quant_ = w.dtype == DType::u8;
    if (!quant_) {
      check_float(n, w, "W");
      PYEDGE_CHECK(in.size() <= kScales || !n.has_input(kScales), where_,
                   ": scales (input 6) are for a quantized (uint8) W; W is float");
    }
    const Tensor& lb = in[kLabels];
    PYEDGE_CHECK(lb.dtype == DType::i64 || lb.dtype == DType::i32, where_,
                 ": labels must be int64 or int32, got ", dtype_name(lb.dtype));
    PYEDGE_CHECK(h.rank() >= 1, where_, ": h must be [..., D], got ", shape_str(h.shape));
    D_ = h.shape.back();
    M_ = h.numel() / std::max<int64_t>(D_, 1);
    trans_w_ = n.attrs.get_int("trans_w", 1) != 0;
    if (quant_) {
      PYEDGE_CHECK(trans_w_, where_, ": a quantized W is [V, D] (MatMulNBits' layout): trans_w "
                   "must be 1");
      PYEDGE_CHECK(in.size() > kScales && n.has_input(kScales), where_,
                   ": a quantized (uint8) W needs its scales as input 6");
      PYEDGE_CHECK(n.attrs.has("K") && n.attrs.has("N") && n.attrs.has("block_size"), where_,
                   ": a quantized W needs the attributes K, N and block_size (and bits)");
      qspec_ = nbits_spec_at(n, in, n.attrs.get_int("K", 0), n.attrs.get_int("N", 0),
                             int(n.attrs.get_int("bits", 4)), n.attrs.get_int("block_size", 0),
                             kW, kScales, kZp);
      V_ = qspec_.N;
      PYEDGE_CHECK(qspec_.K == D_, where_, ": h ", shape_str(h.shape), " does not match the "
                   "quantized W's K = ", qspec_.K);
    } else {
      PYEDGE_CHECK(w.rank() == 2, where_, ": W must be 2-D, got ", shape_str(w.shape));
      V_ = trans_w_ ? w.shape[0] : w.shape[1];
      const int64_t wd = trans_w_ ? w.shape[1] : w.shape[0];
      PYEDGE_CHECK(wd == D_, where_, ": h ", shape_str(h.shape), " does not match W ",
                   shape_str(w.shape), trans_w_ ? " ([V, D], trans_w=1)" : " ([D, V], trans_w=0)");
    }
    PYEDGE_CHECK(V_ > 0, where_, ": W has 0 classes");
    Shape lead(h.shape.begin(), h.shape.end() - 1);
    PYEDGE_CHECK(lb.shape == lead, where_, ": labels shape ", shape_str(lb.shape),
                 " must equal h's shape without its last dim ", shape_str(lead), " (h ",
                 shape_str(h.shape), ")");
    has_bias_ = in.size() > kBias && n.has_input(kBias);
    if (has_bias_) {
      check_float(n, in[kBias], "bias");
      PYEDGE_CHECK(in[kBias].numel() == V_, where_, ": bias must have ", V_, " elements, got ",
                   shape_str(in[kBias].shape));
    }
    has_lora_ = in.size() > kA && n.has_input(kA);
    PYEDGE_CHECK(has_lora_ == (in.size() > kB && n.has_input(kB)), where_,
                 ": LoRA needs both A and B (inputs 4 and 5)");
    if (has_lora_) {
      check_float(n, in[kA], "lora_A");
      check_float(n, in[kB], "lora_B");
      PYEDGE_CHECK(in[kA].rank() == 2 && in[kA].shape[1] == D_, where_, ": lora_A must be [r, ",
                   D_, "], got ", shape_str(in[kA].shape));
      r_ = in[kA].shape[0];
      PYEDGE_CHECK(in[kB].rank() == 2 && in[kB].shape[0] == V_ && in[kB].shape[1] == r_, where_,
                   ": lora_B must be [", V_, ", ", r_, "], got ", shape_str(in[kB].shape));
      scale_ = float(n.attrs.get_float("lora_scale", 1.0));
    }
    shift_ = n.attrs.get_int("shift", 0) != 0;
    ignore_ = n.attrs.get_int("ignore_index", -100);
    eps_ = float(n.attrs.get_float("label_smoothing", 0.0));
    PYEDGE_CHECK(eps_ >= 0.f && eps_ <= 1.f, where_, ": label_smoothing must be in [0, 1], got ",
                 eps_);
    std::string red = n.attrs.get_string("reduction", "mean");
    PYEDGE_CHECK(red == "mean" || red == "sum", where_, ": reduction must be 'mean' or 'sum', got '",
                 red, "'");
    mean_ = red == "mean";
    if (shift_) {
      PYEDGE_CHECK(lb.rank() >= 1, where_, ": shift=1 needs labels [..., T]");
      T_ = lb.shape.back();
      rows_ = T_ > 0 ? lb.numel() / T_ * (T_ - 1) : 0;
    } else {
      rows_ = lb.numel();
    }
    int64_t chunk = n.attrs.get_int("chunk", 0);
    PYEDGE_CHECK(chunk >= 0, where_, ": chunk must be >= 0 (0: automatic), got ", chunk);
    if (chunk == 0)
      chunk = std::clamp<int64_t>(kChunkBytes / (4 * V_) / 16 * 16, kMinChunk, kMaxChunk);
    chunk_ = std::max<int64_t>(1, std::min(chunk, rows_));
    // W given at plan time = frozen: the gradients can be taken in the forward (a quantized
    // W never takes a gradient)
    early_ = w.data != nullptr || quant_;
    if (quant_) {
      qfwd_ = quant_gemm_tiling(V_, D_);
      qbwd_ = quant_gemm_tiling(D_, V_);
    }
    outputs = {make_output(DType::f32, {}), make_output(DType::f32, {rows_, 2})};
    if (early_) {
      outputs.push_back(make_output(DType::f32, h.shape));                     // dh
      outputs.push_back(make_output(DType::f32, {has_bias_ ? V_ : 0}));        // dbias
      outputs.push_back(make_output(DType::f32, {has_lora_ ? r_ : 0, D_}));    // dA
      outputs.push_back(make_output(DType::f32, {has_lora_ ? V_ : 0, r_}));    // dB
    }
    n_visible = 1;
  }

  // live list, per-row loss, then one chunk's gathered h, logits and h·Aᵀ (and what the
  // gradients need when they are taken here)
  size_t forward_scratch_bytes() const override {
    return live_bytes() + align64(size_t(rows_) * 4) + chunk_bytes(early_);
  }
  // live list, then one chunk's h, logits/dlogits, dh, h·Aᵀ and s·dZ·B (none when the
  // forward took the gradients)
  size_t backward_scratch_bytes(const std::vector<bool>&) const override {
    return early_ ? 0 : live_bytes() + chunk_bytes(true);
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext& ctx) override {
    char* p = static_cast<char*>(ctx.scratch);
    int64_t* live = reinterpret_cast<int64_t*>(p);
    const int64_t nlive = in[kLabels].dtype == DType::i64 ? gather_live<int64_t>(in[kLabels], live)
                                                         : gather_live<int32_t>(in[kLabels], live);
    p += live_bytes();
    float* row_loss = reinterpret_cast<float*>(p);  // [nlive]
    p += align64(size_t(rows_) * 4);
    const bool grads_here = early_ && backward_planned;
    Chunk c = carve(p, grads_here);
    float* lse = out[1].ptr<float>();
    std::fill(lse, lse + 2 * rows_, 0.f);
    const int64_t V = V_;
    const float eps = eps_, invV = 1.f / float(V);
    const int64_t count = mean_ ? nlive : 1;
    Targets saved;
    if (grads_here) {  // for dloss = 1; all assigned by the first chunk
      saved = Targets{out[2].ptr<float>(), true, nullptr, false,
                      has_bias_ ? out[3].ptr<float>() : nullptr, true,
                      has_lora_ ? out[4].ptr<float>() : nullptr, true,
                      has_lora_ ? out[5].ptr<float>() : nullptr, true};
      zero_dead_rows(saved.dh, live, nlive);
      if (nlive == 0)
        for (size_t k = 3; k < out.size(); ++k)
          std::fill(out[k].ptr<float>(), out[k].ptr<float>() + out[k].numel(), 0.f);
    }
    for (int64_t j0 = 0; j0 < nlive; j0 += chunk_) {
      const int64_t cn = std::min(chunk_, nlive - j0);
      const int64_t* lc = live + 2 * j0;
      chunk_logits(in, lc, cn, c);
      parallel_for(cn, std::max<int64_t>(1, 16384 / V), [&](int64_t b, int64_t e) {
        for (int64_t j = b; j < e; ++j) {
          const float* z = c.z + j * V;
          const int64_t r = lc[2 * j], y = lc[2 * j + 1];
          // loss = lse - (1-eps)·z_y - eps·mean(z), lse = m + log(s) kept split (precision
          // when |m| is large), as CrossEntropyLoss computes it
          const float m = rowk::row_max(z, V);
          const float ls = std::log(rowk::exp_sum(z, m, V));
          lse[2 * r] = m;
          lse[2 * r + 1] = ls;
          float v = ls + (1.f - eps) * (m - z[y]);
          if (eps > 0.f) v += eps * (m - rowk::row_sum(z, V) * invV);
          row_loss[j0 + j] = v;
        }
      });
      if (grads_here) {
        to_dlogits(c.z, lc, cn, lse, 1.f / float(count));
        chunk_grads(in, lc, cn, c, saved, j0 == 0);
      }
    }
    double s = 0.0;
    for (int64_t j = 0; j < nlive; ++j) s += row_loss[j];
    out[0].ptr<float>()[0] = count > 0 ? float(s / double(count)) : 0.f;
  }

  bool has_backward() const override { return true; }
  bool differentiable_input(size_t i) const override {
    return i != kLabels && i < kScales && !(quant_ && i == kW);
  }
  bool assigns_fresh_grads() const override { return true; }
  // Recompute path: every input (the chunk's logits are recomputed from h, W, bias, A and B
  // whatever gradient is wanted) and the saved log-sum-exp. Gradients taken in the forward:
  // those alone.
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    return std::vector<bool>(ng.size(), !early_);
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    std::vector<bool> r(outputs.size(), early_);
    r[0] = false;
    r[1] = !early_;
    return r;
  }

  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    auto want = [&](size_t k) { return k < din.size() && din[k].data != nullptr; };
    const float dl = dout.empty() || dout[0].data == nullptr ? 0.f : dout[0].ptr<float>()[0];
    if (early_) {
      PYEDGE_CHECK(!want(kW), where_, ": internal: a gradient for a plan-time constant W");
      // din (+)= dloss · (the gradient the forward took for dloss = 1)
      const size_t from[] = {kH, kBias, kA, kB}, saved[] = {2, 3, 4, 5};
      for (int i = 0; i < 4; ++i) {
        if (!want(from[i])) continue;
        float* d = din[from[i]].ptr<float>();
        const float* g = out[saved[i]].ptr<float>();
        const bool assign = ctx.fresh(from[i]);
        parallel_for(din[from[i]].numel(), 1 << 14, [&](int64_t b, int64_t e) {
          for (int64_t j = b; j < e; ++j) d[j] = assign ? dl * g[j] : d[j] + dl * g[j];
        });
      }
      return;
    }
    char* p = static_cast<char*>(ctx.scratch);
    int64_t* live = reinterpret_cast<int64_t*>(p);
    const int64_t nlive = in[kLabels].dtype == DType::i64 ? gather_live<int64_t>(in[kLabels], live)
                                                         : gather_live<int32_t>(in[kLabels], live);
    Chunk c = carve(p + live_bytes(), true);
    const int64_t count = mean_ ? nlive : 1;
    const bool no_rows = nlive == 0 || count == 0 || dout.empty() || dout[0].data == nullptr;
    // Fresh gradients are assigned: the rows of dh no label reads are zeroed here, and the
    // weight gradients are zeroed when no chunk will write them.
    if (want(kH) && ctx.fresh(kH)) zero_dead_rows(din[kH].ptr<float>(), live, no_rows ? 0 : nlive);
    if (no_rows) {
      for (size_t k : {kW, kBias, kA, kB})
        if (want(k) && ctx.fresh(k)) std::fill(din[k].ptr<float>(), din[k].ptr<float>() + din[k].numel(), 0.f);
      return;
    }
    auto ptr = [&](size_t k) { return want(k) ? din[k].ptr<float>() : nullptr; };
    const Targets t{ptr(kH), ctx.fresh(kH), ptr(kW), ctx.fresh(kW), ptr(kBias), ctx.fresh(kBias),
                    ptr(kA), ctx.fresh(kA), ptr(kB), ctx.fresh(kB)};
    const float* lse = out[1].ptr<float>();
    for (int64_t j0 = 0; j0 < nlive; j0 += chunk_) {
      const int64_t cn = std::min(chunk_, nlive - j0);
      const int64_t* lc = live + 2 * j0;
      chunk_logits(in, lc, cn, c);
      to_dlogits(c.z, lc, cn, lse, dl / float(count));
      chunk_grads(in, lc, cn, c, t, j0 == 0);
    }
  }

  // The head GEMM over the live rows (twice more when a frozen head takes its gradients in
  // the forward): recomputing this op is never cheap, whatever its small outputs suggest.
  double flops() const override {
    const double gemm = 2.0 * double(rows_) * double(D_) * double(V_);
    return early_ ? 3.0 * gemm : gemm;
  }

 private:
  struct Chunk {
    float* h = nullptr;   // [chunk, D] gathered live rows of h
    float* z = nullptr;   // [chunk, V] logits (dlogits in the backward)
    float* t = nullptr;   // [chunk, r] h·Aᵀ
    float* dt = nullptr;  // [chunk, r] s·dZ·B (backward)
    float* dh = nullptr;  // [chunk, D] (backward)
    float* q = nullptr;   // quantized W: the panel buffers of quant_gemm
  };

  // [rows, 2] int64: (row index r, label) of each counted row
  size_t live_bytes() const { return align64(size_t(rows_) * 2 * sizeof(int64_t)); }
  size_t chunk_bytes(bool backward) const {
    size_t b = align64(size_t(chunk_ * D_) * 4) + align64(size_t(chunk_ * V_) * 4) +
               align64(size_t(chunk_ * r_) * 4);
    if (backward) b += align64(size_t(chunk_ * r_) * 4) + align64(size_t(chunk_ * D_) * 4);
    if (quant_) b += align64(std::max(qfwd_.scratch_floats(), qbwd_.scratch_floats()) * 4);
    return b;
  }
  Chunk carve(char* p, bool backward) const {
    Chunk c;
    auto take = [&](int64_t floats) {
      float* f = reinterpret_cast<float*>(p);
      p += align64(size_t(floats) * 4);
      return f;
    };
    c.h = take(chunk_ * D_);
    c.z = take(chunk_ * V_);
    c.t = take(chunk_ * r_);
    if (backward) {
      c.dt = take(chunk_ * r_);
      c.dh = take(chunk_ * D_);
    }
    if (quant_)
      c.q = take(int64_t(std::max(qfwd_.scratch_floats(), qbwd_.scratch_floats())));
    return c;
  }

  // row r -> (h row, label index), as CrossEntropyLoss maps them
  int64_t h_row(int64_t r) const { return shift_ ? r / (T_ - 1) * T_ + r % (T_ - 1) : r; }
  int64_t label_index(int64_t r) const { return shift_ ? h_row(r) + 1 : r; }

  // Counted rows in order into live [n, 2]; checks the labels (serially: an exception must
  // not leave a parallel region). Returns n.
  template <typename L>
  int64_t gather_live(const Tensor& labels, int64_t* live) const {
    const L* lab = labels.ptr<L>();
    int64_t n = 0;
    for (int64_t r = 0; r < rows_; ++r) {
      const int64_t y = int64_t(lab[label_index(r)]);
      if (y == ignore_) continue;
      PYEDGE_CHECK(y >= 0 && y < V_, where_, ": label ", y, " (at flat position ", label_index(r),
                   ") is out of range for ", V_, " classes; valid labels are 0..", V_ - 1,
                   " or ignore_index ", ignore_);
      live[2 * n] = r;
      live[2 * n + 1] = y;
      ++n;
    }
    return n;
  }

  // c.z [cn, V] = h_c·op(W) (+ bias) (+ s·(h_c·Aᵀ)·Bᵀ), h_c gathered into c.h; c.t = h_c·Aᵀ.
  void chunk_logits(const std::vector<Tensor>& in, const int64_t* lc, int64_t cn,
                    const Chunk& c) const {
    const int64_t D = D_, V = V_;
    const float* h = in[kH].ptr<float>();
    const float* bias = has_bias_ ? in[kBias].ptr<float>() : nullptr;
    parallel_for(cn, 16, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        std::memcpy(c.h + j * D, h + h_row(lc[2 * j]) * D, size_t(D) * 4);
        if (bias) std::memcpy(c.z + j * V, bias, size_t(V) * 4);  // the GEMM adds onto it
      }
    });
    if (quant_)  // Z = h_c·Wᵀ, W dequantized a panel at a time
      quant_gemm_xwt(view(qspec_, in), cn, c.h, bias ? 1.f : 0.f, c.z, V, qfwd_, c.q);
    else
      sgemm(false, trans_w_, cn, V, D, 1.f, c.h, D, in[kW].ptr<float>(), in[kW].shape[1],
            bias ? 1.f : 0.f, c.z, V);
    if (!has_lora_) return;
    sgemm(false, true, cn, r_, D, 1.f, c.h, D, in[kA].ptr<float>(), D, 0.f, c.t, r_);
    sgemm(false, true, cn, V, r_, scale_, c.t, r_, in[kB].ptr<float>(), r_, 1.f, c.z, V);
  }

  // Where a chunk's gradients go; nullptr: not wanted. *_assign: the first chunk assigns
  // (dh rows are each written once, so its flag holds for every chunk).
  struct Targets {
    float* dh = nullptr;
    bool dh_assign = false;
    float* dW = nullptr;
    bool dW_assign = false;
    float* db = nullptr;
    bool db_assign = false;
    float* dA = nullptr;
    bool dA_assign = false;
    float* dB = nullptr;
    bool dB_assign = false;
  };

  // Z [cn, V] -> dZ = g·(softmax(Z) − eps/V) − g·(1−eps)·onehot(y), in place; g = dloss/count
  void to_dlogits(float* z, const int64_t* lc, int64_t cn, const float* lse, float g) const {
    const int64_t V = V_;
    const float off = g * eps_ / float(V), hit = g * (1.f - eps_);
    parallel_for(cn, std::max<int64_t>(1, 16384 / V), [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        float* zr = z + j * V;
        const int64_t r = lc[2 * j], y = lc[2 * j + 1];
        const float m = lse[2 * r], ls = lse[2 * r + 1];
        for (int64_t k = 0; k < V; ++k) zr[k] = g * exp_f((zr[k] - m) - ls) - off;
        zr[y] -= hit;
      }
    });
  }

  // The chunk's shares of every wanted gradient from dZ (c.z), h_c (c.h) and t = h_c·Aᵀ (c.t).
  void chunk_grads(const std::vector<Tensor>& in, const int64_t* lc, int64_t cn, const Chunk& c,
                   const Targets& t, bool first) const {
    const int64_t V = V_, D = D_, r = r_;
    const float* dz = c.z;
    auto beta = [&](bool assign) { return first && assign ? 0.f : 1.f; };
    if (has_lora_ && (t.dh || t.dA))  // dt [c, r] = s·dZ·B
      sgemm(false, false, cn, r, V, scale_, dz, V, in[kB].ptr<float>(), r, 0.f, c.dt, r);
    if (t.dW) {
      if (trans_w_)  // dW [V, D] (+)= dZᵀ·h_c
        sgemm(true, false, V, D, cn, 1.f, dz, V, c.h, D, beta(t.dW_assign), t.dW, D);
      else  // dW [D, V] (+)= h_cᵀ·dZ
        sgemm(true, false, D, V, cn, 1.f, c.h, D, dz, V, beta(t.dW_assign), t.dW, V);
    }
    if (t.db) column_sums(dz, cn, t.db, beta(t.db_assign) == 0.f);
    if (t.dA)  // dA [r, D] (+)= dtᵀ·h_c
      sgemm(true, false, r, D, cn, 1.f, c.dt, r, c.h, D, beta(t.dA_assign), t.dA, D);
    if (t.dB)  // dB [V, r] (+)= s·dZᵀ·t
      sgemm(true, false, V, r, cn, scale_, dz, V, c.t, r, beta(t.dB_assign), t.dB, r);
    if (t.dh) {  // dh_c = dZ·op(W)ᵀ (+ dt·A), then into the live rows
      if (quant_)  // dh_c = dZ·W
        quant_gemm_xw(view(qspec_, in), cn, dz, 0.f, c.dh, qbwd_, c.q);
      else
        sgemm(false, !trans_w_, cn, D, V, 1.f, dz, V, in[kW].ptr<float>(), in[kW].shape[1], 0.f,
              c.dh, D);
      if (has_lora_)
        sgemm(false, false, cn, D, r, 1.f, c.dt, r, in[kA].ptr<float>(), D, 1.f, c.dh, D);
      scatter_rows(c.dh, lc, cn, t.dh, t.dh_assign);
    }
  }

  // db[v] (+)= Σ_j dz[j, v], rows summed in order (the same result for any thread count)
  void column_sums(const float* dz, int64_t cn, float* db, bool assign) const {
    const int64_t V = V_;
    parallel_for(V, 4096, [&](int64_t b, int64_t e) {
      for (int64_t v = b; v < e; ++v) {
        float s = assign ? 0.f : db[v];
        for (int64_t j = 0; j < cn; ++j) s += dz[j * V + v];
        db[v] = s;
      }
    });
  }

  // dh rows of the chunk's live rows (+)= dh_c rows
  void scatter_rows(const float* dhc, const int64_t* lc, int64_t cn, float* dh, bool assign) const {
    const int64_t D = D_;
    parallel_for(cn, 16, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        float* d = dh + h_row(lc[2 * j]) * D;
        const float* s = dhc + j * D;
        if (assign) std::memcpy(d, s, size_t(D) * 4);
        else
          for (int64_t k = 0; k < D; ++k) d[k] += s[k];
      }
    });
  }

  // Zeroes the rows of a fresh dh that no live row writes (live rows ascend, as do h rows).
  void zero_dead_rows(float* dh, const int64_t* live, int64_t nlive) const {
    int64_t j = 0;
    for (int64_t row = 0; row < M_; ++row) {
      if (j < nlive && h_row(live[2 * j]) == row) {
        ++j;
        continue;
      }
      std::fill(dh + row * D_, dh + (row + 1) * D_, 0.f);
    }
  }

  std::string where_;
  int64_t D_ = 0, M_ = 0, V_ = 0, r_ = 0, T_ = 0, rows_ = 0, chunk_ = 1, ignore_ = -100;
  float eps_ = 0.f, scale_ = 1.f;
  bool trans_w_ = true, has_bias_ = false, has_lora_ = false, shift_ = false, mean_ = true;
  bool early_ = false;  // frozen W: gradients taken in the forward when a backward is planned
  bool quant_ = false;  // W is a packed 4/8-bit MatMulNBits weight (inputs 6, 7: its scales, zp)
  QuantWeightSpec qspec_;
  QuantGemmTiling qfwd_, qbwd_;
};
PYEDGE_REGISTER_OP("pyedge.LinearCrossEntropy", LinearCrossEntropy);

}  // namespace
}  // namespace pyedge
