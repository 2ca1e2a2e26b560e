// Layout ops: Transpose, Concat, Split, Slice, Tile, Pad (constant, edge, reflect, wrap), Trilu. All of them move
// bytes of any dtype; each is one or more strided Regions (ops/region_copy.h) built at plan
// time. Backward (float32 data) runs the same Regions the other way round with +=.
#include <algorithm>
#include <cstring>
#include <string>

#include "common/memory_limit.h"
#include "ops/op.h"
#include "ops/region_copy.h"

namespace pyedge {
namespace {

// Shared by the ops below: only input 0 carries a float32 gradient; backward reads nothing.
class LayoutOp : public Op {
 public:
  bool has_backward() const override { return true; }
  bool differentiable_input(size_t i) const override {
    return i == 0 && !input_dtypes.empty() && input_dtypes[0] == DType::f32;
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    return std::vector<bool>(ng.size(), false);
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return std::vector<bool>(outputs.size(), false);
  }
};

// Transpose(x, perm): y[i0..] = x[permuted]; backward applies the inverse permutation.
// [B,S,H,D] -> [B,H,S,D] copies rows of D; [..,S,D] -> [..,D,S] runs the tiled kernel.
class Transpose : public LayoutOp {
 public:
  Transpose(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 1, 1);
    const Tensor& x = in[0];
    size_t r = x.shape.size();
    std::vector<int64_t> perm = n.attrs.get_ints("perm");
    if (!n.attrs.has("perm"))
      for (size_t k = 0; k < r; ++k) perm.push_back(int64_t(r - 1 - k));
    PYEDGE_CHECK(perm.size() == r, n.where(), ": perm has ", perm.size(),
                 " entries for an input of rank ", r);
    std::vector<bool> seen(r, false);
    for (int64_t p : perm) {
      PYEDGE_CHECK(p >= 0 && p < int64_t(r) && !seen[size_t(p)], n.where(), ": perm ",
                   shape_str(perm), " is not a permutation of 0..", r - 1);
      seen[size_t(p)] = true;
    }
    Shape os(r);
    for (size_t i = 0; i < r; ++i) os[i] = x.shape[size_t(perm[i])];
    auto xst = contiguous_strides(x.shape), ost = contiguous_strides(os);
    std::vector<int64_t> src_f(r), src_b(r);
    for (size_t i = 0; i < r; ++i) {
      src_f[i] = xst[size_t(perm[i])];  // y axis i walks x axis perm[i]
      src_b[size_t(perm[i])] = ost[i];  // x axis perm[i] walks y axis i
    }
    fwd_ = Region::make(os, ost, src_f);
    bwd_ = Region::make(x.shape, xst, src_b);
    outputs = {make_output(x.dtype, os)};
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    copy_region(fwd_, dtype_size(in[0].dtype), out[0].data, in[0].data);
  }
  void backward(const std::vector<Tensor>&, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    if (!din[0].data || !dout[0].data) return;
    if (ctx.fresh(0)) copy_region(bwd_, sizeof(float), din[0].data, dout[0].data);
    else add_region(bwd_, din[0].ptr<float>(), dout[0].ptr<float>());
  }
  bool assigns_fresh_grads() const override { return true; }

