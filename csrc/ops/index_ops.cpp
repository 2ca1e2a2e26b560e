// Indexing ops: Gather, GatherElements, ScatterND (forward), CumSum, ArgMax/ArgMin (forward).
// Indices are checked at run time before any parallel loop (a bad index is a PyedgeError that
// names the node, never a crash); negative indices wrap. Scatter-add backwards are partitioned
// so that no two threads touch the same gradient element.
#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>

#include "common/parallel.h"
#include "ops/op.h"

namespace pyedge {
namespace {

constexpr int64_t kGrain = 1 << 15;

template <typename I>
void check_indices_t(const I* p, int64_t n, int64_t dim, const std::string& where) {
  for (int64_t i = 0; i < n; ++i) {
    int64_t v = int64_t(p[i]);
    if (v < -dim || v >= dim)
      throw Error(str_cat(where, ": index ", v, " (at position ", i,
                          ") is out of range for a dimension of size ", dim));
  }
}
void check_indices(const Tensor& t, int64_t dim, const std::string& where) {
  if (t.dtype == DType::i64) check_indices_t(t.ptr<int64_t>(), t.numel(), dim, where);
  else check_indices_t(t.ptr<int32_t>(), t.numel(), dim, where);
}
void check_index_dtype(const NodeInfo& n, const Tensor& t) {
  PYEDGE_CHECK(t.dtype == DType::i64 || t.dtype == DType::i32, n.where(),
               ": indices must be int64 or int32, got ", dtype_name(t.dtype));
}
inline int64_t wrap(int64_t v, int64_t dim) { return v < 0 ? v + dim : v; }

// Calls f with a typed element pointer type chosen by element size (bytes are just moved).
template <typename F>
void by_esize(size_t es, F&& f) {
  switch (es) {
    case 1: f(uint8_t{}); break;
    case 4: f(uint32_t{}); break;
    case 8: f(uint64_t{}); break;
    default: PYEDGE_CHECK(false, "internal: element size ", es);
  }
}
template <typename F>
void by_index(DType dt, F&& f) {
  if (dt == DType::i64) f(int64_t{}); else f(int32_t{});
}

// Gather(data, indices; axis): y[o, j.., c] = x[o, idx[j..], c], x viewed as [outer, N, inner].
// Backward (the embedding gradient) scatter-adds dy rows into dx; repeated indices accumulate.
class Gather : public Op {
 public:
  Gather(const NodeInfo& n, const std::vector<Tensor>& in) : where_(n.where()) {
    check_num_inputs(n, in, 2, 2);
    const Tensor &x = in[0], &idx = in[1];
    check_index_dtype(n, idx);
    PYEDGE_CHECK(x.rank() >= 1, n.where(), ": data must have rank >= 1");
    int64_t axis = normalize_axis(n, n.attrs.get_int("axis", 0), x.rank());
    outer_ = inner_ = 1;
    for (int64_t k = 0; k < x.rank(); ++k)
      (k < axis ? outer_ : k > axis ? inner_ : n_) *= x.shape[size_t(k)];
    n_ = x.shape[size_t(axis)];
    ni_ = idx.numel();
    Shape os(x.shape.begin(), x.shape.begin() + axis);
    os.insert(os.end(), idx.shape.begin(), idx.shape.end());
    os.insert(os.end(), x.shape.begin() + axis + 1, x.shape.end());
    if (idx.data) check_indices(idx, n_, where_);
    outputs = {make_output(x.dtype, os)};
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    const Tensor &x = in[0], &idx = in[1];
    check_indices(idx, n_, where_);
    by_esize(dtype_size(x.dtype), [&](auto t) {
      using T = decltype(t);
      by_index(idx.dtype, [&](auto it) {
        using I = decltype(it);
        const T* xs = static_cast<const T*>(x.data);
        const I* ix = static_cast<const I*>(idx.data);
        T* y = static_cast<T*>(out[0].data);
        const int64_t inner = inner_, N = n_, ni = ni_;
        parallel_for(outer_ * ni, std::max<int64_t>(1, kGrain / std::max<int64_t>(inner, 1)),
                     [&](int64_t b, int64_t e) {
          int64_t o = b / ni, j = b % ni;
          for (int64_t w = b; w < e; ++w) {
            const T* src = xs + (o * N + wrap(int64_t(ix[j]), N)) * inner;
            T* dst = y + w * inner;
            for (int64_t c = 0; c < inner; ++c) dst[c] = src[c];
            if (++j == ni) { j = 0; ++o; }
          }
        });
      });
    });
  }
  bool has_backward() const override { return true; }
  bool differentiable_input(size_t i) const override {
    return i == 0 && !input_dtypes.empty() && input_dtypes[0] == DType::f32;
  }
  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext&) override {
    if (!din[0].data || !dout[0].data) return;
    const float* dy = dout[0].ptr<float>();
    float* dx = din[0].ptr<float>();
    const int64_t inner = inner_, N = n_, ni = ni_;
    by_index(in[1].dtype, [&](auto it) {
      using I = decltype(it);
      const I* ix = static_cast<const I*>(in[1].data);
      // Columns [c0, c1) of outer rows [o0, o1): disjoint dx elements per call.
      auto body = [&](int64_t o0, int64_t o1, int64_t c0, int64_t c1) {
        for (int64_t o = o0; o < o1; ++o)
          for (int64_t j = 0; j < ni; ++j) {
            float* d = dx + (o * N + wrap(int64_t(ix[j]), N)) * inner;
            const float* g = dy + (o * ni + j) * inner;
            for (int64_t c = c0; c < c1; ++c) d[c] += g[c];
          }
      };
      if (outer_ >= 2 * num_threads() || inner < 128) {
        parallel_for(outer_, std::max<int64_t>(1, kGrain / std::max<int64_t>(ni * inner, 1)),
                     [&](int64_t b, int64_t e) { body(b, e, 0, inner); });
      } else {
        parallel_for(inner, 64, [&](int64_t b, int64_t e) { body(0, outer_, b, e); });
      }
    });
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    std::vector<bool> r(ng.size(), false);
    r[1] = true;  // the indices
    return r;
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return std::vector<bool>(outputs.size(), false);
  }

