// GatherND: data [b..., r...], indices [b..., q..., k] -> [b..., q..., r[k:]...] (batch_dims b).
// Backward scatters (adds) slices back into the data gradient.
#include <cstring>

#include "ops/op.h"

namespace pyedge {
namespace {

class GatherND : public Op {
 public:
  GatherND(const NodeInfo& n, const std::vector<Tensor>& in) : node_(n.where()) {
    check_num_inputs(n, in, 2, 2);
    PYEDGE_CHECK(in[1].dtype == DType::i64 || in[1].dtype == DType::i32, n.where(),
                 ": indices must be int64 or int32");
    const Shape& d = in[0].shape;
    const Shape& ix = in[1].shape;
    b_ = n.attrs.get_int("batch_dims", 0);
    PYEDGE_CHECK(!ix.empty(), n.where(), ": indices must have rank >= 1");
    k_ = ix.back();
    PYEDGE_CHECK(b_ >= 0 && b_ + k_ <= int64_t(d.size()) && b_ < int64_t(ix.size()), n.where(),
                 ": indices ", shape_str(ix), " do not fit data ", shape_str(d), " with batch_dims ", b_);
    for (int64_t i = 0; i < b_; ++i)
      PYEDGE_CHECK(d[size_t(i)] == ix[size_t(i)], n.where(), ": batch dimensions differ");
    Shape out(ix.begin(), ix.end() - 1);
    for (size_t i = size_t(b_ + k_); i < d.size(); ++i) out.push_back(d[i]);
    batch_ = 1;
    for (int64_t i = 0; i < b_; ++i) batch_ *= d[size_t(i)];
    per_batch_ = 1;
    for (size_t i = size_t(b_); i + 1 < ix.size(); ++i) per_batch_ *= ix[i];
    slice_ = 1;
    for (size_t i = size_t(b_ + k_); i < d.size(); ++i) slice_ *= d[i];
    strides_.assign(size_t(k_), 0);
    int64_t s = slice_;
    for (int64_t j = k_ - 1; j >= 0; --j) {
      strides_[size_t(j)] = s;
      dims_.insert(dims_.begin(), d[size_t(b_ + j)]);
      s *= d[size_t(b_ + j)];
    }
    batch_stride_ = s;
    outputs = {make_output(in[0].dtype, out)};
  }

  // Element offset of gathered slice i within the data (validated).
  int64_t offset(const Tensor& idx, int64_t bi, int64_t qi) const {
    int64_t off = bi * batch_stride_;
    int64_t base = (bi * per_batch_ + qi) * k_;
    for (int64_t j = 0; j < k_; ++j) {
      int64_t v = idx.int_at(base + j);
      int64_t dim = dims_[size_t(j)];
      if (v < 0) v += dim;
      PYEDGE_CHECK(v >= 0 && v < dim, node_, ": index ", idx.int_at(base + j),
                   " out of range for a dimension of size ", dim);
      off += v * strides_[size_t(j)];
    }
    return off;
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out, RunContext&) override {
    size_t es = dtype_size(in[0].dtype);
    const char* src = static_cast<const char*>(in[0].data);
    char* dst = static_cast<char*>(out[0].data);
    for (int64_t bi = 0; bi < batch_; ++bi)
      for (int64_t qi = 0; qi < per_batch_; ++qi)
        std::memcpy(dst + size_t((bi * per_batch_ + qi) * slice_) * es,
                    src + size_t(offset(in[1], bi, qi)) * es, size_t(slice_) * es);
  }
  bool has_backward() const override { return true; }
  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext&) override {
    if (!din[0].data || !dout[0].data) return;
    const float* dy = dout[0].ptr<float>();
    float* dx = din[0].ptr<float>();
    for (int64_t bi = 0; bi < batch_; ++bi)
      for (int64_t qi = 0; qi < per_batch_; ++qi) {
        float* d = dx + offset(in[1], bi, qi);
        const float* g = dy + (bi * per_batch_ + qi) * slice_;
        for (int64_t e = 0; e < slice_; ++e) d[e] += g[e];
      }
  }
  bool differentiable_input(size_t i) const override {
    return i == 0 && input_dtypes[0] == DType::f32;
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    return {false, true};
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override { return {false}; }

 private:
  std::string node_;
  int64_t b_ = 0, k_ = 0, batch_ = 1, per_batch_ = 1, slice_ = 1, batch_stride_ = 1;
  std::vector<int64_t> strides_, dims_;
};
PYEDGE_REGISTER_OP("GatherND", GatherND);

}  // namespace
}  // namespace pyedge