 private:
  Region fwd_, bwd_;
};
PYEDGE_REGISTER_OP("Transpose", Transpose);

// Concat(x0, x1, ..; axis): each input is a box of the output.
class Concat : public LayoutOp {
 public:
  Concat(const NodeInfo& n, const std::vector<Tensor>& in) {
    PYEDGE_CHECK(!in.empty(), n.where(), ": needs at least one input");
    PYEDGE_CHECK(n.attrs.has("axis"), n.where(), ": missing attribute 'axis'");
    const Tensor& x0 = in[0];
    int64_t r = x0.rank();
    int64_t axis = normalize_axis(n, n.attrs.get_int("axis", 0), r);
    Shape os = x0.shape;
    os[size_t(axis)] = 0;
    for (size_t i = 0; i < in.size(); ++i) {
      const Tensor& x = in[i];
      PYEDGE_CHECK(x.dtype == x0.dtype, n.where(), ": input ", i, " is ", dtype_name(x.dtype),
                   ", input 0 is ", dtype_name(x0.dtype));
      bool ok = x.rank() == r;
      for (int64_t k = 0; ok && k < r; ++k)
        ok = k == axis || x.shape[size_t(k)] == x0.shape[size_t(k)];
      PYEDGE_CHECK(ok, n.where(), ": input ", i, " has shape ", shape_str(x.shape),
                   ", which does not match input 0 ", shape_str(x0.shape), " outside axis ",
                   axis);
      os[size_t(axis)] += x.shape[size_t(axis)];
    }
    auto ost = contiguous_strides(os);
    int64_t off = 0;
    for (const Tensor& x : in) {
      auto xst = contiguous_strides(x.shape);
      fwd_.push_back(Region::make(x.shape, ost, xst, off * ost[size_t(axis)], 0));
      bwd_.push_back(Region::make(x.shape, xst, ost, 0, off * ost[size_t(axis)]));
      off += x.shape[size_t(axis)];
    }
    outputs = {make_output(x0.dtype, os)};
  }
  bool differentiable_input(size_t i) const override {
    return i < input_dtypes.size() && input_dtypes[i] == DType::f32;
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    size_t es = dtype_size(out[0].dtype);
    for (size_t i = 0; i < in.size(); ++i) copy_region(fwd_[i], es, out[0].data, in[i].data);
  }
  void backward(const std::vector<Tensor>&, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext&) override {
    if (!dout[0].data) return;
    for (size_t i = 0; i < din.size(); ++i)
      if (din[i].data) add_region(bwd_[i], din[i].ptr<float>(), dout[0].ptr<float>());
  }

 private:
  std::vector<Region> fwd_, bwd_;
};
PYEDGE_REGISTER_OP("Concat", Concat);

// Split(x[, split]; axis, split (<13), num_outputs (18)). Without sizes, the output count is
// the 'num_outputs' attribute or else the node's own output count.
class Split : public LayoutOp {
 public:
  Split(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 1, 2);
    const Tensor& x = in[0];
    int64_t axis = normalize_axis(n, n.attrs.get_int("axis", 0), x.rank());
    int64_t d = x.shape[size_t(axis)];
    std::vector<int64_t> sizes;
    bool given = false;
    if (n.opset >= 13) {
      if (in.size() > 1 && n.has_input(1)) {
        sizes = const_input(n, in, 1, "split").to_ints();
        given = true;
      }
    } else if (n.attrs.has("split")) {
      sizes = n.attrs.get_ints("split");
      given = true;
    }
    if (!given) {
      int64_t k = n.attrs.get_int("num_outputs", n.num_outputs);
      PYEDGE_CHECK(k >= 1 && k <= std::max<int64_t>(d, 1), n.where(), ": cannot split dim ",
                   d, " into ", k, " outputs");
      if (n.opset >= 18) {  // ceil-sized chunks, the last one smaller
        int64_t c = (d + k - 1) / k;
        PYEDGE_CHECK(c * (k - 1) <= d, n.where(), ": cannot split dim ", d, " into ",
                     k, " outputs of size ", c);
        sizes.assign(size_t(k), c);
        sizes.back() = d - c * (k - 1);
      } else {
        PYEDGE_CHECK(d % k == 0, n.where(), ": dim ", d, " does not split evenly into ", k,
                     " outputs");
        sizes.assign(size_t(k), d / k);
      }
    }
    int64_t sum = 0;
    for (int64_t s : sizes) {
      PYEDGE_CHECK(s >= 0, n.where(), ": negative split size in ", shape_str(sizes));
      sum += s;
    }
    PYEDGE_CHECK(sum == d, n.where(), ": split sizes ", shape_str(sizes), " sum to ", sum,
                 ", dim ", axis, " of ", shape_str(x.shape), " is ", d);
    auto xst = contiguous_strides(x.shape);
    int64_t off = 0;
    for (int64_t s : sizes) {
      Shape os = x.shape;
      os[size_t(axis)] = s;
      auto ost = contiguous_strides(os);
      fwd_.push_back(Region::make(os, ost, xst, 0, off * xst[size_t(axis)]));
      bwd_.push_back(Region::make(os, xst, ost, off * xst[size_t(axis)], 0));
      outputs.push_back(make_output(x.dtype, os));
      off += s;
    }
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    size_t es = dtype_size(in[0].dtype);
    for (size_t j = 0; j < fwd_.size(); ++j) copy_region(fwd_[j], es, out[j].data, in[0].data);
  }
  void backward(const std::vector<Tensor>&, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext&) override {
    if (!din[0].data) return;
    for (size_t j = 0; j < bwd_.size(); ++j)
      if (dout[j].data) add_region(bwd_[j], din[0].ptr<float>(), dout[j].ptr<float>());
  }

