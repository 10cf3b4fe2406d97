// Declarations of the ddfast CPU kernels (one .cpp per op). Arguments are raw addresses of
// contiguous tensors plus sizes; shapes and semantics follow ddfast/reference.py.
#pragma once
#include <cstdint>

#include "common.h"

namespace ddfast {

enum class DType : int { f32 = 0, f64 = 1 };

struct SelectArgs {
  std::uintptr_t logits, grads, cand, ref, active;  // [B,K] [B,C,D] [B,C] i64 [B] i64 [B] bool
  std::uintptr_t l, dist, r;                         // [B] i64, [B], [B,D]
  std::int64_t B, K, C, D;
  std::int64_t gs_b, gs_c;  // element strides of grads over B and C (its D stride is 1)
  bool norm_inf;
  double eps;
  DType dtype;
  bool diff;  // grads rows are already g_cand - g_ref (no reference row)
};
void select_boundary(const SelectArgs& a);

// r[B,D] from fdiff[B], w[B,D].
void boundary_step(std::uintptr_t fdiff, std::uintptr_t w, std::uintptr_t r, std::int64_t B,
                   std::int64_t D, bool norm_inf, double eps, DType dtype);

// penalty[B] from delta[B,D], x[B,D], correct[B] bool.
void deepdefense_penalty(std::uintptr_t delta, std::uintptr_t x, std::uintptr_t correct,
                         std::uintptr_t out, std::int64_t B, std::int64_t D, double c, double d,
                         double exp_cap, DType dtype);

// r_tot_out[B,D], x_next[B,D] from x0, r_tot, r [B,D], active[B] bool and the optional bounds
// lo, hi [1 or B, D] (0 when absent): element (i, d) at lo + i * lo_row_stride + d *
// lo_col_stride, the row stride 0 (one row for every sample) or D, the column stride 1 or 0
// (one value: a number expanded to [1, D]).
struct UpdateArgs {
  std::uintptr_t x0, r_tot, r, active, lo, hi;  // [B,D] x3, [B] bool, [1 or B, D] x2
  std::uintptr_t r_tot_out, x_next;             // [B,D] x2
  std::int64_t B, D, lo_row_stride, lo_col_stride, hi_row_stride, hi_col_stride;
  double overshoot;
  DType dtype;
};
void deepfool_update(const UpdateArgs& a);

}  // namespace ddfast
