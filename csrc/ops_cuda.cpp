// pybind11 module ddfast._C_cuda: the CUDA kernels of csrc/*.cu, called from ddfast/_cuda.py
// with raw device addresses of tensors it has checked and the current stream as an integer.
// Links nothing from libtorch (only the static CUDA runtime). The GIL is released while a
// launcher runs; a launch error becomes a RuntimeError naming the op.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "launchers.cuh"

namespace py = pybind11;

namespace {
void check(const std::string& err, const char* op) {
  if (!err.empty()) throw std::runtime_error(std::string("ddfast CUDA ") + op + ": " + err);
}
}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "ddfast CUDA kernels; see ddfast/reference.py for the semantics";
  m.attr("F32") = static_cast<int>(ddfast_cuda::kF32);
  m.attr("F16") = static_cast<int>(ddfast_cuda::kF16);
  m.attr("BF16") = static_cast<int>(ddfast_cuda::kBF16);
  m.def("row_chunks", &ddfast_cuda::row_chunks,
        "chunks S a row of D elements is split into for B rows (size of the partial buffers)");
  m.def(
      "select_boundary",
      [](std::uintptr_t logits, std::uintptr_t grads, std::uintptr_t cand, std::uintptr_t ref,
         std::uintptr_t active, std::uintptr_t part, std::uintptr_t l, std::uintptr_t dist,
         std::uintptr_t r, std::int64_t B, std::int64_t K, std::int64_t C, std::int64_t D,
         std::int64_t gs_b, std::int64_t gs_c, bool norm_inf, double eps, bool diff, int dtype,
         std::uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release release;
          err = ddfast_cuda::select_boundary(logits, grads, cand, ref, active, part, l, dist, r, B,
                                             K, C, D, gs_b, gs_c, norm_inf, eps, diff, dtype,
                                             stream);
        }
        check(err, "select_boundary");
      });
  m.def(
      "boundary_step",
      [](std::uintptr_t fdiff, std::uintptr_t w, std::uintptr_t part, std::uintptr_t r,
         std::int64_t B, std::int64_t D, std::int64_t ws_b, bool norm_inf, double eps, int dtype,
         std::uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release release;
          err = ddfast_cuda::boundary_step(fdiff, w, part, r, B, D, ws_b, norm_inf, eps, dtype,
                                           stream);
        }
        check(err, "boundary_step");
      });
  m.def(
      "deepdefense_penalty",
      [](std::uintptr_t delta, std::uintptr_t x, std::uintptr_t correct, std::uintptr_t part,
         std::uintptr_t out, std::int64_t B, std::int64_t D, double c, double d, double cap,
         int dtype, std::uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release release;
          err = ddfast_cuda::deepdefense_penalty(delta, x, correct, part, out, B, D, c, d, cap,
                                                 dtype, stream);
        }
        check(err, "deepdefense_penalty");
      });
  m.def(
      "deepfool_update",
      [](std::uintptr_t x0, std::uintptr_t r_tot, std::uintptr_t r, std::uintptr_t active,
         std::uintptr_t lo, std::int64_t lo_rs, std::int64_t lo_cs, std::uintptr_t hi,
         std::int64_t hi_rs, std::int64_t hi_cs, std::uintptr_t r_tot_out, std::uintptr_t x_next,
         std::int64_t B, std::int64_t D, double overshoot, int dtype, std::uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release release;
          err = ddfast_cuda::deepfool_update(x0, r_tot, r, active, lo, lo_rs, lo_cs, hi, hi_rs,
                                             hi_cs, r_tot_out, x_next, B, D, overshoot, dtype,
                                             stream);
        }
        check(err, "deepfool_update");
      });
}
