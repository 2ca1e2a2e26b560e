// The most bytes one allocation (Buffer) or one plan (arena + folded constants) may take:
// PYEDGE_MAX_MEMORY (bytes, or with a K/M/G/T suffix), by default 75% of physical RAM. Read
// when called (plan time only, never in steady state); no global state.
#pragma once
#include <cstdint>

namespace pyedge {
int64_t memory_limit_bytes();
}
