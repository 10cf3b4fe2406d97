// select_boundary on CPU: one pass over each row's candidate gradients computes every
// ||g_k - g_ref||_q, the argmin of |f_k - f_ref| / ||g_k - g_ref||_q, then writes the step
// r from the chosen row alone. Spec: ddfast.reference.select_boundary.
#include "kernels.h"

namespace ddfast {
namespace {

template <int Q, typename T>
void select_row(const T* logits, const T* grads, std::int64_t gs_c, const std::int64_t* cand,
                std::int64_t ref, std::int64_t C, std::int64_t D, double eps, bool par,
                std::int64_t* l_out, T* dist_out, T* r) {
  std::int64_t ref_pos = 0;
  for (std::int64_t j = 0; j < C; ++j)
    if (cand[j] == ref) { ref_pos = j; break; }
  const T* g_ref = grads + ref_pos * gs_c;
  const double f_ref = static_cast<double>(logits[ref]);
  const double inf = std::numeric_limits<double>::infinity();
  // First minimum over all positions, the reference counting as +inf (as torch.argmin).
  double best = inf;
  std::int64_t best_pos = -1;
  double best_norm = 0.0;
  for (std::int64_t j = 0; j < C; ++j) {
    double dist = inf, n = 0.0;
    if (j != ref_pos) {
      const double npow = diff_norm_pow<Q>(grads + j * gs_c, g_ref, D, par);
      n = (Q == 2) ? std::sqrt(npow) : npow;
      if (n > 0.0) dist = std::fabs(static_cast<double>(logits[cand[j]]) - f_ref) / n;
    }
    if (best_pos < 0 || dist < best) { best = dist; best_pos = j; best_norm = n; }
  }
  *l_out = cand[best_pos];
  *dist_out = static_cast<T>(best);
  const T* g_l = grads + best_pos * gs_c;
  if (!(best < inf)) {
    for (std::int64_t d = 0; d < D; ++d) r[d] = T(0);
    return;
  }
  const double scale = best + eps;
  if (Q == 2) {
    const double n2 = best_norm;
    const double s = scale / n2;
#pragma omp parallel for simd if (par) schedule(static)
    for (std::int64_t d = 0; d < D; ++d)
      r[d] = static_cast<T>(s * (static_cast<double>(g_l[d]) - static_cast<double>(g_ref[d])));
  } else {
#pragma omp parallel for simd if (par) schedule(static)
    for (std::int64_t d = 0; d < D; ++d) {
      const double w = static_cast<double>(g_l[d]) - static_cast<double>(g_ref[d]);
      r[d] = static_cast<T>(scale * static_cast<double>((w > 0) - (w < 0)));
    }
  }
}

template <int Q, typename T>
void select_boundary_impl(const SelectArgs& a) {
  const T* logits = as_ptr<const T>(a.logits);
  const T* grads = as_ptr<const T>(a.grads);
  const std::int64_t* cand = as_ptr<const std::int64_t>(a.cand);
  const std::int64_t* ref = as_ptr<const std::int64_t>(a.ref);
  const bool* active = as_ptr<const bool>(a.active);
  std::int64_t* l = as_ptr<std::int64_t>(a.l);
  T* dist = as_ptr<T>(a.dist);
  T* r = as_ptr<T>(a.r);
  const std::int64_t B = a.B, K = a.K, C = a.C, D = a.D;
  const bool rows_par = parallel_over_rows(B, D) && B * C * D >= kMinParallelWork;
  const bool inner_par = !parallel_over_rows(B, D);
#pragma omp parallel for schedule(static) if (rows_par)
  for (std::int64_t i = 0; i < B; ++i) {
    T* ri = r + i * D;
    if (!active[i]) {
      l[i] = ref[i];
      dist[i] = T(0);
      for (std::int64_t d = 0; d < D; ++d) ri[d] = T(0);
      continue;
    }
    select_row<Q, T>(logits + i * K, grads + i * a.gs_b, a.gs_c, cand + i * C, ref[i], C, D, a.eps,
                     inner_par, l + i, dist + i, ri);
  }
}

}  // namespace

void select_boundary(const SelectArgs& a) {
  if (a.dtype == DType::f32) {
    a.norm_inf ? select_boundary_impl<1, float>(a) : select_boundary_impl<2, float>(a);
  } else {
    a.norm_inf ? select_boundary_impl<1, double>(a) : select_boundary_impl<2, double>(a);
  }
}

}  // namespace ddfast