 private:
  std::string where_;
  int64_t outer_ = 1, n_ = 1, inner_ = 1, ni_ = 0;
};
PYEDGE_REGISTER_OP("Gather", Gather);

// GatherElements(data, indices; axis): y[p] = x[p with p[axis] = idx[p]]; y has the shape of
// indices. Viewed as [outer, K, inner] over the indices' shape.
class GatherElements : public Op {
 public:
  GatherElements(const NodeInfo& n, const std::vector<Tensor>& in) : where_(n.where()) {
    check_num_inputs(n, in, 2, 2);
    const Tensor &x = in[0], &idx = in[1];
    check_index_dtype(n, idx);
    PYEDGE_CHECK(x.rank() >= 1 && idx.rank() == x.rank(), n.where(), ": data ",
                 shape_str(x.shape), " and indices ", shape_str(idx.shape),
                 " must have the same rank");
    axis_ = normalize_axis(n, n.attrs.get_int("axis", 0), x.rank());
    for (int64_t k = 0; k < x.rank(); ++k)
      PYEDGE_CHECK(k == axis_ || idx.shape[size_t(k)] <= x.shape[size_t(k)], n.where(),
                   ": indices ", shape_str(idx.shape), " larger than data ",
                   shape_str(x.shape), " outside axis ", axis_);
    ishape_ = idx.shape;
    xst_.assign(x.shape.size(), 1);
    for (size_t k = x.shape.size() - 1; k-- > 0;) xst_[k] = xst_[k + 1] * x.shape[k + 1];
    dim_ = x.shape[size_t(axis_)];
    outer_ = inner_ = 1;
    for (int64_t k = 0; k < idx.rank(); ++k)
      (k < axis_ ? outer_ : k > axis_ ? inner_ : k_) *= idx.shape[size_t(k)];
    k_ = idx.shape[size_t(axis_)];
    inner_same_ = true;
    for (size_t k = size_t(axis_) + 1; k < x.shape.size(); ++k)
      inner_same_ = inner_same_ && idx.shape[k] == x.shape[k];
    if (idx.data) check_indices(idx, dim_, where_);
    outputs = {make_output(x.dtype, idx.shape)};
  }

