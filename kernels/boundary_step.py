"""boundary_step in triton: ``r = (|fdiff| / ||w||_q + eps) * w / ||w||_2`` (norm 2) or
``(|fdiff| / ||w||_1 + eps) * sign(w)`` (norm inf), 0 where ``w == 0``.

Two kernels: the shared per-(row, chunk) partial norm kernel (``_common``: float64 partials,
no overflow), then ``_step_kernel`` over (row, BLOCK slice) sums the row's partials in
float64 and writes ``r``. IEEE sqrt/div (``sqrt_rn``, ``div_rn``).
Spec: :func:`ddfast.reference.boundary_step`. fdiff [B], w [B, D] -> r [B, D] (w's dtype).
The gradient is the torch formula registered in :mod:`ddfast.ops`.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common
from ._common import BLOCK_D, LAUNCH, partial_norms, rows, store_dtype


@triton.jit
def _step_kernel(fdiff_ptr, w_ptr, part_ptr, r_ptr, D, stride_b, S, eps, tiles,
                 Q: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    npow = tl.zeros([BLOCK_S], dtype=tl.float64)
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        npow += tl.load(part_ptr + i * S + ss, mask=ss < S, other=0.0)
    n64 = tl.sum(npow, axis=0)
    if Q == 2:
        n64 = tl.sqrt(n64)                      # float64: IEEE
    n = n64.to(tl.float32)
    nz = n > 0
    n_safe = tl.where(nz, n, 1.0)
    f = tl.load(fdiff_ptr + i).to(tl.float32)
    scale = tl.where(nz, tl.div_rn(tl.abs(f), n_safe) + eps, 0.0)
    inv_n = tl.div_rn(1.0, n_safe)
    for t in range(0, tiles):
        offs = (tl.program_id(1).to(tl.int64) * tiles + t) * BLOCK + tl.arange(0, BLOCK)
        dm = offs < D
        w = tl.load(w_ptr + i * stride_b + offs, mask=dm, other=0.0).to(tl.float32)
        if Q == 2:
            # (w / n) * scale, not (scale / n) * w: scale / n may overflow where r does not
            r = tl.where(nz, (w * inv_n) * scale, 0.0)   # 0, not 0 * NaN, where w holds NaN
        else:
            r = scale * tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0))
        tl.store(r_ptr + i * D + offs, r.to(r_ptr.dtype.element_ty), mask=dm)


def boundary_step(fdiff: Tensor, w: Tensor, norm: float = 2.0, eps: float = 1e-4, *,
                  block_d: int = BLOCK_D) -> Tensor:
    """Launch the partial-norm and step kernels; ``block_d`` only tunes or tests the split."""
    B, D = w.shape
    w = rows(w.detach())
    fdiff = _common.dense(fdiff.detach(), device=w.device)
    r = torch.empty(B, D, dtype=store_dtype(w.dtype), device=w.device)
    if B == 0 or D == 0:
        return r.to(w.dtype)
    q = 1 if math.isinf(norm) else 2
    part, S = partial_norms(w, q, block_d)
    block = min(block_d, triton.next_power_of_2(D))
    tiles, R = _common.row_slices(D, block)
    _step_kernel[(B, R)](fdiff, w, part, r, D, w.stride(0), S, float(eps), tiles, Q=q,
                                             BLOCK_S=min(triton.next_power_of_2(S), 64),
                                             BLOCK=block, **LAUNCH)
    return r.to(w.dtype)
