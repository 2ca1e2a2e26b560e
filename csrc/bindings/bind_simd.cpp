// Test hooks for the SIMD layer (common/simd.h): run a kernel on its SIMD path (simd::Native)
// or on the scalar reference (simd::Scalar) so tests can compare the two on any machine.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/simd.h"
#include "ops/attention_kernels.h"
#include "ops/dora_kernels.h"
#include "ops/gated_mlp_kernels.h"
#include "ops/rmsnorm_kernels.h"
#include "ops/rotary_kernels.h"
#include "ops/softmax_kernels.h"
#include "ops/unary_kernels.h"

namespace py = pybind11;

namespace pyedge {
namespace {

using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;

template <class S, class Op>
void binary(const float* a, const float* b, float* y, int64_t n, Op op) {
  int64_t i = 0;
  for (; i + S::W <= n; i += S::W) S::store(y + i, op.v(S::load(a + i), S::load(b + i)));
  for (; i < n; ++i) y[i] = op.s(a[i], b[i]);
}

#define PYEDGE_BINOP(NAME, EXPR)                                                     \
  template <class S>                                                                 \
  struct NAME##Op {                                                                  \
    static typename S::V v(typename S::V a, typename S::V b) { return S::EXPR(a, b); } \
    static float s(float a, float b) { return simd::Scalar::EXPR(a, b); }            \
  };
PYEDGE_BINOP(Add, add)
PYEDGE_BINOP(Sub, sub)
PYEDGE_BINOP(Mul, mul)
PYEDGE_BINOP(Div, div)
PYEDGE_BINOP(Max, max)
PYEDGE_BINOP(Min, min)
#undef PYEDGE_BINOP

// Runs kernel `name` with backend S. Elementwise kernels return an array shaped like a;
// row reductions return a 1-element array; "softmax"/"logsoftmax"/"layernorm" treat a as
// [rows, D] (layernorm: b = scale [D], c = bias [D] or empty).
template <class S>
py::array run(const std::string& name, F32 a, F32 b, F32 c) {
  const int64_t n = int64_t(a.size());
  const float* x = a.data();
  auto need = [&](const F32& t, const char* what) {
    if (int64_t(t.size()) != n) throw std::invalid_argument(name + ": " + what + " must match a");
  };
  auto scalar_out = [](float v) {
    py::array_t<float> r(1);
    r.mutable_data()[0] = v;
    return py::array(r);
  };
  std::vector<py::ssize_t> shape(a.shape(), a.shape() + a.ndim());
  py::array_t<float> out(shape);
  float* y = out.mutable_data();
  if (name == "add") { need(b, "b"); binary<S>(x, b.data(), y, n, AddOp<S>{}); }
  else if (name == "sub") { need(b, "b"); binary<S>(x, b.data(), y, n, SubOp<S>{}); }
  else if (name == "mul") { need(b, "b"); binary<S>(x, b.data(), y, n, MulOp<S>{}); }
  else if (name == "div") { need(b, "b"); binary<S>(x, b.data(), y, n, DivOp<S>{}); }
  else if (name == "max") { need(b, "b"); binary<S>(x, b.data(), y, n, MaxOp<S>{}); }
  else if (name == "min") { need(b, "b"); binary<S>(x, b.data(), y, n, MinOp<S>{}); }
  else if (name == "fma") {
    need(b, "b");
    need(c, "c");
    const float *pb = b.data(), *pc = c.data();
    int64_t i = 0;
    for (; i + S::W <= n; i += S::W)
      S::store(y + i, S::fma(S::load(x + i), S::load(pb + i), S::load(pc + i)));
    for (; i < n; ++i) y[i] = simd::Scalar::fma(x[i], pb[i], pc[i]);
  }
  else if (name == "exp") simd::exp_array<S>(x, y, n);
  else if (name == "tanh") simd::tanh_array<S>(x, y, n);
  else if (name == "erf") simd::erf_array<S>(x, y, n);
  else if (name == "sigmoid") simd::sigmoid_array<S>(x, y, n);
  else if (name == "dora_sum_sq") return scalar_out(dorak::sum_sq<S>(x, n));
  else if (name == "dora_scale" || name == "dora_scale_bwd") {
    // dora_scale: a = z [rows, N], b = c [N], c = bias [N] or empty -> y [rows, N];
    // dora_scale_bwd: a = dy [rows, N], b = z [rows, N], c = c [N] -> [rows + 1, N]: dz rows
    // (accumulated onto 0.5), then Σ dy∘z
    if (a.ndim() != 2) throw std::invalid_argument(name + ": a must be 2-D [rows, N]");
    const int64_t rows = a.shape(0), N = a.shape(1);
    if (name == "dora_scale") {
      if (int64_t(b.size()) != N) throw std::invalid_argument("dora_scale: b must be [N]");
      if (c.size() != 0 && int64_t(c.size()) != N)
        throw std::invalid_argument("dora_scale: c must be [N] or empty");
      for (int64_t r = 0; r < rows; ++r)
        dorak::scale_row<S>(x + r * N, b.data(), c.size() ? c.data() : nullptr, y + r * N, N);
    } else {
      need(b, "b");
      if (int64_t(c.size()) != N) throw std::invalid_argument("dora_scale_bwd: c must be [N]");
      py::array_t<float> res(std::vector<py::ssize_t>{rows + 1, N});
      float* o = res.mutable_data();
      std::fill(o, o + rows * N, 0.5f);
      std::fill(o + rows * N, o + (rows + 1) * N, 0.f);
      for (int64_t r = 0; r < rows; ++r)
        dorak::scale_row_bwd<S>(x + r * N, b.data() + r * N, c.data(), o + r * N, r % 2 == 0,
                                o + rows * N, N);
      return std::move(res);
    }
  }
  else if (name == "log") simd::log_array<S>(x, y, n);
  else if (name.rfind("unary_", 0) == 0) {
    // unary_<op>: y = f(a); unary_<op>_bwd: b = dY, returns dX (ops/unary_kernels.h)
    const bool bwd = name.size() > 4 && name.compare(name.size() - 4, 4, "_bwd") == 0;
    if (bwd) need(b, "b");
    const std::string op = name.substr(6, name.size() - 6 - (bwd ? 4 : 0));
    if (!uk::run_named<S>(op, x, bwd ? b.data() : nullptr, y, n))
      throw std::invalid_argument("simd_kernel: unknown unary kernel '" + op + "'");
  }
  else if (name == "row_max") return scalar_out(rowk::row_max<S>(x, n));
  else if (name == "row_sum") return scalar_out(rowk::row_sum<S>(x, n));
  else if (name == "row_dot") { need(b, "b"); return scalar_out(rowk::row_dot<S>(x, b.data(), n)); }
  else if (name == "exp_sum") return scalar_out(rowk::exp_sum<S>(x, rowk::row_max<S>(x, n), n));
  else if (name == "softmax" || name == "logsoftmax" || name == "layernorm") {
    if (a.ndim() != 2) throw std::invalid_argument(name + ": a must be 2-D [rows, D]");
    const int64_t rows = a.shape(0), D = a.shape(1);
    if (name == "layernorm") {
      if (int64_t(b.size()) != D) throw std::invalid_argument("layernorm: b (scale) must be [D]");
      const float* bias = nullptr;
      if (c.size() != 0) {
        if (int64_t(c.size()) != D) throw std::invalid_argument("layernorm: c (bias) must be [D]");
        bias = c.data();
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * D;
        float mu = rowk::row_sum<S>(xr, D) / float(D);
        float var = rowk::row_sqdev<S>(xr, mu, D);
        float rs = 1.f / std::sqrt(var / float(D) + 1e-5f);
        rowk::ln_apply<S>(xr, mu, rs, b.data(), bias, y + r * D, D);
      }
    } else {
      for (int64_t r = 0; r < rows; ++r)
        rowk::softmax_row<S>(x + r * D, y + r * D, D, name == "logsoftmax");
    }
  } else if (name == "rmsnorm" || name == "rmsnorm_1p" || name == "rmsnorm_bwd" || name == "rmsnorm_1p_bwd") {
    // a = X [rows, D], b = W [D] (or empty: no weight); rmsnorm_1p: w' = 1 + W;
    // rmsnorm_bwd: c = dY [rows, D], returns [rows + 1, D]: dX rows, then dW
    if (a.ndim() != 2) throw std::invalid_argument(name + ": a must be 2-D [rows, D]");
    const int64_t rows = a.shape(0), D = a.shape(1);
    const bool has_w = b.size() != 0, bwd = name.size() > 4 && name.compare(name.size() - 4, 4, "_bwd") == 0;
    if (has_w && int64_t(b.size()) != D) throw std::invalid_argument(name + ": b must be [D]");
    if (bwd) need(c, "c");
    const int form = !has_w ? rmsk::kNone : name.rfind("rmsnorm_1p", 0) == 0 ? rmsk::kOnePlus : rmsk::kWeight;
    py::array_t<float> res(std::vector<py::ssize_t>{bwd ? rows + 1 : rows, D});
    float* o = res.mutable_data();
    std::fill(o, o + res.size(), 0.f);
    const float* w = has_w ? b.data() : nullptr;
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * D;
      const float rs = 1.f / std::sqrt(rmsk::sum_sq<S>(xr, D) / float(D) + 1e-6f);
      auto go = [&](auto form_tag) {
        constexpr int kW = decltype(form_tag)::value;
        if (!bwd) return rmsk::apply_row<S, kW>(xr, w, rs, o + r * D, D);
        const float* dy = c.data() + r * D;
        const float cc = -rs * rs * rs * rmsk::dot_row<S, kW>(xr, w, dy, D) / float(D);
        rmsk::bwd_row<S, kW, true>(xr, w, dy, rs, cc, o + r * D, has_w ? o + rows * D : nullptr, D);
      };
      if (form == rmsk::kNone) go(std::integral_constant<int, rmsk::kNone>{});
      else if (form == rmsk::kWeight) go(std::integral_constant<int, rmsk::kWeight>{});
      else go(std::integral_constant<int, rmsk::kOnePlus>{});
    }
    return std::move(res);
  } else if (name.rfind("gated_", 0) == 0) {
    // gated_<act>: y = act(a) * b; gated_<act>_bwd: c = dY, returns [2, n]: dGate, dUp
    need(b, "b");
    const bool bwd = name.size() > 4 && name.compare(name.size() - 4, 4, "_bwd") == 0;
    const std::string act = name.substr(6, name.size() - 6 - (bwd ? 4 : 0));
    const int a_ = act == "silu" ? gmk::kSilu : act == "gelu" ? gmk::kGelu
                 : act == "gelu_tanh" ? gmk::kGeluTanh : -1;
    if (a_ < 0) throw std::invalid_argument("simd_kernel: unknown gated activation '" + act + "'");
    if (bwd) need(c, "c");
    py::array_t<float> res(std::vector<py::ssize_t>{bwd ? 2 : 1, n});
    float* o = res.mutable_data();
    auto go = [&](auto act_tag) {
      constexpr int kA = decltype(act_tag)::value;
      if (bwd) gmk::backward<S, kA, true>(x, b.data(), c.data(), o, o + n, n);
      else gmk::forward<S, kA>(x, b.data(), o, n);
    };
    if (a_ == gmk::kSilu) go(std::integral_constant<int, gmk::kSilu>{});
    else if (a_ == gmk::kGelu) go(std::integral_constant<int, gmk::kGelu>{});
    else go(std::integral_constant<int, gmk::kGeluTanh>{});
    return std::move(res);
  } else if (name == "rotary" || name == "rotary_bwd") {
    // a = X [rows, D] (rotary_bwd: dY, as dX needs no X), b = cos, c = sin [rows, rd]
    // (one table row per row of a); returns Y (dX) [rows, D]
    if (a.ndim() != 2 || b.ndim() != 2 || c.ndim() != 2 || b.shape(0) != a.shape(0) ||
        c.shape(0) != a.shape(0) || b.shape(1) != c.shape(1) || b.shape(1) % 2 ||
        b.shape(1) > a.shape(1))
      throw std::invalid_argument(name + ": a [rows, D], b and c [rows, rd] with rd even <= D");
    const int64_t rows = a.shape(0), D = a.shape(1), rd = b.shape(1);
    for (int64_t r = 0; r < rows; ++r) {
      if (name == "rotary")
        rotk::fwd_row<S>(x + r * D, b.data() + r * rd, c.data() + r * rd, y + r * D, rd / 2, D);
      else
        rotk::bwd_row<S, true>(x + r * D, b.data() + r * rd, c.data() + r * rd, y + r * D,
                               rd / 2, D);
    }
  } else {
    throw std::invalid_argument("simd_kernel: unknown kernel '" + name + "'");
  }
  return std::move(out);
}

