// select_boundary on CPU: one pass over each row's candidate gradients computes every
// ||g_k - g_ref||_q, the argmin of |f_k - f_ref| / ||g_k - g_ref||_q, then writes the step
// r from the chosen row alone. Spec: ddfast.reference.select_boundary.
//
// With ``diff`` the candidate rows are already w = g_cand - g_ref: there is no reference row
// (g_ref below is null) and a candidate equal to the reference is skipped.
//
// The norms are computed first, rows taken in memory order and split into contiguous runs
// across threads: a transposed Jacobian ([C, B, D] viewed as [B, C, D], as the attack passes
// it) is read plane by plane, in the order the backward's GEMM wrote it; then each sample's
// argmin and r.
#include <vector>

#include "kernels.h"

namespace ddfast {
namespace {

// Position of ref in cand, -1 when absent (possible only with diff).
inline std::int64_t ref_position(const std::int64_t* cand, std::int64_t ref, std::int64_t C) {
  for (std::int64_t j = 0; j < C; ++j)
    if (cand[j] == ref) return j;
  return -1;
}

// Given norms[j] = ||g_j - g_ref||_q (q = 2 or 1) of one row: the first minimum of the
// distances (a candidate equal to the reference, a zero or NaN norm and a NaN distance all
// count as +inf; ties: the first, as torch.argmin; no finite distance: position 0), and the
// step r. g_ref is null when the rows are already differences.
template <int Q, typename T>
void finish_row(const T* logits, const T* grads, const T* g_ref, std::int64_t gs_c,
                const std::int64_t* cand, std::int64_t ref, std::int64_t C,
                std::int64_t D, double eps, bool par, const double* norms, std::int64_t* l_out,
                T* dist_out, T* r) {
  const double inf = std::numeric_limits<double>::infinity();
  const double f_ref = static_cast<double>(logits[ref]);
  double best = inf, best_norm = 0.0;
  std::int64_t best_pos = 0;
  for (std::int64_t j = 0; j < C; ++j) {
    if (cand[j] == ref) continue;  // every candidate equal to ref, not only the first at ref_pos
    const double n = norms[j];
    const double dist = n > 0.0 ? std::fabs(static_cast<double>(logits[cand[j]]) - f_ref) / n : inf;
    if (dist < best) { best = dist; best_pos = j; best_norm = n; }  // NaN is never < best
  }
  *l_out = cand[best_pos];
  *dist_out = static_cast<T>(best);
  if (!(best < inf)) {
    for (std::int64_t d = 0; d < D; ++d) r[d] = T(0);
    return;
  }
  const T* g_l = grads + best_pos * gs_c;
  const double scale = best + eps;
  auto w_at = [&](std::int64_t d) {
    return g_ref ? static_cast<double>(g_l[d]) - static_cast<double>(g_ref[d])
                 : static_cast<double>(g_l[d]);
  };
  if (Q == 2) {
    const double s = scale / best_norm;
#pragma omp parallel for simd if (par) schedule(static)
    for (std::int64_t d = 0; d < D; ++d) r[d] = static_cast<T>(s * w_at(d));
  } else {
#pragma omp parallel for simd if (par) schedule(static)
    for (std::int64_t d = 0; d < D; ++d) {
      const double w = w_at(d);
      r[d] = static_cast<T>(scale * static_cast<double>((w > 0) - (w < 0)));
    }
  }
}

template <typename T>
void inactive_row(std::int64_t ref, std::int64_t* l_out, T* dist_out, T* r, std::int64_t D) {
  *l_out = ref;
  *dist_out = T(0);
  for (std::int64_t d = 0; d < D; ++d) r[d] = T(0);
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
  const std::int64_t B = a.B, K = a.K, C = a.C, D = a.D, gs_b = a.gs_b, gs_c = a.gs_c;

  if (!parallel_over_rows(B, D)) {  // few long rows: split each row's reductions instead
    std::vector<double> norms(C, 0.0);
    for (std::int64_t i = 0; i < B; ++i) {
      if (!active[i]) { inactive_row(ref[i], l + i, dist + i, r + i * D, D); continue; }
      const T* g = grads + i * gs_b;
      const std::int64_t p = ref_position(cand + i * C, ref[i], C);
      const T* g_ref = a.diff ? nullptr : g + p * gs_c;
      for (std::int64_t j = 0; j < C; ++j)
        norms[j] = j == p ? 0.0 : diff_norm<Q>(g + j * gs_c, g_ref, D, true);
      finish_row<Q, T>(logits + i * K, g, g_ref, gs_c, cand + i * C, ref[i], C, D, a.eps,
                       true, norms.data(), l + i, dist + i, r + i * D);
    }
    return;
  }
  const bool par = B * C * D >= kMinParallelWork;
  // norms[i * C + j] = ||g_ij - g_i,ref||_q over the rows in memory order (see the top).
  std::vector<std::int64_t> pos(B);
  std::vector<double> norms(B * C);
  const bool c_major = gs_c > gs_b;
  const std::int64_t rows = B * C;
#pragma omp parallel if (par)
  {
#pragma omp for schedule(static)
    for (std::int64_t i = 0; i < B; ++i) pos[i] = ref_position(cand + i * C, ref[i], C);
#pragma omp for schedule(static)
    for (std::int64_t f = 0; f < rows; ++f) {
      const std::int64_t i = c_major ? f % B : f / C, j = c_major ? f / B : f % C;
      const T* g = grads + i * gs_b;
      norms[i * C + j] = (!active[i] || j == pos[i])
                             ? 0.0
                             : diff_norm<Q>(g + j * gs_c, a.diff ? nullptr : g + pos[i] * gs_c, D, false);
    }
#pragma omp for schedule(static)
    for (std::int64_t i = 0; i < B; ++i) {
      if (!active[i]) { inactive_row(ref[i], l + i, dist + i, r + i * D, D); continue; }
      const T* g = grads + i * gs_b;
      finish_row<Q, T>(logits + i * K, g, a.diff ? nullptr : g + pos[i] * gs_c, gs_c,
                       cand + i * C, ref[i], C, D, a.eps, false, norms.data() + i * C,
                       l + i, dist + i, r + i * D);
    }
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
