"""deepdefense_penalty in triton: ``exp(-c ||delta|| / ||x||)`` for correct rows,
``exp(d ||delta|| / ||x||)`` otherwise, continued linearly past
:data:`ddfast.reference.PENALTY_EXP_CAP`; ``||x|| == 0`` counts as ratio 0.

The shared partial norm kernel (``_common``) reduces ``delta`` and ``x`` by (row, chunk) in float64;
``_penalty_kernel`` (one program per BLOCK_B rows) finishes. Spec:
:func:`ddfast.reference.deepdefense_penalty`. delta, x [B, D], correct [B] bool -> [B]
(delta's dtype). The gradient is the torch formula registered in :mod:`ddfast.ops`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import PENALTY_EXP_CAP
from ._common import BLOCK_D, LAUNCH, dense, partial_norms, rows, store_dtype


@triton.jit
def _penalty_kernel(dpart_ptr, xpart_ptr, correct_ptr, out_ptr, B, S, c, d, cap,
                    BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr):
    i = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    im = i < B
    dn2 = tl.zeros([BLOCK_B], dtype=tl.float64)
    xn2 = tl.zeros([BLOCK_B], dtype=tl.float64)
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        m = im[:, None] & (ss[None, :] < S)
        idx = i[:, None].to(tl.int64) * S + ss[None, :]
        dn2 += tl.sum(tl.load(dpart_ptr + idx, mask=m, other=0.0), axis=1)
        xn2 += tl.sum(tl.load(xpart_ptr + idx, mask=m, other=0.0), axis=1)
    # per-row scalars: finish in float64, where exp is accurate (float32 exp is approximate
    # on GPUs, and exp multiplies the relative error of its argument by up to ~60)
    dn = tl.sqrt(dn2)
    xn = tl.sqrt(xn2)
    ratio = tl.where(xn == 0, 0.0, dn / tl.where(xn == 0, 1.0, xn))    # NaN stays NaN
    corr = tl.load(correct_ptr + i, mask=im, other=0) != 0
    z = tl.where(corr, -c * ratio, d * ratio)
    over = z > cap
    e = tl.exp(tl.where(over, cap, z))
    p = tl.where(over, e * (1.0 + (z - cap)), e)
    tl.store(out_ptr + i, p.to(out_ptr.dtype.element_ty), mask=im)


def deepdefense_penalty(delta: Tensor, x: Tensor, correct: Tensor, c: float, d: float, *,
                        block_d: int = BLOCK_D) -> Tensor:
    """Launch the partial-norm kernel on delta and x, then the penalty kernel."""
    B, D = delta.shape
    delta = rows(delta.detach())
    x = rows(x.detach().to(delta.dtype))
    corr = dense(correct, device=delta.device, dtype=torch.int8)
    out = torch.empty(B, dtype=store_dtype(delta.dtype), device=delta.device)
    if B == 0:
        return out.to(delta.dtype)
    # float64 partials: exp(d * ratio) multiplies the ratio's relative error by d * ratio
    dpart, S = partial_norms(delta, 2, block_d, acc64=True)
    xpart, _ = partial_norms(x, 2, block_d, acc64=True)
    block_b = min(triton.next_power_of_2(B), 64)
    _penalty_kernel[(triton.cdiv(B, block_b),)](dpart, xpart, corr, out, B, S, float(c), float(d),
                                               float(PENALTY_EXP_CAP), BLOCK_B=block_b,
                                               BLOCK_S=min(triton.next_power_of_2(S), 64), **LAUNCH)
    return out.to(delta.dtype)
