// Sliding-window geometry shared by Conv and the pools, plus im2col / col2im for Conv.
// 1D windows run as 2D with H == 1, so every kernel below is written once, for 2D.
#pragma once
#include <cstdint>
#include <vector>

#include "ops/op.h"

namespace pyedge {

struct WindowGeom {
  int rank = 2;  // spatial rank of the node (1 or 2)
  int64_t IH = 1, IW = 1, OH = 1, OW = 1;
  int64_t KH = 1, KW = 1, SH = 1, SW = 1, DH = 1, DW = 1;
  int64_t PH = 0, PW = 0, PHE = 0, PWE = 0;  // begin and end pads
  // Per kernel tap i (j): the outputs [lo, hi) whose input row (column) lies inside the
  // unpadded input, so inner loops need no bounds checks.
  std::vector<int64_t> oh_lo, oh_hi, ow_lo, ow_hi;

  int64_t in_plane() const { return IH * IW; }
  int64_t out_plane() const { return OH * OW; }
  int64_t taps() const { return KH * KW; }
  // Input row of output row oh at tap i (may be outside [0, IH)).
  int64_t ih(int64_t oh, int64_t i) const { return oh * SH - PH + i * DH; }
  int64_t iw(int64_t ow, int64_t j) const { return ow * SW - PW + j * DW; }
  // True when the window is a plain 1x1 pointwise map (no im2col needed).
  bool pointwise() const {
    return KH == 1 && KW == 1 && SH == 1 && SW == 1 && PH == 0 && PW == 0 && PHE == 0 &&
           PWE == 0;
  }
};

// Builds the geometry of a window op over x [N, C, spatial...] from the node's attributes
// strides / pads / dilations / auto_pad (kernel given by the caller). ceil_mode is for pools.
// Validates everything and throws with the node's name on bad attributes.
WindowGeom make_window_geom(const NodeInfo& n, const Shape& x, const std::vector<int64_t>& kernel,
                            bool ceil_mode);

// Output spatial dims in the node's own rank ([OW] for 1D, [OH, OW] for 2D).
Shape window_out_dims(const WindowGeom& g);

// Both run serially: Conv calls them per sample, either inside its own parallel loop over
// samples or between threaded BLAS calls (where OpenMP regions would fight BLAS threads).
// col [C*KH*KW, OH*OW] = patches of x [C, IH, IW] (zeros in the padding); `ld` is the row
// stride of col (OH*OW for one sample; B*OH*OW when B samples sit side by side).
void im2col(const float* x, int64_t C, const WindowGeom& g, float* col, int64_t ld);
// dx [C, IH, IW] += fold of col [C*KH*KW, OH*OW] (the adjoint of im2col).
void col2im_add(const float* col, int64_t C, const WindowGeom& g, float* dx, int64_t ld);

// Faster im2col for small, narrow or strided outputs, where the row-wise copies above spend
// their time on per-row overhead (4x4 outputs: rows of 4 floats) or scalar strided loads.
// Each channel plane is first copied into a zero-bordered plane [IH + pads, IW + pads] (no
// copy without padding), so no bounds are checked afterwards:
//   kRows:  rows of a width and stride fixed at compile time (OW 2..32, stride 1 or 2), so the
//           copies are a few vector moves (stride 2: loads + shuffles);
//   kTable: any other small geometry, one lookup per entry: col[t, p] = padded[idx[t*P + p]];
//   kPlain: im2col / col2im_add above (wide stride-1 rows, or large planes).
// Chosen at plan time by make_im2col_plan (measured on W3's shapes: 2-5x the row-wise copies).
struct Im2colPlan {
  enum Mode { kPlain, kRows, kTable };
  Mode mode = kPlain;
  bool padded = false;        // false: read x's own plane (row stride IW)
  int64_t IHp = 0, IWp = 0;   // padded plane
  std::vector<int32_t> idx;   // kTable: KH*KW*OH*OW offsets into the (padded) plane
  // kRows: all taps of one channel; src plane with row stride rs; col rows with stride ld.
  void (*rows)(const float* src, int64_t rs, const WindowGeom& g, float* col, int64_t ld) = nullptr;
  void (*fold)(const float* col, int64_t ld, const WindowGeom& g, float* dst, int64_t rs) = nullptr;
  int64_t plane_floats() const { return mode != kPlain && padded ? IHp * IWp : 0; }
};
Im2colPlan make_im2col_plan(const WindowGeom& g);
// As im2col / col2im_add; `pad` holds plane_floats() of scratch (one per concurrent caller).
void im2col_planned(const float* x, int64_t C, const WindowGeom& g, const Im2colPlan& pl,
                    float* pad, float* col, int64_t ld);
void col2im_add_planned(const float* col, int64_t C, const WindowGeom& g, const Im2colPlan& pl,
                        float* pad, float* dx, int64_t ld);

// Σ a[i]·b[i] with 8 independent partial sums, so the loop vectorises without -ffast-math.
inline float dot8(const float* a, const float* b, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += a[i + k] * b[i + k];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}
inline float sum8(const float* a, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += a[i + k];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i];
  return s;
}

}  // namespace pyedge
