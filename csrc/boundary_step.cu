// boundary_step on CUDA (spec: ddfast.reference.boundary_step): the shared partial norm
// kernel reduces each row of w by chunks (float64 partials, no overflow), then bs_step (grid (B, R)) sums a row's partials
// and writes r = (|fdiff| / ||w||_q + eps) * w / ||w||_2 (norm 2) or * sign(w) (norm inf),
// 0 where w == 0.
#include "cuda_common.cuh"

namespace ddfast_cuda {
namespace {

constexpr int kRSlice = 1024;  // r elements per bs_step block (more where D is huge: slice_len)

template <typename T, int Q>
__global__ void bs_step(const float* __restrict__ fdiff, const T* __restrict__ w,
                        const double* __restrict__ part, T* __restrict__ r, std::int64_t D,
                        std::int64_t ws_b, std::int64_t S, float eps, std::int64_t slice) {
  const std::int64_t i = blockIdx.x;
  const std::int64_t d0 = static_cast<std::int64_t>(blockIdx.y) * slice;
  const std::int64_t d1 = d0 + slice < D ? d0 + slice : D;
  double npow = 0.0;
  for (std::int64_t s = 0; s < S; ++s) npow += part[i * S + s];  // same S loads in every thread
  const float n = static_cast<float>(Q == 2 ? sqrt(npow) : npow);
  const bool nz = n > 0.0f;
  const float scale = nz ? fabsf(fdiff[i]) / n + eps : 0.0f;
  const float inv_n = nz ? 1.0f / n : 0.0f;  // (v / n) * scale: scale / n may overflow where r does not
  const T* wi = w + i * ws_b;
  T* ri = r + i * D;
  for (std::int64_t d = d0 + threadIdx.x; d < d1; d += blockDim.x) {
    const float v = to_f(wi[d]);
    ri[d] = from_f<T>(Q == 2 ? (nz ? (v * inv_n) * scale : 0.0f) : scale * sign_f(v));  // r = 0 also for a NaN w
  }
}

}  // namespace

std::string boundary_step(std::uintptr_t fdiff, std::uintptr_t w, std::uintptr_t part,
                          std::uintptr_t r, std::int64_t B, std::int64_t D, std::int64_t ws_b,
                          bool norm_inf, double eps, int dtype, std::uintptr_t stream) {
  if (B == 0 || D == 0) return "";
  const cudaStream_t st = as_stream(stream);
  const std::int64_t S = row_chunks(B, D), slice = slice_len(D, kRSlice);
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(cdiv(D, slice)));
  const float e = static_cast<float>(eps);
  DDFAST_DISPATCH(dtype, {
    launch_partial_norm<false, T>(ptr<const T>(w), ptr<double>(part), B, D, ws_b, norm_inf, st);
    if (norm_inf)
      bs_step<T, 1><<<grid, kThreads, 0, st>>>(ptr<const float>(fdiff), ptr<const T>(w),
                                               ptr<const double>(part), ptr<T>(r), D, ws_b, S, e, slice);
    else
      bs_step<T, 2><<<grid, kThreads, 0, st>>>(ptr<const float>(fdiff), ptr<const T>(w),
                                               ptr<const double>(part), ptr<T>(r), D, ws_b, S, e, slice);
  });
  return last_error();
}

}  // namespace ddfast_cuda
