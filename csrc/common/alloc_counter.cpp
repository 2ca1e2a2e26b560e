#include "common/alloc_counter.h"

#include <atomic>
#include <cstdlib>
#include <new>

namespace pyedge {
namespace {
std::atomic<int64_t> g_allocations{0};
}
void note_heap_allocation() { g_allocations.fetch_add(1, std::memory_order_relaxed); }
int64_t heap_allocation_count() { return g_allocations.load(std::memory_order_relaxed); }
}  // namespace pyedge

// Replacing operator new inside this module (symbols are hidden, so only the core's own code
// binds to these) counts every std::vector/std::string/make_shared the core performs.
void* operator new(std::size_t n) {
  pyedge::note_heap_allocation();
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
