// select_boundary on CUDA, two kernels (spec: ddfast.reference.select_boundary):
//  1. sb_partial, grid (B, S): block (i, s) sums |g_j[d] - g_ref[d]|^q over the s-th chunk
//     of d for every candidate j, kCT candidates at a time (g_ref is read once per kCT rows),
//     into part[i, j, s] (float64): in float32, and again in float64 for a group whose
//     float32 sums are not trusted (overflowed or may have underflowed; cuda_common.cuh).
//  2. sb_finish, grid (B, R): warp 0 of every block sums row i's partials and takes the
//     exact first-index argmin of |f_j - f_ref| / ||w_j||_q (a NaN distance never wins: it
//     is never `better`); the block then writes its
//     slice of r from the chosen row alone; block (i, 0) writes l, dist.
// With ``diff`` the rows are already w_j = g_j - g_ref: there is no reference row to subtract,
// ref need not be among the candidates, and a candidate equal to it is skipped.
#include <cmath>

#include "cuda_common.cuh"

namespace ddfast_cuda {
namespace {

constexpr int kCT = 8;         // candidates per pass of sb_partial
constexpr int kRSlice = 1024;  // r elements per sb_finish block (more where D is huge: slice_len)

// Position of ref's row in cand (without diff): 0 when absent, as the reference's argmax of an
// all-false row.
__device__ __forceinline__ std::int64_t ref_position(const std::int64_t* cand, std::int64_t ref,
                                                     std::int64_t C) {
  for (std::int64_t j = 0; j < C; ++j)
    if (cand[j] == ref) return j;
  return 0;
}

// The exact sum over d in [start, end) of |g[d] - g_ref[d]|^Q (g_ref may be null), in float64
// (the difference too); valid in thread 0. Every thread calls it. The slow path of sb_partial.
template <int Q, typename T>
__device__ __forceinline__ double exact_sum(const T* g, const T* g_ref, std::int64_t start,
                                         std::int64_t end) {
  double acc[1] = {0.0};
  for (std::int64_t d = start + threadIdx.x; d < end; d += blockDim.x) {
    const double gr = g_ref ? static_cast<double>(to_f(g_ref[d])) : 0.0;
    acc[0] += norm_term<Q>(static_cast<double>(to_f(g[d])) - gr);
  }
  block_sum<1>(acc);
  return acc[0];
}

template <typename T, int Q>
__global__ void sb_partial(const T* __restrict__ grads, const std::int64_t* __restrict__ cand,
                           const std::int64_t* __restrict__ ref, const bool* __restrict__ active,
                           double* __restrict__ part, std::int64_t C, std::int64_t D,
                           std::int64_t gs_b, std::int64_t gs_c, std::int64_t chunk,
                           std::int64_t S, bool diff) {
  __shared__ bool redo;
  const std::int64_t i = blockIdx.x, s = blockIdx.y;
  if (!active[i]) return;  // uniform over the block: no barrier is skipped by half of it
  const T* row = grads + i * gs_b;
  const T* g_ref = diff ? nullptr : row + ref_position(cand + i * C, ref[i], C) * gs_c;
  const std::int64_t start = s * chunk;
  const std::int64_t end = start + chunk < D ? start + chunk : D;
  for (std::int64_t c0 = 0; c0 < C; c0 += kCT) {
    float acc[kCT];
#pragma unroll
    for (int t = 0; t < kCT; ++t) acc[t] = 0.0f;
    for (std::int64_t d = start + threadIdx.x; d < end; d += blockDim.x) {
      const float gr = g_ref ? to_f(g_ref[d]) : 0.0f;
#pragma unroll
      for (int t = 0; t < kCT; ++t)
        if (c0 + t < C) acc[t] += norm_term<Q>(to_f(row[(c0 + t) * gs_c + d]) - gr);
    }
    block_sum<kCT>(acc);
    if (threadIdx.x == 0) {
      bool bad = false;
#pragma unroll
      for (int t = 0; t < kCT; ++t) bad |= c0 + t < C && !trusted<Q>(acc[t]);
      redo = bad;
    }
    __syncthreads();
    if (redo) {  // rare, uniform over the block: the group again in float64, row by row
      for (int t = 0; t < kCT && c0 + t < C; ++t) {
        const double exact = exact_sum<Q>(row + (c0 + t) * gs_c, g_ref, start, end);
        if (threadIdx.x == 0) part[(i * C + c0 + t) * S + s] = exact;
      }
    } else if (threadIdx.x == 0) {
#pragma unroll
      for (int t = 0; t < kCT; ++t)
        if (c0 + t < C) part[(i * C + c0 + t) * S + s] = acc[t];
    }
  }
}

// (dist, pos) lexicographic minimum: the first index among equal distances.
__device__ __forceinline__ bool better(float d, std::int64_t p, float bd, std::int64_t bp) {
  return d < bd || (d == bd && p < bp);
}

template <typename T, int Q>
__global__ void sb_finish(const float* __restrict__ logits, const T* __restrict__ grads,
                          const std::int64_t* __restrict__ cand, const std::int64_t* __restrict__ ref,
                          const bool* __restrict__ active, const double* __restrict__ part,
                          std::int64_t* __restrict__ l, float* __restrict__ dist, T* __restrict__ r,
                          std::int64_t K, std::int64_t C, std::int64_t D, std::int64_t gs_b,
                          std::int64_t gs_c, std::int64_t S, float eps, bool diff,
                          std::int64_t slice) {
  const std::int64_t i = blockIdx.x;
  const std::int64_t d0 = static_cast<std::int64_t>(blockIdx.y) * slice;
  const std::int64_t d1 = d0 + slice < D ? d0 + slice : D;
  T* ri = r + i * D;
  const bool first = blockIdx.y == 0 && threadIdx.x == 0;
  if (!active[i]) {
    for (std::int64_t d = d0 + threadIdx.x; d < d1; d += blockDim.x) ri[d] = from_f<T>(0.0f);
    if (first) { l[i] = ref[i]; dist[i] = 0.0f; }
    return;
  }
  __shared__ std::int64_t s_pos, s_rp;
  __shared__ float s_best, s_norm;
  const std::int64_t* cand_i = cand + i * C;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const float f_ref = logits[i * K + ref[i]];
    const float inf = INFINITY;
    float best = inf, best_n = 0.0f;
    std::int64_t pos = INT64_MAX;
    for (std::int64_t j = lane; j < C; j += 32) {  // ascending j: the lane's first minimum
      double npow = 0.0;
      for (std::int64_t s = 0; s < S; ++s) npow += part[(i * C + j) * S + s];
      const float n = static_cast<float>(Q == 2 ? sqrt(npow) : npow);
      // every candidate equal to ref is skipped, not only the first (its row may hold anything)
      const float dj = (cand_i[j] != ref[i] && n > 0.0f) ? fabsf(logits[i * K + cand_i[j]] - f_ref) / n : inf;
      if (better(dj, j, best, pos)) { best = dj; pos = j; best_n = n; }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const std::int64_t op = __shfl_xor_sync(0xffffffffu, pos, o);
      const float on = __shfl_xor_sync(0xffffffffu, best_n, o);
      if (better(ob, op, best, pos)) { best = ob; pos = op; best_n = on; }
    }
    if (lane == 0) {
      s_pos = pos == INT64_MAX ? 0 : pos;
      s_rp = diff ? 0 : ref_position(cand_i, ref[i], C);
      s_best = best;
      s_norm = best_n;
    }
  }
  __syncthreads();
  const std::int64_t pos = s_pos;
  const float best = s_best, n = s_norm;
  const bool finite = best < INFINITY;
  const float scale = finite ? best + eps : 0.0f;
  const bool step = finite && n > 0.0f;  // else r = 0, also where w holds NaN (0 * NaN would be NaN)
  const float inv_n = step ? 1.0f / n : 0.0f;  // (w / n) * scale: scale / n may overflow where r does not
  const T* g_l = grads + i * gs_b + pos * gs_c;
  const T* g_ref = diff ? nullptr : grads + i * gs_b + s_rp * gs_c;
  for (std::int64_t d = d0 + threadIdx.x; d < d1; d += blockDim.x) {
    const float w = g_ref ? to_f(g_l[d]) - to_f(g_ref[d]) : to_f(g_l[d]);
    ri[d] = from_f<T>(Q == 2 ? (step ? (w * inv_n) * scale : 0.0f) : scale * sign_f(w));
  }
  if (first) { l[i] = cand_i[pos]; dist[i] = best; }
}

template <typename T, int Q>
void launch(std::uintptr_t logits, std::uintptr_t grads, std::uintptr_t cand, std::uintptr_t ref,
            std::uintptr_t active, std::uintptr_t part, std::uintptr_t l, std::uintptr_t dist,
            std::uintptr_t r, std::int64_t B, std::int64_t K, std::int64_t C, std::int64_t D,
            std::int64_t gs_b, std::int64_t gs_c, float eps, bool diff, cudaStream_t st) {
  const std::int64_t chunk = chunk_len(B, D), S = row_chunks(B, D);
  sb_partial<T, Q><<<dim3(static_cast<unsigned>(B), static_cast<unsigned>(S)), kThreads, 0, st>>>(
      ptr<const T>(grads), ptr<const std::int64_t>(cand), ptr<const std::int64_t>(ref),
      ptr<const bool>(active), ptr<double>(part), C, D, gs_b, gs_c, chunk, S, diff);
  const std::int64_t slice = slice_len(D, kRSlice);
  const unsigned R = static_cast<unsigned>(cdiv(D, slice));
  sb_finish<T, Q><<<dim3(static_cast<unsigned>(B), R), kThreads, 0, st>>>(
      ptr<const float>(logits), ptr<const T>(grads), ptr<const std::int64_t>(cand),
      ptr<const std::int64_t>(ref), ptr<const bool>(active), ptr<const double>(part),
      ptr<std::int64_t>(l), ptr<float>(dist), ptr<T>(r), K, C, D, gs_b, gs_c, S, eps, diff, slice);
}

}  // namespace

std::string select_boundary(std::uintptr_t logits, std::uintptr_t grads, std::uintptr_t cand,
                            std::uintptr_t ref, std::uintptr_t active, std::uintptr_t part,
                            std::uintptr_t l, std::uintptr_t dist, std::uintptr_t r,
                            std::int64_t B, std::int64_t K, std::int64_t C, std::int64_t D,
                            std::int64_t gs_b, std::int64_t gs_c, bool norm_inf, double eps,
                            bool diff, int dtype, std::uintptr_t stream) {
  if (B == 0 || D == 0) return "";
  const cudaStream_t st = as_stream(stream);
  const float e = static_cast<float>(eps);
  DDFAST_DISPATCH(dtype, norm_inf
      ? launch<T, 1>(logits, grads, cand, ref, active, part, l, dist, r, B, K, C, D, gs_b, gs_c, e, diff, st)
      : launch<T, 2>(logits, grads, cand, ref, active, part, l, dist, r, B, K, C, D, gs_b, gs_c, e, diff, st));
  return last_error();
}

}  // namespace ddfast_cuda
