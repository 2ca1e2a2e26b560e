#include "ops/conv_im2col.h"

#include <algorithm>
#include <cstring>


namespace pyedge {

namespace {
int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

// For each tap t, the outputs o in [lo, hi) with 0 <= o*S - P + t*D < I.
void tap_ranges(int64_t K, int64_t S, int64_t D, int64_t P, int64_t I, int64_t O,
                std::vector<int64_t>& lo, std::vector<int64_t>& hi) {
  lo.resize(size_t(K));
  hi.resize(size_t(K));
  for (int64_t t = 0; t < K; ++t) {
    int64_t off = t * D - P;
    int64_t l = std::max<int64_t>(0, ceil_div(-off, S));
    int64_t h = std::min<int64_t>(O, floor_div(I - 1 - off, S) + 1);
    lo[size_t(t)] = std::min(l, O);
    hi[size_t(t)] = std::max(h, lo[size_t(t)]);
  }
}
}  // namespace

WindowGeom make_window_geom(const NodeInfo& n, const Shape& x, const std::vector<int64_t>& kernel,
                            bool ceil_mode) {
  const int64_t r = int64_t(x.size()) - 2;
  PYEDGE_CHECK(r == 1 || r == 2, n.where(), ": only 1D and 2D windows are supported; input has ",
               "shape ", shape_str(x), " (", r, " spatial dims)");
  PYEDGE_CHECK(int64_t(kernel.size()) == r, n.where(), ": kernel_shape has ", kernel.size(),
               " dims, input has ", r, " spatial dims");
  auto strides = n.attrs.get_ints("strides", std::vector<int64_t>(size_t(r), 1));
  auto dil = n.attrs.get_ints("dilations", std::vector<int64_t>(size_t(r), 1));
  auto pads = n.attrs.get_ints("pads", std::vector<int64_t>(size_t(2 * r), 0));
  std::string auto_pad = n.attrs.get_string("auto_pad", "NOTSET");
  PYEDGE_CHECK(int64_t(strides.size()) == r, n.where(), ": strides needs ", r, " values");
  PYEDGE_CHECK(int64_t(dil.size()) == r, n.where(), ": dilations needs ", r, " values");
  PYEDGE_CHECK(int64_t(pads.size()) == 2 * r, n.where(), ": pads needs ", 2 * r, " values");

  int64_t in[2], k[2], s[2], d[2], pb[2], pe[2], out[2];
  for (int64_t a = 0; a < r; ++a) {
    in[a] = x[size_t(2 + a)];
    k[a] = kernel[size_t(a)];
    s[a] = strides[size_t(a)];
    d[a] = dil[size_t(a)];
    pb[a] = pads[size_t(a)];
    pe[a] = pads[size_t(a + r)];
    PYEDGE_CHECK(k[a] >= 1 && s[a] >= 1 && d[a] >= 1, n.where(),
                 ": kernel_shape, strides and dilations must be >= 1");
    PYEDGE_CHECK(pb[a] >= 0 && pe[a] >= 0, n.where(), ": pads must be >= 0");
    const int64_t eff = (k[a] - 1) * d[a] + 1;  // receptive field of one window
    if (auto_pad == "SAME_UPPER" || auto_pad == "SAME_LOWER") {
      out[a] = ceil_div(in[a], s[a]);
      int64_t total = std::max<int64_t>(0, (out[a] - 1) * s[a] + eff - in[a]);
      pb[a] = auto_pad == "SAME_UPPER" ? total / 2 : total - total / 2;
      pe[a] = total - pb[a];
    } else if (auto_pad == "VALID") {
      pb[a] = pe[a] = 0;
      out[a] = in[a] >= eff ? (in[a] - eff) / s[a] + 1 : 0;
    } else {
      PYEDGE_CHECK(auto_pad == "NOTSET", n.where(), ": unknown auto_pad '", auto_pad, "'");
      int64_t span = in[a] + pb[a] + pe[a] - eff;
      if (ceil_mode) {
        // A window may reach past the padded input (EfficientNet's pooler: a 1280-wide
        // window, stride 1280, over 7 columns gives one output), as in PyTorch and
        // onnxruntime; the taps outside are skipped and not counted.
        out[a] = std::max<int64_t>(0, ceil_div(span, s[a]) + 1);
        // The last window must start inside the input or its leading padding.
        if (out[a] > 0 && (out[a] - 1) * s[a] >= in[a] + pb[a]) --out[a];
      } else if (span < 0) {
        out[a] = 0;
      } else {
        out[a] = span / s[a] + 1;
      }
    }
    PYEDGE_CHECK(out[a] >= 1, n.where(), ": window (kernel ", k[a], ", dilation ", d[a],
                 ") is larger than the padded input (", in[a], " + pads ", pb[a], "+", pe[a],
                 ") along spatial axis ", a);
  }
  WindowGeom g;
  g.rank = int(r);
  const int h = r == 2 ? 0 : -1, w = int(r) - 1;  // 1D: H is a dummy axis of size 1
  if (h == 0) {
    g.IH = in[0]; g.KH = k[0]; g.SH = s[0]; g.DH = d[0]; g.PH = pb[0]; g.PHE = pe[0];
    g.OH = out[0];
  }
  g.IW = in[w]; g.KW = k[w]; g.SW = s[w]; g.DW = d[w]; g.PW = pb[w]; g.PWE = pe[w];
  g.OW = out[w];
  tap_ranges(g.KH, g.SH, g.DH, g.PH, g.IH, g.OH, g.oh_lo, g.oh_hi);
  tap_ranges(g.KW, g.SW, g.DW, g.PW, g.IW, g.OW, g.ow_lo, g.ow_hi);
  return g;
}

Shape window_out_dims(const WindowGeom& g) {
  if (g.rank == 1) return {g.OW};
  return {g.OH, g.OW};
}

void im2col(const float* x, int64_t C, const WindowGeom& g, float* col, int64_t ld) {
  for (int64_t c = 0; c < C; ++c) {
    const float* xc = x + c * g.in_plane();
    for (int64_t i = 0; i < g.KH; ++i) {
      const int64_t hlo = g.oh_lo[size_t(i)], hhi = g.oh_hi[size_t(i)];
      for (int64_t j = 0; j < g.KW; ++j) {
        float* dst = col + ((c * g.KH + i) * g.KW + j) * ld;
        const int64_t lo = g.ow_lo[size_t(j)], hi = g.ow_hi[size_t(j)];
        const int64_t offw = j * g.DW - g.PW;
        std::memset(dst, 0, sizeof(float) * size_t(hlo * g.OW));
        for (int64_t oh = hlo; oh < hhi; ++oh) {
          float* d = dst + oh * g.OW;
          const float* xr = xc + g.ih(oh, i) * g.IW + offw;
          for (int64_t ow = 0; ow < lo; ++ow) d[ow] = 0.f;
          if (g.SW == 1) {
            std::memcpy(d + lo, xr + lo, sizeof(float) * size_t(hi - lo));
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) d[ow] = xr[ow * g.SW];
          }
          for (int64_t ow = hi; ow < g.OW; ++ow) d[ow] = 0.f;
        }
        std::memset(dst + hhi * g.OW, 0, sizeof(float) * size_t((g.OH - hhi) * g.OW));
      }
    }
  }
}

