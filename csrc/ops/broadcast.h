// Numpy-style broadcasting for elementwise ops, planned once per node.
//
// Broadcast: the output shape plus, for each input (up to kMaxIn), its strides over a
// *merged* view of the output: size-1 output dims are dropped and neighbouring dims where every
// input has the same broadcast pattern are fused. Common cases then need no special code:
//   same shape        [N,C]   + [N,C]  -> 1 dim, strides (1,1)       (a flat loop)
//   scalar operand    [N,C]   + []     -> 1 dim, strides (1,0)
//   bias over rows    [N,C]   + [C]    -> dims N:(C,0) C:(1,1)       (row loop, vector inner)
//   conv bias         [N,C,HW]+[C,1,1] -> dims N, C, HW:(1,0)        (inner loop on a scalar)
// The innermost merged dim always has per-input stride 0 or 1, so kernels specialise the inner
// run on those and the outer dims advance with counters (no per-element division).
//
// ReducePlan: the reverse, for gradients: sums an output-shaped tensor into one input's
// (broadcast) shape, race-free in parallel (each worker owns disjoint output elements).
#pragma once
#include <array>
#include <cstdint>
#include <vector>

#include "common/parallel.h"
#include "ops/op.h"

namespace pyedge {

constexpr int kMaxIn = 3;
constexpr int kMaxMergedDims = 16;

// Result shape of broadcasting all `shapes` together; error names the node and shapes.
Shape broadcast_shapes(const NodeInfo& n, const std::vector<Shape>& shapes);

struct Broadcast {
  Shape out_shape;
  int64_t total = 0;
  int n_in = 0;
  int nd = 1;                                      // merged rank, >= 1
  std::array<int64_t, kMaxMergedDims> dims{};      // outermost first
  std::array<std::array<int64_t, kMaxIn>, kMaxMergedDims> stride{};

  Broadcast() = default;
  // Each of `shapes` must broadcast to `out` (checked).
  Broadcast(const NodeInfo& n, const std::vector<Shape>& shapes, const Shape& out);

  int64_t inner_stride(int k) const { return stride[nd - 1][k]; }

