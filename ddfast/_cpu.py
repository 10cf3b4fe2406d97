"""The ``cpu`` backend: thin wrappers that lay tensors out for the C++/OpenMP kernels of
``ddfast._C`` and pass their raw addresses. The op's public entry point checked the
arguments; :mod:`ddfast.backends` sends only CPU float32/float64 here.
Semantics: :mod:`ddfast.reference`."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _C
from .reference import PENALTY_EXP_CAP

_DTYPES = {torch.float32: 0, torch.float64: 1}


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return torch.device(device).type == "cpu" and dtype in _DTYPES


def _code(t: Tensor) -> int:
    return _DTYPES[t.dtype]


def _c(t: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``t`` in ``dtype``, contiguous, its negation bit applied (the kernels read raw memory)."""
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.resolve_neg().contiguous()


def _rows(t: Tensor) -> Tensor:
    """A view whose last dim is contiguous (rows may be strided), its negation bit applied."""
    t = t.resolve_neg()
    return t if t.stride(-1) == 1 else t.contiguous()


def select_boundary(logits: Tensor, grads: Tensor, cand: Tensor, ref: Tensor, active: Tensor,
                    norm: float = 2.0, eps: float = 1e-4,
                    diff: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    code = _code(grads)
    B, C, D = grads.shape
    K = logits.shape[1]
    logits_dtype = logits.dtype
    logits = _c(logits, grads.dtype)
    grads = _rows(grads)  # rows may be strided (e.g. a transposed Jacobian), not elements
    cand = _c(cand, torch.int64)
    ref = _c(ref, torch.int64)
    active = _c(active, torch.bool)
    l = torch.empty(B, dtype=torch.int64)
    dist = torch.empty(B, dtype=grads.dtype)
    r = torch.empty(B, D, dtype=grads.dtype)
    _C.select_boundary(logits.data_ptr(), grads.data_ptr(), cand.data_ptr(), ref.data_ptr(),
                       active.data_ptr(), l.data_ptr(), dist.data_ptr(), r.data_ptr(),
                       B, K, C, D, grads.stride(0), grads.stride(1), math.isinf(norm), float(eps),
                       code, bool(diff))
    return l, dist.to(logits_dtype), r


def boundary_step(fdiff: Tensor, w: Tensor, norm: float = 2.0, eps: float = 1e-4) -> Tensor:
    code = _code(w)
    B, D = w.shape
    fdiff = _c(fdiff.detach(), w.dtype)
    w = _c(w.detach())
    r = torch.empty(B, D, dtype=w.dtype)
    _C.boundary_step(fdiff.data_ptr(), w.data_ptr(), r.data_ptr(), B, D, math.isinf(norm),
                     float(eps), code)
    return r


def deepdefense_penalty(delta: Tensor, x: Tensor, correct: Tensor, c: float, d: float) -> Tensor:
    code = _code(delta)
    B, D = delta.shape
    delta = _c(delta.detach())
    x = _c(x.detach(), delta.dtype)
    correct = _c(correct, torch.bool)
    out = torch.empty(B, dtype=delta.dtype)
    _C.deepdefense_penalty(delta.data_ptr(), x.data_ptr(), correct.data_ptr(), out.data_ptr(),
                           B, D, float(c), float(d), PENALTY_EXP_CAP, code)
    return out


def bound_layout(t: Optional[Tensor], like: Tensor) -> Tuple[Optional[Tensor], int, int, int]:
    """(bound [1 or B, D] in like's dtype, address (0: absent), row stride, column stride 0 or 1):
    a number expanded to [1, D] keeps its column stride 0 (one value, read once a row); any
    other layout whose columns are not contiguous is copied."""
    if t is None:
        return None, 0, 0, 1
    t = t.to(dtype=like.dtype).resolve_neg()
    if t.shape[1] > 1 and t.stride(1) not in (0, 1):
        t = t.contiguous()
    row = t.stride(0) if t.shape[0] > 1 else 0
    col = t.stride(1) if t.shape[1] > 1 else 1
    return t, t.data_ptr(), row, col


def deepfool_update(x0: Tensor, r_tot: Tensor, r: Tensor, active: Tensor, overshoot: float,
                    lo: Optional[Tensor] = None, hi: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    code = _code(x0)
    B, D = x0.shape
    x0 = _c(x0)
    r_tot = _c(r_tot, x0.dtype)
    r = _c(r, x0.dtype)
    active = _c(active, torch.bool)
    lo, lo_ptr, lo_rs, lo_cs = bound_layout(lo, x0)
    hi, hi_ptr, hi_rs, hi_cs = bound_layout(hi, x0)
    r_tot_out = torch.empty_like(x0)
    x_next = torch.empty_like(x0)
    _C.deepfool_update(x0.data_ptr(), r_tot.data_ptr(), r.data_ptr(), active.data_ptr(),
                       lo_ptr, lo_rs, lo_cs, hi_ptr, hi_rs, hi_cs, r_tot_out.data_ptr(),
                       x_next.data_ptr(), B, D, float(overshoot), code)
    return r_tot_out, x_next