void col2im_add(const float* col, int64_t C, const WindowGeom& g, float* dx, int64_t ld) {
  for (int64_t c = 0; c < C; ++c) {
    float* xc = dx + c * g.in_plane();
    for (int64_t i = 0; i < g.KH; ++i) {
      for (int64_t j = 0; j < g.KW; ++j) {
        const float* src = col + ((c * g.KH + i) * g.KW + j) * ld;
        const int64_t lo = g.ow_lo[size_t(j)], hi = g.ow_hi[size_t(j)];
        const int64_t offw = j * g.DW - g.PW;
        for (int64_t oh = g.oh_lo[size_t(i)]; oh < g.oh_hi[size_t(i)]; ++oh) {
          const float* s = src + oh * g.OW;
          float* xr = xc + g.ih(oh, i) * g.IW + offw;
          if (g.SW == 1) {
            for (int64_t ow = lo; ow < hi; ++ow) xr[ow] += s[ow];
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) xr[ow * g.SW] += s[ow];
          }
        }
      }
    }
  }
}

namespace {
// All taps of one channel, rows of fixed width OW and stride SW: col[(i, j), oh, :] =
// src[oh*SH + i*DH, j*DW + ow*SW] (src: the padded plane, or x's plane when unpadded).
template <int OW, int SW>
void rows_fixed(const float* src, int64_t rs, const WindowGeom& g, float* col, int64_t ld) {
  for (int64_t i = 0; i < g.KH; ++i)
    for (int64_t j = 0; j < g.KW; ++j) {
      float* d = col + (i * g.KW + j) * ld;
      const float* s = src + i * g.DH * rs + j * g.DW;
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        float* dr = d + oh * OW;
        const float* sr = s + oh * g.SH * rs;
        for (int o = 0; o < OW; ++o) dr[o] = sr[o * SW];
      }
    }
}
// Its adjoint: dst (plane, row stride rs) += fold of the channel's col rows.
template <int OW, int SW>
void fold_fixed(const float* col, int64_t ld, const WindowGeom& g, float* dst, int64_t rs) {
  for (int64_t i = 0; i < g.KH; ++i)
    for (int64_t j = 0; j < g.KW; ++j) {
      const float* s = col + (i * g.KW + j) * ld;
      float* d = dst + i * g.DH * rs + j * g.DW;
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        const float* sr = s + oh * OW;
        float* dr = d + oh * g.SH * rs;
        for (int o = 0; o < OW; ++o) dr[o * SW] += sr[o];
      }
    }
}

template <int OW>
bool pick_rows(const WindowGeom& g, Im2colPlan& pl) {
  if (g.OW != OW) return false;
  if (g.SW == 1) {
    pl.rows = rows_fixed<OW, 1>;
    pl.fold = fold_fixed<OW, 1>;
  } else if (g.SW == 2) {
    pl.rows = rows_fixed<OW, 2>;
    pl.fold = fold_fixed<OW, 2>;
  } else {
    return false;
  }
  return true;
}

