#include "ops/op.h"

#include <algorithm>

namespace pyedge {

namespace {
std::map<std::string, OpFactory>& registry() {
  static std::map<std::string, OpFactory> r;
  return r;
}
template <typename T>
const T* find_attr(const Attrs& a, const std::string& k) {
  auto it = a.values.find(k);
  if (it == a.values.end()) return nullptr;
  const T* v = std::get_if<T>(&it->second);
  PYEDGE_CHECK(v != nullptr, "attribute '", k, "' has the wrong type");
  return v;
}
}  // namespace

int64_t Attrs::get_int(const std::string& k, int64_t dflt) const {
  auto it = values.find(k);
  if (it == values.end()) return dflt;
  if (auto d = std::get_if<double>(&it->second)) return int64_t(*d);
  const int64_t* v = find_attr<int64_t>(*this, k);
  return *v;
}
double Attrs::get_float(const std::string& k, double dflt) const {
  auto it = values.find(k);
  if (it == values.end()) return dflt;
  if (auto i = std::get_if<int64_t>(&it->second)) return double(*i);
  return *find_attr<double>(*this, k);
}
std::string Attrs::get_string(const std::string& k, const std::string& dflt) const {
  auto v = find_attr<std::string>(*this, k);
  return v ? *v : dflt;
}
std::vector<int64_t> Attrs::get_ints(const std::string& k, const std::vector<int64_t>& dflt) const {
  auto v = find_attr<std::vector<int64_t>>(*this, k);
  return v ? *v : dflt;
}
std::vector<double> Attrs::get_floats(const std::string& k, const std::vector<double>& dflt) const {
  auto v = find_attr<std::vector<double>>(*this, k);
  return v ? *v : dflt;
}
const OwnedTensor* Attrs::get_tensor(const std::string& k) const {
  return find_attr<OwnedTensor>(*this, k);
}

std::string NodeInfo::where() const {
  std::string t = domain.empty() ? op_type : domain + "." + op_type;
  return t + " node '" + name + "'";
}

void Op::backward(const std::vector<Tensor>&, const std::vector<Tensor>&,
                  const std::vector<Tensor>&, const std::vector<Tensor>&, RunContext&) {
  throw UnsupportedError("internal: backward called on an op without a backward rule");
}

double Op::flops() const {
  double n = 0;
  for (const Tensor& o : outputs) n += double(o.numel());
  return n;
}

bool Op::differentiable_input(size_t i) const {
  return i < input_dtypes.size() && is_float(input_dtypes[i]);
}

std::vector<bool> Op::backward_reads_inputs(const std::vector<bool>& need_grad) const {
  return std::vector<bool>(need_grad.size(), true);
}
std::vector<bool> Op::backward_reads_outputs(const std::vector<bool>&) const {
  return std::vector<bool>(outputs.size(), true);
}

std::string op_key(const std::string& domain, const std::string& op_type) {
  if (domain.empty() || domain == "ai.onnx") return op_type;
  return domain + "." + op_type;
}

void register_op(const std::string& key, OpFactory factory) { registry()[key] = std::move(factory); }
bool op_registered(const std::string& key) { return registry().count(key) != 0; }
std::vector<std::string> registered_ops() {
  std::vector<std::string> r;
  for (auto& kv : registry()) r.push_back(kv.first);
  return r;
}

std::unique_ptr<Op> make_op(const NodeInfo& node, const std::vector<Tensor>& inputs) {
  auto it = registry().find(op_key(node.domain, node.op_type));
  if (it == registry().end())
    throw UnsupportedError(str_cat("unsupported op ", node.where(),
                                   ": pyedge has no kernel for it (see `pyedge inspect` for "
                                   "the list of supported ops)"));
  std::unique_ptr<Op> op;
  try {
    op = it->second(node, inputs);
  } catch (const UnsupportedError&) {
    throw;
  } catch (const std::exception& e) {
    std::string msg = e.what();
    if (msg.find(node.name) == std::string::npos || node.name.empty())
      msg = node.where() + ": " + msg;
    throw Error(msg);
  }
  op->input_dtypes.clear();
  for (auto& t : inputs) op->input_dtypes.push_back(t.dtype);
  if (op->n_visible == 0) op->n_visible = int(op->outputs.size());
  return op;
}

void check_num_inputs(const NodeInfo& n, const std::vector<Tensor>& in, size_t lo, size_t hi) {
  PYEDGE_CHECK(in.size() >= lo && in.size() <= hi, n.where(), " takes ", lo, "..", hi,
               " inputs, got ", in.size());
}

void check_float(const NodeInfo& n, const Tensor& t, const char* what) {
  PYEDGE_CHECK(t.dtype == DType::f32, n.where(), ": ", what, " must be float32, got ",
               dtype_name(t.dtype));
}

const Tensor& const_input(const NodeInfo& n, const std::vector<Tensor>& in, size_t i,
                          const char* what) {
  PYEDGE_CHECK(i < in.size() && n.has_input(i), n.where(), ": missing input '", what, "'");
  PYEDGE_CHECK(in[i].data != nullptr, n.where(), ": input '", what,
               "' must be known when the plan is built (a constant or computed from shapes); "
               "it depends on data");
  return in[i];
}

Tensor make_output(DType dt, Shape shape) {
  // Every planned shape passes here: refuse negative sizes and element counts whose byte size
  // overflows (a hostile Reshape/Expand/ConstantOfShape) before anything multiplies them.
  int64_t n = 1;
  for (int64_t d : shape) {
    PYEDGE_CHECK(d >= 0, "invalid tensor shape ", shape_str(shape), ": negative dimension");
    PYEDGE_CHECK(d == 0 || n <= (int64_t(1) << 56) / d, "invalid tensor shape ",
                 shape_str(shape), ": too many elements");
    n *= d;
  }
  Tensor t;
  t.dtype = dt;
  t.shape = std::move(shape);
  return t;
}

int64_t normalize_axis(const NodeInfo& n, int64_t axis, int64_t rank) {
  int64_t a = axis < 0 ? axis + rank : axis;
  PYEDGE_CHECK(a >= 0 && a < rank, n.where(), ": axis ", axis,
               " out of range for rank ", rank);
  return a;
}

}  // namespace pyedge
