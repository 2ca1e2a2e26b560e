// One template for pointwise unary ops. A kernel struct K supplies the math:
//   explicit K(const NodeInfo&)                  attributes
//   float f(float x) const                       forward (a template over T when kNumeric)
//   float df(float x, float y, float dy) const   dx for one element; reads x and/or y only as
//                                                K::reads_x / K::reads_y say (others are 0)
//   static constexpr bool kGrad                  whether a gradient exists
//   static constexpr bool kNumeric               forward also for float64/int64/int32
//   static constexpr int64_t kGrain              elements per parallel chunk (cost-dependent)
// and optionally, with static constexpr bool kVector = true, the same math on simd vectors:
//   template <class S> S::V fv(S::V x) const
//   template <class S> S::V dfv(S::V x, S::V y, S::V dy) const
// used for float32 instead of f/df where simd::Native is AVX2, AVX-512 or NEON
// (PYEDGE_UNARY_VECTOR). Portable x86-64 builds (Native = SSE2) keep f/df: their
// auto-vectorised AVX2/AVX-512 clones beat 4-lane intrinsics.
#pragma once
#include <algorithm>
#include <type_traits>

#include "common/parallel.h"
#include "common/simd.h"
#include "ops/broadcast.h"
#include "ops/fast_math.h"
#include "ops/op.h"

// Forces vectorisation of loops whose body has selects GCC will not if-convert on its own
// (floating-point ops "may trap" without -fno-trapping-math). Lanes are independent.
#ifdef _OPENMP
#define PYEDGE_SIMD _Pragma("omp simd")
#else
#define PYEDGE_SIMD
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__)) || \
    (defined(__aarch64__) && defined(__ARM_NEON))
#define PYEDGE_UNARY_VECTOR 1
#else
#define PYEDGE_UNARY_VECTOR 0
#endif

namespace pyedge {

template <class K>
class UnaryOp : public Op {
 public:
  UnaryOp(const NodeInfo& n, const std::vector<Tensor>& in) : k_(n) {
    check_num_inputs(n, in, 1, 1);
    if constexpr (K::kNumeric) {
      DType t = in[0].dtype;
      PYEDGE_CHECK(t == DType::f32 || t == DType::f64 || t == DType::i64 || t == DType::i32,
                   n.where(), ": X must be float32, float64, int64 or int32, got ", dtype_name(t));
    } else {
      check_float(n, in[0], "X");
    }
    outputs = {make_output(in[0].dtype, in[0].shape)};
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out, RunContext&) override {
    if constexpr (K::kNumeric) {
      dispatch_type(in[0].dtype, [&](auto tag) {
        using T = decltype(tag);
        if constexpr (!std::is_same_v<T, uint8_t>) run<T>(in[0], out[0]);
      });
    } else {
      run<float>(in[0], out[0]);
    }
  }

  bool has_backward() const override { return K::kGrad; }
  bool assigns_fresh_grads() const override { return true; }
  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    if (!din[0].data || !dout[0].data) return;
    const float* x = k_.reads_x ? in[0].ptr<float>() : nullptr;
    const float* y = k_.reads_y ? out[0].ptr<float>() : nullptr;
    const float* dy = dout[0].ptr<float>();
    float* dx = din[0].ptr<float>();
    const bool assign = ctx.fresh(0);
    parallel_for(in[0].numel(), K::kGrain, [&](int64_t b, int64_t e) {
      if constexpr (kUseVector) {
        if (assign) bwd_vec<true>(k_, x, y, dy, dx, b, e);
        else bwd_vec<false>(k_, x, y, dy, dx, b, e);
      } else {
        if (assign) bwd_chunk<true>(k_, x, y, dy, dx, b, e);
        else bwd_chunk<false>(k_, x, y, dy, dx, b, e);
      }
    });
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>&) const override {
    return {k_.reads_x};
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return {k_.reads_y};
  }

 private:
  template <typename T>
  void run(const Tensor& xt, const Tensor& yt) const {
    const T* x = xt.ptr<T>();
    T* y = yt.ptr<T>();
    parallel_for(xt.numel(), K::kGrain, [&](int64_t b, int64_t e) {
      if constexpr (kUseVector && std::is_same_v<T, float>) fwd_vec(k_, x, y, b, e);
      else fwd_chunk<T>(k_, x, y, b, e);
    });
  }

