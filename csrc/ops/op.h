// The op interface. One Op object exists per graph node per plan: it is built at plan time
// from the node's attributes and its inputs' dtypes and shapes (and values, where those are
// known at plan time), computes its output shapes once, and then runs forward and backward on
// buffers the planner hands it. Kernels never allocate.
//
// Gradient convention (llm.c style): backward ACCUMULATES (+=) into din[i]; the planner zeroes
// a gradient buffer before its first writer. din[i].data == nullptr means "no gradient wanted
// for input i" (frozen or not differentiable) and must be skipped: this is where sparse
// backprop saves the weight-gradient GEMMs.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "tensor/tensor.h"

namespace pyedge {

using AttrValue = std::variant<int64_t, double, std::string, std::vector<int64_t>,
                               std::vector<double>, std::vector<std::string>, OwnedTensor>;

struct Attrs {
  std::map<std::string, AttrValue> values;

  bool has(const std::string& k) const { return values.count(k) != 0; }
  int64_t get_int(const std::string& k, int64_t dflt) const;
  double get_float(const std::string& k, double dflt) const;
  std::string get_string(const std::string& k, const std::string& dflt) const;
  std::vector<int64_t> get_ints(const std::string& k, const std::vector<int64_t>& dflt = {}) const;
  std::vector<double> get_floats(const std::string& k, const std::vector<double>& dflt = {}) const;
  const OwnedTensor* get_tensor(const std::string& k) const;  // nullptr when absent
};

struct NodeInfo {
  std::string op_type;
  std::string domain;  // "" for the default ONNX domain, "pyedge" for our fused ops
  std::string name;
  int opset = 17;      // opset of the node's domain in the model
  int num_outputs = 1; // outputs the node lists (Split's count, LayerNorm's optional ones)
  Attrs attrs;
  // false where an optional input is given as "" in the middle of the input list
  std::vector<bool> input_present;
  bool has_input(size_t i) const { return i < input_present.size() && input_present[i]; }
  std::string where() const;  // "Relu node 'layer1/relu'" for error messages
};

// State an op may need at run time besides its tensors.
struct RunContext {
  bool training = false;   // Dropout masks only when training
  uint64_t seed = 0;       // per-step seed; random ops mix it with node_index
  uint64_t node_index = 0; // position of the node in the graph (distinct per node)
  void* scratch = nullptr; // scratch_bytes() of planned, uninitialised memory
  // Backward only. Bit k set: din[k] is uninitialised memory (this step is the first writer
  // of that gradient), so the op must assign it rather than add to it. Set only for ops whose
  // assigns_fresh_grads() is true; every other din is zeroed before the step (or holds the
  // sum of earlier writers) and is accumulated into.
  uint64_t fresh_din = 0;
  bool fresh(size_t k) const { return k < 64 && ((fresh_din >> k) & 1); }
};

class Op {
 public:
  virtual ~Op() = default;

  // Visible outputs first (as many as the node has), then hidden outputs the op wants kept
  // for its backward (a dropout mask, saved statistics). Set by the constructor. An op may set
  // `data` of an output to give its value at plan time (Shape does).
  std::vector<Tensor> outputs;
  int n_visible = 0;

  virtual void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                       RunContext& ctx) = 0;

