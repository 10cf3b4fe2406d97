// Device helpers shared by the ddfast CUDA kernels (included by the .cu files only):
// float32 conversion of the storage types, warp/block sums, the row split, the shared
// per-(row, chunk) partial norm kernel, dtype dispatch and launch error reporting.
//
// Overflow and underflow (the rule of ddfast/reference.py): power sums are taken in float32
// where that is exact enough and again in float64 (where no float32 / bfloat16 / float16
// square overflows or underflows) for a chunk whose float32 sum is not `trusted`; partial
// sums are stored in float64.
#pragma once
#include <cfloat>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "launchers.cuh"

namespace ddfast_cuda {

constexpr int kThreads = 256;        // threads of every block
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sums v[0..N) (float or double) over the block; the totals are valid in thread 0. Every
// thread must call it.
template <int N, typename V>
__device__ __forceinline__ void block_sum(V (&v)[N]) {
  __shared__ V sh[N][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int t = 0; t < N; ++t) {
    v[t] = warp_sum(v[t]);
    if (lane == 0) sh[t][warp] = v[t];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int t = 0; t < N; ++t) v[t] = warp_sum(lane < kWarps ? sh[t][lane] : V(0));
  }
  __syncthreads();  // sh may be reused by the next call
}

__device__ __forceinline__ float sign_f(float w) { return (w > 0.0f) - (w < 0.0f); }

// |w|^Q term of a norm: w*w (Q = 2) or |w| (Q = 1), in the accumulator type.
template <int Q, typename Acc>
__device__ __forceinline__ Acc norm_term(Acc w) { return Q == 2 ? w * w : (w < Acc(0) ? -w : w); }

// Below this a float32 sum of squares may have lost digits to underflow (squares under
// FLT_MIN = 1.2e-38 carry an error below 1e-9 of it).
constexpr float kTinyF32 = 1e-20f;

// Whether a float32 power sum neither overflowed nor (Q = 2) may have underflowed; false for
// NaN (which float64 gives again).
template <int Q>
__device__ __forceinline__ bool trusted(float s) { return s <= FLT_MAX && (Q == 1 || s >= kTinyF32); }

// Sum over d in [start, end) of |row[d]|^Q, accumulated in Acc; valid in thread 0. Every
// thread must call it.
template <typename Acc, int Q, typename T>
__device__ __forceinline__ Acc chunk_sum(const T* row, std::int64_t start, std::int64_t end) {
  Acc acc[1] = {Acc(0)};
  for (std::int64_t d = start + threadIdx.x; d < end; d += blockDim.x)
    acc[0] += norm_term<Q>(static_cast<Acc>(to_f(row[d])));
  block_sum<1>(acc);
  return acc[0];
}

// out[i, s] (float64) = sum over the s-th chunk of row i of |x[i, d]|^Q: in float64 (Acc64,
// where a ratio of two norms feeds an exp), else in float32 and again in float64 where that
// is not trusted. Grid (B, S).
template <typename T, int Q, bool Acc64>
__global__ void partial_norm_kernel(const T* __restrict__ x, double* __restrict__ out,
                                    std::int64_t D, std::int64_t stride_b, std::int64_t chunk,
                                    std::int64_t S) {
  __shared__ bool redo;
  const std::int64_t i = blockIdx.x, s = blockIdx.y;
  const std::int64_t start = s * chunk;
  const std::int64_t end = start + chunk < D ? start + chunk : D;
  const T* row = x + i * stride_b;
  double total;
  if (Acc64) {
    total = chunk_sum<double, Q>(row, start, end);
  } else {
    const float fast = chunk_sum<float, Q>(row, start, end);
    if (threadIdx.x == 0) redo = !trusted<Q>(fast);
    __syncthreads();
    total = fast;
    if (redo) total = chunk_sum<double, Q>(row, start, end);  // uniform over the block
  }
  if (threadIdx.x == 0) out[i * S + s] = total;
}

template <bool Acc64, typename T>
void launch_partial_norm(const T* x, double* out, std::int64_t B, std::int64_t D,
                         std::int64_t stride_b, bool q1, cudaStream_t st) {
  const std::int64_t chunk = chunk_len(B, D), S = row_chunks(B, D);
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(S));
  if (q1)
    partial_norm_kernel<T, 1, Acc64><<<grid, kThreads, 0, st>>>(x, out, D, stride_b, chunk, S);
  else
    partial_norm_kernel<T, 2, Acc64><<<grid, kThreads, 0, st>>>(x, out, D, stride_b, chunk, S);
}

inline std::string last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
}

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

template <typename T>
inline T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

// Calls F<T>() with T the storage type of the dtype code.
#define DDFAST_DISPATCH(code, ...)                       \
  switch (code) {                                        \
    case kF16: { using T = __half; __VA_ARGS__; break; } \
    case kBF16: { using T = __nv_bfloat16; __VA_ARGS__; break; } \
    default: { using T = float; __VA_ARGS__; break; }    \
  }

}  // namespace ddfast_cuda
