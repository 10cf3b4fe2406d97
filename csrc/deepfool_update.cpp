// deepfool_update on CPU: r_tot' = r_tot + r on active rows, x_next = clip(x0 + (1 + overshoot)
// r_tot') to the bounds lo / hi. Spec: ddfast.reference.deepfool_update. A bound is absent
// (null), one value per row (column stride 0: a number expanded to [1, D], read once per row) or
// a row of D values (column stride 1); row i starts at p + i * row_stride (0: one row for every
// sample). The row loop has no branches inside, so it vectorises.
#include <algorithm>

#include "kernels.h"

namespace ddfast {
namespace {

enum BoundMode : int { kNone = 0, kValue = 1, kRow = 2 };

inline int mode_of(std::uintptr_t p, std::int64_t col_stride) {
  return p == 0 ? kNone : col_stride == 0 ? kValue : kRow;
}

template <bool Active, int Lo, int Hi, typename T>
inline void update_row(const T* x0, const T* r_tot, const T* r, const T* lo, T lo_v, const T* hi,
                       T hi_v, T* r_tot_out, T* x_next, std::int64_t D, T k) {
#pragma omp simd
  for (std::int64_t d = 0; d < D; ++d) {
    const T rt = Active ? r_tot[d] + r[d] : r_tot[d];
    r_tot_out[d] = rt;
    T x = x0[d] + k * rt;
    // selects on values, so that the loop if-converts; a NaN iterate stays NaN (torch.clamp)
    if constexpr (Lo != kNone) {
      const T b = Lo == kRow ? lo[d] : lo_v;
      x = x < b ? b : x;
    }
    if constexpr (Hi != kNone) {
      const T b = Hi == kRow ? hi[d] : hi_v;
      x = b < x ? b : x;
    }
    x_next[d] = x;
  }
}

template <int Lo, int Hi, typename T>
void update_rows(const UpdateArgs& a) {
  const T* x0 = as_ptr<const T>(a.x0);
  const T* r_tot = as_ptr<const T>(a.r_tot);
  const T* r = as_ptr<const T>(a.r);
  const T* lo = as_ptr<const T>(a.lo);
  const T* hi = as_ptr<const T>(a.hi);
  const bool* active = as_ptr<const bool>(a.active);
  T* r_tot_out = as_ptr<T>(a.r_tot_out);
  T* x_next = as_ptr<T>(a.x_next);
  const std::int64_t B = a.B, D = a.D;
  const T k = static_cast<T>(1.0 + a.overshoot);
  const bool par = B * D >= kMinParallelWork;
#pragma omp parallel for schedule(static) if (par)
  for (std::int64_t i = 0; i < B; ++i) {
    const std::int64_t o = i * D;
    const T* lo_i = Lo != kNone ? lo + i * a.lo_row_stride : nullptr;
    const T* hi_i = Hi != kNone ? hi + i * a.hi_row_stride : nullptr;
    const T lo_v = Lo == kValue && D > 0 ? lo_i[0] : T(0);
    const T hi_v = Hi == kValue && D > 0 ? hi_i[0] : T(0);
    if (active[i])
      update_row<true, Lo, Hi>(x0 + o, r_tot + o, r + o, lo_i, lo_v, hi_i, hi_v, r_tot_out + o, x_next + o, D, k);
    else
      update_row<false, Lo, Hi>(x0 + o, r_tot + o, r + o, lo_i, lo_v, hi_i, hi_v, r_tot_out + o, x_next + o, D, k);
  }
}

template <int Lo, typename T>
void by_hi(const UpdateArgs& a) {
  switch (mode_of(a.hi, a.hi_col_stride)) {
    case kNone: update_rows<Lo, kNone, T>(a); break;
    case kValue: update_rows<Lo, kValue, T>(a); break;
    default: update_rows<Lo, kRow, T>(a);
  }
}

template <typename T>
void dispatch(const UpdateArgs& a) {
  switch (mode_of(a.lo, a.lo_col_stride)) {
    case kNone: by_hi<kNone, T>(a); break;
    case kValue: by_hi<kValue, T>(a); break;
    default: by_hi<kRow, T>(a);
  }
}

}  // namespace

void deepfool_update(const UpdateArgs& a) {
  a.dtype == DType::f32 ? dispatch<float>(a) : dispatch<double>(a);
}

}  // namespace ddfast
