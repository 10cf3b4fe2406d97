// Host launchers of the ddfast CUDA kernels (csrc/*.cu), called by the pybind11 module
// ddfast._C_cuda (ops_cuda.cpp). Plain C++ declarations: this header is included by both
// nvcc and the host compiler, so it names no CUDA type. Arguments are raw device addresses
// of tensors that ddfast/_cuda.py has checked (dtype, device, contiguity), sizes, and the
// cudaStream_t as an integer. Every launcher returns "" on success, else the CUDA error.
// Shapes and semantics follow ddfast/reference.py.
#pragma once
#include <cstdint>
#include <string>

namespace ddfast_cuda {

// dtype codes of the data tensors (float32 accumulation for all of them)
enum DTypeCode : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

constexpr std::int64_t kChunkUnit = 1024;     // a row chunk is a multiple of this
constexpr std::int64_t kTargetBlocks = 1024;  // blocks a row split aims at

inline std::int64_t cdiv(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

// Long rows are split across blocks: the length (a multiple of kChunkUnit) of the chunks
// of a row of D elements, so that about kTargetBlocks blocks cover B rows.
inline std::int64_t chunk_len(std::int64_t B, std::int64_t D) {
  const std::int64_t units = cdiv(D > 0 ? D : 1, kChunkUnit);
  std::int64_t want = cdiv(kTargetBlocks, B > 0 ? B : 1);
  if (want > units) want = units;
  if (want < 1) want = 1;
  return cdiv(units, want) * kChunkUnit;
}

// Elementwise kernels give a block a slice of `base` elements of a row, grid (B, D / slice);
// past kMaxGridY slices (the grid's y limit, D > ~67M at base 1024) a slice grows to a
// multiple of base that keeps the grid within it.
constexpr std::int64_t kMaxGridY = 65535;
inline std::int64_t slice_len(std::int64_t D, std::int64_t base) {
  return cdiv(cdiv(D > 0 ? D : 1, base), kMaxGridY) * base;
}

// S >= 1: how many chunks a row is cut into. Callers size the float64 partial buffers with it.
inline std::int64_t row_chunks(std::int64_t B, std::int64_t D) {
  return cdiv(D > 0 ? D : 1, chunk_len(B, D));
}

// logits [B,K] float32, grads [B,C,D] (element strides gs_b, gs_c; stride 1 over D),
// cand [B,C] i64, ref [B] i64, active [B] bool, part float64 scratch [B,C,S] (S =
// row_chunks(B, D)) -> l [B] i64, dist [B] float32, r [B,D] (grads dtype). diff: the rows
// are already g_cand - g_ref (ref need not be a candidate; one equal to it is skipped).
std::string select_boundary(std::uintptr_t logits, std::uintptr_t grads, std::uintptr_t cand,
                            std::uintptr_t ref, std::uintptr_t active, std::uintptr_t part,
                            std::uintptr_t l, std::uintptr_t dist, std::uintptr_t r,
                            std::int64_t B, std::int64_t K, std::int64_t C, std::int64_t D,
                            std::int64_t gs_b, std::int64_t gs_c, bool norm_inf, double eps,
                            bool diff, int dtype, std::uintptr_t stream);

// fdiff [B] float32, w [B,D] (row stride ws_b), part float64 scratch [B,S] -> r [B,D].
std::string boundary_step(std::uintptr_t fdiff, std::uintptr_t w, std::uintptr_t part,
                          std::uintptr_t r, std::int64_t B, std::int64_t D, std::int64_t ws_b,
                          bool norm_inf, double eps, int dtype, std::uintptr_t stream);

// delta, x [B,D] contiguous, correct [B] bool, part float64 scratch [2,B,S] -> out [B].
std::string deepdefense_penalty(std::uintptr_t delta, std::uintptr_t x, std::uintptr_t correct,
                                std::uintptr_t part, std::uintptr_t out, std::int64_t B,
                                std::int64_t D, double c, double d, double exp_cap, int dtype,
                                std::uintptr_t stream);

// x0, r_tot, r [B,D] contiguous, active [B] bool, bounds lo / hi in x0's dtype (0 when absent;
// element (i, d) at lo + i * lo_rs + d * lo_cs: row stride 0 or D, column stride 1 or 0)
// -> r_tot_out, x_next [B,D].
std::string deepfool_update(std::uintptr_t x0, std::uintptr_t r_tot, std::uintptr_t r,
                            std::uintptr_t active, std::uintptr_t lo, std::int64_t lo_rs,
                            std::int64_t lo_cs, std::uintptr_t hi, std::int64_t hi_rs,
                            std::int64_t hi_cs, std::uintptr_t r_tot_out,
                            std::uintptr_t x_next, std::int64_t B, std::int64_t D,
                            double overshoot, int dtype, std::uintptr_t stream);

}  // namespace ddfast_cuda
