// boundary_step on CPU: r = (|fdiff| / ||w||_q + eps) * w / ||w||_2 (or * sign(w) for the
// inf norm), 0 where w == 0. Spec: ddfast.reference.boundary_step.
#include "kernels.h"

namespace ddfast {
namespace {

template <int Q, typename T>
void boundary_step_impl(const T* fdiff, const T* w, T* r, std::int64_t B, std::int64_t D,
                        double eps) {
  const bool rows_par = parallel_over_rows(B, D) && B * D >= kMinParallelWork;
  const bool inner_par = !parallel_over_rows(B, D);
#pragma omp parallel for schedule(static) if (rows_par)
  for (std::int64_t i = 0; i < B; ++i) {
    const T* wi = w + i * D;
    T* ri = r + i * D;
    const double n = row_norm<Q>(wi, D, inner_par);
    if (!(n > 0.0)) {
      for (std::int64_t d = 0; d < D; ++d) ri[d] = T(0);
      continue;
    }
    const double scale = std::fabs(static_cast<double>(fdiff[i])) / n + eps;
    if (Q == 2) {
      const double s = scale / n;
#pragma omp parallel for simd if (inner_par) schedule(static)
      for (std::int64_t d = 0; d < D; ++d) ri[d] = static_cast<T>(s * static_cast<double>(wi[d]));
    } else {
#pragma omp parallel for simd if (inner_par) schedule(static)
      for (std::int64_t d = 0; d < D; ++d)
        ri[d] = static_cast<T>(scale * static_cast<double>(sign_of(wi[d])));
    }
  }
}

template <typename T>
void dispatch(std::uintptr_t fdiff, std::uintptr_t w, std::uintptr_t r, std::int64_t B,
              std::int64_t D, bool norm_inf, double eps) {
  auto f = as_ptr<const T>(fdiff);
  auto wp = as_ptr<const T>(w);
  auto rp = as_ptr<T>(r);
  norm_inf ? boundary_step_impl<1, T>(f, wp, rp, B, D, eps)
           : boundary_step_impl<2, T>(f, wp, rp, B, D, eps);
}

}  // namespace

void boundary_step(std::uintptr_t fdiff, std::uintptr_t w, std::uintptr_t r, std::int64_t B,
                   std::int64_t D, bool norm_inf, double eps, DType dtype) {
  dtype == DType::f32 ? dispatch<float>(fdiff, w, r, B, D, norm_inf, eps)
                      : dispatch<double>(fdiff, w, r, B, D, norm_inf, eps);
}

}  // namespace ddfast
