// Test and benchmark hooks for the quantized GEMM (ops/quant_gemm.h, ops/quant_kernels.h):
// the dequantization inner loops on a chosen path (tests compare each SIMD path with the
// scalar reference bit for bit) and a timer of the quantized GEMM against the float SGEMM
// on the same shapes (bench/quant_micro.py).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <string>
#include <vector>

#include "common/error.h"
#include "ops/blas.h"
#include "ops/quant_gemm.h"

namespace py = pybind11;

namespace pyedge {
namespace {

using U8 = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;
using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;

const char* path_name(qk::Path p) {
  switch (p) {
    case qk::Path::scalar: return "scalar";
    case qk::Path::avx2: return "avx2";
    case qk::Path::avx512: return "avx512";
    case qk::Path::neon: return "neon";
  }
  return "?";
}

qk::Path path_from(const std::string& s) {
  for (qk::Path p : {qk::Path::scalar, qk::Path::avx2, qk::Path::avx512, qk::Path::neon})
    if (s == path_name(p)) {
      PYEDGE_CHECK(qk::path_available(p), "quant_dequant_kernel: path '", s,
                   "' is not in this build");
      return p;
    }
  PYEDGE_CHECK(s == "native", "quant_dequant_kernel: unknown path '", s, "'");
  return qk::native_path();
}

// kind: "lut4_lo" / "lut4_hi" (params = the 16-entry table), "u8" (params = [zp, scale]).
py::array dequant_kernel(const std::string& kind, U8 codes, int64_t n, F32 params,
                         const std::string& path) {
  const qk::Path p = path_from(path);
  PYEDGE_CHECK(n >= 0, "quant_dequant_kernel: n must be >= 0");
  const bool four = kind == "lut4_lo" || kind == "lut4_hi";
  PYEDGE_CHECK(four || kind == "u8", "quant_dequant_kernel: unknown kind '", kind, "'");
  PYEDGE_CHECK(int64_t(codes.size()) >= (four ? (n + 1) / 2 : n),
               "quant_dequant_kernel: too few code bytes for n");
  PYEDGE_CHECK(params.size() == (four ? 16 : 2), "quant_dequant_kernel: params must have ",
               four ? 16 : 2, " floats");
  py::array_t<float> out(n);
  float* o = out.mutable_data();
  if (kind == "lut4_lo") qk::lut4<false>(p, codes.data(), n, params.data(), o);
  else if (kind == "lut4_hi") qk::lut4<true>(p, codes.data(), n, params.data(), o);
  else qk::u8(p, codes.data(), n, params.data()[0], params.data()[1], o);
  return std::move(out);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Seconds (median of reps) of Y = X·Wᵀ (backward: dX = dY·W) with W quantized, and of the
// same product in float32 with sgemm. format: "nbits" or "bnb4".
py::dict gemm_time(const std::string& format, int64_t M, int64_t K, int64_t N, int bits,
                   int64_t block, int reps, bool backward, int64_t out_tile, int64_t red_tile) {
  PYEDGE_CHECK(M > 0 && K > 0 && N > 0 && block > 0 && reps > 0 && M * K <= (1 << 28) &&
                   N * K <= (1 << 28) && M * N <= (1 << 28),
               "quant_gemm_time: sizes out of range");
  PYEDGE_CHECK(format == "nbits" || format == "bnb4", "quant_gemm_time: format nbits or bnb4");
  PYEDGE_CHECK(bits == 4 || bits == 8, "quant_gemm_time: bits 4 or 8");
  QuantWeightSpec s;
  s.format = format == "nbits" ? QuantFormat::nbits : QuantFormat::bnb4;
  s.K = K, s.N = N, s.block = block, s.bits = format == "nbits" ? bits : 4, s.quant_type = 1;
  s.n_blocks = (K + block - 1) / block;
  s.blob = (block * s.bits + 7) / 8;
  const int64_t nbytes = s.format == QuantFormat::nbits ? N * s.n_blocks * s.blob : (N * K + 1) / 2;
  const int64_t nscales = s.format == QuantFormat::nbits ? N * s.n_blocks : (N * K + block - 1) / block;
  std::mt19937 rng(0);
  std::vector<uint8_t> packed(static_cast<size_t>(nbytes));
  for (auto& b : packed) b = uint8_t(rng());
  std::vector<float> scales(size_t(nscales), 0.01f), x(size_t(M * std::max(K, N)), 0.5f);
  std::vector<float> y(size_t(M * std::max(K, N))), wf(size_t(N * K), 0.25f);
  QuantWeight w;
  w.spec = &s;
  w.packed = packed.data();
  w.scales = scales.data();
  QuantGemmTiling t = backward ? quant_gemm_tiling(K, N) : quant_gemm_tiling(N, K);
  if (out_tile > 0) t.out_tile = out_tile;
  if (red_tile > 0) t.red_tile = red_tile;
  std::vector<float> scratch(t.scratch_floats());
  std::vector<double> tq, tf, td;
  {
    py::gil_scoped_release nogil;
    for (int r = 0; r < reps; ++r) {
      // The dequantization alone: every panel of W once, on this thread, into one buffer.
      auto td0 = std::chrono::steady_clock::now();
      const int64_t od = backward ? K : N, rd = backward ? N : K;
      for (int64_t o0 = 0; o0 < od; o0 += t.out_tile)
        for (int64_t r0 = 0; r0 < rd; r0 += t.red_tile) {
          const int64_t o1 = std::min(od, o0 + t.out_tile), r1 = std::min(rd, r0 + t.red_tile);
          if (backward) dequantize_panel(w, r0, r1, o0, o1, scratch.data(), o1 - o0);
          else dequantize_panel(w, o0, o1, r0, r1, scratch.data(), r1 - r0);
        }
      td.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - td0).count());
      auto t0 = std::chrono::steady_clock::now();
      if (backward) quant_gemm_xw(w, M, x.data(), 0.f, y.data(), t, scratch.data());
      else quant_gemm_xwt(w, M, x.data(), 0.f, y.data(), N, t, scratch.data());
      auto t1 = std::chrono::steady_clock::now();
      if (backward) sgemm(false, false, M, K, N, 1.f, x.data(), N, wf.data(), K, 0.f, y.data(), K);
      else sgemm(false, true, M, N, K, 1.f, x.data(), K, wf.data(), K, 0.f, y.data(), N);
      auto t2 = std::chrono::steady_clock::now();
      tq.push_back(std::chrono::duration<double>(t1 - t0).count());
      tf.push_back(std::chrono::duration<double>(t2 - t1).count());
    }
  }
  py::dict d;
  d["quant_s"] = median(tq);
  d["float_s"] = median(tf);
  d["dequant_1thread_s"] = median(td);
  d["parts"] = t.parts;
  d["out_tile"] = t.out_tile;
  d["red_tile"] = t.red_tile;
  return d;
}

}  // namespace