  static constexpr bool kUseVector = PYEDGE_UNARY_VECTOR && K::kVector;
  // Explicit-SIMD chunks. A chunk's last partial vector runs padded through the same vector
  // code (not a scalar tail), so every element gets the same arithmetic whatever the chunking
  // (thread count).
  static void fwd_vec(const K& k, const float* x, float* y, int64_t b, int64_t e) {
    using S = simd::Native;
    int64_t i = b;
    for (; i + S::W <= e; i += S::W) S::store(y + i, k.template fv<S>(S::load(x + i)));
    if (i < e) {
      float bx[S::W] = {}, by[S::W];
      std::copy(x + i, x + e, bx);
      S::store(by, k.template fv<S>(S::load(bx)));
      std::copy(by, by + (e - i), y + i);
    }
  }
  template <bool kAssign>
  static void bwd_vec(const K& k, const float* x, const float* y, const float* dy, float* dx,
                      int64_t b, int64_t e) {
    using S = simd::Native;
    using V = typename S::V;
    const V zero = S::set1(0.f);
    auto one = [&](const float* xp, const float* yp, const float* dyp, float* dxp) {
      const V g = k.template dfv<S>(xp ? S::load(xp) : zero, yp ? S::load(yp) : zero, S::load(dyp));
      S::store(dxp, kAssign ? g : S::add(S::load(dxp), g));
    };
    int64_t i = b;
    for (; i + S::W <= e; i += S::W)
      one(x ? x + i : nullptr, y ? y + i : nullptr, dy + i, dx + i);
    if (i < e) {
      const int64_t m = e - i;
      float bx[S::W] = {}, by[S::W] = {}, bdy[S::W] = {}, bdx[S::W] = {};
      if (x) std::copy(x + i, x + e, bx);
      if (y) std::copy(y + i, y + e, by);
      std::copy(dy + i, dy + e, bdy);
      std::copy(dx + i, dx + e, bdx);
      one(x ? bx : nullptr, y ? by : nullptr, bdy, bdx);
      std::copy(bdx, bdx + m, dx + i);
    }
  }
  // flatten: inline the whole kernel (fast_math included) so the loops vectorise; clones for
  // AVX2 / AVX-512 (fast_math.h).
  template <typename T>
  __attribute__((flatten)) PYEDGE_SIMD_CLONES static void fwd_chunk(const K& k, const T* x, T* y, int64_t b, int64_t e) {
    PYEDGE_SIMD for (int64_t i = b; i < e; ++i) {
      if constexpr (K::kNumeric) y[i] = k.template f<T>(x[i]);
      else y[i] = k.f(x[i]);
    }
  }
  // dx = (or +=) df(x, y, dy); kAssign for a fresh gradient buffer.
  template <bool kAssign>
  __attribute__((flatten)) PYEDGE_SIMD_CLONES static void bwd_chunk(const K& k, const float* x, const float* y,
                                                 const float* dy, float* dx, int64_t b, int64_t e) {
    if (x && y) {
      PYEDGE_SIMD for (int64_t i = b; i < e; ++i) put<kAssign>(dx[i], k.df(x[i], y[i], dy[i]));
    } else if (x) {
      PYEDGE_SIMD for (int64_t i = b; i < e; ++i) put<kAssign>(dx[i], k.df(x[i], 0.f, dy[i]));
    } else if (y) {
      PYEDGE_SIMD for (int64_t i = b; i < e; ++i) put<kAssign>(dx[i], k.df(0.f, y[i], dy[i]));
    } else {
      PYEDGE_SIMD for (int64_t i = b; i < e; ++i) put<kAssign>(dx[i], k.df(0.f, 0.f, dy[i]));
    }
  }
  K k_;
};

// Defaults for kernel structs.
struct UnaryKernel {
  static constexpr bool kGrad = true;
  static constexpr bool kNumeric = false;
  static constexpr bool kVector = false;  // fv/dfv given (see the top)
  static constexpr int64_t kGrain = 1 << 12;  // transcendental: ~a few ns per element
  bool reads_x = true, reads_y = false;
};
struct CheapUnaryKernel : UnaryKernel {
  static constexpr int64_t kGrain = 1 << 15;
};

}  // namespace pyedge
