// deepfool_update on CUDA (spec: ddfast.reference.deepfool_update), one elementwise pass over
// a (B, D-slices) grid: r_tot' = r_tot + r on active rows, x_next = clip(x0 + (1 + overshoot)
// r_tot', lo, hi), float32 arithmetic. A bound is absent (null) or element (i, d) at
// lo + i * lo_rs + d * lo_cs: row stride 0 (one row for every sample) or D, column stride 1 or
// 0 (a number expanded to [1, D]).
#include "cuda_common.cuh"

namespace ddfast_cuda {
namespace {

constexpr int kSlice = 1024;  // elements per block (more where D is huge: slice_len)

template <typename T>
__global__ void du_kernel(const T* __restrict__ x0, const T* __restrict__ r_tot,
                          const T* __restrict__ r, const bool* __restrict__ active,
                          const T* __restrict__ lo, std::int64_t lo_rs, std::int64_t lo_cs,
                          const T* __restrict__ hi, std::int64_t hi_rs, std::int64_t hi_cs,
                          T* __restrict__ r_tot_out, T* __restrict__ x_next, std::int64_t D,
                          float k, std::int64_t slice) {
  const std::int64_t i = blockIdx.x;
  const std::int64_t d0 = static_cast<std::int64_t>(blockIdx.y) * slice;
  const std::int64_t d1 = d0 + slice < D ? d0 + slice : D;
  const bool act = active[i];
  const T* lo_i = lo ? lo + i * lo_rs : nullptr;  // uniform branches below
  const T* hi_i = hi ? hi + i * hi_rs : nullptr;
  for (std::int64_t d = d0 + threadIdx.x; d < d1; d += blockDim.x) {
    const std::int64_t o = i * D + d;
    float rt = to_f(r_tot[o]);
    if (act) rt += to_f(r[o]);
    float xn = to_f(x0[o]) + k * rt;
    // comparisons, not fmaxf/fminf: a NaN stays NaN (torch.clamp)
    if (lo_i) { const float b = to_f(lo_i[d * lo_cs]); if (xn < b) xn = b; }
    if (hi_i) { const float b = to_f(hi_i[d * hi_cs]); if (xn > b) xn = b; }
    r_tot_out[o] = from_f<T>(rt);
    x_next[o] = from_f<T>(xn);
  }
}

}  // namespace

std::string deepfool_update(std::uintptr_t x0, std::uintptr_t r_tot, std::uintptr_t r,
                            std::uintptr_t active, std::uintptr_t lo, std::int64_t lo_rs,
                            std::int64_t lo_cs, std::uintptr_t hi, std::int64_t hi_rs,
                            std::int64_t hi_cs, std::uintptr_t r_tot_out,
                            std::uintptr_t x_next, std::int64_t B, std::int64_t D,
                            double overshoot, int dtype, std::uintptr_t stream) {
  if (B == 0 || D == 0) return "";
  const std::int64_t slice = slice_len(D, kSlice);
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(cdiv(D, slice)));
  const float k = static_cast<float>(1.0 + overshoot);
  DDFAST_DISPATCH(dtype, du_kernel<T><<<grid, kThreads, 0, as_stream(stream)>>>(
      ptr<const T>(x0), ptr<const T>(r_tot), ptr<const T>(r), ptr<const bool>(active),
      ptr<const T>(lo), lo_rs, lo_cs, ptr<const T>(hi), hi_rs, hi_cs, ptr<T>(r_tot_out), ptr<T>(x_next), D,
      k, slice));
  return last_error();
}

}  // namespace ddfast_cuda
