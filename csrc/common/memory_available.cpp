// available_memory_bytes(): MemAvailable, or less under a cgroup memory limit.
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include "common/memory_limit.h"

namespace pyedge {
namespace {

// First number in a file ("max" and unreadable files: -1).
int64_t read_number(const std::string& path) {
  std::ifstream f(path);
  std::string s;
  if (!(f >> s) || s == "max") return -1;
  try {
    return int64_t(std::stoll(s));
  } catch (...) {
    return -1;
  }
}

int64_t mem_available() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  int64_t kb;
  std::string unit;
  while (f >> key >> kb) {
    std::getline(f, unit);
    if (key == "MemAvailable:") return kb * 1024;
  }
  return -1;
}

// This process's cgroup path (v2: the "0::" line of /proc/self/cgroup; v1: the memory
// controller's line).
std::string cgroup_path(bool v2) {
  std::ifstream f("/proc/self/cgroup");
  std::string line;
  while (std::getline(f, line)) {
    if (v2 && line.rfind("0::", 0) == 0) return line.substr(3);
    if (!v2) {
      auto a = line.find(':'), b = line.find(':', a + 1);
      if (a == std::string::npos || b == std::string::npos) continue;
      std::stringstream ctrls(line.substr(a + 1, b - a - 1));
      std::string c;
      while (std::getline(ctrls, c, ','))
        if (c == "memory") return line.substr(b + 1);
    }
  }
  return "";
}

// limit - usage of the first cgroup directory (own path, then the mount root) that has both
// files; -1 without a limit.
int64_t headroom(const std::string& mount, const std::string& path, const char* limit_file,
                 const char* usage_file) {
  for (const std::string& dir : {mount + path, mount}) {
    const int64_t limit = read_number(dir + "/" + limit_file);
    const int64_t usage = read_number(dir + "/" + usage_file);
    // v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages).
    if (limit > 0 && usage >= 0 && limit < (int64_t(1) << 60)) return limit > usage ? limit - usage : 0;
  }
  return -1;
}

}  // namespace

int64_t available_memory_bytes(std::string* source) {
  // A fake reading for tests that play "another process took the memory" (bytes).
  if (const char* fake = std::getenv("PYEDGE_TEST_MEM_AVAILABLE")) {
    if (source) *source = "PYEDGE_TEST_MEM_AVAILABLE";
    try {
      return int64_t(std::stoll(fake));
    } catch (...) {
      return -1;
    }
  }
  int64_t avail = mem_available();
  if (source) *source = "MemAvailable";
  int64_t v2 = headroom("/sys/fs/cgroup", cgroup_path(true), "memory.max", "memory.current");
  int64_t v1 = headroom("/sys/fs/cgroup/memory", cgroup_path(false), "memory.limit_in_bytes",
                        "memory.usage_in_bytes");
  if (v2 >= 0 && (avail < 0 || v2 < avail)) {
    avail = v2;
    if (source) *source = "the cgroup v2 memory.max headroom";
  }
  if (v1 >= 0 && (avail < 0 || v1 < avail)) {
    avail = v1;
    if (source) *source = "the cgroup v1 memory.limit_in_bytes headroom";
  }
  return avail;
}

}  // namespace pyedge
