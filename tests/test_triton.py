"""The triton backend (``ddfast.kernels``): split paths, ties across candidate blocks,
strided rows, supports(), cheap import, and compilation for a real GPU target.

Where the kernels run: on a GPU, in this process. Without one they run in triton's
interpreter, which needs ``TRITON_INTERPRET=1`` before triton is imported. Setting it for
the whole pytest session (e.g. in conftest.py) would make ``available_backends()`` list the
interpreted triton for CPU tensors and every other test pick it as the default: slow and
not what those tests are about. So :func:`test_triton_cases_in_interpreter_subprocess`
runs this module and the triton cases of ``test_ops_backends.py`` and
``test_ops_numerics.py`` in a child pytest with
the variable set, and the in-process cases skip (a run with ``TRITON_INTERPRET=1`` already
set, like that child or a CI job, runs them directly).
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddfast
from ddfast import reference

from conftest import child_env
from test_ops_backends import assert_rule, check_select, select_case

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_GPU = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
ROOT = Path(__file__).resolve().parents[1]
CHILD_CWD = ROOT / "tests"
DEVICE = "cuda" if HAS_GPU else "cpu"

here = pytest.mark.skipif(not HAS_TRITON or not (INTERPRET or HAS_GPU),
                          reason="no GPU: run by test_triton_cases_in_interpreter_subprocess")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(INTERPRET or HAS_GPU, reason="the triton cases run in this process")
def test_triton_cases_in_interpreter_subprocess():
    env = child_env(TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "test_triton.py"), str(ROOT / "tests" / "test_ops_backends.py"),
           str(ROOT / "tests" / "test_ops_numerics.py"), "-k", "triton"]
    proc = subprocess.run(cmd, cwd=CHILD_CWD, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail


def test_import_is_cheap_and_lazy():
    code = ("import sys, ddfast, ddfast.kernels as k; assert 'triton' not in sys.modules; "
            "print(k.supports('cpu', __import__('torch').float64))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=CHILD_CWD, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@here
def test_supports():
    k = ddfast.backends.load("triton")
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert k.supports(DEVICE, dt)
    assert not k.supports(DEVICE, torch.float64)
    assert k.supports("cpu", torch.float32) == INTERPRET
    assert "triton" in ddfast.available_backends(DEVICE)


@here
@pytest.mark.parametrize("norm", [2.0, math.inf])
def test_select_boundary_split_rows_and_candidate_blocks(norm):
    """Tiny blocks force every split: several D chunks per row (S > 1), D not a multiple
    of the block, and candidates over several BLOCK_C blocks with an exact tie across two
    of them (the first index must win)."""
    k = ddfast.backends.load("triton")
    for dtype in (torch.float32, torch.bfloat16):
        logits, grads, cand, ref, active = select_case(3, 9, 7, 45, dtype, DEVICE, seed=7)
        active[:] = True
        for i in range(3):   # candidates at positions 1 and 6 (blocks 0 and 3) tie exactly
            a, b = [j for j in range(7) if cand[i, j] != ref[i]][:1] + [6 if cand[i, 6] != ref[i] else 5]
            grads[i, b] = grads[i, a]
            logits[i, cand[i, a]] = logits[i, cand[i, b]] = logits[i, ref[i]] - 1e-3
        l, dist, r = k.select_boundary(logits, grads, cand, ref, active, norm, 1e-4,
                                       block_d=32, block_c=2, block_r=16)
        l64, dist64, r64 = reference.select_boundary(logits.double(), grads.double(), cand, ref,
                                                     active, norm)
        assert torch.equal(l, l64)
        _, dist_lo, r_lo = reference.select_boundary(logits, grads, cand, ref, active, norm)
        assert_rule(dist, dist_lo, dist64, "dist")
        assert_rule(r, r_lo, r64, "r")


@here
def test_select_boundary_strided_rows_and_defaults():
    """A transposed Jacobian [C, B, D] -> [B, C, D] view, through ops with the defaults."""
    args = select_case(4, 8, 5, 33, torch.float32, DEVICE, kind="strided", seed=8)
    assert not args[1].is_contiguous() and args[1].stride(2) == 1
    for norm in (2.0, math.inf):
        check_select("triton", args, norm)


@here
def test_row_reductions_split_across_chunks():
    k = ddfast.backends.load("triton")
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(2, 77, generator=gen).to(DEVICE)
    fdiff = torch.randn(2, generator=gen).to(DEVICE)
    for norm in (2.0, math.inf):
        r = k.boundary_step(fdiff, w, norm, 1e-4, block_d=16)
        assert_rule(r, reference.boundary_step(fdiff, w, norm),
                    reference.boundary_step(fdiff.double(), w.double(), norm), "r")
    x = torch.randn(3, 77, generator=gen).to(DEVICE)
    delta = 0.02 * torch.randn(3, 77, generator=gen).to(DEVICE)
    corr = torch.tensor([True, False, True], device=DEVICE)
    p = k.deepdefense_penalty(delta, x, corr, 25.0, 5.0, block_d=16)
    assert_rule(p, reference.deepdefense_penalty(delta, x, corr, 25.0, 5.0),
                reference.deepdefense_penalty(delta.double(), x.double(), corr, 25.0, 5.0), "penalty")


def _compile_for_sm90(kernels):
    """Compile triton kernels for an sm_90 target without a GPU: the interpreter runs the
    kernels' Python, so only this proves they lower to PTX (types, loops, reductions)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as tcompile
    from ddfast.kernels._common import LAUNCH
    ptx = {}
    for fn, sig, consts in kernels:
        k = tcompile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                     target=GPUTarget("cuda", 90, 32), options=dict(LAUNCH))
        assert ".entry" in k.asm["ptx"]
        ptx[fn.__name__] = k.asm["ptx"]
    return ptx


