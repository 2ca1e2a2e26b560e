// MatMul (numpy semantics, batched with broadcasting) and Gemm, both on SGEMM.
// Backward: dA = dY·Bᵀ, dB = Aᵀ·dY (summed over broadcast batches), each only when wanted:
// a frozen weight never costs its gradient GEMM.
#include <algorithm>
#include <cstring>

#include "common/parallel.h"
#include "ops/blas.h"
#include "ops/op.h"
#include "ops/packed_gemm.h"
#include "ops/small_gemm.h"

namespace pyedge {
namespace {

// Adds bias c (broadcast to [M, N]: scalar, [N], [M, 1] or [M, N]) times beta into y. One
// loop per layout, so the row loops vectorise (a per-element layout test did not).
void add_bias(const Tensor& c, float beta, float* y, int64_t M, int64_t N) {
  const float* cp = c.ptr<float>();
  const int64_t cn = c.numel();
  const bool per_col = c.rank() >= 1 && c.shape.back() == N && cn == N;
  const bool per_row = cn == M && (c.rank() == 2 && c.shape[1] == 1);
  parallel_for(M, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      float* yr = y + i * N;
      if (cn == 1 || per_row) {
        const float v = beta * cp[cn == 1 ? 0 : i];
        for (int64_t j = 0; j < N; ++j) yr[j] += v;
      } else {
        const float* cr = per_col ? cp : cp + i * N;
        for (int64_t j = 0; j < N; ++j) yr[j] += beta * cr[j];
      }
    }
  });
}

// Sums dy [M, N] into dc with c's broadcast shape, times beta.
void reduce_bias_grad(const float* dy, float beta, const Tensor& dc, int64_t M, int64_t N) {
  float* g = dc.ptr<float>();
  int64_t cn = dc.numel();
  bool per_row = cn == M && dc.rank() == 2 && dc.shape[1] == 1 && N != 1;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      float v = beta * dy[i * N + j];
      if (cn == 1) g[0] += v;
      else if (per_row) g[i] += v;
      else if (cn == N) g[j] += v;
      else g[i * N + j] += v;
    }
}