 private:
  std::vector<Region> fwd_, bwd_;
};
PYEDGE_REGISTER_OP("Split", Split);

// Slice(x, starts, ends[, axes[, steps]]) (attributes before opset 10). Starts and ends are
// clamped as ONNX says (INT64_MAX / INT64_MIN mean "to the end"); steps may be negative.
class Slice : public LayoutOp {
 public:
  Slice(const NodeInfo& n, const std::vector<Tensor>& in) {
    const Tensor& x = in.at(0);
    int64_t r = x.rank();
    std::vector<int64_t> starts, ends, axes, steps;
    if (n.opset >= 10) {
      check_num_inputs(n, in, 3, 5);
      starts = const_input(n, in, 1, "starts").to_ints();
      ends = const_input(n, in, 2, "ends").to_ints();
      if (in.size() > 3 && n.has_input(3)) axes = const_input(n, in, 3, "axes").to_ints();
      if (in.size() > 4 && n.has_input(4)) steps = const_input(n, in, 4, "steps").to_ints();
    } else {
      check_num_inputs(n, in, 1, 1);
      starts = n.attrs.get_ints("starts");
      ends = n.attrs.get_ints("ends");
      axes = n.attrs.get_ints("axes");
    }
    size_t m = starts.size();
    if (axes.empty())
      for (size_t k = 0; k < m; ++k) axes.push_back(int64_t(k));
    if (steps.empty()) steps.assign(m, 1);
    PYEDGE_CHECK(ends.size() == m && axes.size() == m && steps.size() == m, n.where(),
                 ": starts, ends, axes and steps must have the same length");
    std::vector<int64_t> b(size_t(r), 0), step(size_t(r), 1);
    Shape os = x.shape;
    std::vector<bool> seen(size_t(r), false);
    for (size_t k = 0; k < m; ++k) {
      size_t a = size_t(normalize_axis(n, axes[k], r));
      PYEDGE_CHECK(!seen[a], n.where(), ": axis ", axes[k], " repeated");
      seen[a] = true;
      int64_t d = x.shape[a], s = starts[k], e = ends[k], st = steps[k];
      PYEDGE_CHECK(st != 0, n.where(), ": step 0 on axis ", axes[k]);
      if (s < 0) s += d;
      if (e < 0) e += d;  // INT64_MIN + d cannot overflow
      int64_t len;
      if (st > 0) {
        s = std::clamp<int64_t>(s, 0, d);
        e = std::clamp<int64_t>(e, 0, d);
        len = e > s ? (e - s + st - 1) / st : 0;
      } else {
        s = std::clamp<int64_t>(s, 0, d - 1);
        e = std::clamp<int64_t>(e, -1, d - 1);
        len = s > e ? (s - e - st - 1) / -st : 0;
      }
      b[a] = s;
      step[a] = st;
      os[a] = len;
    }
    auto xst = contiguous_strides(x.shape), ost = contiguous_strides(os);
    std::vector<int64_t> sst(static_cast<size_t>(r));
    int64_t off = 0;
    for (size_t a = 0; a < size_t(r); ++a) {
      sst[a] = xst[a] * step[a];
      off += b[a] * xst[a];
    }
    if (numel(os) == 0) off = 0;
    fwd_ = Region::make(os, ost, sst, 0, off);
    bwd_ = Region::make(os, sst, ost, off, 0);
    outputs = {make_output(x.dtype, os)};
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    copy_region(fwd_, dtype_size(in[0].dtype), out[0].data, in[0].data);
  }
  void backward(const std::vector<Tensor>&, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext&) override {
    if (din[0].data && dout[0].data) add_region(bwd_, din[0].ptr<float>(), dout[0].ptr<float>());
  }

