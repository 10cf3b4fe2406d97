"""The ``cuda`` backend (``ddfast._C_cuda`` from csrc/*.cu, wrapped by ``ddfast._cuda``).

* Wherever a CUDA toolkit is found, the module must have been built and must import (also
  without a GPU): a .cu file that does not compile makes this red, not silently skipped.
* Without a GPU the backend is absent from ``available_backends`` and refuses to run.
* On a GPU (marked ``gpu``): the conformance cases of ``test_ops_backends.py`` run for
  ``cuda-cuda`` and ``triton-cuda``; here, the ImageNet row length, a side stream, and
  agreement of the two GPU backends.
"""
from __future__ import annotations

import glob
import math
import os
import shutil

import pytest
import torch

import ddfast
from ddfast import ops, reference

from test_ops_backends import assert_rule, check_select, select_case

HAS_GPU = torch.cuda.is_available()


def _toolkit() -> bool:
    """A CUDA toolkit as setup.py looks for it (CUDA_HOME/CUDA_PATH, /usr/local/cuda*, nvcc)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return True
    if any(os.path.isfile(os.path.join(h, "bin", "nvcc"))
           for h in ["/usr/local/cuda"] + glob.glob("/usr/local/cuda-*")):
        return True
    return shutil.which("nvcc") is not None


@pytest.mark.skipif(not _toolkit() or os.environ.get("DDFAST_NO_CUDA") == "1",
                    reason="no CUDA toolkit here (or DDFAST_NO_CUDA=1): ddfast._C_cuda is not built")
def test_cuda_module_was_built_and_imports():
    import ddfast._C_cuda as lib   # fails when a .cu did not compile or the link broke
    for name in ("select_boundary", "boundary_step", "deepdefense_penalty", "deepfool_update",
                 "row_chunks"):
        assert callable(getattr(lib, name))
    # long rows are split across blocks, short ones are not
    assert lib.row_chunks(32, 150528) > 1
    assert lib.row_chunks(256, 784) == 1
    assert lib.row_chunks(1, 1) == 1
    from ddfast import _cuda
    assert _cuda.native() is lib and _cuda.native_error() is None


@pytest.mark.skipif(HAS_GPU, reason="a GPU is present")
def test_cuda_backend_absent_without_gpu():
    assert "cuda" not in ddfast.available_backends("cuda")
    assert "cuda" not in ddfast.available_backends("cpu")
    args = select_case(2, 4, 3, 5, torch.float32, "cpu")
    with pytest.raises(ValueError, match="cannot run here"):
        ops.select_boundary(*args, backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("norm", [2.0, math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_imagenet_rows_split_across_blocks(backend, norm, dtype):
    args = select_case(3, 1000, 10, 150528, dtype, "cuda", kind="strided", seed=11)
    check_select(backend, args, norm)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_runs_on_the_current_stream():
    args = select_case(64, 10, 10, 3072, torch.float32, "cuda", seed=12)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        l, dist, r = ops.select_boundary(*args, backend="cuda")
        w = torch.randn(64, 3072, device="cuda")
        step = ops.boundary_step(dist, w, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    l64, dist64, r64 = reference.select_boundary(*(a.double() if a.is_floating_point() else a
                                                   for a in args))
    assert torch.equal(l, l64)
    assert_rule(step, reference.boundary_step(dist, w), reference.boundary_step(dist.double(), w.double()), "r")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_gpu_backends_agree_with_each_other():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        args = select_case(256, 10, 10, 784, dtype, "cuda", seed=13)
        a = ops.select_boundary(*args, backend="cuda")
        b = ops.select_boundary(*args, backend="triton")
        assert torch.equal(a[0], b[0])
        torch.testing.assert_close(a[2].float(), b[2].float(), rtol=2e-2, atol=1e-5)
