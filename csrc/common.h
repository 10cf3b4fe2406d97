// Shared helpers of the ddfast CPU kernels: raw-pointer views and OpenMP policy.
// The kernels take pointers and sizes from Python (which checked dtype, device and
// contiguity), so this library links nothing from libtorch.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

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

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DDFAST_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DDFAST_CLONES
#endif

// Row reductions (reductions.cpp): diff_pow2 = sum (a - b)^2, diff_pow1 = sum |a - b| (b may
// be null: then the sums are of a alone), norm_pow2 = sum a^2, norm_pow1 = sum |a|; see
// reductions.cpp for the accumulation. exact_norm2 / exact_norm1 are the slow sums that
// neither overflow nor underflow (the fallback of row_norm below).
double diff_pow2(const float* a, const float* b, std::int64_t n);
double diff_pow1(const float* a, const float* b, std::int64_t n);
double norm_pow2(const float* a, std::int64_t n);
double norm_pow1(const float* a, std::int64_t n);
double diff_pow2(const double* a, const double* b, std::int64_t n);
double diff_pow1(const double* a, const double* b, std::int64_t n);
double norm_pow2(const double* a, std::int64_t n);
double norm_pow1(const double* a, std::int64_t n);
double exact_norm2(const float* a, const float* b, std::int64_t n);
double exact_norm1(const float* a, const float* b, std::int64_t n);
double exact_norm2(const double* a, const double* b, std::int64_t n);
double exact_norm1(const double* a, const double* b, std::int64_t n);

// Long rows are cut into chunks of this many elements when split across threads.
constexpr std::int64_t kChunk = 4096;

// part(lo, len) summed over [0, n): in one call, or chunk by chunk across threads.
template <typename Part>
inline double chunked_sum(std::int64_t n, bool parallel, Part part) {
  if (!parallel) return part(0, n);
  double s = 0.0;
  const std::int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for reduction(+ : s) schedule(static)
  for (std::int64_t c = 0; c < chunks; ++c) s += part(c * kChunk, std::min(kChunk, n - c * kChunk));
  return s;
}

// Whether a fast power sum s (sum |v|^Q) of a row is as accurate as its type allows: it did
// not overflow (s = inf, e.g. a float square past 1.8e19 in the float32 blocks), and for
// Q = 2 it is not so small that squares may have lost digits to underflow (below `tiny`).
// Small sums of float rows accumulated in double (norm_pow*) are exact: tiny = 0 there.
template <int Q>
inline bool trusted(double s, double tiny) {
  return s <= std::numeric_limits<double>::max() && (Q == 1 || s >= tiny);
}

// Below these, a float32-block / float64 sum of squares may have lost digits to underflow.
constexpr double kTinyBlocked = 1e-20;   // squares under FLT_MIN (1.2e-38): error < 1e-9 relative
constexpr double kTinyDouble = 1e-280;   // squares under DBL_MIN (2.2e-308): likewise

// ||a - b||_Q (Q = 2, 1) of a row, b == nullptr reading as 0: the fast power sum where it is
// trusted, else the exact slow one. NaN rows give NaN, rows holding Inf give inf.
template <int Q, typename T>
inline double diff_norm(const T* a, const T* b, std::int64_t n, bool parallel) {
  const double s = chunked_sum(n, parallel, [&](std::int64_t lo, std::int64_t len) {
    const T* bl = b ? b + lo : nullptr;
    return Q == 2 ? diff_pow2(a + lo, bl, len) : diff_pow1(a + lo, bl, len);
  });
  const double tiny = std::is_same<T, float>::value ? kTinyBlocked : kTinyDouble;
  if (trusted<Q>(s, tiny) || s != s) return Q == 2 ? std::sqrt(s) : s;
  return Q == 2 ? exact_norm2(a, b, n) : exact_norm1(a, b, n);
}

// ||a||_Q (Q = 2, 1) of a row; as diff_norm (float rows are summed in double: always trusted).
template <int Q, typename T>
inline double row_norm(const T* a, std::int64_t n, bool parallel) {
  const double s = chunked_sum(n, parallel, [&](std::int64_t lo, std::int64_t len) {
    return Q == 2 ? norm_pow2(a + lo, len) : norm_pow1(a + lo, len);
  });
  const double tiny = std::is_same<T, float>::value ? 0.0 : kTinyDouble;
  if (trusted<Q>(s, tiny) || s != s) return Q == 2 ? std::sqrt(s) : s;
  return Q == 2 ? exact_norm2(a, static_cast<const T*>(nullptr), n)
                : exact_norm1(a, static_cast<const T*>(nullptr), n);
}

template <typename T>
inline T sign_of(T v) { return static_cast<T>((v > T(0)) - (v < T(0))); }

}  // namespace ddfast
