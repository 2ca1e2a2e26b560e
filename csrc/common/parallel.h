// Parallel loops: OpenMP when the build has it, a plain loop otherwise.
#pragma once
#include <algorithm>
#include <cstdint>
#include <exception>
#ifdef PYEDGE_OPENMP
#include <omp.h>
#endif

namespace pyedge {

int num_threads();
void set_num_threads(int n);  // core loops and OpenBLAS share this count

// Calls f(begin, end) on disjoint chunks covering [0, n); chunks hold at least `grain` items.
template <typename F>
void parallel_for(int64_t n, int64_t grain, F&& f) {
  if (n <= 0) return;
#ifdef PYEDGE_OPENMP
  int nt = num_threads();
  int64_t chunks = std::min<int64_t>(nt, (n + grain - 1) / std::max<int64_t>(grain, 1));
  if (chunks > 1 && !omp_in_parallel()) {
    // An exception may not leave an OpenMP region: keep the first and rethrow after it.
    std::exception_ptr error;
#pragma omp parallel num_threads(int(chunks))
    {
      int64_t t = omp_get_thread_num();
      int64_t per = (n + chunks - 1) / chunks;
      int64_t b = t * per, e = std::min(n, b + per);
      try {
        if (b < e) f(b, e);
      } catch (...) {
#pragma omp critical(pyedge_parallel_error)
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  f(int64_t(0), n);
}

}  // namespace pyedge