 private:
  Region fwd_, bwd_;
};
PYEDGE_REGISTER_OP("Slice", Slice);

// Tile(x, repeats): y viewed as [r0, d0, r1, d1, ..] reads x with stride 0 on the r axes.
// Backward sums the tiles: one pass per tile, each adding a box of dy into dx.
class Tile : public LayoutOp {
 public:
  Tile(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 2, 2);
    const Tensor& x = in[0];
    std::vector<int64_t> reps = const_input(n, in, 1, "repeats").to_ints();
    size_t r = x.shape.size();
    PYEDGE_CHECK(reps.size() == r, n.where(), ": repeats has ", reps.size(),
                 " entries for an input of rank ", r);
    Shape os(r), view;
    for (size_t k = 0; k < r; ++k) {
      PYEDGE_CHECK(reps[k] >= 0, n.where(), ": negative repeat ", reps[k]);
      os[k] = x.shape[k] * reps[k];
    }
    // throws on an element count past int64 (a hostile repeats input); an output past the
    // plan memory limit is refused here, before the per-tile offsets below (one int64 per
    // tile: 8 GB for repeats [2^20, 2^10]) are allocated
    const int64_t limit = memory_limit_bytes();
    PYEDGE_CHECK(numel(os) <= limit / int64_t(dtype_size(x.dtype)), n.where(), ": output ",
                 shape_str(os), " of ", dtype_name(x.dtype), " is over the plan memory limit of ",
                 limit, " bytes (PYEDGE_MAX_MEMORY)");
    auto xst = contiguous_strides(x.shape), ost = contiguous_strides(os);
    std::vector<int64_t> ds, ss;
    for (size_t k = 0; k < r; ++k) {
      view.push_back(reps[k]);
      ds.push_back(x.shape[k] * ost[k]);
      ss.push_back(0);
      view.push_back(x.shape[k]);
      ds.push_back(ost[k]);
      ss.push_back(xst[k]);
    }
    fwd_ = Region::make(view, ds, ss);
    bwd_ = Region::make(x.shape, xst, ost);
    if (numel(os) > 0) {
      // dy offset of each tile, for the backward
      int64_t ntiles = numel(reps);
      tile_off_.resize(size_t(ntiles));
      for (int64_t t = 0; t < ntiles; ++t) {
        int64_t rem = t, off = 0;
        for (size_t k = r; k-- > 0;) {
          off += (rem % reps[k]) * x.shape[k] * ost[k];
          rem /= reps[k];
        }
        tile_off_[size_t(t)] = off;
      }
    }
    outputs = {make_output(x.dtype, os)};
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    copy_region(fwd_, dtype_size(in[0].dtype), out[0].data, in[0].data);
  }
  void backward(const std::vector<Tensor>&, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext&) override {
    if (!din[0].data || !dout[0].data) return;
    for (int64_t off : tile_off_)
      add_region(bwd_, din[0].ptr<float>(), dout[0].ptr<float>() + off);
  }

 private:
  Region fwd_, bwd_;
  std::vector<int64_t> tile_off_;
};
PYEDGE_REGISTER_OP("Tile", Tile);

// Bit pattern of value v in dtype dt (for fills).
uint64_t bits_of(DType dt, double v) {
  uint64_t b = 0;
  switch (dt) {
    case DType::f32: { float f = float(v); std::memcpy(&b, &f, 4); break; }
    case DType::f64: std::memcpy(&b, &v, 8); break;
    case DType::i64: { int64_t i = int64_t(v); std::memcpy(&b, &i, 8); break; }
    case DType::i32: { int32_t i = int32_t(v); std::memcpy(&b, &i, 4); break; }
    case DType::u8: b = uint8_t(v); break;
    case DType::boolean: b = v != 0; break;
  }
  return b;
}

