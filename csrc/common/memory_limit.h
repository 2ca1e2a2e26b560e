// The most bytes one allocation (Buffer) or one plan (arena + folded constants) may take:
// PYEDGE_MAX_MEMORY (bytes, or with a K/M/G/T suffix), by default 75% of physical RAM. Read
// when called (plan time only, never in steady state); no global state.
//
// A session's memory budget (Session::memory_budget, `max_memory=`) is the softer, total
// figure the planner recomputes activations to meet; with no budget the planner aims at what
// available_memory_bytes() reports. Plans stay under memory_limit_bytes() in both cases.
#pragma once
#include <cstdint>
#include <string>

namespace pyedge {
int64_t memory_limit_bytes();

// What this process may still allocate: MemAvailable (/proc/meminfo), lowered to the
// headroom of a cgroup v2 (memory.max - memory.current) or v1 (limit_in_bytes -
// usage_in_bytes) limit when one is set. -1 when none of them can be read. `source` names
// what decided it ("MemAvailable", "cgroup v2 memory.max"). PYEDGE_TEST_MEM_AVAILABLE (bytes)
// replaces the reading, for tests.
int64_t available_memory_bytes(std::string* source = nullptr);
}
