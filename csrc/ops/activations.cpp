// Pointwise activations. y = f(x); backward dx += dy * f'(.) from the saved input or output.
#include <cmath>

#include "common/parallel.h"
#include "ops/op.h"

namespace pyedge {
namespace {

// Relu: backward reads only the output (y > 0 <=> x > 0), so the input can be freed early.
class Relu : public Op {
 public:
  Relu(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 1, 1);
    check_float(n, in[0], "X");
    outputs = {make_output(in[0].dtype, in[0].shape)};
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out, RunContext&) override {
    const float* x = in[0].ptr<float>();
    float* y = out[0].ptr<float>();
    parallel_for(in[0].numel(), 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) y[i] = x[i] > 0.f ? x[i] : 0.f;
    });
  }
  bool has_backward() const override { return true; }
  void backward(const std::vector<Tensor>&, const std::vector<Tensor>& out,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext&) override {
    const float* y = out[0].ptr<float>();
    const float* dy = dout[0].ptr<float>();
    float* dx = din[0].ptr<float>();
    parallel_for(out[0].numel(), 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) dx[i] += y[i] > 0.f ? dy[i] : 0.f;
    });
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    return std::vector<bool>(ng.size(), false);
  }
};
PYEDGE_REGISTER_OP("Relu", Relu);

}  // namespace
}  // namespace pyedge
