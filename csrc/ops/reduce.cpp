// ReduceSum/Mean/Max/Min/Prod/SumSquare/L2.
// Axes come from the attribute before opset 13 (ReduceSum) / 18 (the others) and from the
// optional constant input 1 after; no axes reduces everything unless noop_with_empty_axes.
//
// At plan time the input is canonicalised: size-1 dims dropped, neighbouring dims with the same
// reduced/kept role merged. Most graphs then give x [K, R, K2] (K, K2 kept, R reduced; either
// may be 1), handled with affine indexing: in = o*R*K2 + r*K2 + k. Anything else (e.g. axes
// {0, 2} of a 4D tensor) keeps the innermost kept run as K2 and precomputes offset tables for
// the rest: in = base[o] + off[r] + k. Output index is always o*K2 + k.
// Lets GCC if-convert the float selects in these kernels (clamps, max) and vectorise them;
// no effect on results (no code here relies on FP exception traps).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <algorithm>
#include <cmath>
#include <limits>

#include "common/parallel.h"
#include "ops/op.h"

namespace pyedge {
namespace {

enum class Kind { Sum, Mean, Max, Min, Prod, SumSquare, L2 };

struct Plan {
  int64_t K = 1, R = 1, K2 = 1;
  bool affine = true;
  std::vector<int64_t> base, off;  // tables when !affine
  int64_t in_base(int64_t o) const { return affine ? o * R * K2 : base[size_t(o)]; }
  int64_t in_off(int64_t r) const { return affine ? r * K2 : off[size_t(r)]; }
};

Plan make_plan(const Shape& s, const std::vector<bool>& red) {
  // (size, reduced) of the merged dims
  std::vector<std::pair<int64_t, bool>> d;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == 1) continue;
    if (!d.empty() && d.back().second == red[i]) d.back().first *= s[i];
    else d.push_back({s[i], red[i]});
  }
  Plan p;
  if (!d.empty() && !d.back().second) {
    p.K2 = d.back().first;
    d.pop_back();
  }
  size_t nk = 0, nr = 0;
  for (auto& e : d) (e.second ? nr : nk) += 1;
  for (auto& e : d) (e.second ? p.R : p.K) *= e.first;
  if (nr <= 1 && nk <= 1) return p;  // [K?, R?] + K2: affine
  p.affine = false;
  // strides of the merged dims (K2 innermost)
  std::vector<int64_t> stride(d.size());
  int64_t st = p.K2;
  for (size_t i = d.size(); i-- > 0;) {
    stride[i] = st;
    st *= d[i].first;
  }
  // odometer over one role's dims, writing linear offsets in row-major order
  auto table = [&](bool role, int64_t count) {
    std::vector<int64_t> t(size_t(count), 0);
    std::vector<size_t> dims;
    for (size_t i = 0; i < d.size(); ++i)
      if (d[i].second == role) dims.push_back(i);
    std::vector<int64_t> idx(dims.size(), 0);
    int64_t cur = 0;
    for (int64_t c = 0; c < count; ++c) {
      t[size_t(c)] = cur;
      for (size_t j = dims.size(); j-- > 0;) {
        size_t di = dims[j];
        cur += stride[di];
        if (++idx[j] < d[di].first) break;
        cur -= stride[di] * d[di].first;
        idx[j] = 0;
      }
    }
    return t;
  };
  p.base = table(false, p.K);
  p.off = table(true, p.R);
  return p;
}

// Calls f(in_index, out_index) once for every input element. split_r: the reduced range may be
// split across threads (safe when f writes only at in_index); otherwise every output is
// handled by one thread (for accumulating into outputs).
template <typename F>
void for_each_pair(const Plan& p, bool split_r, F&& f) {
  const int64_t K = p.K, R = p.R, K2 = p.K2;
  if (K2 == 1) {
    if (K == 1 && split_r) {
      parallel_for(R, 1 << 14, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) f(p.in_off(r), int64_t(0));
      });
      return;
    }
    parallel_for(K, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(R, 1)),
                 [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o) {
        int64_t ib = p.in_base(o);
        if (p.affine)
          for (int64_t r = 0; r < R; ++r) f(ib + r, o);
        else
          for (int64_t r = 0; r < R; ++r) f(ib + p.off[size_t(r)], o);
      }
    });
    return;
  }
  const int64_t kb = 512, nkb = (K2 + kb - 1) / kb;
  int64_t work = R * std::min(K2, kb);
  parallel_for(K * nkb, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(work, 1)),
               [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      int64_t o = it / nkb, k0 = (it % nkb) * kb, k1 = std::min(K2, k0 + kb);
      int64_t ib = p.in_base(o), ob = o * K2;
      for (int64_t r = 0; r < R; ++r) {
        int64_t i0 = ib + p.in_off(r);
        for (int64_t k = k0; k < k1; ++k) f(i0 + k, ob + k);
      }
    }
  });
}