template <typename T>
void fill_bits(void* p, int64_t n, uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  T* d = static_cast<T*>(p);
  parallel_for(n, 1 << 15, [&](int64_t b, int64_t e) { std::fill(d + b, d + e, v); });
}

void fill_value(const Tensor& t, uint64_t bits) {
  switch (dtype_size(t.dtype)) {
    case 1: fill_bits<uint8_t>(t.data, t.numel(), bits); break;
    case 4: fill_bits<uint32_t>(t.data, t.numel(), bits); break;
    case 8: fill_bits<uint64_t>(t.data, t.numel(), bits); break;
  }
}

// Pad(x, pads[, constant_value[, axes]]) in constant mode; negative pads crop.
// Pad's edge / reflect / wrap modes: every output element copies one input element.
// Per axis a, src_[a][o] = stride_a · (input index that output index o reads), so an
// output element's source is Σ_a src_[a][o_a]; rows along the last axis run as one loop.
// Backward scatters dY back through the same map (+=: an edge element gets many rows).
class PadGather {
 public:
  bool active() const { return !src_.empty(); }

  void build(const NodeInfo& n, const std::string& mode, const Shape& xs, const Shape& os,
             const std::vector<int64_t>& pb) {
    const size_t r = xs.size();
    auto xst = contiguous_strides(xs);
    os_ = os;
    src_.assign(r, {});
    for (size_t a = 0; a < r; ++a) {
      const int64_t len = xs[a];
      PYEDGE_CHECK(len > 0 || os[a] == 0, n.where(), ": mode '", mode, "' cannot pad axis ",
                   a, " of ", shape_str(xs), " (it is empty)");
      src_[a].resize(size_t(os[a]));
      for (int64_t o = 0; o < os[a]; ++o) {
        int64_t i = o - pb[a];  // index into x, possibly outside [0, len)
        if (mode == "edge") {
          i = std::min<int64_t>(std::max<int64_t>(i, 0), len - 1);
        } else if (mode == "wrap") {
          i = ((i % len) + len) % len;
        } else if (len == 1) {  // reflect: numpy's 'reflect' (edge not repeated)
          i = 0;
        } else {
          const int64_t period = 2 * (len - 1);
          i = ((i % period) + period) % period;
          if (i >= len) i = period - i;
        }
        src_[a][size_t(o)] = i * xst[a];
      }
    }
  }

  void forward(size_t esize, const void* x, void* y) const {
    switch (esize) {
      case 1: run<uint8_t>(static_cast<const uint8_t*>(x), static_cast<uint8_t*>(y)); break;
      case 2: run<uint16_t>(static_cast<const uint16_t*>(x), static_cast<uint16_t*>(y)); break;
      case 4: run<uint32_t>(static_cast<const uint32_t*>(x), static_cast<uint32_t*>(y)); break;
      default: run<uint64_t>(static_cast<const uint64_t*>(x), static_cast<uint64_t*>(y)); break;
    }
  }
  // dx [x's shape] += scatter of dy [output shape]
  void backward(const float* dy, float* dx) const {
    rows([&](int64_t base, int64_t out_off) {
      const std::vector<int64_t>& last = src_.back();
      for (size_t j = 0; j < last.size(); ++j) dx[base + last[j]] += dy[out_off + int64_t(j)];
    });
  }

 private:
  template <typename T>
  void run(const T* x, T* y) const {
    rows([&](int64_t base, int64_t out_off) {
      const std::vector<int64_t>& last = src_.back();
      for (size_t j = 0; j < last.size(); ++j) y[out_off + int64_t(j)] = x[base + last[j]];
    });
  }
  // Calls f(source offset of the row's axes but the last, output offset of the row) for each
  // row along the last axis, in output order.
  template <typename F>
  void rows(F&& f) const {
    const size_t r = src_.size();
    if (r == 0 || numel(os_) == 0) return;
    const int64_t W = os_.back();
    std::vector<int64_t> idx(r, 0);
    int64_t out_off = 0;
    while (true) {
      int64_t base = 0;
      for (size_t a = 0; a + 1 < r; ++a) base += src_[a][size_t(idx[a])];
      f(base, out_off);
      out_off += W;
      size_t a = r - 1;
      while (a-- > 0) {
        if (++idx[a] < os_[a]) break;
        idx[a] = 0;
      }
      if (a == size_t(-1)) return;
    }
  }

