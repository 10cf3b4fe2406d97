"""deepfool_update in triton: ``r_tot' = r_tot + r`` on active rows (``r_tot`` elsewhere)
and ``x_next = clip(x0 + (1 + overshoot) * r_tot', lo, hi)``, one elementwise pass over [B, D].

Spec: :func:`ddfast.reference.deepfool_update`. x0, r_tot, r [B, D], active [B] bool, the
optional bounds lo, hi [1, D] (row stride 0) or [B, D], element (i, d) at
``i * row_stride + d * col_stride`` (column stride 1, or 0 for a number expanded to [1, D])
-> (r_tot', x_next) [B, D] in x0's dtype; the arithmetic is float32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common
from ._common import LAUNCH, dense, store_dtype


@triton.jit
def _update_kernel(x0_ptr, rt_ptr, r_ptr, active_ptr, lo_ptr, hi_ptr, rt_out_ptr, x_out_ptr, D, k,
                   lo_rs, lo_cs, hi_rs, hi_cs, tiles,
                   HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    act = tl.load(active_ptr + i) != 0
    for t in range(0, tiles):
        offs = (tl.program_id(1).to(tl.int64) * tiles + t) * BLOCK + tl.arange(0, BLOCK)
        m = offs < D
        base = i * D + offs
        rt = tl.load(rt_ptr + base, mask=m, other=0.0).to(tl.float32)
        if act:
            rt += tl.load(r_ptr + base, mask=m, other=0.0).to(tl.float32)
        xn = tl.load(x0_ptr + base, mask=m, other=0.0).to(tl.float32) + k * rt
        if HAS_LO:  # comparisons: a NaN stays NaN, as in torch.clamp (tl.maximum would return the bound)
            lo = tl.load(lo_ptr + i * lo_rs + offs * lo_cs, mask=m, other=0.0).to(tl.float32)
            xn = tl.where(xn < lo, lo, xn)
        if HAS_HI:
            hi = tl.load(hi_ptr + i * hi_rs + offs * hi_cs, mask=m, other=0.0).to(tl.float32)
            xn = tl.where(xn > hi, hi, xn)
        tl.store(rt_out_ptr + base, rt.to(rt_out_ptr.dtype.element_ty), mask=m)
        tl.store(x_out_ptr + base, xn.to(x_out_ptr.dtype.element_ty), mask=m)


def _bound(t: Optional[Tensor], like: Tensor) -> Tuple[Tensor, int, int]:
    """(bound for the kernel, row stride, column stride 0 or 1); x0 stands in for an absent one."""
    if t is None:
        return like, 0, 1
    t = t.to(device=like.device, dtype=like.dtype).resolve_neg()
    if t.shape[1] > 1 and t.stride(1) not in (0, 1):
        t = t.contiguous()
    return t, t.stride(0) if t.shape[0] > 1 else 0, t.stride(1) if t.shape[1] > 1 else 1


def deepfool_update(x0: Tensor, r_tot: Tensor, r: Tensor, active: Tensor, overshoot: float,
                    lo: Optional[Tensor] = None, hi: Optional[Tensor] = None, *,
                    block_d: int = 1024) -> Tuple[Tensor, Tensor]:
    """Launch the elementwise update kernel over a (B, D-blocks) grid."""
    B, D = x0.shape
    x0 = dense(x0)
    r_tot = dense(r_tot, dtype=x0.dtype)
    r = dense(r, dtype=x0.dtype)
    act = dense(active, device=x0.device, dtype=torch.int8)
    rt_out = torch.empty_like(x0, dtype=store_dtype(x0.dtype))
    x_out = torch.empty_like(rt_out)
    if B == 0 or D == 0:
        return rt_out.to(x0.dtype), x_out.to(x0.dtype)
    lo_rows, lo_rs, lo_cs = _bound(lo, x0)
    hi_rows, hi_rs, hi_cs = _bound(hi, x0)
    block = min(block_d, triton.next_power_of_2(D))
    tiles, R = _common.row_slices(D, block)
    _update_kernel[(B, R)](
        x0, r_tot, r, act, lo_rows, hi_rows, rt_out, x_out, D, 1.0 + float(overshoot), lo_rs, lo_cs, hi_rs,
        hi_cs, tiles, HAS_LO=lo is not None, HAS_HI=hi is not None, BLOCK=block, **LAUNCH)
    return rt_out.to(x0.dtype), x_out.to(x0.dtype)