// The zero-bordered copy of plane xc (interior rows at [PH, PH + IH), columns [PW, PW + IW)).
void fill_padded(const float* xc, const WindowGeom& g, const Im2colPlan& pl, float* pad) {
  std::memset(pad, 0, sizeof(float) * size_t(pl.IHp * pl.IWp));
  for (int64_t h = 0; h < g.IH; ++h)
    std::memcpy(pad + (h + g.PH) * pl.IWp + g.PW, xc + h * g.IW, sizeof(float) * size_t(g.IW));
}
}  // namespace

Im2colPlan make_im2col_plan(const WindowGeom& g) {
  Im2colPlan pl;
  pl.padded = g.PH + g.PHE + g.PW + g.PWE > 0;
  pl.IHp = g.IH + g.PH + g.PHE;
  pl.IWp = g.IW + g.PW + g.PWE;
  // Conv windows fit inside the padded input (OH, OW come from it): every read is in range.
  // Huge planes (a padded copy per channel task, int32 offsets) stay on the plain path.
  if (pl.padded && pl.IHp * pl.IWp > (int64_t(1) << 20)) return pl;
  if (!pl.padded && g.in_plane() > (int64_t(1) << 30)) return pl;
  if (pick_rows<2>(g, pl) || pick_rows<4>(g, pl) || pick_rows<7>(g, pl) ||
      pick_rows<8>(g, pl) || pick_rows<14>(g, pl) || pick_rows<16>(g, pl) ||
      pick_rows<28>(g, pl) || pick_rows<32>(g, pl)) {
    pl.mode = Im2colPlan::kRows;
    return pl;
  }
  if ((g.SW > 1 || g.OW <= 8) && g.taps() * g.out_plane() <= (int64_t(1) << 16)) {
    pl.mode = Im2colPlan::kTable;
    const int64_t rs = pl.padded ? pl.IWp : g.IW;
    pl.idx.reserve(size_t(g.taps() * g.out_plane()));
    for (int64_t i = 0; i < g.KH; ++i)
      for (int64_t j = 0; j < g.KW; ++j)
        for (int64_t oh = 0; oh < g.OH; ++oh)
          for (int64_t ow = 0; ow < g.OW; ++ow)
            pl.idx.push_back(int32_t((oh * g.SH + i * g.DH) * rs + ow * g.SW + j * g.DW));
  }
  return pl;
}

void im2col_planned(const float* x, int64_t C, const WindowGeom& g, const Im2colPlan& pl,
                    float* pad, float* col, int64_t ld) {
  if (pl.mode == Im2colPlan::kPlain) return im2col(x, C, g, col, ld);
  const int64_t P = g.out_plane(), T = g.taps();
  const int64_t rs = pl.padded ? pl.IWp : g.IW;
  for (int64_t c = 0; c < C; ++c) {
    const float* src = x + c * g.in_plane();
    if (pl.padded) {
      fill_padded(src, g, pl, pad);
      src = pad;
    }
    float* colc = col + c * T * ld;
    if (pl.mode == Im2colPlan::kRows) {
      pl.rows(src, rs, g, colc, ld);
      continue;
    }
    for (int64_t k = 0; k < T; ++k) {
      float* d = colc + k * ld;
      const int32_t* ix = pl.idx.data() + k * P;
      for (int64_t p = 0; p < P; ++p) d[p] = src[ix[p]];
    }
  }
}

void col2im_add_planned(const float* col, int64_t C, const WindowGeom& g, const Im2colPlan& pl,
                        float* pad, float* dx, int64_t ld) {
  if (pl.mode == Im2colPlan::kPlain) return col2im_add(col, C, g, dx, ld);
  const int64_t P = g.out_plane(), T = g.taps();
  const int64_t rs = pl.padded ? pl.IWp : g.IW;
  for (int64_t c = 0; c < C; ++c) {
    float* xc = dx + c * g.in_plane();
    float* dst = xc;
    if (pl.padded) {
      std::memset(pad, 0, sizeof(float) * size_t(pl.IHp * pl.IWp));
      dst = pad;
    }
    const float* colc = col + c * T * ld;
    if (pl.mode == Im2colPlan::kRows) {
      pl.fold(colc, ld, g, dst, rs);
    } else {
      for (int64_t k = 0; k < T; ++k) {
        const float* s = colc + k * ld;
        const int32_t* ix = pl.idx.data() + k * P;
        for (int64_t p = 0; p < P; ++p) dst[ix[p]] += s[p];
      }
    }
    if (pl.padded)
      for (int64_t h = 0; h < g.IH; ++h) {
        const float* pr = pad + (h + g.PH) * pl.IWp + g.PW;
        float* xr = xc + h * g.IW;
        for (int64_t w = 0; w < g.IW; ++w) xr[w] += pr[w];
      }
  }
}

}  // namespace pyedge