  // Offset in x of outer row o / inner column c (index-shape coordinates).
  int64_t outer_off(int64_t o) const {
    int64_t off = 0;
    for (int64_t k = axis_ - 1; k >= 0; --k) {
      off += (o % ishape_[size_t(k)]) * xst_[size_t(k)];
      o /= ishape_[size_t(k)];
    }
    return off;
  }
  int64_t inner_off(int64_t c) const {
    if (inner_same_) return c;
    int64_t off = 0;
    for (int64_t k = int64_t(ishape_.size()) - 1; k > axis_; --k) {
      off += (c % ishape_[size_t(k)]) * xst_[size_t(k)];
      c /= ishape_[size_t(k)];
    }
    return off;
  }
  // Runs f(x_offset, y_offset) over outer rows [o0, o1) and inner columns [c0, c1).
  template <typename I, typename F>
  void visit(const I* ix, int64_t o0, int64_t o1, int64_t c0, int64_t c1, F&& f) const {
    const int64_t sa = xst_[size_t(axis_)];
    for (int64_t o = o0; o < o1; ++o) {
      int64_t xo = outer_off(o);
      for (int64_t k = 0; k < k_; ++k) {
        int64_t yrow = (o * k_ + k) * inner_;
        for (int64_t c = c0; c < c1; ++c)
          f(xo + wrap(int64_t(ix[yrow + c]), dim_) * sa + inner_off(c), yrow + c);
      }
    }
  }
  // Partition by outer rows, or by inner columns when there are few rows: a column range
  // owns all its dx elements (collisions happen only along the axis).
  template <typename F>
  void partition(F&& body) const {
    if (outer_ >= 2 * num_threads() || inner_ < 128)
      parallel_for(outer_, std::max<int64_t>(1, kGrain / std::max<int64_t>(k_ * inner_, 1)),
                   [&](int64_t b, int64_t e) { body(b, e, 0, inner_); });
    else
      parallel_for(inner_, 64, [&](int64_t b, int64_t e) { body(0, outer_, b, e); });
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    check_indices(in[1], dim_, where_);
    by_esize(dtype_size(in[0].dtype), [&](auto t) {
      using T = decltype(t);
      by_index(in[1].dtype, [&](auto it) {
        using I = decltype(it);
        const T* x = static_cast<const T*>(in[0].data);
        T* y = static_cast<T*>(out[0].data);
        const I* ix = static_cast<const I*>(in[1].data);
        partition([&](int64_t o0, int64_t o1, int64_t c0, int64_t c1) {
          visit(ix, o0, o1, c0, c1, [&](int64_t xo, int64_t yo) { y[yo] = x[xo]; });
        });
      });
    });
  }
  bool has_backward() const override { return true; }
  bool differentiable_input(size_t i) const override {
    return i == 0 && !input_dtypes.empty() && input_dtypes[0] == DType::f32;
  }
  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext&) override {
    if (!din[0].data || !dout[0].data) return;
    const float* dy = dout[0].ptr<float>();
    float* dx = din[0].ptr<float>();
    by_index(in[1].dtype, [&](auto it) {
      using I = decltype(it);
      const I* ix = static_cast<const I*>(in[1].data);
      partition([&](int64_t o0, int64_t o1, int64_t c0, int64_t c1) {
        visit(ix, o0, o1, c0, c1, [&](int64_t xo, int64_t yo) { dx[xo] += dy[yo]; });
      });
    });
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    std::vector<bool> r(ng.size(), false);
    r[1] = true;
    return r;
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return std::vector<bool>(outputs.size(), false);
  }