  Shape os_;
  std::vector<std::vector<int64_t>> src_;
};

class Pad : public LayoutOp {
 public:
  Pad(const NodeInfo& n, const std::vector<Tensor>& in) {
    const Tensor& x = in.at(0);
    size_t r = x.shape.size();
    std::string mode = n.attrs.get_string("mode", "constant");
    PYEDGE_CHECK(mode == "constant" || mode == "edge" || mode == "reflect" || mode == "wrap",
                 n.where(), ": mode '", mode, "' is not supported (constant, edge, reflect, wrap)");
    std::vector<int64_t> pads, axes;
    double value = 0;
    const void* const_bits = nullptr;  // constant_value known at plan time
    if (n.opset >= 11) {
      check_num_inputs(n, in, 2, 4);
      pads = const_input(n, in, 1, "pads").to_ints();
      if (in.size() > 2 && n.has_input(2)) {
        PYEDGE_CHECK(in[2].dtype == x.dtype && in[2].numel() <= 1, n.where(),
                     ": constant_value must be a scalar of the input's dtype");
        if (in[2].data && in[2].numel() == 1) const_bits = in[2].data;
        else runtime_value_ = in[2].numel() == 1;
      }
      if (in.size() > 3 && n.has_input(3)) axes = const_input(n, in, 3, "axes").to_ints();
    } else {
      check_num_inputs(n, in, 1, 1);
      pads = n.attrs.get_ints("pads");
      value = n.attrs.get_float("value", 0.0);
    }
    if (axes.empty())
      for (size_t k = 0; k < r; ++k) axes.push_back(int64_t(k));
    size_t m = axes.size();
    PYEDGE_CHECK(pads.size() == 2 * m, n.where(), ": pads has ", pads.size(),
                 " entries, expected ", 2 * m);
    std::vector<int64_t> pb(r, 0), pe(r, 0);
    for (size_t k = 0; k < m; ++k) {
      size_t a = size_t(normalize_axis(n, axes[k], int64_t(r)));
      pb[a] = pads[k];
      pe[a] = pads[k + m];
    }
    Shape os(r), kept(r);
    int64_t soff = 0, doff = 0;
    auto xst = contiguous_strides(x.shape);
    for (size_t a = 0; a < r; ++a) {
      os[a] = x.shape[a] + pb[a] + pe[a];
      PYEDGE_CHECK(os[a] >= 0, n.where(), ": pads ", shape_str(pads), " crop more than dim ",
                   a, " of ", shape_str(x.shape));
      kept[a] = std::max<int64_t>(0, x.shape[a] - std::max<int64_t>(0, -pb[a]) -
                                         std::max<int64_t>(0, -pe[a]));
    }
    auto ost = contiguous_strides(os);
    for (size_t a = 0; a < r; ++a) {
      soff += std::max<int64_t>(0, -pb[a]) * xst[a];
      doff += std::max<int64_t>(0, pb[a]) * ost[a];
    }
    if (numel(kept) == 0) soff = doff = 0;
    if (mode != "constant" && r > 0) {  // a scalar has nothing to pad
      gather_.build(n, mode, x.shape, os, pb);
      outputs = {make_output(x.dtype, os)};
      return;
    }
    need_fill_ = numel(kept) != numel(os);
    bits_ = bits_of(x.dtype, value);
    if (const_bits) std::memcpy(&bits_, const_bits, dtype_size(x.dtype));
    fwd_ = Region::make(kept, ost, xst, doff, soff);
    bwd_ = Region::make(kept, xst, ost, soff, doff);
    outputs = {make_output(x.dtype, os)};
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    if (gather_.active()) {
      gather_.forward(dtype_size(in[0].dtype), in[0].data, out[0].data);
      return;
    }
    if (need_fill_) {
      uint64_t bits = bits_;
      if (runtime_value_) std::memcpy(&bits, in[2].data, dtype_size(in[2].dtype));
      fill_value(out[0], bits);
    }
    copy_region(fwd_, dtype_size(in[0].dtype), out[0].data, in[0].data);
  }
  void backward(const std::vector<Tensor>&, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext&) override {
    if (!din[0].data || !dout[0].data) return;
    if (gather_.active()) gather_.backward(dout[0].ptr<float>(), din[0].ptr<float>());
    else add_region(bwd_, din[0].ptr<float>(), dout[0].ptr<float>());
  }

