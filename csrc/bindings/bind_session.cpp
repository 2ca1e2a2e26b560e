#include "bindings/numpy_convert.h"
namespace pyedge {
void bind_session(py::module_& m) {}
}