 private:
  std::string where_;
  int64_t axis_ = 0, dim_ = 1, outer_ = 1, k_ = 1, inner_ = 1;
  bool inner_same_ = true;
  Shape ishape_;
  std::vector<int64_t> xst_;
};
PYEDGE_REGISTER_OP("GatherElements", GatherElements);

// Calls f(T{}) with the arithmetic type of dt.
template <typename F>
void by_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::f32: f(float{}); break;
    case DType::f64: f(double{}); break;
    case DType::i64: f(int64_t{}); break;
    case DType::i32: f(int32_t{}); break;
    case DType::u8: f(uint8_t{}); break;
    case DType::boolean: f(bool{}); break;
  }
}

// ScatterND(data, indices [.., q], updates; reduction): forward only.
class ScatterND : public Op {
 public:
  ScatterND(const NodeInfo& n, const std::vector<Tensor>& in) : where_(n.where()) {
    check_num_inputs(n, in, 3, 3);
    const Tensor &x = in[0], &idx = in[1], &upd = in[2];
    PYEDGE_CHECK(idx.dtype == DType::i64, n.where(), ": indices must be int64");
    PYEDGE_CHECK(idx.rank() >= 1, n.where(), ": indices must have rank >= 1");
    q_ = idx.shape.back();
    PYEDGE_CHECK(q_ >= 1 && q_ <= x.rank(), n.where(), ": indices' last dim ", q_,
                 " must be in 1..rank(data)=", x.rank());
    Shape us(idx.shape.begin(), idx.shape.end() - 1);
    us.insert(us.end(), x.shape.begin() + q_, x.shape.end());
    PYEDGE_CHECK(upd.shape == us && upd.dtype == x.dtype, n.where(), ": updates must be ",
                 dtype_name(x.dtype), " ", shape_str(us), ", got ", dtype_name(upd.dtype),
                 " ", shape_str(upd.shape));
    std::string red = n.attrs.get_string("reduction", "none");
    PYEDGE_CHECK(red == "none" || red == "add" || red == "mul" || red == "max" || red == "min",
                 n.where(), ": unknown reduction '", red, "'");
    red_ = red == "none" ? 0 : red == "add" ? 1 : red == "mul" ? 2 : red == "max" ? 3 : 4;
    PYEDGE_CHECK(red_ == 0 || x.dtype != DType::boolean, n.where(), ": reduction '", red,
                 "' on bool data");
    dims_.assign(x.shape.begin(), x.shape.begin() + q_);
    auto st = Shape(x.shape.size(), 1);
    for (size_t k = x.shape.size() - 1; k-- > 0;) st[k] = st[k + 1] * x.shape[k + 1];
    st_.assign(st.begin(), st.begin() + q_);
    slice_ = 1;
    for (size_t k = size_t(q_); k < x.shape.size(); ++k) slice_ *= x.shape[k];
    nt_ = idx.numel() / q_;
    outputs = {make_output(x.dtype, x.shape)};
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    const int64_t* ix = in[1].ptr<int64_t>();
    for (int64_t t = 0; t < nt_; ++t)
      for (int64_t k = 0; k < q_; ++k) {
        int64_t v = ix[t * q_ + k], d = dims_[size_t(k)];
        if (v < -d || v >= d)
          throw Error(str_cat(where_, ": index ", v, " in indices row ", t,
                              " is out of range for dim ", k, " of size ", d));
      }
    if (out[0].data != in[0].data) std::memcpy(out[0].data, in[0].data, in[0].nbytes());
    by_dtype(in[0].dtype, [&](auto tag) {
      using T = decltype(tag);
      T* y = static_cast<T*>(out[0].data);
      const T* u = static_cast<const T*>(in[2].data);
      const int64_t S = slice_;
      for (int64_t t = 0; t < nt_; ++t) {
        int64_t off = 0;
        for (int64_t k = 0; k < q_; ++k)
          off += wrap(ix[t * q_ + k], dims_[size_t(k)]) * st_[size_t(k)];
        T* d = y + off;
        const T* s = u + t * S;
        if constexpr (std::is_same_v<T, bool>) {
          for (int64_t c = 0; c < S; ++c) d[c] = s[c];
        } else {
          switch (red_) {
            case 0: for (int64_t c = 0; c < S; ++c) d[c] = s[c]; break;
            case 1: for (int64_t c = 0; c < S; ++c) d[c] += s[c]; break;
            case 2: for (int64_t c = 0; c < S; ++c) d[c] *= s[c]; break;
            case 3: for (int64_t c = 0; c < S; ++c) d[c] = std::max(d[c], s[c]); break;
            default: for (int64_t c = 0; c < S; ++c) d[c] = std::min(d[c], s[c]); break;
          }
        }
      }
    });
  }