  // Whether a backward rule exists. Only asked when some input needs a gradient.
  virtual bool has_backward() const { return false; }
  virtual void backward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                        const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                        RunContext& ctx);
  // True when backward honours RunContext::fresh_din (assigns the marked dins). Saves the
  // planner a memset of every activation gradient this op writes first (1.4 GB per MiniLM
  // step); ops that do not opt in get zeroed buffers.
  virtual bool assigns_fresh_grads() const { return false; }
  // k when the backward is just din[k] += dY over the same bytes, given which inputs need a
  // gradient (Reshape-likes, Identity; Add of a frozen bias): the planner may then give
  // din[k] dY's buffer and skip the step. -1 otherwise.
  virtual int passthrough_input(const std::vector<bool>& /*need_grad*/) const { return -1; }
  // True when both inputs need a gradient and each is exactly dY (a residual Add): the
  // planner may give both dY's buffer and skip the step when their other readers and
  // writers are ordered so that sharing it is exact (see Plan::assign_memory).
  virtual bool both_grads_are_dy(const std::vector<bool>& /*need_grad*/) const { return false; }
  // Which inputs can carry a gradient at all (indices, masks and shapes cannot).
  virtual bool differentiable_input(size_t i) const;

  // What the backward reads, given which inputs need a gradient; used by the memory planner
  // to free activations early. Defaults: everything.
  virtual std::vector<bool> backward_reads_inputs(const std::vector<bool>& need_grad) const;
  virtual std::vector<bool> backward_reads_outputs(const std::vector<bool>& need_grad) const;

  // Scratch memory for forward / backward (e.g. im2col); planned in the arena.
  virtual size_t forward_scratch_bytes() const { return 0; }
  virtual size_t backward_scratch_bytes(const std::vector<bool>& /*need_grad*/) const { return 0; }

  // Switches to a path that needs less scratch, asked by the planner when even its smallest
  // plan does not fit the memory budget (LoraMatMul: x·W + s·(x·Aᵀ)·Bᵀ instead of building
  // the merged K×N weight). Results may then differ from the default path by rounding only;
  // a plan stays on one path, so its recomputation is still bitwise. True when it changed.
  virtual bool reduce_scratch() { return false; }

  // Cost of one forward call, for choosing what to recompute (graph/plan_recompute.cpp):
  // floating-point operations where the op knows them (MatMul, Gemm, LoraMatMul, Conv,
  // Attention), else a proxy of one per output element.
  virtual double flops() const;
  // Whether the planner may run forward again inside the backward to remake the outputs
  // instead of keeping them. Forward must then be a function of the inputs and RunContext
  // (training, seed, node_index) alone and write every output in full, so the second run
  // gives the same bytes. Ops with state that forward changes opt out.
  virtual bool recomputable() const { return true; }

  // False for ops whose result may not be computed once at plan time (random ones).
  virtual bool foldable() const { return true; }
  // True when the output aliases input 0's memory (Reshape-like ops); the planner may then
  // skip the copy. Kernels must still work when buffers differ.
  virtual bool output_aliases_input0() const { return false; }

  // Filled by the planner; kernels may use them in errors.
  std::vector<DType> input_dtypes;
  // Set by the planner once the backward is pruned: false when this op gets no backward step
  // in the plan, so forward may skip what only the backward reads (MaxPool's argmax).
  bool backward_planned = false;
};

using OpFactory =
    std::function<std::unique_ptr<Op>(const NodeInfo& node, const std::vector<Tensor>& inputs)>;

// key: op_type for the ONNX domain, "domain.op_type" otherwise (e.g. "pyedge.LoraMatMul").
void register_op(const std::string& key, OpFactory factory);
bool op_registered(const std::string& key);
std::vector<std::string> registered_ops();
// Builds the Op for a node; throws UnsupportedError naming the op and node if unknown.
std::unique_ptr<Op> make_op(const NodeInfo& node, const std::vector<Tensor>& inputs);
std::string op_key(const std::string& domain, const std::string& op_type);

struct OpRegistrar {
  OpRegistrar(const char* key, OpFactory f) { register_op(key, std::move(f)); }
};

// Registers class C, which must have a constructor C(const NodeInfo&, const std::vector<Tensor>&).
#define PYEDGE_CONCAT_INNER(a, b) a##b
#define PYEDGE_CONCAT(a, b) PYEDGE_CONCAT_INNER(a, b)
#define PYEDGE_REGISTER_OP(key, C)                                                         \
  static ::pyedge::OpRegistrar PYEDGE_CONCAT(pyedge_registrar_, __COUNTER__)(              \
      key, [](const ::pyedge::NodeInfo& n, const std::vector<::pyedge::Tensor>& in) {      \
        return std::unique_ptr<::pyedge::Op>(new C(n, in));                               \
      })

// Writes a gradient element: assigns into a fresh buffer, adds otherwise.
template <bool kAssign>
inline void put(float& dst, float v) {
  if constexpr (kAssign) dst = v;
  else dst += v;
}

// Helpers for constructors.
void check_num_inputs(const NodeInfo& n, const std::vector<Tensor>& in, size_t lo, size_t hi);
void check_float(const NodeInfo& n, const Tensor& t, const char* what);
// Value of input i at plan time, or an error saying it must be a constant.
const Tensor& const_input(const NodeInfo& n, const std::vector<Tensor>& in, size_t i,
                          const char* what);
Tensor make_output(DType dt, Shape shape);
int64_t normalize_axis(const NodeInfo& n, int64_t axis, int64_t rank);

}  // namespace pyedge
