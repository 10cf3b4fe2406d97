// deepdefense_penalty on CPU: exp(-c ||delta||/||x||) for correct rows, exp(d ||delta||/||x||)
// otherwise, continued linearly past exp_cap. Spec: ddfast.reference.deepdefense_penalty.
#include "kernels.h"

namespace ddfast {
namespace {

template <typename T>
void penalty_impl(const T* delta, const T* x, const bool* correct, T* out, std::int64_t B,
                  std::int64_t D, double c, double d, double cap) {
  const bool rows_par = parallel_over_rows(B, D) && B * D >= kMinParallelWork;
  const bool inner_par = !parallel_over_rows(B, D);
#pragma omp parallel for schedule(static) if (rows_par)
  for (std::int64_t i = 0; i < B; ++i) {
    const double dn = row_norm<2>(delta + i * D, D, inner_par);
    const double xn = row_norm<2>(x + i * D, D, inner_par);
    const double ratio = xn == 0.0 ? 0.0 : dn / xn;  // NaN stays NaN
    const double z = correct[i] ? -c * ratio : d * ratio;
    const double e = z > cap ? std::exp(cap) * (1.0 + (z - cap)) : std::exp(z);
    out[i] = static_cast<T>(e);
  }
}

}  // namespace

void deepdefense_penalty(std::uintptr_t delta, std::uintptr_t x, std::uintptr_t correct,
                         std::uintptr_t out, std::int64_t B, std::int64_t D, double c, double d,
                         double exp_cap, DType dtype) {
  auto cp = as_ptr<const bool>(correct);
  if (dtype == DType::f32)
    penalty_impl(as_ptr<const float>(delta), as_ptr<const float>(x), cp, as_ptr<float>(out), B, D,
                 c, d, exp_cap);
  else
    penalty_impl(as_ptr<const double>(delta), as_ptr<const double>(x), cp, as_ptr<double>(out), B,
                 D, c, d, exp_cap);
}

}  // namespace ddfast