 private:
  std::string where_;
  int64_t q_ = 1, slice_ = 1, nt_ = 0;
  int red_ = 0;
  std::vector<int64_t> dims_, st_;
};
PYEDGE_REGISTER_OP("ScatterND", ScatterND);

// Blocks of kCols columns, so a running value per column lives on the stack.
constexpr int64_t kCols = 64;

// Splits [outer, N, inner] into work items (o, column block) and calls f(o, c0, cw).
template <typename F>
void for_column_blocks(int64_t outer, int64_t N, int64_t inner, F&& f) {
  const int64_t blocks = (inner + kCols - 1) / kCols;
  const int64_t per_item = N * std::min(inner, kCols);
  parallel_for(outer * blocks, std::max<int64_t>(1, kGrain / std::max<int64_t>(per_item, 1)),
               [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      int64_t o = w / blocks, c0 = (w % blocks) * kCols;
      f(o, c0, std::min(kCols, inner - c0));
    }
  });
}

// y (=|+=) cumulative sum of x along the middle axis of [outer, N, inner].
template <typename T, bool Acc>
void cumsum(const T* x, T* y, int64_t outer, int64_t N, int64_t inner, bool excl, bool rev) {
  for_column_blocks(outer, N, inner, [&](int64_t o, int64_t c0, int64_t cw) {
    T run[kCols];
    for (int64_t c = 0; c < cw; ++c) run[c] = T(0);
    for (int64_t kk = 0; kk < N; ++kk) {
      int64_t k = rev ? N - 1 - kk : kk;
      const T* xs = x + (o * N + k) * inner + c0;
      T* ys = y + (o * N + k) * inner + c0;
      for (int64_t c = 0; c < cw; ++c) {
        T v = xs[c];
        if (!excl) run[c] += v;
        if constexpr (Acc) ys[c] += run[c]; else ys[c] = run[c];
        if (excl) run[c] += v;
      }
    }
  });
}

