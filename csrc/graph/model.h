// The imported graph: values by id, nodes in topological order, initializers as views.
// Immutable once built; plans and sessions read it.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "ops/op.h"

namespace pyedge {

struct ModelNode {
  NodeInfo info;
  std::vector<int> inputs;   // value ids; -1 for an absent optional input
  std::vector<int> outputs;  // value ids; -1 for an unused optional output
};

class Model {
 public:
  // Returns the id of a named value, creating it on first use.
  int value_id(const std::string& name);
  int find_value(const std::string& name) const;  // -1 when absent
  const std::string& value_name(int id) const { return names_[size_t(id)]; }
  size_t num_values() const { return names_.size(); }

  void add_input(const std::string& name, DType dtype, const Shape& shape_hint);
  void add_output(const std::string& name);
  // `owner` keeps the memory behind `t` alive (a numpy array, a memory map).
  void add_initializer(const std::string& name, const Tensor& t, std::shared_ptr<void> owner);
  void add_node(ModelNode node);
  // Checks references and topological order; throws Error naming the offending node.
  void finalize();

  std::vector<ModelNode> nodes;
  std::vector<int> inputs;            // graph inputs (not initializers)
  std::vector<DType> input_dtypes;
  std::vector<Shape> input_shape_hints;  // -1 for symbolic dims
  std::vector<int> outputs;
  std::map<int, Tensor> initializers;
  std::vector<int> producer;          // node index producing each value, -1 if none

 private:
  std::vector<std::string> names_;
  std::map<std::string, int> ids_;
  std::vector<std::shared_ptr<void>> owners_;
};

}  // namespace pyedge
