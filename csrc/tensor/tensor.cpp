#include "tensor/tensor.h"

#include <unistd.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

#include "common/alloc_counter.h"
#include "common/memory_limit.h"

namespace pyedge {
namespace {
constexpr size_t kHugePage = size_t(2) << 20;
}  // namespace

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
  for (int64_t d : s)
    if (__builtin_mul_overflow(n, d, &n))  // a hostile or broken model's shape
      throw Error(str_cat("tensor shape ", shape_str(s), " has too many elements"));
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

int64_t memory_limit_bytes() {
  if (const char* env = std::getenv("PYEDGE_MAX_MEMORY")) {
    char* end = nullptr;
    double v = std::strtod(env, &end);
    double mult = 1;
    if (end && *end) {
      switch (*end) {
        case 'k': case 'K': mult = double(1 << 10); break;
        case 'm': case 'M': mult = double(1 << 20); break;
        case 'g': case 'G': mult = double(1 << 30); break;
        case 't': case 'T': mult = double(int64_t(1) << 40); break;
        default: mult = 0;
      }
    }
    PYEDGE_CHECK(end != env && mult > 0 && v > 0,
                 "PYEDGE_MAX_MEMORY='", env, "' is not a byte count (e.g. 2000000000 or 2G)");
    double bytes = v * mult;
    return bytes >= 1e15 ? int64_t(1e15) : int64_t(bytes);  // 1 PB: keeps the sums far from overflow
  }
  long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page <= 0) return std::numeric_limits<int64_t>::max();
  return int64_t(double(pages) * double(page) * 0.75);
}

Buffer::Buffer(size_t bytes) : size_(bytes) {
  if (bytes == 0) return;
  int64_t limit = memory_limit_bytes();
  if (bytes > uint64_t(limit))
    throw Error(str_cat("refusing to allocate ", bytes, " bytes: over the memory limit of ", limit,
                        " bytes (75% of RAM by default; set PYEDGE_MAX_MEMORY to change it)"));
  // Large buffers (the plan's arena, big constants) in 2 MiB pages where the kernel offers
  // them on request (transparent hugepages in "madvise" mode): the step streams through
  // hundreds of MB, and 4 KiB pages cost a TLB miss every 1024 floats.
  const size_t align = bytes >= kHugePage * 2 ? kHugePage : 64;
  size_t rounded = (bytes + align - 1) / align * align;
  data_ = std::aligned_alloc(align, rounded);
  if (!data_) throw Error(str_cat("out of memory allocating ", bytes, " bytes"));
#ifdef MADV_HUGEPAGE
  if (align == kHugePage) madvise(data_, rounded, MADV_HUGEPAGE);  // a hint: failure is fine
#endif
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
