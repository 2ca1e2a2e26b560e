// Tensors as the core sees them: a dtype, a shape and a pointer. Storage is owned elsewhere
// (the plan's arena, a session buffer, or a numpy array kept alive by the bindings).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "common/error.h"

namespace pyedge {

enum class DType : uint8_t { f32, f64, i64, i32, u8, boolean };

size_t dtype_size(DType t);
const char* dtype_name(DType t);
bool is_float(DType t);

using Shape = std::vector<int64_t>;
int64_t numel(const Shape& s);
std::string shape_str(const Shape& s);

template <typename T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::f32; }
template <> constexpr DType dtype_of<double>() { return DType::f64; }
template <> constexpr DType dtype_of<int64_t>() { return DType::i64; }
template <> constexpr DType dtype_of<int32_t>() { return DType::i32; }
template <> constexpr DType dtype_of<uint8_t>() { return DType::u8; }
template <> constexpr DType dtype_of<bool>() { return DType::boolean; }

// Non-owning view. data may be null while planning (only dtype and shape known).
struct Tensor {
  DType dtype = DType::f32;
  Shape shape;
  void* data = nullptr;

  int64_t numel() const { return pyedge::numel(shape); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype); }
  int64_t rank() const { return int64_t(shape.size()); }
  template <typename T> T* ptr() const {
    PYEDGE_CHECK(dtype == dtype_of<T>(), "internal: tensor is ", dtype_name(dtype),
                 ", accessed as ", dtype_name(dtype_of<T>()));
    return static_cast<T*>(data);
  }
  // Read element i of an integer or float tensor as int64 (for shape-like inputs).
  int64_t int_at(int64_t i) const;
  double float_at(int64_t i) const;
  std::vector<int64_t> to_ints() const;
};

// Owned, 64-byte aligned memory: a plan's arena, folded constants, parameters.
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t bytes);
  Buffer(Buffer&& o) noexcept;
  Buffer& operator=(Buffer&& o) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer();
  void* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

// A tensor with its own storage (constants folded at plan time, op results in tests).
struct OwnedTensor {
  std::shared_ptr<Buffer> buf;
  Tensor t;
  static OwnedTensor make(DType dt, const Shape& s);
};

}  // namespace pyedge
