// pybind11 module ddfast._C: the CPU kernels, called from ddfast/_cpu.py with raw addresses
// of tensors it has checked. The GIL is released while a kernel runs.
#include <pybind11/pybind11.h>

#include "kernels.h"

namespace py = pybind11;
using ddfast::DType;

namespace {
DType dtype_of(int code) { return code == 0 ? DType::f32 : DType::f64; }
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ddfast CPU kernels (C++17, OpenMP); see ddfast/reference.py for the semantics";
  m.def("num_threads", &ddfast::max_threads, "OpenMP threads a kernel may use");
  m.def(
      "select_boundary",
      [](std::uintptr_t logits, std::uintptr_t grads, std::uintptr_t cand, std::uintptr_t ref,
         std::uintptr_t active, std::uintptr_t l, std::uintptr_t dist, std::uintptr_t r,
         std::int64_t B, std::int64_t K, std::int64_t C, std::int64_t D, std::int64_t gs_b,
         std::int64_t gs_c, bool norm_inf, double eps, int dtype, bool diff) {
        ddfast::SelectArgs a{logits, grads, cand, ref,      active, l,   dist,            r,   B,
                             K,      C,     D,    gs_b, gs_c, norm_inf, eps, dtype_of(dtype), diff};
        ddfast::select_boundary(a);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "boundary_step",
      [](std::uintptr_t fdiff, std::uintptr_t w, std::uintptr_t r, std::int64_t B,
         std::int64_t D, bool norm_inf, double eps, int dtype) {
        ddfast::boundary_step(fdiff, w, r, B, D, norm_inf, eps, dtype_of(dtype));
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "deepdefense_penalty",
      [](std::uintptr_t delta, std::uintptr_t x, std::uintptr_t correct, std::uintptr_t out,
         std::int64_t B, std::int64_t D, double c, double d, double cap, int dtype) {
        ddfast::deepdefense_penalty(delta, x, correct, out, B, D, c, d, cap, dtype_of(dtype));
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "deepfool_update",
      [](std::uintptr_t x0, std::uintptr_t r_tot, std::uintptr_t r, std::uintptr_t active,
         std::uintptr_t lo, std::int64_t lo_rs, std::int64_t lo_cs, std::uintptr_t hi,
         std::int64_t hi_rs, std::int64_t hi_cs, std::uintptr_t r_tot_out, std::uintptr_t x_next,
         std::int64_t B, std::int64_t D, double overshoot, int dtype) {
        ddfast::UpdateArgs a{x0, r_tot, r,     active, lo,    hi,    r_tot_out, x_next,
                             B,  D,     lo_rs, lo_cs,  hi_rs, hi_cs, overshoot, dtype_of(dtype)};
        ddfast::deepfool_update(a);
      },
      py::call_guard<py::gil_scoped_release>());
}
