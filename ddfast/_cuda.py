"""The ``cuda`` backend: thin wrappers that lay tensors out for the CUDA kernels of
``ddfast._C_cuda`` (csrc/*.cu) with raw device addresses and the current stream.
Semantics: :mod:`ddfast.reference`. Tensors: CUDA float32 / float16 / bfloat16, float32
accumulation (norms: float64 partial sums, see csrc/cuda_common.cuh), outputs in the input
dtype (``dist`` in the logits' dtype).

``ddfast._C_cuda`` is imported lazily, on the first call for a CUDA tensor, so importing
this module costs nothing on a machine without it.
"""
from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import reference
from .reference import PENALTY_EXP_CAP

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_lib: Optional[ModuleType] = None
_lib_error: Optional[str] = None


def native() -> Optional[ModuleType]:
    """``ddfast._C_cuda``, or None when it was not built or does not load (reason kept in
    :func:`native_error`)."""
    global _lib, _lib_error
    if _lib is None and _lib_error is None:
        try:
            _lib = importlib.import_module("ddfast._C_cuda")
        except Exception as exc:
            _lib_error = f"{type(exc).__name__}: {exc}"
    return _lib


def native_error() -> Optional[str]:
    native()
    return _lib_error


def supports(device, dtype: torch.dtype) -> bool:
    """CUDA tensors of float32/float16/bfloat16, when a GPU is present and the module loads."""
    return (torch.device(device).type == "cuda" and dtype in _CODES
            and torch.cuda.is_available() and native() is not None)


def _code(t: Tensor, name: str) -> int:
    return _CODES[t.dtype]


def _lib_for(t: Tensor) -> ModuleType:
    lib = native()
    if lib is None:
        raise RuntimeError(f"ddfast._C_cuda is unavailable: {_lib_error}")
    return lib


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _on(t: Tensor, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``t`` on like's device (and ``dtype``), contiguous, its negation bit applied (the
    kernels read raw memory)."""
    return t.to(device=like.device, dtype=dtype or t.dtype).resolve_neg().contiguous()


def _rows(t: Tensor) -> Tensor:
    """A view whose last dim is contiguous (rows may be strided), its negation bit applied."""
    t = t.resolve_neg()
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def select_boundary(logits: Tensor, grads: Tensor, cand: Tensor, ref: Tensor, active: Tensor,
                    norm: float = 2.0, eps: float = 1e-4,
                    diff: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    code = _code(grads, "grads")
    lib = _lib_for(grads)
    B, C, D = grads.shape
    K = logits.shape[1]
    if B == 0 or D == 0:  # nothing for the kernels to do: the reference's rule for empty rows
        return reference.select_boundary(logits, grads, _on(cand, grads, torch.int64), _on(ref, grads, torch.int64),
                                         _on(active, grads, torch.bool), norm, eps, diff)
    grads = _rows(grads)  # rows may be strided (a transposed Jacobian), not elements
    logits32 = _on(logits, grads, torch.float32)
    cand = _on(cand, grads, torch.int64)
    ref = _on(ref, grads, torch.int64)
    active = _on(active, grads, torch.bool)
    dev = grads.device
    part = torch.empty(B, C, lib.row_chunks(B, D), dtype=torch.float64, device=dev)
    l = torch.empty(B, dtype=torch.int64, device=dev)
    dist = torch.empty(B, dtype=torch.float32, device=dev)
    r = torch.empty(B, D, dtype=grads.dtype, device=dev)
    with torch.cuda.device(dev):
        lib.select_boundary(logits32.data_ptr(), grads.data_ptr(), cand.data_ptr(), ref.data_ptr(),
                            active.data_ptr(), part.data_ptr(), l.data_ptr(), dist.data_ptr(),
                            r.data_ptr(), B, K, C, D, grads.stride(0), grads.stride(1),
                            math.isinf(norm), float(eps), bool(diff), code, _stream(grads))
    return l, dist.to(logits.dtype), r


def boundary_step(fdiff: Tensor, w: Tensor, norm: float = 2.0, eps: float = 1e-4) -> Tensor:
    code = _code(w, "w")
    lib = _lib_for(w)
    B, D = w.shape
    w = _rows(w.detach())
    fdiff32 = _on(fdiff.detach(), w, torch.float32)
    part = torch.empty(B, lib.row_chunks(B, D), dtype=torch.float64, device=w.device)
    r = torch.empty(B, D, dtype=w.dtype, device=w.device)
    with torch.cuda.device(w.device):
        lib.boundary_step(fdiff32.data_ptr(), w.data_ptr(), part.data_ptr(), r.data_ptr(), B, D,
                          w.stride(0), math.isinf(norm), float(eps), code, _stream(w))
    return r


def deepdefense_penalty(delta: Tensor, x: Tensor, correct: Tensor, c: float, d: float) -> Tensor:
    code = _code(delta, "delta")
    lib = _lib_for(delta)
    B, D = delta.shape
    delta = _on(delta.detach(), delta)
    x = _on(x.detach(), delta, delta.dtype)
    correct = _on(correct, delta, torch.bool)
    part = torch.empty(2, B, lib.row_chunks(B, D), dtype=torch.float64, device=delta.device)
    out = torch.empty(B, dtype=delta.dtype, device=delta.device)
    with torch.cuda.device(delta.device):
        lib.deepdefense_penalty(delta.data_ptr(), x.data_ptr(), correct.data_ptr(), part.data_ptr(),
                                out.data_ptr(), B, D, float(c), float(d), PENALTY_EXP_CAP, code,
                                _stream(delta))
    return out


def _bound(t: Optional[Tensor], like: Tensor) -> Tuple[Optional[Tensor], int, int, int]:
    """(bound [1 or B, D] on like's device and in its dtype, address (0: absent), row stride,
    column stride 0 or 1): a number expanded to [1, D] keeps its column stride 0; any other
    layout whose columns are not contiguous is copied."""
    if t is None:
        return None, 0, 0, 1
    t = t.to(device=like.device, dtype=like.dtype).resolve_neg()
    if t.shape[1] > 1 and t.stride(1) not in (0, 1):
        t = t.contiguous()
    return t, t.data_ptr(), t.stride(0) if t.shape[0] > 1 else 0, t.stride(1) if t.shape[1] > 1 else 1


def deepfool_update(x0: Tensor, r_tot: Tensor, r: Tensor, active: Tensor, overshoot: float,
                    lo: Optional[Tensor] = None, hi: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    code = _code(x0, "x0")
    lib = _lib_for(x0)
    B, D = x0.shape
    x0 = _on(x0, x0)
    r_tot = _on(r_tot, x0, x0.dtype)
    r = _on(r, x0, x0.dtype)
    active = _on(active, x0, torch.bool)
    lo, lo_ptr, lo_rs, lo_cs = _bound(lo, x0)
    hi, hi_ptr, hi_rs, hi_cs = _bound(hi, x0)
    r_tot_out = torch.empty_like(x0)
    x_next = torch.empty_like(x0)
    with torch.cuda.device(x0.device):
        lib.deepfool_update(x0.data_ptr(), r_tot.data_ptr(), r.data_ptr(), active.data_ptr(),
                            lo_ptr, lo_rs, lo_cs, hi_ptr, hi_rs, hi_cs, r_tot_out.data_ptr(),
                            x_next.data_ptr(), B, D, float(overshoot), code, _stream(x0))
    return r_tot_out, x_next
