"""The ``cuda`` backend: thin wrappers that lay tensors out for the CUDA kernels of
``ddfast._C_cuda`` (csrc/*.cu) with raw device addresses and the current stream.
Semantics: :mod:`ddfast.reference`. Tensors: CUDA float32 / float16 / bfloat16, float32
accumulation, outputs in the input dtype (``dist`` in the logits' dtype).

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
    """``t`` on like's device (and ``dtype``), contiguous."""
    return t.to(device=like.device, dtype=dtype or t.dtype).contiguous()


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
    if grads.stride(2) != 1 and D > 1:  # rows may be strided (a transposed Jacobian), not elements
        grads = grads.contiguous()
    logits32 = _on(logits, grads, torch.float32)
    cand = _on(cand, grads, torch.int64)
    ref = _on(ref, grads, torch.int64)
    active = _on(active, grads, torch.bool)
    dev = grads.device
    part = torch.empty(B, C, lib.row_chunks(B, D), dtype=torch.float32, device=dev)
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
    w = w.detach()
    if w.stride(1) != 1 and D > 1:
        w = w.contiguous()
    fdiff32 = _on(fdiff.detach(), w, torch.float32)
    part = torch.empty(B, lib.row_chunks(B, D), dtype=torch.float32, device=w.device)
    r = torch.empty(B, D, dtype=w.dtype, device=w.device)
    with torch.cuda.device(w.device):
        lib.boundary_step(fdiff32.data_ptr(), w.data_ptr(), part.data_ptr(), r.data_ptr(), B, D,
                          w.stride(0), math.isinf(norm), float(eps), code, _stream(w))
    return r


def deepdefense_penalty(delta: Tensor, x: Tensor, correct: Tensor, c: float, d: float) -> Tensor:
    code = _code(delta, "delta")
    lib = _lib_for(delta)
    B, D = delta.shape
    delta = delta.detach().contiguous()
    x = _on(x.detach(), delta, delta.dtype)
    correct = _on(correct, delta, torch.bool)
    part = torch.empty(2, B, lib.row_chunks(B, D), dtype=torch.float64, device=delta.device)
    out = torch.empty(B, dtype=delta.dtype, device=delta.device)
    with torch.cuda.device(delta.device):
        lib.deepdefense_penalty(delta.data_ptr(), x.data_ptr(), correct.data_ptr(), part.data_ptr(),
                                out.data_ptr(), B, D, float(c), float(d), PENALTY_EXP_CAP, code,
                                _stream(delta))
    return out


def deepfool_update(x0: Tensor, r_tot: Tensor, r: Tensor, active: Tensor, overshoot: float,
                    lo: Optional[float] = None, hi: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    code = _code(x0, "x0")
    lib = _lib_for(x0)
    B, D = x0.shape
    x0 = x0.contiguous()
    r_tot = _on(r_tot, x0, x0.dtype)
    r = _on(r, x0, x0.dtype)
    active = _on(active, x0, torch.bool)
    r_tot_out = torch.empty_like(x0)
    x_next = torch.empty_like(x0)
    with torch.cuda.device(x0.device):
        lib.deepfool_update(x0.data_ptr(), r_tot.data_ptr(), r.data_ptr(), active.data_ptr(),
                            r_tot_out.data_ptr(), x_next.data_ptr(), B, D, float(overshoot),
                            lo is not None, 0.0 if lo is None else float(lo),
                            hi is not None, 0.0 if hi is None else float(hi), code, _stream(x0))
    return r_tot_out, x_next
