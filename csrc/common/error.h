// Errors crossing into Python: every failure in the core is one of these, never an abort.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace pyedge {

// A user-facing error (bad model, bad shape, unsupported op). Mapped to pyedge.PyedgeError.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// An op type with no kernel, or with no backward rule where a gradient must flow.
struct UnsupportedError : Error {
  using Error::Error;
};

// The system does not have the memory a plan needs (another process took it): raised before
// allocating instead of being killed by the kernel. Mapped to pyedge.OutOfMemoryError, a
// MemoryError.
struct OutOfMemoryError : Error {
  using Error::Error;
};

template <typename... Args>
std::string str_cat(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace pyedge

#define PYEDGE_CHECK(cond, ...)                                      \
  do {                                                               \
    if (!(cond)) throw ::pyedge::Error(::pyedge::str_cat(__VA_ARGS__)); \
  } while (0)
