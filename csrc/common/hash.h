// Counter-based hashing for random masks (Dropout, LoRA dropout): a mask bit depends only on
// (key, element index), so masks are reproducible and independent of the thread count.
#pragma once
#include <cstdint>

namespace pyedge {

// SplitMix64's finaliser: a bijective 64-bit mix.
inline uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace pyedge
