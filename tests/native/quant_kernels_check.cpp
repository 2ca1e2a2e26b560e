// Cross-build check of the dequantization inner loops (csrc/ops/quant_kernels.h): every SIMD
// path this build has against the scalar reference, bit for bit, on pseudo-random codes.
// tests/test_quant_ops.py builds it for aarch64 and runs it under qemu when a cross compiler
// and qemu-aarch64-static are installed, so the NEON path is checked on an x86 machine.
// Prints one line per path and exits non-zero on the first mismatch.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "ops/quant_kernels.h"

using pyedge::qk::Path;

static uint32_t lcg(uint32_t& s) { return s = s * 1664525u + 1013904223u; }

int main() {
  const Path paths[] = {Path::avx2, Path::avx512, Path::neon};
  const char* names[] = {"avx2", "avx512", "neon"};
  uint32_t seed = 12345;
  int checked = 0;
  for (int pi = 0; pi < 3; ++pi) {
    if (!pyedge::qk::path_available(paths[pi])) continue;
    for (int64_t n : {0, 1, 2, 7, 8, 15, 16, 17, 31, 32, 33, 100, 1027}) {
      std::vector<uint8_t> codes(size_t(n) + 16);
      for (auto& c : codes) c = uint8_t(lcg(seed) >> 24);
      float lut[16];
      for (auto& v : lut) v = float(int32_t(lcg(seed) >> 8) - (1 << 23)) * 1e-6f;
      const float zp = float(lcg(seed) >> 24) + 0.37f, scale = 1e-3f + float(lcg(seed) >> 16) * 1e-7f;
      std::vector<float> ref(size_t(n) + 1), got(size_t(n) + 1);
      for (int kind = 0; kind < 3; ++kind) {
        auto run = [&](Path p, float* out) {
          if (kind == 0) pyedge::qk::lut4<false>(p, codes.data(), n, lut, out);
          else if (kind == 1) pyedge::qk::lut4<true>(p, codes.data(), n, lut, out);
          else pyedge::qk::u8(p, codes.data(), n, zp, scale, out);
        };
        run(Path::scalar, ref.data());
        run(paths[pi], got.data());
        if (std::memcmp(ref.data(), got.data(), size_t(n) * sizeof(float)) != 0) {
          std::printf("MISMATCH path=%s kind=%d n=%lld\n", names[pi], kind, (long long)n);
          return 1;
        }
        ++checked;
      }
    }
    std::printf("ok %s\n", names[pi]);
  }
  std::printf("checked %d\n", checked);
  return checked > 0 ? 0 : 2;
}
