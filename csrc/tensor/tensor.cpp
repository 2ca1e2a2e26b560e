#include "tensor/tensor.h"

#include <cstring>
#include <new>

#include "common/alloc_counter.h"

namespace pyedge {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::i64: return 8;
    case DType::i32: return 4;
    case DType::u8: return 1;
    case DType::boolean: return 1;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f64: return "float64";
    case DType::i64: return "int64";
    case DType::i32: return "int32";
    case DType::u8: return "uint8";
    case DType::boolean: return "bool";
  }
  return "?";
}

bool is_float(DType t) { return t == DType::f32 || t == DType::f64; }

int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? "," : "") + std::to_string(s[i]);
  return r + "]";
}

int64_t Tensor::int_at(int64_t i) const {
  switch (dtype) {
    case DType::i64: return static_cast<const int64_t*>(data)[i];
    case DType::i32: return static_cast<const int32_t*>(data)[i];
    case DType::u8: case DType::boolean: return static_cast<const uint8_t*>(data)[i];
    case DType::f32: return int64_t(static_cast<const float*>(data)[i]);
    case DType::f64: return int64_t(static_cast<const double*>(data)[i]);
  }
  return 0;
}

double Tensor::float_at(int64_t i) const {
  switch (dtype) {
    case DType::f32: return static_cast<const float*>(data)[i];
    case DType::f64: return static_cast<const double*>(data)[i];
    default: return double(int_at(i));
  }
}

std::vector<int64_t> Tensor::to_ints() const {
  PYEDGE_CHECK(data != nullptr, "internal: reading values of a tensor that has no data");
  std::vector<int64_t> r(static_cast<size_t>(numel()));
  for (int64_t i = 0; i < numel(); ++i) r[size_t(i)] = int_at(i);
  return r;
}

Buffer::Buffer(size_t bytes) : size_(bytes) {
  if (bytes == 0) return;
  size_t rounded = (bytes + 63) / 64 * 64;
  data_ = std::aligned_alloc(64, rounded);
  if (!data_) throw Error(str_cat("out of memory allocating ", bytes, " bytes"));
  note_heap_allocation();
  std::memset(data_, 0, rounded);
}
Buffer::Buffer(Buffer&& o) noexcept : data_(o.data_), size_(o.size_) {
  o.data_ = nullptr;
  o.size_ = 0;
}
Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    std::free(data_);
    data_ = o.data_;
    size_ = o.size_;
    o.data_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}
Buffer::~Buffer() { std::free(data_); }

OwnedTensor OwnedTensor::make(DType dt, const Shape& s) {
  OwnedTensor o;
  o.t.dtype = dt;
  o.t.shape = s;
  o.buf = std::make_shared<Buffer>(std::max<size_t>(o.t.nbytes(), 1));
  o.t.data = o.buf->data();
  return o;
}

}  // namespace pyedge
