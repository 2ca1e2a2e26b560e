// Counts heap allocations made by the core's own code (operator new and Buffer), so a test can
// assert that a training step in steady state allocates nothing.
#pragma once
#include <cstdint>

namespace pyedge {
void note_heap_allocation();
int64_t heap_allocation_count();
}  // namespace pyedge
