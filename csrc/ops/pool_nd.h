// 3-D pooling (pool_nd.cpp): pool.cpp's MaxPool / AveragePool registrations hand inputs with
// three spatial axes to it.
#pragma once
#include <memory>
#include <vector>

#include "ops/op.h"

namespace pyedge {

// MaxPool (max = true) or AveragePool over x [N, C, D, H, W].
std::unique_ptr<Op> make_pool_3d(const NodeInfo& n, const std::vector<Tensor>& in, bool max);

}  // namespace pyedge
