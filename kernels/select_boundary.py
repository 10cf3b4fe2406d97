"""select_boundary in triton: two kernels.

1. ``_partial_kernel``, grid (B, S): program (i, s) finds the reference candidate of row i
   and, for every candidate j, sums ``|g_j[d] - g_ref[d]|^q`` over the s-th chunk of d
   into ``part[i, j, s]`` (float64: summed in float32, and again in float64 for a group
   of candidates whose float32 sums are not ``_common.trusted``, i.e. overflowed or may
   have underflowed). Candidates are processed BLOCK_C at a time so each chunk of
   ``g_ref`` is loaded once per BLOCK_C candidates.
2. ``_finish_kernel``, grid (B, R): every program of row i sums the partials, takes the
   exact first-index argmin of ``|f_j - f_ref| / ||w_j||_q`` (cheap: C * S floats; a NaN
   distance counts as inf, as in the reference), and
   writes its slice of ``r`` (``tiles`` blocks of BLOCK_R, one unless D is huge) from the
   chosen row alone; program (i, 0) writes ``l[i]`` and ``dist[i]``.

With ``diff`` (the constexpr ``DIFF``) the rows are already ``w_j = g_j - g_ref``: nothing is
subtracted, ``ref`` need not be among the candidates, and a candidate equal to it is skipped.

Square roots and divisions are the IEEE ones (``sqrt_rn``, ``div_rn``; triton's defaults
are approximate on GPUs), so float32 results are as accurate as torch's.

Spec: :func:`ddfast.reference.select_boundary`. Shapes: logits [B, K], grads [B, C, D]
(rows may be strided: only ``grads.stride(2) == 1`` is needed), cand [B, C] int64,
ref [B] int64, active [B] bool -> l [B] int64, dist [B] (logits dtype), r [B, D] (grads
dtype).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common
from ._common import BLOCK_D, LAUNCH, split_rows, store_dtype


@triton.jit
def _ref_pos(cand_row, ref, C, BLOCK_C: tl.constexpr):
    """First j with cand_row[j] == ref, the row subtracted without DIFF (0 when absent, as the
    reference's argmax)."""
    pos = C
    for c0 in range(0, C, BLOCK_C):
        j = c0 + tl.arange(0, BLOCK_C)
        cj = tl.load(cand_row + j, mask=j < C, other=-1)
        pos = tl.minimum(pos, tl.min(tl.where((cj == ref) & (j < C), j, C), axis=0))
    return tl.where(pos == C, 0, pos)


@triton.jit
def _group_sums(g_row, g_ref, j, jm, gs_c, start, end, ACC: tl.constexpr, Q: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, DIFF: tl.constexpr):
    """[BLOCK_C]: sum over d in [start, end) of |g_j[d] - g_ref[d]|^Q, the difference and the
    sum in ACC (float32, or float64 where neither can overflow)."""
    acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=ACC)
    for d0 in range(start, end, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        dm = offs < end
        w = tl.load(g_row + j[:, None].to(tl.int64) * gs_c + offs[None, :],
                    mask=jm[:, None] & dm[None, :], other=0.0).to(tl.float32).to(ACC)
        if not DIFF:
            w -= tl.load(g_ref + offs, mask=dm, other=0.0).to(tl.float32).to(ACC)[None, :]
        if Q == 2:
            acc += w * w
        else:
            acc += tl.abs(w)
    return tl.sum(acc, axis=1)


@triton.jit
def _partial_kernel(grads_ptr, cand_ptr, ref_ptr, active_ptr, part_ptr,
                    C, D, gs_b, gs_c, chunk, S,
                    Q: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                    DIFF: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)   # s * chunk and the offsets may pass 2**31
    if tl.load(active_ptr + i) != 0:
        g_row = grads_ptr + i * gs_b
        g_ref = g_row
        if not DIFF:
            rp = _ref_pos(cand_ptr + i * C, tl.load(ref_ptr + i), C, BLOCK_C).to(tl.int64)
            g_ref = g_row + rp * gs_c
        start = s * chunk
        end = tl.minimum(start + chunk, D)
        for c0 in range(0, C, BLOCK_C):
            j = c0 + tl.arange(0, BLOCK_C)
            jm = j < C
            fast = _group_sums(g_row, g_ref, j, jm, gs_c, start, end, tl.float32, Q, BLOCK_C, BLOCK_D, DIFF)
            total = fast.to(tl.float64)
            if tl.sum((jm & ~_common.trusted(fast, Q)).to(tl.int32), axis=0) > 0:   # rare: exact sums
                total = _group_sums(g_row, g_ref, j, jm, gs_c, start, end, tl.float64, Q, BLOCK_C, BLOCK_D,
                                    DIFF)
            tl.store(part_ptr + (i * C + j) * S + s, total, mask=jm)


@triton.jit
def _finish_kernel(logits_ptr, grads_ptr, cand_ptr, ref_ptr, active_ptr, part_ptr,
                   l_ptr, dist_ptr, r_ptr,
                   K, C, D, gs_b, gs_c, S, eps, tiles,
                   Q: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_R: tl.constexpr, DIFF: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)   # offsets may pass 2**31
    first = pid_d == 0
    ref = tl.load(ref_ptr + i)
    if tl.load(active_ptr + i) != 0:
        cand_row = cand_ptr + i * C
        if not DIFF:
            rp = _ref_pos(cand_row, ref, C, BLOCK_C).to(tl.int64)
        f_ref = tl.load(logits_ptr + i * K + ref).to(tl.float32)
        best = tl.full([], float("inf"), tl.float32)
        best_pos = tl.full([], 0, tl.int32)
        best_n = tl.full([], 0.0, tl.float32)
        for c0 in range(0, C, BLOCK_C):
            j = c0 + tl.arange(0, BLOCK_C)
            jm = j < C
            npow = tl.zeros([BLOCK_C], dtype=tl.float64)
            for s0 in range(0, S, BLOCK_S):
                ss = s0 + tl.arange(0, BLOCK_S)
                p = tl.load(part_ptr + (i * C + j[:, None]) * S + ss[None, :],
                            mask=jm[:, None] & (ss[None, :] < S), other=0.0)
                npow += tl.sum(p, axis=1)
            if Q == 2:
                npow = tl.sqrt(npow)                 # float64: IEEE
            n = npow.to(tl.float32)
            cj = tl.load(cand_row + j, mask=jm, other=0)
            f = tl.load(logits_ptr + i * K + cj, mask=jm, other=0.0).to(tl.float32)
            ok = jm & (cj != ref) & (n > 0)          # every candidate equal to ref is skipped
            dist = tl.where(ok, tl.div_rn(tl.abs(f - f_ref), tl.where(ok, n, 1.0)), float("inf"))
            dist = tl.where(dist == dist, dist, float("inf"))    # a NaN distance never wins
            blk_min = tl.min(dist, axis=0)
            blk_pos = tl.argmin(dist, axis=0)       # first index of the block's minimum
            blk_n = tl.sum(tl.where(j == c0 + blk_pos, n, 0.0), axis=0)
            better = blk_min < best                 # strict: earlier blocks win ties
            best_pos = tl.where(better, c0 + blk_pos, best_pos)
            best_n = tl.where(better, blk_n, best_n)
            best = tl.where(better, blk_min, best)
        l_val = tl.load(cand_row + best_pos)
        finite = best < float("inf")
        scale = tl.where(finite, best + eps, 0.0)
        g_row = grads_ptr + i * gs_b
        step = finite & (best_n > 0)
        inv_n = tl.div_rn(1.0, tl.where(best_n > 0, best_n, 1.0))   # not scale / n: it may overflow
        for t in range(0, tiles):
            offs = (pid_d * tiles + t) * BLOCK_R + tl.arange(0, BLOCK_R)
            dm = offs < D
            w = tl.load(g_row + best_pos.to(tl.int64) * gs_c + offs, mask=dm, other=0.0).to(tl.float32)
            if not DIFF:
                w -= tl.load(g_row + rp * gs_c + offs, mask=dm, other=0.0).to(tl.float32)
            if Q == 2:
                r = tl.where(step, (w * inv_n) * scale, 0.0)   # 0, not 0 * NaN, where w holds NaN
            else:
                r = scale * tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0))
            tl.store(r_ptr + i * D + offs, r.to(r_ptr.dtype.element_ty), mask=dm)
        tl.store(l_ptr + i, l_val, mask=first)
        tl.store(dist_ptr + i, best.to(dist_ptr.dtype.element_ty), mask=first)
    else:
        for t in range(0, tiles):
            offs = (pid_d * tiles + t) * BLOCK_R + tl.arange(0, BLOCK_R)
            tl.store(r_ptr + i * D + offs, tl.zeros([BLOCK_R], dtype=r_ptr.dtype.element_ty), mask=offs < D)
        tl.store(l_ptr + i, ref, mask=first)
        tl.store(dist_ptr + i, tl.zeros([], dtype=dist_ptr.dtype.element_ty), mask=first)