void bind_quant(py::module_& m) {
  m.def("quant_paths", [] {
    std::vector<std::string> r;
    for (qk::Path p : {qk::Path::scalar, qk::Path::avx2, qk::Path::avx512, qk::Path::neon})
      if (qk::path_available(p)) r.push_back(path_name(p));
    return r;
  }, "Dequantization paths this build has (scalar first; the last is the one the ops use).");
  m.def("quant_dequant_kernel", &dequant_kernel, py::arg("kind"), py::arg("codes"), py::arg("n"),
        py::arg("params"), py::arg("path") = "native",
        "Run a dequantization inner loop: kind 'lut4_lo'/'lut4_hi' (4-bit codes, low/high "
        "nibble first, params = 16-entry table) or 'u8' (params = [zero_point, scale]) on "
        "path scalar/avx2/avx512/neon/native. Returns float32 [n].");
  m.def("quant_gemm_time", &gemm_time, py::arg("format"), py::arg("M"), py::arg("K"),
        py::arg("N"), py::arg("bits") = 4, py::arg("block_size") = 32, py::arg("reps") = 5,
        py::arg("backward") = false, py::arg("out_tile") = 0, py::arg("red_tile") = 0,
        "Median seconds of the quantized GEMM (Y = X·Wᵀ, or dX = dY·W with backward) and of "
        "float sgemm on the same shapes, and of dequantizing all of W once on one thread: "
        "{'quant_s', 'float_s', 'dequant_1thread_s', 'parts', 'out_tile', 'red_tile'}. out_tile/red_tile > 0 override the panel sizes.");
}

}  // namespace pyedge