// Accumulation policies: y = fin(step(...step(init, x0)..., xn)).
template <typename T> struct SumR {
  static T init() { return T(0); }
  static T step(T a, T x) { return a + x; }
  static T merge(T a, T b) { return a + b; }
};
template <typename T> struct SumSqR {
  static T init() { return T(0); }
  static T step(T a, T x) { return a + x * x; }
  static T merge(T a, T b) { return a + b; }
};
template <typename T> struct ProdR {
  static T init() { return T(1); }
  static T step(T a, T x) { return a * x; }
  static T merge(T a, T b) { return a * b; }
};
template <typename T> struct MaxR {
  static T init() {
    return std::numeric_limits<T>::has_infinity ? -std::numeric_limits<T>::infinity()
                                                : std::numeric_limits<T>::lowest();
  }
  static T step(T a, T x) { return x > a ? x : a; }
  static T merge(T a, T b) { return step(a, b); }
};
template <typename T> struct MinR {
  static T init() {
    return std::numeric_limits<T>::has_infinity ? std::numeric_limits<T>::infinity()
                                                : std::numeric_limits<T>::max();
  }
  static T step(T a, T x) { return x < a ? x : a; }
  static T merge(T a, T b) { return step(a, b); }
};

constexpr int kLanes = 8;

// Reduction of n contiguous values with kLanes independent accumulators (vectorisable).
template <typename T, typename P>
T reduce_contig(const T* x, int64_t n) {
  T acc[kLanes];
  for (int j = 0; j < kLanes; ++j) acc[j] = P::init();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] = P::step(acc[j], x[i + j]);
  T a = acc[0];
  for (int j = 1; j < kLanes; ++j) a = P::merge(a, acc[j]);
  for (; i < n; ++i) a = P::step(a, x[i]);
  return a;
}

template <typename T, typename P>
void reduce_forward(const Plan& p, const T* x, T* y) {
  const int64_t K = p.K, R = p.R, K2 = p.K2;
  if (K2 == 1 && K == 1 && p.affine) {
    // full reduction: fixed blocks (deterministic), partials on the stack
    constexpr int64_t kMaxBlocks = 64;
    int64_t nb = std::min<int64_t>(kMaxBlocks, std::max<int64_t>(1, R / (1 << 15)));
    int64_t per = (R + nb - 1) / nb;
    T part[kMaxBlocks];
    parallel_for(nb, 1, [&](int64_t b, int64_t e) {
      for (int64_t blk = b; blk < e; ++blk) {
        int64_t r0 = std::min(R, blk * per), r1 = std::min(R, r0 + per);
        part[blk] = reduce_contig<T, P>(x + r0, r1 - r0);
      }
    });
    T a = P::init();
    for (int64_t blk = 0; blk < nb; ++blk) a = P::merge(a, part[blk]);
    y[0] = a;
    return;
  }
  if (K2 == 1) {
    parallel_for(K, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(R, 1)),
                 [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o) {
        if (p.affine) {
          y[o] = reduce_contig<T, P>(x + o * R, R);
        } else {
          const T* xb = x + p.base[size_t(o)];
          T a = P::init();
          for (int64_t r = 0; r < R; ++r) a = P::step(a, xb[p.off[size_t(r)]]);
          y[o] = a;
        }
      }
    });
    return;
  }
  // K2 > 1: rows of K2 accumulated along r, vectorised along k
  const int64_t kb = 512, nkb = (K2 + kb - 1) / kb;
  int64_t work = R * std::min(K2, kb);
  parallel_for(K * nkb, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(work, 1)),
               [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      int64_t o = it / nkb, k0 = (it % nkb) * kb, k1 = std::min(K2, k0 + kb);
      T* yr = y + o * K2;
      for (int64_t k = k0; k < k1; ++k) yr[k] = P::init();
      int64_t ib = p.in_base(o);
      for (int64_t r = 0; r < R; ++r) {
        const T* xr = x + ib + p.in_off(r);
        for (int64_t k = k0; k < k1; ++k) yr[k] = P::step(yr[k], xr[k]);
      }
    }
  });
}

