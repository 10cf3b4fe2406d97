"""Pieces shared by the triton kernels: how long rows are split across programs, the
per-(row, chunk) partial norm kernel, and the checks every launcher makes.

Long rows (D up to 150528 for ImageNet) are cut into ``S`` chunks of ``chunk`` elements
(a multiple of the block); one program reduces one (row, chunk) into a float64 partial,
and a finishing kernel sums a row's ``S`` partials.

Overflow and underflow (the rule of :mod:`ddfast.reference`): a chunk is summed in float32
where that is exact enough, and again in float64 (where no float32 / bfloat16 / float16
square overflows or underflows) when its float32 sum is not :func:`trusted`: it overflowed
(gradients past ~1.8e19) or, for squares, is so small that digits may have been lost.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import DTYPES

#: Programs a split aims at (a few per streaming multiprocessor of a current GPU).
TARGET_PROGRAMS = 1024
#: Default block of a row: elements one program touches per loop step.
BLOCK_D = 1024
#: The grid's limit on its second axis (CUDA's y): elementwise kernels put a row's slices there.
MAX_GRID_Y = 65535
#: Options of every launch. Multiply-adds are fused (FMA), as nvcc does for the CUDA kernels
#: by default; said explicitly because Triton 3.10 turns fusion off by default.
LAUNCH = {"enable_fp_fusion": True}


def split_rows(B: int, D: int, block: int) -> tuple[int, int]:
    """(chunk, S): cut rows of length D into S >= 1 chunks of ``chunk`` elements (a
    multiple of ``block``) so that about TARGET_PROGRAMS programs cover B rows."""
    blocks = max(1, triton.cdiv(D, block))
    want = max(1, min(blocks, triton.cdiv(TARGET_PROGRAMS, max(B, 1))))
    chunk = triton.cdiv(blocks, want) * block
    return chunk, max(1, triton.cdiv(D, chunk))


def row_slices(D: int, block: int) -> tuple[int, int]:
    """(tiles, R): an elementwise kernel over rows of D elements runs R <= MAX_GRID_Y programs
    a row, each over ``tiles`` consecutive blocks of ``block`` elements (1 unless D is huge)."""
    blocks = max(1, triton.cdiv(D, block))
    tiles = triton.cdiv(blocks, MAX_GRID_Y)
    return tiles, triton.cdiv(blocks, tiles)


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes an output of ``dtype`` in. Triton's interpreter (3.9)
    converts float32 to bfloat16 by truncation, where GPUs round to nearest even, so under
    the interpreter bfloat16 outputs are written as float32 and rounded by torch
    (``.to(dtype)``, a no-op otherwise)."""
    from . import interpreting
    return torch.float32 if dtype == torch.bfloat16 and interpreting() else dtype


def rows(t: Tensor) -> Tensor:
    """A [B, D] view whose rows may be strided but whose elements are contiguous (its
    negation bit applied: the kernels read raw memory)."""
    t = t.resolve_neg()
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def dense(t: Tensor, **to) -> Tensor:
    """``t.to(**to)``, contiguous, its negation bit applied."""
    return t.to(**to).resolve_neg().contiguous()


#: Below this a float32 sum of squares may have lost digits to underflow (squares under
#: FLT_MIN = 1.2e-38): such chunks are summed again in float64.
TINY_F32 = tl.constexpr(1e-20)
FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def trusted(s, Q: tl.constexpr):
    """Whether the float32 power sum(s) ``s`` neither overflowed nor (Q = 2) may have
    underflowed; False for NaN (a NaN row sums to NaN in float64 too)."""
    ok = s <= FLT_MAX
    if Q == 2:
        ok = ok & (s >= TINY_F32)
    return ok


@triton.jit
def _chunk_sum(base, start, end, ACC: tl.constexpr, Q: tl.constexpr, BLOCK: tl.constexpr):
    """sum of |base[d]|^Q over d in [start, end), accumulated in ACC (float32 or float64)."""
    acc = tl.zeros([BLOCK], dtype=ACC)
    for d0 in range(start, end, BLOCK):
        offs = d0 + tl.arange(0, BLOCK)
        v = tl.load(base + offs, mask=offs < end, other=0.0).to(tl.float32).to(ACC)
        if Q == 2:
            acc += v * v
        else:
            acc += tl.abs(v)
    return tl.sum(acc, axis=0)


@triton.jit
def partial_norm_kernel(x_ptr, out_ptr, D, stride_b, chunk, S,
                        Q: tl.constexpr, BLOCK: tl.constexpr, ACC64: tl.constexpr):
    """out[i, s] (float64) = sum over the s-th chunk of row i of x[i, d]^2 (Q = 2) or
    |x[i, d]| (Q = 1): in float64 (ACC64), else in float32 and again in float64 where that is
    not :func:`trusted`. Grid (B, S)."""
    i = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)   # s * chunk and the offsets may pass 2**31
    start = s * chunk
    end = tl.minimum(start + chunk, D)
    base = x_ptr + i * stride_b
    if ACC64:
        total = _chunk_sum(base, start, end, tl.float64, Q, BLOCK)
    else:
        fast = _chunk_sum(base, start, end, tl.float32, Q, BLOCK)
        total = fast.to(tl.float64)
        if not trusted(fast, Q):
            total = _chunk_sum(base, start, end, tl.float64, Q, BLOCK)
    tl.store(out_ptr + i * S + s, total)


def partial_norms(x: Tensor, q: int, block: int, acc64: bool = False) -> tuple[Tensor, int]:
    """[B, S] float64 partial sums of |x|^q over chunks of each row of x [B, D] (q = 1, 2),
    accumulated in float64 (``acc64``: where a ratio of norms feeds an exp) or in float32 with
    the float64 fallback."""
    B, D = x.shape
    chunk, S = split_rows(B, D, block)
    out = torch.empty(B, S, dtype=torch.float64, device=x.device)
    if B:
        partial_norm_kernel[(B, S)](x, out, D, x.stride(0), chunk, S, Q=q, BLOCK=block, ACC64=acc64,
                                    **LAUNCH)
    return out, S