// pyedge.MatMul adds trans_a / trans_b: the last two dims of A / B are read transposed, so
// MatMul(x, Transpose(W)) and attention's Q·Transpose(K) need no transposed copy (the
// fusions rewrite them; a frozen W is then used as stored instead of folded into a copy), and
// an optional bias [N] (input 2) added to every output row: the exporters' MatMul + Add of a
// Linear's bias in one op, where the GEMM adds the product onto rows pre-filled with the bias
// instead of a separate pass reading and writing the whole output again.
class MatMul : public Op {
 public:
  MatMul(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 2, 3);
    check_float(n, in[0], "A");
    check_float(n, in[1], "B");
    ta_ = n.attrs.get_int("trans_a", 0) != 0;
    tb_ = n.attrs.get_int("trans_b", 0) != 0;
    Shape a = in[0].shape, b = in[1].shape;
    PYEDGE_CHECK(!a.empty() && !b.empty(), n.where(), ": MatMul of a scalar");
    PYEDGE_CHECK((!ta_ || a.size() >= 2) && (!tb_ || b.size() >= 2), n.where(),
                 ": trans_a / trans_b need an operand of rank >= 2");
    bool a_vec = a.size() == 1, b_vec = b.size() == 1;
    if (a_vec) a.insert(a.begin(), 1);
    if (b_vec) b.push_back(1);
    // Logical (op(A), op(B)) matrix dims.
    M_ = ta_ ? a.back() : a[a.size() - 2];
    K_ = ta_ ? a[a.size() - 2] : a.back();
    N_ = tb_ ? b[b.size() - 2] : b.back();
    const int64_t kb = tb_ ? b.back() : b[b.size() - 2];
    PYEDGE_CHECK(kb == K_, n.where(), ": inner dimensions differ: A is ",
                 shape_str(in[0].shape), (ta_ ? " (transposed)" : ""), ", B is ",
                 shape_str(in[1].shape), (tb_ ? " (transposed)" : ""));
    lda_ = ta_ ? M_ : K_;  // row strides of A and B as stored
    ldb_ = tb_ ? K_ : N_;
    Shape ab(a.begin(), a.end() - 2), bb(b.begin(), b.end() - 2);
    size_t r = std::max(ab.size(), bb.size());
    ab.insert(ab.begin(), r - ab.size(), 1);
    bb.insert(bb.begin(), r - bb.size(), 1);
    Shape batch(r);
    for (size_t i = 0; i < r; ++i) {
      PYEDGE_CHECK(ab[i] == bb[i] || ab[i] == 1 || bb[i] == 1, n.where(),
                   ": batch dimensions do not broadcast: ", shape_str(in[0].shape), " vs ",
                   shape_str(in[1].shape));
      batch[i] = std::max(ab[i], bb[i]);
    }
    int64_t nb = numel(batch);
    // B shared by all batches (a weight [K, N]): fold the batch into M for one big GEMM
    // (A stored [batch*M, K], so not when A is read transposed).
    b_shared_ = numel(bb) == 1;
    a_shared_ = numel(ab) == 1;
    fold_ = b_shared_ && !a_shared_ && !ta_;
    if (!fold_) {
      for (int64_t i = 0; i < nb; ++i) {
        int64_t ia = 0, ib = 0, rem = i, sa = 1, sb = 1;
        for (size_t d = r; d-- > 0;) {
          int64_t idx = rem % batch[d];
          rem /= batch[d];
          if (ab[d] != 1) ia += idx * sa;
          if (bb[d] != 1) ib += idx * sb;
          sa *= ab[d];
          sb *= bb[d];
        }
        a_off_.push_back(ia * M_ * K_);
        b_off_.push_back(ib * K_ * N_);
      }
      a_broadcast_ = numel(ab) != nb;
      b_broadcast_ = numel(bb) != nb;
    }
    batches_ = nb;
    // A frozen weight (known at plan time) times few rows: pack it once (packed_gemm.h).
    if (fold_ && in[1].data && PackedWeight::worth_it(batches_ * M_, N_, K_))
      packed_ = PackedWeight(in[1].ptr<float>(), K_, N_, tb_, ldb_);
    Shape out = batch;
    if (!a_vec) out.push_back(M_);
    if (!b_vec) out.push_back(N_);
    has_bias_ = in.size() > 2 && n.has_input(2);
    if (has_bias_) {
      check_float(n, in[2], "bias");
      PYEDGE_CHECK(in[2].rank() == 1 && in[2].shape[0] == N_ && !b_vec, n.where(), ": bias ",
                   shape_str(in[2].shape), " must be [N] = [", N_, "]");
    }
    outputs = {make_output(DType::f32, out)};
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out, RunContext&) override {
    const float* A = in[0].ptr<float>();
    const float* B = in[1].ptr<float>();
    float* Y = out[0].ptr<float>();
    const int64_t rows = batches_ * M_;
    if (fold_) {
      if (!packed_.empty()) {
        packed_.gemm(rows, A, K_, Y, N_);
        if (has_bias_) add_bias(in[2], 1.f, Y, rows, N_);
      } else {
        if (has_bias_) fill_rows(in[2].ptr<float>(), Y, rows);
        sgemm(false, tb_, rows, N_, K_, 1.f, A, K_, B, ldb_, has_bias_ ? 1.f : 0.f, Y, N_);
      }
      return;
    }
    // Many small products (attention): one per task, each on one thread.
    parallel_for(batches_, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        gemm(ta_, tb_, M_, N_, K_, A + a_off_[i], lda_, B + b_off_[i], ldb_, 0.f,
             Y + i * M_ * N_, N_);
    });
    if (has_bias_) add_bias(in[2], 1.f, Y, rows, N_);
  }

  bool has_backward() const override { return true; }
  bool assigns_fresh_grads() const override { return true; }
  size_t backward_scratch_bytes(const std::vector<bool>& ng) const override {
    return fold_ && ng[0] ? skip_zero_rows_scratch_bytes(batches_ * M_, K_, N_) : 0;
  }
  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    const float* dY = dout[0].ptr<float>();
    // beta 0 overwrites a fresh gradient buffer, 1 adds to it.
    const float beta_a = ctx.fresh(0) ? 0.f : 1.f, beta_b = ctx.fresh(1) ? 0.f : 1.f;
    if (has_bias_ && din.size() > 2 && din[2].data) {  // dbias [N] += dY summed over rows
      if (ctx.fresh(2)) std::fill(din[2].ptr<float>(), din[2].ptr<float>() + N_, 0.f);
      reduce_bias_grad(dY, 1.f, din[2], batches_ * M_, N_);
    }
    if (fold_) {
      int64_t m = batches_ * M_;
      if (din[0].data)  // dA [m, K] += dY [m, N] · op(B)ᵀ, rows the loss never reads skipped
        sgemm_skip_zero_rows(!tb_, m, K_, N_, dY, N_, in[1].ptr<float>(), ldb_, beta_a,
                             din[0].ptr<float>(), K_, ctx.scratch);
      if (din[1].data) {
        if (tb_)  // dB stored [N, K] += dYᵀ [N, m] · A [m, K]
          sgemm(true, false, N_, K_, m, 1.f, dY, N_, in[0].ptr<float>(), K_, beta_b,
                din[1].ptr<float>(), K_);
        else      // dB [K, N] += Aᵀ [K, m] · dY [m, N]
          sgemm(true, false, K_, N_, m, 1.f, in[0].ptr<float>(), K_, dY, N_, beta_b,
                din[1].ptr<float>(), N_);
      }
      return;
    }
    // dA per batch writes disjoint blocks unless A is broadcast; same for dB. A broadcast
    // block is summed over several batches, so a fresh one is cleared first.
    auto grad_loop = [&](bool for_a) {
      bool shared = for_a ? a_shared_ || a_broadcast_ : b_shared_ || b_broadcast_;
      float beta = for_a ? beta_a : beta_b;
      const Tensor& d = din[for_a ? 0 : 1];
      if (shared && beta == 0.f) {
        std::fill(d.ptr<float>(), d.ptr<float>() + d.numel(), 0.f);
        beta = 1.f;
      }
      auto body = [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const float* dYi = dY + i * M_ * N_;
          const int64_t off = for_a ? a_off_[size_t(i)] : b_off_[size_t(i)];
          const float* Ai = in[0].ptr<float>() + a_off_[size_t(i)];
          const float* Bi = in[1].ptr<float>() + b_off_[size_t(i)];
          if (for_a) {
            float* dA = din[0].ptr<float>() + off;
            if (!ta_)  // dA [M, K] = dY · op(B)ᵀ
              gemm(false, !tb_, M_, K_, N_, dYi, N_, Bi, ldb_, beta, dA, K_);
            else       // dA stored [K, M] = op(B) · dYᵀ
              gemm(tb_, true, K_, M_, N_, Bi, ldb_, dYi, N_, beta, dA, M_);
          } else {
            float* dB = din[1].ptr<float>() + off;
            if (!tb_)  // dB [K, N] = op(A)ᵀ · dY
              gemm(!ta_, false, K_, N_, M_, Ai, lda_, dYi, N_, beta, dB, N_);
            else       // dB stored [N, K] = dYᵀ · op(A)
              gemm(true, ta_, N_, K_, M_, dYi, N_, Ai, lda_, beta, dB, K_);
          }
        }
      };
      if (shared) body(0, batches_);
      else parallel_for(batches_, 1, body);
    };
    if (din[0].data) grad_loop(true);
    if (din[1].data) grad_loop(false);
  }
  // dA needs B, dB needs A; dbias neither.
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    std::vector<bool> r(ng.size(), false);
    r[0] = ng.size() > 1 && ng[1];
    r[1] = ng[0];
    return r;
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return {false};
  }

  double flops() const override { return 2.0 * double(batches_) * double(M_ * N_) * double(K_); }

 private:
  // Y [rows, N] = the bias in every row (the GEMM then adds the product, beta 1).
  void fill_rows(const float* bias, float* Y, int64_t rows) const {
    const int64_t N = N_;
    parallel_for(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) std::memcpy(Y + i * N, bias, size_t(N) * sizeof(float));
    });
  }

  // One product of the batched path: with several batches (each on one thread), small ones
  // on small_gemm; a single product keeps sgemm's split over the threads.
  void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
            const float* B, int64_t ldb, float beta, float* C, int64_t ldc) const {
    if (batches_ > 1 && small_gemm_fits(M, N, K))
      small_gemm(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
    else sgemm(ta, tb, M, N, K, 1.f, A, lda, B, ldb, beta, C, ldc);
  }

  int64_t M_ = 0, K_ = 0, N_ = 0, batches_ = 1;
  int64_t lda_ = 0, ldb_ = 0;
  PackedWeight packed_;  // frozen B packed for few-row products (empty otherwise)
  bool ta_ = false, tb_ = false, fold_ = false, has_bias_ = false;
  bool b_shared_ = false, a_shared_ = false;
  bool a_broadcast_ = false, b_broadcast_ = false;  // several batches read the same block
  std::vector<int64_t> a_off_, b_off_;
};
PYEDGE_REGISTER_OP("MatMul", MatMul);
PYEDGE_REGISTER_OP("pyedge.MatMul", MatMul);