class Reduce : public Op {
 public:
  Reduce(const NodeInfo& n, const std::vector<Tensor>& in, Kind kind) : kind_(kind) {
    check_num_inputs(n, in, 1, 2);
    const Tensor& x = in[0];
    bool int_ok = kind == Kind::Sum || kind == Kind::Max || kind == Kind::Min ||
                  kind == Kind::Prod;
    PYEDGE_CHECK(x.dtype == DType::f32 ||
                     (int_ok && (x.dtype == DType::i64 || x.dtype == DType::i32)),
                 n.where(), ": input must be float32", int_ok ? " or int64/int32" : "",
                 ", got ", dtype_name(x.dtype));
    std::vector<int64_t> axes;
    bool axes_given = false;
    if (in.size() > 1 && n.has_input(1)) {
      axes = const_input(n, in, 1, "axes").to_ints();
      axes_given = true;
    } else if (n.attrs.has("axes")) {
      axes = n.attrs.get_ints("axes");
      axes_given = true;
    }
    (void)axes_given;
    bool keep = n.attrs.get_int("keepdims", 1) != 0;
    bool noop_empty = n.attrs.get_int("noop_with_empty_axes", 0) != 0;
    int64_t rank = x.rank();
    std::vector<bool> red(size_t(rank), false);
    if (axes.empty()) {
      noop_ = noop_empty;
      if (!noop_) red.assign(size_t(rank), true);
    } else {
      for (int64_t a : axes) {
        PYEDGE_CHECK(a >= -rank && a < rank, n.where(), ": axis ", a,
                     " out of range for input of rank ", rank, " (shape ", shape_str(x.shape),
                     ")");
        int64_t na = a < 0 ? a + rank : a;
        PYEDGE_CHECK(!red[size_t(na)], n.where(), ": axis ", a, " listed twice in axes");
        red[size_t(na)] = true;
      }
    }
    Shape out_shape;
    for (int64_t i = 0; i < rank; ++i) {
      if (!red[size_t(i)]) out_shape.push_back(x.shape[size_t(i)]);
      else if (keep) out_shape.push_back(1);
    }
    outputs = {make_output(x.dtype, noop_ ? x.shape : out_shape)};
    plan_ = make_plan(x.shape, red);
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    if (noop_) {
      if (in[0].nbytes() && in[0].data != out[0].data)
        std::copy_n(static_cast<const char*>(in[0].data), in[0].nbytes(),
                    static_cast<char*>(out[0].data));
      return;
    }
    switch (in[0].dtype) {
      case DType::f32: run<float>(in[0], out[0]); break;
      case DType::i64: run<int64_t>(in[0], out[0]); break;
      case DType::i32: run<int32_t>(in[0], out[0]); break;
      default: break;
    }
  }

  bool has_backward() const override {
    return kind_ != Kind::Prod && input_dtypes.size() && input_dtypes[0] == DType::f32;
  }
  bool differentiable_input(size_t i) const override {
    return i == 0 && input_dtypes.size() && input_dtypes[0] == DType::f32;
  }