def _kernel_specs(dtypes, norms):
    k = ddfast.backends.load("triton")
    sb, bs = k.module("select_boundary"), k.module("boundary_step")
    dp, du = k.module("deepdefense_penalty"), k.module("deepfool_update")
    from ddfast.kernels import _common
    i32, i64, f32, f64 = "i32", "*i64", "*fp32", "*fp64"
    specs = []
    for dt in dtypes:
        for q in norms:
            for diff in (False, True):
                specs += [
                    (sb._partial_kernel, dict(grads_ptr=dt, cand_ptr=i64, ref_ptr=i64, active_ptr="*i8",
                                              part_ptr=f64, C=i32, D=i32, gs_b=i32, gs_c=i32, chunk=i32,
                                              S=i32, Q="constexpr", BLOCK_C="constexpr",
                                              BLOCK_D="constexpr", DIFF="constexpr"),
                     dict(Q=q, BLOCK_C=8, BLOCK_D=128, DIFF=diff)),
                    (sb._finish_kernel, dict(logits_ptr=dt, grads_ptr=dt, cand_ptr=i64, ref_ptr=i64,
                                             active_ptr="*i8", part_ptr=f64, l_ptr=i64, dist_ptr=dt,
                                             r_ptr=dt, K=i32, C=i32, D=i32, gs_b=i32, gs_c=i32, S=i32,
                                             eps="fp32", tiles=i32, Q="constexpr", BLOCK_C="constexpr",
                                             BLOCK_S="constexpr", BLOCK_R="constexpr", DIFF="constexpr"),
                     dict(Q=q, BLOCK_C=8, BLOCK_S=16, BLOCK_R=1024, DIFF=diff)),
                ]
            specs += [
                (_common.partial_norm_kernel, dict(x_ptr=dt, out_ptr=f64, D=i32, stride_b=i32,
                                                   chunk=i32, S=i32, Q="constexpr", BLOCK="constexpr",
                                                   ACC64="constexpr"),
                 dict(Q=q, BLOCK=1024, ACC64=acc64))
                for acc64 in (False, True)
            ] + [
                (bs._step_kernel, dict(fdiff_ptr=dt, w_ptr=dt, part_ptr=f64, r_ptr=dt, D=i32,
                                       stride_b=i32, S=i32, eps="fp32", tiles=i32, Q="constexpr",
                                       BLOCK_S="constexpr", BLOCK="constexpr"),
                 dict(Q=q, BLOCK_S=16, BLOCK=1024)),
            ]
        specs += [
            (dp._penalty_kernel, dict(dpart_ptr=f64, xpart_ptr=f64, correct_ptr="*i8", out_ptr=dt,
                                      B=i32, S=i32, c="fp32", d="fp32", cap="fp32",
                                      BLOCK_B="constexpr", BLOCK_S="constexpr"),
             dict(BLOCK_B=64, BLOCK_S=16)),
        ]
        specs += [
            (du._update_kernel, dict(x0_ptr=dt, rt_ptr=dt, r_ptr=dt, active_ptr="*i8", lo_ptr=dt, hi_ptr=dt,
                                     rt_out_ptr=dt, x_out_ptr=dt, D=i32, k="fp32", lo_rs=i32, lo_cs=i32,
                                     hi_rs=i32, hi_cs=i32, tiles=i32, HAS_LO="constexpr", HAS_HI="constexpr",
                                     BLOCK="constexpr"),
             dict(HAS_LO=has_lo, HAS_HI=has_hi, BLOCK=1024))
            for has_lo, has_hi in ((True, True), (False, True), (False, False))
        ]
    return specs


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="needs triton, not its interpreter")
def test_kernels_compile_for_a_gpu_target():
    ptx = _compile_for_sm90(_kernel_specs(["*fp32"], [2]))
    # the launch options fuse x0 + k * r_tot into one FMA, as nvcc does in the CUDA kernel
    assert "fma.rn.f32" in ptx["_update_kernel"]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="needs triton, not its interpreter")
def test_kernels_compile_for_a_gpu_target_all_dtypes():
    _compile_for_sm90(_kernel_specs(["*fp32", "*fp16", "*bf16"], [1, 2]))