class Gemm : public Op {
 public:
  Gemm(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 2, 3);
    check_float(n, in[0], "A");
    check_float(n, in[1], "B");
    PYEDGE_CHECK(in[0].rank() == 2 && in[1].rank() == 2, n.where(), ": A and B must be 2-D, got ",
                 shape_str(in[0].shape), " and ", shape_str(in[1].shape));
    ta_ = n.attrs.get_int("transA", 0) != 0;
    tb_ = n.attrs.get_int("transB", 0) != 0;
    alpha_ = float(n.attrs.get_float("alpha", 1.0));
    beta_ = float(n.attrs.get_float("beta", 1.0));
    M_ = ta_ ? in[0].shape[1] : in[0].shape[0];
    K_ = ta_ ? in[0].shape[0] : in[0].shape[1];
    int64_t kb = tb_ ? in[1].shape[1] : in[1].shape[0];
    N_ = tb_ ? in[1].shape[0] : in[1].shape[1];
    PYEDGE_CHECK(kb == K_, n.where(), ": inner dimensions differ: A is ", shape_str(in[0].shape),
                 (ta_ ? " (transposed)" : ""), ", B is ", shape_str(in[1].shape),
                 (tb_ ? " (transposed)" : ""));
    has_c_ = in.size() > 2 && n.has_input(2);
    if (has_c_) {
      const Shape& c = in[2].shape;
      int64_t cn = numel(c);
      bool ok = cn == 1 || (cn == N_ && c.back() == N_) || (c.size() == 2 && c[0] == M_ && (c[1] == 1 || c[1] == N_));
      PYEDGE_CHECK(ok, n.where(), ": C of shape ", shape_str(c), " does not broadcast to [",
                   M_, ",", N_, "]");
    }
    outputs = {make_output(DType::f32, {M_, N_})};
    // A frozen weight (known at plan time) times few rows: pack it once (packed_gemm.h).
    if (!ta_ && alpha_ == 1.f && in[1].data && PackedWeight::worth_it(M_, N_, K_))
      packed_ = PackedWeight(in[1].ptr<float>(), K_, N_, tb_, in[1].shape[1]);
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out, RunContext&) override {
    float* Y = out[0].ptr<float>();
    if (!packed_.empty())
      packed_.gemm(M_, in[0].ptr<float>(), in[0].shape[1], Y, N_);
    else
      sgemm(ta_, tb_, M_, N_, K_, alpha_, in[0].ptr<float>(), in[0].shape[1], in[1].ptr<float>(),
            in[1].shape[1], 0.f, Y, N_);
    if (has_c_ && beta_ != 0.f) add_bias(in[2], beta_, Y, M_, N_);
  }
  bool has_backward() const override { return true; }
  bool assigns_fresh_grads() const override { return true; }
  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    const float* dY = dout[0].ptr<float>();
    int64_t lda = in[0].shape[1], ldb = in[1].shape[1];
    const float ba = ctx.fresh(0) ? 0.f : 1.f, bb = ctx.fresh(1) ? 0.f : 1.f;
    if (din[0].data) {
      // op(A) = dY·op(B)ᵀ; if A is stored transposed, Aᵀ-storage = op(B)·dYᵀ.
      if (!ta_) sgemm(false, !tb_, M_, K_, N_, alpha_, dY, N_, in[1].ptr<float>(), ldb, ba, din[0].ptr<float>(), lda);
      else sgemm(tb_, true, K_, M_, N_, alpha_, in[1].ptr<float>(), ldb, dY, N_, ba, din[0].ptr<float>(), lda);
    }
    if (din[1].data) {
      // op(B) = op(A)ᵀ·dY; stored transposed: dYᵀ·op(A).
      if (!tb_) sgemm(!ta_, false, K_, N_, M_, alpha_, in[0].ptr<float>(), lda, dY, N_, bb, din[1].ptr<float>(), ldb);
      else sgemm(true, ta_, N_, K_, M_, alpha_, dY, N_, in[0].ptr<float>(), lda, bb, din[1].ptr<float>(), ldb);
    }
    if (has_c_ && din.size() > 2 && din[2].data) {
      if (ctx.fresh(2)) std::fill(din[2].ptr<float>(), din[2].ptr<float>() + din[2].numel(), 0.f);
      reduce_bias_grad(dY, beta_, din[2], M_, N_);
    }
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    std::vector<bool> r(ng.size(), false);
    r[0] = ng[1];
    r[1] = ng[0];
    return r;
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override { return {false}; }

  double flops() const override { return 2.0 * double(M_) * double(N_) * double(K_); }

 private:
  bool ta_ = false, tb_ = false, has_c_ = false;
  float alpha_ = 1.f, beta_ = 1.f;
  int64_t M_ = 0, K_ = 0, N_ = 0;
  PackedWeight packed_;  // frozen B packed for few-row products (empty otherwise)
};
PYEDGE_REGISTER_OP("Gemm", Gemm);

}  // namespace
}  // namespace pyedge