// CumSum(x, axis; exclusive, reverse). Backward: dx += cumsum of dy in the other direction.
class CumSum : public Op {
 public:
  CumSum(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 2, 2);
    const Tensor& x = in[0];
    PYEDGE_CHECK(x.dtype == DType::f32 || x.dtype == DType::f64 || x.dtype == DType::i64 ||
                 x.dtype == DType::i32, n.where(), ": unsupported dtype ", dtype_name(x.dtype));
    const Tensor& a = const_input(n, in, 1, "axis");
    PYEDGE_CHECK(a.numel() == 1, n.where(), ": axis must be a scalar");
    int64_t axis = normalize_axis(n, a.int_at(0), x.rank());
    excl_ = n.attrs.get_int("exclusive", 0) != 0;
    rev_ = n.attrs.get_int("reverse", 0) != 0;
    for (int64_t k = 0; k < x.rank(); ++k)
      (k < axis ? outer_ : k > axis ? inner_ : n_) *= x.shape[size_t(k)];
    n_ = x.rank() ? x.shape[size_t(axis)] : 1;
    outputs = {make_output(x.dtype, x.shape)};
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    by_dtype(in[0].dtype, [&](auto tag) {
      using T = decltype(tag);
      if constexpr (std::is_same_v<T, bool> || std::is_same_v<T, uint8_t>) return;
      else
        cumsum<T, false>(static_cast<const T*>(in[0].data), static_cast<T*>(out[0].data),
                         outer_, n_, inner_, excl_, rev_);
    });
  }
  bool has_backward() const override { return true; }
  bool differentiable_input(size_t i) const override {
    return i == 0 && !input_dtypes.empty() && input_dtypes[0] == DType::f32;
  }
  void backward(const std::vector<Tensor>&, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext&) override {
    if (!din[0].data || !dout[0].data) return;
    cumsum<float, true>(dout[0].ptr<float>(), din[0].ptr<float>(), outer_, n_, inner_, excl_,
                        !rev_);
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    return std::vector<bool>(ng.size(), false);
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return std::vector<bool>(outputs.size(), false);
  }

 private:
  int64_t outer_ = 1, n_ = 1, inner_ = 1;
  bool excl_ = false, rev_ = false;
};
PYEDGE_REGISTER_OP("CumSum", CumSum);

// ArgMax / ArgMin(x; axis, keepdims, select_last_index) -> int64. Forward only.
template <bool Max>
class ArgExtreme : public Op {
 public:
  ArgExtreme(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 1, 1);
    const Tensor& x = in[0];
    PYEDGE_CHECK(x.rank() >= 1, n.where(), ": input must have rank >= 1");
    int64_t axis = normalize_axis(n, n.attrs.get_int("axis", 0), x.rank());
    for (int64_t k = 0; k < x.rank(); ++k)
      (k < axis ? outer_ : k > axis ? inner_ : n_) *= x.shape[size_t(k)];
    n_ = x.shape[size_t(axis)];
    PYEDGE_CHECK(n_ > 0, n.where(), ": cannot reduce an empty axis ", axis);
    last_ = n.attrs.get_int("select_last_index", 0) != 0;
    Shape os = x.shape;
    if (n.attrs.get_int("keepdims", 1)) os[size_t(axis)] = 1;
    else os.erase(os.begin() + axis);
    outputs = {make_output(DType::i64, os)};
  }
  template <typename T>
  void run(const T* x, int64_t* y) const {
    const int64_t N = n_, inner = inner_;
    const bool last = last_;
    for_column_blocks(outer_, N, inner, [&](int64_t o, int64_t c0, int64_t cw) {
      T best[kCols];
      int64_t bi[kCols];
      const T* xs = x + o * N * inner + c0;
      for (int64_t c = 0; c < cw; ++c) { best[c] = xs[c]; bi[c] = 0; }
      for (int64_t k = 1; k < N; ++k) {
        const T* row = xs + k * inner;
        for (int64_t c = 0; c < cw; ++c) {
          T v = row[c];
          bool better = Max ? (last ? v >= best[c] : v > best[c])
                            : (last ? v <= best[c] : v < best[c]);
          if (better) { best[c] = v; bi[c] = k; }
        }
      }
      int64_t* ys = y + o * inner + c0;
      for (int64_t c = 0; c < cw; ++c) ys[c] = bi[c];
    });
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    by_dtype(in[0].dtype, [&](auto tag) {
      using T = decltype(tag);
      using U = std::conditional_t<std::is_same_v<T, bool>, uint8_t, T>;
      run<U>(static_cast<const U*>(in[0].data), out[0].ptr<int64_t>());
    });
  }
  bool differentiable_input(size_t) const override { return false; }

 private:
  int64_t outer_ = 1, n_ = 1, inner_ = 1;
  bool last_ = false;
};
using ArgMax = ArgExtreme<true>;
using ArgMin = ArgExtreme<false>;
PYEDGE_REGISTER_OP("ArgMax", ArgMax);
PYEDGE_REGISTER_OP("ArgMin", ArgMin);

}  // namespace
}  // namespace pyedge
