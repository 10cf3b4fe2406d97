// Row reductions of the CPU kernels: sum of squares / of absolute values of a row or of the
// difference of two rows. Differences of float rows (select_boundary's hot loop) are summed
// in float within blocks of kBlock elements -- the differences are float, exactly as a
// float32 torch composition computes them -- and the block sums in double; everything else
// is accumulated in double. The exact_norm* functions are the slow fallback where a fast
// sum overflowed or underflowed (see row_norm in common.h): float rows are summed in double
// (no float32 square overflows or underflows there), double rows are divided by a power of
// two near their largest entry first (exact). The fast functions are compiled for AVX-512,
// AVX2 and baseline x86-64 and the loader picks the best the CPU has (GCC target_clones), so
// a build is both fast and safe to run on another x86-64 machine.
#include "common.h"

namespace ddfast {
namespace {

constexpr std::int64_t kBlock = 64;
constexpr int kLanes = 16;  // one AVX-512 register of floats

template <int Q, typename T>
inline T term(T v) { return (Q == 2) ? v * v : (v < T(0) ? -v : v); }

// Lane i sums elements i, i + kLanes, ... of each block of kBlock in float, then adds that to
// its double lane: the vector stays in registers and the one horizontal sum is at the end.
template <int Q, bool Diff, typename T>
inline double blocked_sum(const T* a, const T* b, std::int64_t n) {
  double lanes[kLanes] = {};
  std::int64_t d0 = 0;
  for (; d0 + kBlock <= n; d0 += kBlock) {
    T acc[kLanes] = {};
    for (std::int64_t k = d0; k < d0 + kBlock; k += kLanes)
      for (int i = 0; i < kLanes; ++i) acc[i] += term<Q>(Diff ? a[k + i] - b[k + i] : a[k + i]);
    for (int i = 0; i < kLanes; ++i) lanes[i] += static_cast<double>(acc[i]);
  }
  T acc[kLanes] = {};
  for (std::int64_t d = d0; d < n; ++d) acc[(d - d0) % kLanes] += term<Q>(Diff ? a[d] - b[d] : a[d]);
  double s = 0.0;
  for (int i = 0; i < kLanes; ++i) s += lanes[i] + static_cast<double>(acc[i]);
  return s;
}

template <int Q, bool Diff, typename T>
inline double double_sum(const T* a, const T* b, std::int64_t n) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (std::int64_t d = 0; d < n; ++d) {
    const double v = Diff ? static_cast<double>(a[d]) - static_cast<double>(b[d])
                          : static_cast<double>(a[d]);
    s += (Q == 2) ? v * v : std::fabs(v);
  }
  return s;
}

// ||a - b||_2 of double rows without overflow or underflow: sum ((a - b) / s)^2 with s a power
// of two near max |a - b| (so the division is exact), times s. NaN anywhere gives NaN.
inline double scaled_norm2(const double* a, const double* b, std::int64_t n) {
  double m = 0.0;
  bool nan = false;
  for (std::int64_t d = 0; d < n; ++d) {
    const double v = std::fabs(b ? a[d] - b[d] : a[d]);
    nan |= v != v;
    m = std::max(m, v);
  }
  if (nan) return std::numeric_limits<double>::quiet_NaN();
  if (m == 0.0 || std::isinf(m)) return m;
  int e = 0;
  std::frexp(m, &e);
  const double s = std::ldexp(1.0, e - 1);
  double acc = 0.0;
  for (std::int64_t d = 0; d < n; ++d) {
    const double v = (b ? a[d] - b[d] : a[d]) / s;
    acc += v * v;
  }
  return s * std::sqrt(acc);
}

}  // namespace

DDFAST_CLONES double diff_pow2(const float* a, const float* b, std::int64_t n) {
  return b ? blocked_sum<2, true>(a, b, n) : blocked_sum<2, false>(a, a, n);
}
DDFAST_CLONES double diff_pow1(const float* a, const float* b, std::int64_t n) {
  return b ? blocked_sum<1, true>(a, b, n) : blocked_sum<1, false>(a, a, n);
}
DDFAST_CLONES double norm_pow2(const float* a, std::int64_t n) {
  return double_sum<2, false>(a, a, n);
}
DDFAST_CLONES double norm_pow1(const float* a, std::int64_t n) {
  return double_sum<1, false>(a, a, n);
}
DDFAST_CLONES double diff_pow2(const double* a, const double* b, std::int64_t n) {
  return b ? double_sum<2, true>(a, b, n) : double_sum<2, false>(a, a, n);
}
DDFAST_CLONES double diff_pow1(const double* a, const double* b, std::int64_t n) {
  return b ? double_sum<1, true>(a, b, n) : double_sum<1, false>(a, a, n);
}
DDFAST_CLONES double norm_pow2(const double* a, std::int64_t n) {
  return double_sum<2, false>(a, a, n);
}
DDFAST_CLONES double norm_pow1(const double* a, std::int64_t n) {
  return double_sum<1, false>(a, a, n);
}

double exact_norm2(const float* a, const float* b, std::int64_t n) {
  return std::sqrt(b ? double_sum<2, true>(a, b, n) : double_sum<2, false>(a, a, n));
}
double exact_norm1(const float* a, const float* b, std::int64_t n) {
  return b ? double_sum<1, true>(a, b, n) : double_sum<1, false>(a, a, n);
}
double exact_norm2(const double* a, const double* b, std::int64_t n) {
  return scaled_norm2(a, b, n);
}
double exact_norm1(const double* a, const double* b, std::int64_t n) {
  return b ? double_sum<1, true>(a, b, n) : double_sum<1, false>(a, a, n);
}

}  // namespace ddfast