  size_t backward_scratch_bytes(const std::vector<bool>&) const override {
    bool needs = kind_ == Kind::Max || kind_ == Kind::Min || kind_ == Kind::L2;
    return needs && !noop_ ? size_t(outputs[0].numel()) * sizeof(float) : 0;
  }

  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    if (din[0].data == nullptr || dout[0].data == nullptr) return;
    const float* dy = dout[0].ptr<float>();
    float* dx = din[0].ptr<float>();
    if (noop_) {
      int64_t n = din[0].numel();
      parallel_for(n, 1 << 14, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) dx[i] += dy[i];
      });
      return;
    }
    const Plan& p = plan_;
    switch (kind_) {
      case Kind::Sum:
      case Kind::Mean: {
        float c = kind_ == Kind::Mean ? 1.f / float(std::max<int64_t>(p.R, 1)) : 1.f;
        for_each_pair(p, true, [&](int64_t i, int64_t o) { dx[i] += dy[o] * c; });
        break;
      }
      case Kind::SumSquare: {
        const float* x = in[0].ptr<float>();
        for_each_pair(p, true, [&](int64_t i, int64_t o) { dx[i] += 2.f * x[i] * dy[o]; });
        break;
      }
      case Kind::L2: {
        const float* x = in[0].ptr<float>();
        const float* y = out[0].ptr<float>();
        float* fac = static_cast<float*>(ctx.scratch);  // dy / y per output (0 where y = 0)
        for (int64_t o = 0; o < out[0].numel(); ++o) fac[o] = y[o] > 0.f ? dy[o] / y[o] : 0.f;
        for_each_pair(p, true, [&](int64_t i, int64_t o) { dx[i] += x[i] * fac[o]; });
        break;
      }
      case Kind::Max:
      case Kind::Min: {
        // like torch.amax/amin: the gradient is split evenly among tied extremes
        const float* x = in[0].ptr<float>();
        const float* y = out[0].ptr<float>();
        float* fac = static_cast<float*>(ctx.scratch);
        int64_t no = out[0].numel();
        for (int64_t o = 0; o < no; ++o) fac[o] = 0.f;
        for_each_pair(p, false, [&](int64_t i, int64_t o) { fac[o] += x[i] == y[o] ? 1.f : 0.f; });
        for (int64_t o = 0; o < no; ++o) fac[o] = fac[o] > 0.f ? dy[o] / fac[o] : 0.f;
        for_each_pair(p, true, [&](int64_t i, int64_t o) {
          dx[i] += x[i] == y[o] ? fac[o] : 0.f;
        });
        break;
      }
      case Kind::Prod: break;
    }
  }

  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    std::vector<bool> r(ng.size(), false);
    r[0] = !noop_ && kind_ != Kind::Sum && kind_ != Kind::Mean;
    return r;
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return {!noop_ && (kind_ == Kind::Max || kind_ == Kind::Min || kind_ == Kind::L2)};
  }

 private:
  Kind kind_;
  bool noop_ = false;
  Plan plan_;

  template <typename T>
  void run(const Tensor& xt, const Tensor& yt) {
    const T* x = xt.ptr<T>();
    T* y = yt.ptr<T>();
    switch (kind_) {
      case Kind::Sum: reduce_forward<T, SumR<T>>(plan_, x, y); break;
      case Kind::Mean: reduce_forward<T, SumR<T>>(plan_, x, y); break;
      case Kind::Max: reduce_forward<T, MaxR<T>>(plan_, x, y); break;
      case Kind::Min: reduce_forward<T, MinR<T>>(plan_, x, y); break;
      case Kind::Prod: reduce_forward<T, ProdR<T>>(plan_, x, y); break;
      case Kind::SumSquare: reduce_forward<T, SumSqR<T>>(plan_, x, y); break;
      case Kind::L2: reduce_forward<T, SumSqR<T>>(plan_, x, y); break;
    }
    int64_t no = yt.numel();
    if (kind_ == Kind::Mean) {
      T inv = T(1) / T(std::max<int64_t>(plan_.R, 1));
      for (int64_t o = 0; o < no; ++o) y[o] *= inv;
    } else if (kind_ == Kind::L2) {
      for (int64_t o = 0; o < no; ++o) y[o] = T(std::sqrt(double(y[o])));
    }
  }
};

template <Kind K>
struct ReduceK : Reduce {
  ReduceK(const NodeInfo& n, const std::vector<Tensor>& in) : Reduce(n, in, K) {}
};
PYEDGE_REGISTER_OP("ReduceSum", ReduceK<Kind::Sum>);
PYEDGE_REGISTER_OP("ReduceMean", ReduceK<Kind::Mean>);
PYEDGE_REGISTER_OP("ReduceMax", ReduceK<Kind::Max>);
PYEDGE_REGISTER_OP("ReduceMin", ReduceK<Kind::Min>);
PYEDGE_REGISTER_OP("ReduceProd", ReduceK<Kind::Prod>);
PYEDGE_REGISTER_OP("ReduceSumSquare", ReduceK<Kind::SumSquare>);
PYEDGE_REGISTER_OP("ReduceL2", ReduceK<Kind::L2>);

}  // namespace
}  // namespace pyedge
