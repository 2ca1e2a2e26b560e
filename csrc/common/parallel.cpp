#include "common/parallel.h"

#include <atomic>

#include "ops/blas.h"

namespace pyedge {
namespace {
std::atomic<int> g_threads{0};
}

int num_threads() {
  int n = g_threads.load();
  if (n > 0) return n;
#ifdef PYEDGE_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void set_num_threads(int n) {
  g_threads.store(n > 0 ? n : 0);
  blas_set_num_threads(num_threads());
}

}  // namespace pyedge