// One (b, h) slice of pyedge.Attention's fused kernels (ops/attention_kernels.h) with backend
// S: q [L, D], k [Lk, D], v [Lk, Dv], dO [L, Dv], mask [L, Lk] or empty; returns
// (O [L, Dv], LSE [L], dQ, dK, dV).
template <class S>
py::tuple attention_slice(F32 q, F32 k, F32 v, F32 dO, F32 mask, float scale, bool causal,
                          int64_t window, float cap) {
  if (q.ndim() != 2 || k.ndim() != 2 || v.ndim() != 2 || dO.ndim() != 2)
    throw std::invalid_argument("attention_slice: q, k, v and dO must be 2-D");
  const int64_t L = q.shape(0), D = q.shape(1), Lk = k.shape(0), Dv = v.shape(1);
  if (k.shape(1) != D || v.shape(0) != Lk || dO.shape(0) != L || dO.shape(1) != Dv ||
      (mask.size() != 0 && (mask.ndim() != 2 || mask.shape(0) != L || mask.shape(1) != Lk)))
    throw std::invalid_argument("attention_slice: shapes q [L, D], k [Lk, D], v [Lk, Dv], "
                                "dO [L, Dv], mask [L, Lk]");
  if (!attn::fits<S>(L, Lk, D, Dv, window > 0) || (causal && Lk < L) || (window > 0 && !causal))
    throw std::invalid_argument("attention_slice: sizes the fused kernels do not take (Lk, D, "
                                "Dv whole vectors, all <= 512; causal needs Lk >= L, a "
                                "window needs causal)");
  attn::Slice s;
  s.L = L;
  s.Lk = Lk;
  s.D = D;
  s.Dv = Dv;
  s.q = q.data();
  s.k = k.data();
  s.v = v.data();
  s.ldq = D;
  s.ldk = D;
  s.ldv = Dv;
  s.mask = mask.size() ? mask.data() : nullptr;
  s.ldm = Lk;
  s.scale = scale;
  s.causal = causal;
  s.coff = Lk - L;
  s.window = window;
  s.cap = cap;
  py::array_t<float> o({L, Dv}), lse(L), dq({L, D}), dk({Lk, D}), dv({Lk, Dv});
  std::vector<float> scratch(size_t(std::max(attn::forward_floats<S>(L, Lk, D, Dv),
                                             attn::backward_floats(L, Lk, D, Dv, true, true,
                                                                   cap > 0.f))));
  attn::forward_slice<S>(s, o.mutable_data(), Dv, lse.mutable_data(), scratch.data());
  const attn::Out oq{dq.mutable_data(), D}, ok{dk.mutable_data(), D}, ov{dv.mutable_data(), Dv};
  attn::backward_slice<S>(s, lse.data(), dO.data(), Dv, &oq, &ok, &ov, scratch.data());
  return py::make_tuple(o, lse, dq, dk, dv);
}

}  // namespace

