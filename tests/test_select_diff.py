"""select_boundary(diff=True): rows that are already boundary normals g_k - g_ref give the
same choice and step as the class-gradient form (every backend takes it natively; the
triton and cuda kernels are compared with the reference in tests/test_ops_backends.py)."""
import math

import pytest
import torch

from ddfast import ops, reference


def _case(B, K, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, generator=g, dtype=dtype)
    grads = torch.randn(B, K, D, generator=g, dtype=dtype)
    ref = logits.argmax(1)
    others = torch.arange(K - 1).expand(B, K - 1)
    others = others + (others >= ref[:, None]).long()
    rows = torch.arange(B)[:, None]
    w = grads[rows, others] - grads[torch.arange(B), ref][:, None]
    active = torch.rand(B, generator=g) > 0.2
    return logits, grads, ref, others, w, active


@pytest.mark.parametrize("norm", [2.0, math.inf])
@pytest.mark.parametrize("shape", [(1, 2, 1), (6, 5, 37), (2, 10, 5003), (9, 3, 8)])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_difference_rows_match_class_rows(norm, shape, backend):
    B, K, D = shape
    logits, grads, ref, others, w, active = _case(B, K, D, torch.float64)
    full = torch.arange(K).expand(B, K)
    l0, d0, r0 = reference.select_boundary(logits, grads, full, ref, active, norm)
    l, d, r = ops.select_boundary(logits, w, others, ref, active, norm, backend=backend, diff=True)
    assert torch.equal(l, l0)
    torch.testing.assert_close(d, d0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r, r0, rtol=1e-12, atol=1e-14)


def test_a_candidate_equal_to_the_reference_is_skipped():
    logits, grads, ref, others, w, active = _case(4, 4, 6, torch.float64, seed=3)
    with_ref = torch.cat([ref[:, None], others], 1)
    w_ref = torch.cat([torch.randn(4, 1, 6, dtype=torch.float64), w], 1)   # any row: never chosen
    for backend in ("torch", "cpu"):
        a = ops.select_boundary(logits, w, others, ref, active, backend=backend, diff=True)
        b = ops.select_boundary(logits, w_ref, with_ref, ref, active, backend=backend, diff=True)
        assert torch.equal(a[0], b[0])
        torch.testing.assert_close(a[2], b[2])


def test_class_form_still_requires_the_reference_among_candidates():
    logits, grads, ref, others, w, active = _case(3, 4, 5, torch.float64)
    with pytest.raises(ValueError, match="every ref"):
        ops.select_boundary(logits, w, others, ref, active)


@pytest.mark.parametrize("diff", [False, True])
def test_rows_without_candidates_are_refused(diff):
    """C == 0: nothing to choose from (the kernels would read past the empty rows)."""
    logits, grads, ref, others, w, active = _case(3, 4, 5, torch.float64)
    with pytest.raises(ValueError, match="at least one class"):
        ops.select_boundary(logits, w[:, :0], others[:, :0], ref, active, diff=diff)