  // Calls f(off, out_off, len) on runs covering the output: `off[k]` is input k's element
  // offset at the run start, the run has `len` output elements starting at `out_off`, and
  // input k advances by inner_stride(k) (0 or 1) per element. Parallel over runs; `grain`
  // is the minimal number of elements per worker.
  template <typename F>
  void for_runs(int64_t grain, F&& f) const {
    if (total <= 0) return;
    if (nd == 1) {
      parallel_for(total, grain, [&](int64_t b, int64_t e) {
        int64_t off[kMaxIn];
        for (int k = 0; k < kMaxIn; ++k) off[k] = b * stride[0][k];
        f(static_cast<const int64_t*>(off), b, e - b);
      });
      return;
    }
    const int64_t inner = dims[nd - 1];
    const int64_t rows = total / inner;
    parallel_for(rows, std::max<int64_t>(1, grain / inner), [&](int64_t rb, int64_t re) {
      int64_t cnt[kMaxMergedDims];
      int64_t off[kMaxIn] = {0, 0, 0};
      int64_t r = rb;
      for (int d = nd - 2; d >= 0; --d) {  // one division per dim per worker
        cnt[d] = r % dims[d];
        r /= dims[d];
        for (int k = 0; k < kMaxIn; ++k) off[k] += cnt[d] * stride[d][k];
      }
      for (int64_t row = rb; row < re; ++row) {
        f(static_cast<const int64_t*>(off), row * inner, inner);
        for (int d = nd - 2; d >= 0; --d) {
          for (int k = 0; k < kMaxIn; ++k) off[k] += stride[d][k];
          if (++cnt[d] < dims[d]) break;
          cnt[d] = 0;
          for (int k = 0; k < kMaxIn; ++k) off[k] -= stride[d][k] * dims[d];
        }
      }
    });
  }
};

// Visits a run of n elements: f(i, a_i, b_i) where a advances by sa and b by sb (each 0 or 1).
// Specialised on the strides so the inner loop is a plain, vectorisable loop.
template <typename A, typename B, typename F>
inline void visit2(int64_t n, const A* a, int64_t sa, const B* b, int64_t sb, F&& f) {
  if (sa && sb) {
    for (int64_t i = 0; i < n; ++i) f(i, a[i], b[i]);
  } else if (sa) {
    const B bv = *b;
    for (int64_t i = 0; i < n; ++i) f(i, a[i], bv);
  } else if (sb) {
    const A av = *a;
    for (int64_t i = 0; i < n; ++i) f(i, av, b[i]);
  } else {
    const A av = *a;
    const B bv = *b;
    for (int64_t i = 0; i < n; ++i) f(i, av, bv);
  }
}

// Three-operand version of visit2: f(i, a_i, b_i, c_i), specialised on all 8 stride patterns.
template <bool SA, bool SB, bool SC, typename A, typename B, typename C, typename F>
inline void visit3_fixed(int64_t n, const A* a, const B* b, const C* c, F& f) {
  for (int64_t i = 0; i < n; ++i) f(i, a[SA ? i : 0], b[SB ? i : 0], c[SC ? i : 0]);
}
template <typename A, typename B, typename C, typename F>
inline void visit3(int64_t n, const A* a, int64_t sa, const B* b, int64_t sb, const C* c,
                   int64_t sc, F&& f) {
  switch ((sa ? 4 : 0) | (sb ? 2 : 0) | (sc ? 1 : 0)) {
    case 7: visit3_fixed<true, true, true>(n, a, b, c, f); break;
    case 6: visit3_fixed<true, true, false>(n, a, b, c, f); break;
    case 5: visit3_fixed<true, false, true>(n, a, b, c, f); break;
    case 4: visit3_fixed<true, false, false>(n, a, b, c, f); break;
    case 3: visit3_fixed<false, true, true>(n, a, b, c, f); break;
    case 2: visit3_fixed<false, true, false>(n, a, b, c, f); break;
    case 1: visit3_fixed<false, false, true>(n, a, b, c, f); break;
    default: visit3_fixed<false, false, false>(n, a, b, c, f); break;
  }
}

// out = f(a, b) elementwise with broadcasting (plan over inputs a=0, b=1).
template <typename T, typename R, typename F>
void broadcast_binary(const Broadcast& bc, const T* a, const T* b, R* out, int64_t grain, F f) {
  const int64_t sa = bc.inner_stride(0), sb = bc.inner_stride(1);
  bc.for_runs(grain, [&](const int64_t* off, int64_t oo, int64_t n) {
    R* o = out + oo;
    visit2(n, a + off[0], sa, b + off[1], sb, [&](int64_t i, T x, T y) { o[i] = f(x, y); });
  });
}

// out = broadcast copy of input 0 (any element type of this size).
template <typename T>
void broadcast_copy(const Broadcast& bc, const T* a, T* out) {
  const int64_t sa = bc.inner_stride(0);
  bc.for_runs(1 << 15, [&](const int64_t* off, int64_t oo, int64_t n) {
    const T* p = a + off[0];
    T* o = out + oo;
    if (sa) {
      for (int64_t i = 0; i < n; ++i) o[i] = p[i];
    } else {
      const T v = *p;
      for (int64_t i = 0; i < n; ++i) o[i] = v;
    }
  });
}

class ReducePlan {
 public:
  ReducePlan() = default;
  // Sums tensors of shape `out` into shape `in`, which broadcasts to `out`.
  ReducePlan(const Shape& out, const Shape& in);
  // dst[in-shaped] += alpha * sum over broadcast dims of g[out-shaped]; with assign, dst is
  // overwritten instead (a fresh gradient buffer, see RunContext::fresh_din).
  void accumulate(const float* g, float* dst, float alpha = 1.f, bool assign = false) const;
  bool identity() const { return identity_; }  // no dim is reduced: dst += alpha * g

 private:
  bool identity_ = true;
  int64_t total_ = 0, dst_n_ = 0;
  bool inner_kept_ = true;  // innermost merged dim is kept (else reduced)
  int64_t inner_ = 1;       // length of the innermost merged dim
  int nk_ = 0, nr_ = 0;     // kept / reduced dims other than the innermost one
  int64_t kdim_[kMaxMergedDims]{}, kstr_[kMaxMergedDims]{};  // kept dims: size, stride in g
  int64_t rdim_[kMaxMergedDims]{}, rstr_[kMaxMergedDims]{};  // reduced dims: size, stride in g
};

// Sum of n floats with independent partial sums (vectorises without -ffast-math).
float sum_floats(const float* p, int64_t n);

// Raw element pointer without the dtype check of Tensor::ptr (bool tensors are read as uint8).
template <typename T>
inline T* raw(const Tensor& t) { return static_cast<T*>(t.data); }

// Type dispatch for kernels: f(T{}) with T the storage type of `dt` (bool -> uint8_t).
template <typename F>
void dispatch_type(DType dt, F&& f) {
  switch (dt) {
    case DType::f32: f(float{}); return;
    case DType::f64: f(double{}); return;
    case DType::i64: f(int64_t{}); return;
    case DType::i32: f(int32_t{}); return;
    case DType::u8: case DType::boolean: f(uint8_t{}); return;
  }
}

}  // namespace pyedge
