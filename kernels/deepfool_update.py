"""deepfool_update in triton: ``r_tot' = r_tot + r`` on active rows (``r_tot`` elsewhere)
and ``x_next = clip(x0 + (1 + overshoot) * r_tot')``, one elementwise pass over [B, D].

Spec: :func:`ddfast.reference.deepfool_update`. x0, r_tot, r [B, D], active [B] bool ->
(r_tot', x_next) [B, D] in x0's dtype; the arithmetic is float32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common
from ._common import LAUNCH, store_dtype


@triton.jit
def _update_kernel(x0_ptr, rt_ptr, r_ptr, active_ptr, rt_out_ptr, x_out_ptr, D, k, lo, hi, tiles,
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
            xn = tl.where(xn < lo, lo, xn)
        if HAS_HI:
            xn = tl.where(xn > hi, hi, xn)
        tl.store(rt_out_ptr + base, rt.to(rt_out_ptr.dtype.element_ty), mask=m)
        tl.store(x_out_ptr + base, xn.to(x_out_ptr.dtype.element_ty), mask=m)


def deepfool_update(x0: Tensor, r_tot: Tensor, r: Tensor, active: Tensor, overshoot: float,
                    lo: Optional[float] = None, hi: Optional[float] = None, *,
                    block_d: int = 1024) -> Tuple[Tensor, Tensor]:
    """Launch the elementwise update kernel over a (B, D-blocks) grid."""
    B, D = x0.shape
    x0 = x0.contiguous()
    r_tot = r_tot.to(x0.dtype).contiguous()
    r = r.to(x0.dtype).contiguous()
    act = active.to(device=x0.device, dtype=torch.int8).contiguous()
    rt_out = torch.empty_like(x0, dtype=store_dtype(x0.dtype))
    x_out = torch.empty_like(rt_out)
    if B == 0 or D == 0:
        return rt_out.to(x0.dtype), x_out.to(x0.dtype)
    block = min(block_d, triton.next_power_of_2(D))
    tiles, R = _common.row_slices(D, block)
    _update_kernel[(B, R)](
        x0, r_tot, r, act, rt_out, x_out, D, 1.0 + float(overshoot),
        0.0 if lo is None else float(lo), 0.0 if hi is None else float(hi), tiles,
        HAS_LO=lo is not None, HAS_HI=hi is not None, BLOCK=block, **LAUNCH)
    return rt_out.to(x0.dtype), x_out.to(x0.dtype)
