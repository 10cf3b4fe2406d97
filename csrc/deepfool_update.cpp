// deepfool_update on CPU: r_tot' = r_tot + r on active rows, x_next = clip(x0 + (1 + overshoot)
// r_tot'). Spec: ddfast.reference.deepfool_update.
#include <algorithm>

#include "kernels.h"

namespace ddfast {
namespace {

template <typename T>
void update_impl(const T* x0, const T* r_tot, const T* r, const bool* active, T* r_tot_out,
                 T* x_next, std::int64_t B, std::int64_t D, double overshoot, bool has_lo,
                 double lo, bool has_hi, double hi) {
  const T k = static_cast<T>(1.0 + overshoot);
  const T tlo = static_cast<T>(lo), thi = static_cast<T>(hi);
  const bool par = B * D >= kMinParallelWork;
#pragma omp parallel for schedule(static) if (par)
  for (std::int64_t i = 0; i < B; ++i) {
    const std::int64_t o = i * D;
    const bool act = active[i];
#pragma omp simd
    for (std::int64_t d = 0; d < D; ++d) {
      const T rt = act ? r_tot[o + d] + r[o + d] : r_tot[o + d];
      T xn = x0[o + d] + k * rt;
      if (has_lo) xn = std::max(xn, tlo);
      if (has_hi) xn = std::min(xn, thi);
      r_tot_out[o + d] = rt;
      x_next[o + d] = xn;
    }
  }
}

}  // namespace

void deepfool_update(std::uintptr_t x0, std::uintptr_t r_tot, std::uintptr_t r,
                     std::uintptr_t active, std::uintptr_t r_tot_out, std::uintptr_t x_next,
                     std::int64_t B, std::int64_t D, double overshoot, bool has_lo, double lo,
                     bool has_hi, double hi, DType dtype) {
  auto ap = as_ptr<const bool>(active);
  if (dtype == DType::f32)
    update_impl(as_ptr<const float>(x0), as_ptr<const float>(r_tot), as_ptr<const float>(r), ap,
                as_ptr<float>(r_tot_out), as_ptr<float>(x_next), B, D, overshoot, has_lo, lo,
                has_hi, hi);
  else
    update_impl(as_ptr<const double>(x0), as_ptr<const double>(r_tot), as_ptr<const double>(r), ap,
                as_ptr<double>(r_tot_out), as_ptr<double>(x_next), B, D, overshoot, has_lo, lo,
                has_hi, hi);
}

}  // namespace ddfast