def select_boundary(logits: Tensor, grads: Tensor, cand: Tensor, ref: Tensor, active: Tensor,
                    norm: float = 2.0, eps: float = 1e-4, diff: bool = False, *, block_d: int = BLOCK_D,
                    block_c: int = 0, block_r: int = 1024) -> Tuple[Tensor, Tensor, Tensor]:
    """Launch the two kernels; ``block_*`` (powers of two) only tune or test the split."""
    logits_dtype = logits.dtype          # the backend is chosen by grads' dtype: logits may be wider
    if logits_dtype == torch.float64:
        logits = logits.to(torch.float32)
    B, C, D = grads.shape
    K = logits.shape[1]
    dev = grads.device
    grads = _common.rows(grads)
    logits = _common.dense(logits)
    cand = _common.dense(cand, device=dev, dtype=torch.int64)
    ref = _common.dense(ref, device=dev, dtype=torch.int64)
    act = _common.dense(active, device=dev, dtype=torch.int8)
    l = torch.empty(B, dtype=torch.int64, device=dev)
    dist = torch.empty(B, dtype=store_dtype(logits.dtype), device=dev)
    r = torch.empty(B, D, dtype=store_dtype(grads.dtype), device=dev)
    if B == 0 or D == 0:  # nothing for the kernels to do: the reference's rule for empty rows
        from ..reference import select_boundary as reference

        l, dist, r = reference(logits, grads, cand, ref, active.bool(), norm, eps, diff)
        return l, dist.to(logits_dtype), r
    q = 1 if math.isinf(norm) else 2
    if not block_c:
        block_c = min(triton.next_power_of_2(C), 8)
    block_dc = max(16, block_d // block_c)          # a [BLOCK_C, BLOCK_D] tile of ~block_d
    chunk, S = split_rows(B, D, block_dc)
    part = torch.empty(B, C, S, dtype=torch.float64, device=dev)
    _partial_kernel[(B, S)](grads, cand, ref, act, part, C, D, grads.stride(0), grads.stride(1),
                            chunk, S, Q=q, BLOCK_C=block_c, BLOCK_D=block_dc, DIFF=bool(diff), **LAUNCH)
    block_r = min(block_r, triton.next_power_of_2(D))
    block_s = min(triton.next_power_of_2(S), 64)
    tiles, R = _common.row_slices(D, block_r)
    _finish_kernel[(B, R)](
        logits, grads, cand, ref, act, part, l, dist, r, K, C, D, grads.stride(0),
        grads.stride(1), S, float(eps), tiles, Q=q, BLOCK_C=block_c, BLOCK_S=block_s, BLOCK_R=block_r,
        DIFF=bool(diff), **LAUNCH)
    return l, dist.to(logits_dtype), r.to(grads.dtype)
