#include "graph/model.h"

namespace pyedge {

int Model::value_id(const std::string& name) {
  auto it = ids_.find(name);
  if (it != ids_.end()) return it->second;
  int id = int(names_.size());
  names_.push_back(name);
  ids_[name] = id;
  return id;
}

int Model::find_value(const std::string& name) const {
  auto it = ids_.find(name);
  return it == ids_.end() ? -1 : it->second;
}

void Model::add_input(const std::string& name, DType dtype, const Shape& shape_hint) {
  inputs.push_back(value_id(name));
  input_dtypes.push_back(dtype);
  input_shape_hints.push_back(shape_hint);
}

void Model::add_output(const std::string& name) { outputs.push_back(value_id(name)); }

void Model::add_initializer(const std::string& name, const Tensor& t, std::shared_ptr<void> owner) {
  initializers[value_id(name)] = t;
  if (owner) owners_.push_back(std::move(owner));
}

void Model::add_node(ModelNode node) { nodes.push_back(std::move(node)); }

void Model::finalize() {
  producer.assign(names_.size(), -1);
  std::vector<bool> known(names_.size(), false);
  for (int v : inputs) known[size_t(v)] = true;
  for (auto& kv : initializers) known[size_t(kv.first)] = true;
  for (size_t i = 0; i < nodes.size(); ++i) {
    const ModelNode& n = nodes[i];
    for (size_t k = 0; k < n.inputs.size(); ++k) {
      int v = n.inputs[k];
      if (v < 0) continue;
      PYEDGE_CHECK(known[size_t(v)], n.info.where(), ": input '", names_[size_t(v)],
                   "' is not produced by any earlier node, initializer or graph input "
                   "(dangling input, or the graph is not topologically sorted / has a cycle)");
    }
    for (int v : n.outputs) {
      if (v < 0) continue;
      PYEDGE_CHECK(!known[size_t(v)] || producer[size_t(v)] < 0 ? !known[size_t(v)] : false,
                   n.info.where(), ": output '", names_[size_t(v)], "' is defined twice");
      known[size_t(v)] = true;
      producer[size_t(v)] = int(i);
    }
  }
  for (int v : outputs)
    PYEDGE_CHECK(known[size_t(v)], "graph output '", names_[size_t(v)], "' is never produced");
}

}  // namespace pyedge