 private:
  PadGather gather_;  // edge / reflect / wrap
  Region fwd_, bwd_;
  bool need_fill_ = false, runtime_value_ = false;
  uint64_t bits_ = 0;
};
PYEDGE_REGISTER_OP("Pad", Pad);

// Trilu(x[, k]; upper): keeps j - i >= k (upper) or j - i <= k (lower) of x [.., N, M].
class Trilu : public LayoutOp {
 public:
  Trilu(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 1, 2);
    const Tensor& x = in[0];
    PYEDGE_CHECK(x.rank() >= 2, n.where(), ": input must have rank >= 2, has shape ",
                 shape_str(x.shape));
    if (in.size() > 1 && n.has_input(1)) k_ = const_input(n, in, 1, "k").int_at(0);
    upper_ = n.attrs.get_int("upper", 1) != 0;
    rows_ = x.shape[x.shape.size() - 2];
    cols_ = x.shape.back();
    k_ = std::clamp<int64_t>(k_, -rows_ - 1, cols_ + 1);  // same result, no overflow in i + k
    outputs = {make_output(x.dtype, x.shape)};
  }
  // Columns [b, e) of row i are kept.
  void kept(int64_t i, int64_t* b, int64_t* e) const {
    int64_t lim = i + k_;  // clamp before use: k may be huge
    if (upper_) { *b = std::clamp<int64_t>(lim, 0, cols_); *e = cols_; }
    else { *b = 0; *e = std::clamp<int64_t>(lim + 1, 0, cols_); }
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    size_t es = dtype_size(in[0].dtype);
    const auto* x = static_cast<const uint8_t*>(in[0].data);
    auto* y = static_cast<uint8_t*>(out[0].data);
    int64_t nrows = in[0].numel() / std::max<int64_t>(cols_, 1);
    if (cols_ == 0) return;
    parallel_for(nrows, std::max<int64_t>(1, 4096 / cols_), [&](int64_t rb, int64_t re) {
      for (int64_t row = rb; row < re; ++row) {
        int64_t b, e;
        kept(row % rows_, &b, &e);
        if (e < b) e = b;
        size_t base = size_t(row * cols_) * es;
        std::memset(y + base, 0, size_t(b) * es);
        std::memcpy(y + base + size_t(b) * es, x + base + size_t(b) * es, size_t(e - b) * es);
        std::memset(y + base + size_t(e) * es, 0, size_t(cols_ - e) * es);
      }
    });
  }
  void backward(const std::vector<Tensor>&, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext&) override {
    if (!din[0].data || !dout[0].data || cols_ == 0) return;
    const float* dy = dout[0].ptr<float>();
    float* dx = din[0].ptr<float>();
    int64_t nrows = din[0].numel() / cols_;
    parallel_for(nrows, std::max<int64_t>(1, 4096 / cols_), [&](int64_t rb, int64_t re) {
      for (int64_t row = rb; row < re; ++row) {
        int64_t b, e;
        kept(row % rows_, &b, &e);
        const float* g = dy + row * cols_;
        float* d = dx + row * cols_;
        for (int64_t j = b; j < e; ++j) d[j] += g[j];
      }
    });
  }

 private:
  int64_t k_ = 0, rows_ = 0, cols_ = 0;
  bool upper_ = true;
};
PYEDGE_REGISTER_OP("Trilu", Trilu);

}  // namespace
}  // namespace pyedge
