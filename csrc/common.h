// Shared helpers of the ddfast CPU kernels: raw-pointer views and OpenMP policy.
// The kernels take pointers and sizes from Python (which checked dtype, device and
// contiguity), so this library links nothing from libtorch.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace ddfast {

template <typename T>
inline T* as_ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Rows are split across threads when there are enough of them; otherwise (few, long rows)
// each row's reductions are split across threads instead.
inline bool parallel_over_rows(std::int64_t rows, std::int64_t row_len) {
  return rows >= max_threads() || row_len < 4096;
}

// Below this much work a parallel region costs more than it saves.
constexpr std::int64_t kMinParallelWork = 1 << 15;

// Sum over d of (a[d] - b[d])^2 (Q = 2) or |a[d] - b[d]| (Q = 1), accumulated in double.
template <int Q, typename T>
inline double diff_norm_pow(const T* a, const T* b, std::int64_t n, bool parallel) {
  double s = 0.0;
  if (parallel) {
#pragma omp parallel for simd reduction(+ : s) schedule(static)
    for (std::int64_t d = 0; d < n; ++d) {
      double v = static_cast<double>(a[d]) - static_cast<double>(b[d]);
      s += (Q == 2) ? v * v : std::fabs(v);
    }
  } else {
#pragma omp simd reduction(+ : s)
    for (std::int64_t d = 0; d < n; ++d) {
      double v = static_cast<double>(a[d]) - static_cast<double>(b[d]);
      s += (Q == 2) ? v * v : std::fabs(v);
    }
  }
  return s;
}

// Sum over d of a[d]^2 (Q = 2) or |a[d]| (Q = 1), accumulated in double.
template <int Q, typename T>
inline double norm_pow(const T* a, std::int64_t n, bool parallel) {
  double s = 0.0;
  if (parallel) {
#pragma omp parallel for simd reduction(+ : s) schedule(static)
    for (std::int64_t d = 0; d < n; ++d) {
      double v = static_cast<double>(a[d]);
      s += (Q == 2) ? v * v : std::fabs(v);
    }
  } else {
#pragma omp simd reduction(+ : s)
    for (std::int64_t d = 0; d < n; ++d) {
      double v = static_cast<double>(a[d]);
      s += (Q == 2) ? v * v : std::fabs(v);
    }
  }
  return s;
}

template <typename T>
inline T sign_of(T v) { return static_cast<T>((v > T(0)) - (v < T(0))); }

}  // namespace ddfast