void bind_simd(py::module_& m) {
  m.def("simd_info", [] {
    py::dict d;
    d["backend"] = simd::Native::name;
    d["width"] = simd::Native::W;
#ifdef PYEDGE_BUILD_TARGET
    d["target"] = PYEDGE_BUILD_TARGET;
#else
    d["target"] = "unknown";
#endif
    return d;
  }, "The SIMD backend this build uses (avx512/avx2/sse2/neon/scalar), its float width and "
     "the -march it was compiled for (target: baseline, x86-64-v3, native, ...).");
  m.def(
      "simd_kernel",
      [](const std::string& name, F32 a, py::object b, py::object c, bool scalar) {
        F32 bb = b.is_none() ? F32(0) : F32(b), cc = c.is_none() ? F32(0) : F32(c);
        return scalar ? run<simd::Scalar>(name, a, bb, cc) : run<simd::Native>(name, a, bb, cc);
      },
      py::arg("name"), py::arg("a"), py::arg("b") = py::none(), py::arg("c") = py::none(),
      py::arg("scalar") = false,
      "Run a SIMD kernel (add sub mul div max min fma exp log tanh erf sigmoid row_max row_sum "
      "row_dot exp_sum softmax logsoftmax layernorm rmsnorm rmsnorm_1p rmsnorm_bwd "
      "gated_<silu|gelu|gelu_tanh>[_bwd] rotary rotary_bwd, unary_<exp|log|sigmoid|tanh|erf|gelu|"
      "gelu_tanh|softplus|elu|elu_x|selu>[_bwd] with b = dY) on the native SIMD path or, with "
      "scalar=True, on the scalar reference.");
  m.def(
      "attention_slice_kernel",
      [](F32 q, F32 k, F32 v, F32 dO, py::object mask, float scale, bool causal, int64_t window,
         float softcap, bool scalar) {
        F32 mm = mask.is_none() ? F32(0) : F32(mask);
        return scalar ? attention_slice<simd::Scalar>(q, k, v, dO, mm, scale, causal, window, softcap)
                      : attention_slice<simd::Native>(q, k, v, dO, mm, scale, causal, window, softcap);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("dO"), py::arg("mask") = py::none(),
      py::arg("scale") = 1.f, py::arg("causal") = false, py::arg("window") = 0,
      py::arg("softcap") = 0.f, py::arg("scalar") = false,
      "One slice of pyedge.Attention's fused kernels, forward then backward: (O, LSE, dQ, dK, "
      "dV) on the native SIMD path or, with scalar=True, the same kernels on the scalar "
      "reference.");
}

}  // namespace pyedge
