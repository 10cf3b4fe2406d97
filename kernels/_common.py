"""Pieces shared by the triton kernels: how long rows are split across programs, the
per-(row, chunk) partial norm kernel, and the checks every launcher makes.

Long rows (D up to 150528 for ImageNet) are cut into ``S`` chunks of ``chunk`` elements
(a multiple of the block); one program reduces one (row, chunk) into a float32 partial,
and a finishing kernel sums a row's ``S`` partials. Partial sums are float32.
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
    """A [B, D] view whose rows may be strided but whose elements are contiguous."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


@triton.jit
def partial_norm_kernel(x_ptr, out_ptr, D, stride_b, chunk, S,
                        Q: tl.constexpr, BLOCK: tl.constexpr):
    """out[i, s] = sum over the s-th chunk of row i of x[i, d]^2 (Q = 2) or |x[i, d]| (Q = 1),
    accumulated in out's dtype (float32 or float64). Grid (B, S)."""
    acc_t = out_ptr.dtype.element_ty
    i = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)   # s * chunk and the offsets may pass 2**31
    start = s * chunk
    end = tl.minimum(start + chunk, D)
    acc = tl.zeros([BLOCK], dtype=acc_t)
    base = x_ptr + i * stride_b
    for d0 in range(start, end, BLOCK):
        offs = d0 + tl.arange(0, BLOCK)
        v = tl.load(base + offs, mask=offs < end, other=0.0).to(tl.float32).to(acc_t)
        if Q == 2:
            acc += v * v
        else:
            acc += tl.abs(v)
    tl.store(out_ptr + i * S + s, tl.sum(acc, axis=0))


def partial_norms(x: Tensor, q: int, block: int, acc_dtype: torch.dtype = torch.float32) -> tuple[Tensor, int]:
    """[B, S] partial sums of |x|^q over chunks of each row of x [B, D] (q = 1, 2), accumulated
    and returned in ``acc_dtype`` (float32, or float64 where a ratio of norms feeds an exp)."""
    B, D = x.shape
    chunk, S = split_rows(B, D, block)
    out = torch.empty(B, S, dtype=acc_dtype, device=x.device)
    if B:
        partial_norm_kernel[(B, S)](x, out, D, x.stride(0), chunk, S, Q=q, BLOCK=block, **LAUNCH)
    return out, S
