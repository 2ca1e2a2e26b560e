// CastLike(x, like) = Cast(x, to = like's dtype): built on the Cast kernel.
#include "ops/op.h"

namespace pyedge {
namespace {

int64_t onnx_type_code(DType t) {
  switch (t) {
    case DType::f32: return 1;
    case DType::u8: return 2;
    case DType::i32: return 6;
    case DType::i64: return 7;
    case DType::boolean: return 9;
    case DType::f64: return 11;
  }
  return 1;
}

std::unique_ptr<Op> make_cast_like(const NodeInfo& n, const std::vector<Tensor>& in) {
  check_num_inputs(n, in, 2, 2);
  NodeInfo cast = n;
  cast.op_type = "Cast";
  cast.attrs.values["to"] = onnx_type_code(in[1].dtype);
  cast.input_present = {true};
  return make_op(cast, {in[0]});
}

OpRegistrar cast_like_registrar("CastLike", make_cast_like);

}  // namespace
}  // namespace pyedge
