// deepdefense_penalty on CUDA (spec: ddfast.reference.deepdefense_penalty): the shared
// partial norm kernel reduces delta and x by (row, chunk) in float64 (exp(d * ratio)
// multiplies the ratio's relative error by d * ratio, up to the cap), then dp_finish (one
// thread per row) computes exp(-c ||delta||/||x||) (correct) or exp(d ||delta||/||x||), continued
// linearly past exp_cap; ||x|| == 0 counts as ratio 0.
#include "cuda_common.cuh"

namespace ddfast_cuda {
namespace {

template <typename T>
__global__ void dp_finish(const double* __restrict__ dpart, const double* __restrict__ xpart,
                          const bool* __restrict__ correct, T* __restrict__ out, std::int64_t B,
                          std::int64_t S, float c, float d, float cap) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B) return;
  double dn2 = 0.0, xn2 = 0.0;
  for (std::int64_t s = 0; s < S; ++s) {
    dn2 += dpart[i * S + s];
    xn2 += xpart[i * S + s];
  }
  // one row's scalars: finish in double, where exp is accurate (expf is off by up to 2 ulp
  // and exp multiplies the relative error of its argument by up to ~60)
  const double dn = sqrt(dn2), xn = sqrt(xn2);
  const double ratio = xn == 0.0 ? 0.0 : dn / xn;  // NaN stays NaN
  const double z = correct[i] ? -static_cast<double>(c) * ratio : static_cast<double>(d) * ratio;
  const double p = z > cap ? exp(static_cast<double>(cap)) * (1.0 + (z - cap)) : exp(z);
  out[i] = from_f<T>(static_cast<float>(p));
}

}  // namespace

std::string deepdefense_penalty(std::uintptr_t delta, std::uintptr_t x, std::uintptr_t correct,
                                std::uintptr_t part, std::uintptr_t out, std::int64_t B,
                                std::int64_t D, double c, double d, double exp_cap, int dtype,
                                std::uintptr_t stream) {
  if (B == 0) return "";
  const cudaStream_t st = as_stream(stream);
  const std::int64_t S = row_chunks(B, D);
  double* dpart = ptr<double>(part);  // float64 [2, B, S]
  double* xpart = dpart + B * S;
  const unsigned blocks = static_cast<unsigned>(cdiv(B, kThreads));
  DDFAST_DISPATCH(dtype, {
    launch_partial_norm<true, T>(ptr<const T>(delta), dpart, B, D, D, false, st);
    launch_partial_norm<true, T>(ptr<const T>(x), xpart, B, D, D, false, st);
    dp_finish<T><<<blocks, kThreads, 0, st>>>(dpart, xpart, ptr<const bool>(correct), ptr<T>(out),
                                              B, S, static_cast<float>(c), static_cast<float>(d),
                                              static_cast<float>(exp_cap));
  });
  return last_error();
}

}  // namespace ddfast_cuda
