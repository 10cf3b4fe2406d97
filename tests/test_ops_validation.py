"""The public op entry points reject malformed arguments with a message that names them
(before any native kernel could read out of bounds)."""
import pytest
import torch

from ddfast import ops


def _select_args(B=3, K=5, C=3, D=4):
    torch.manual_seed(0)
    cand = torch.stack([torch.randperm(K)[:C] for _ in range(B)])
    return dict(logits=torch.randn(B, K), grads=torch.randn(B, C, D), cand=cand,
                ref=cand[:, 0].clone(), active=torch.ones(B, dtype=torch.bool))


@pytest.mark.parametrize("change, match", [
    (dict(logits=torch.randn(3)), "logits must be 2-d"),
    (dict(logits=torch.randn(4, 5)), "logits must have 3 rows"),
    (dict(grads=torch.randn(3, 3)), "grads must be 3-d"),
    (dict(grads=torch.randint(0, 2, (3, 3, 4))), "grads must be a float"),
    (dict(cand=torch.zeros(3, 2, dtype=torch.int64)), r"cand must have shape \[3, 3\]"),
    (dict(cand=torch.full((3, 3), 7)), r"cand holds classes outside \[0, 5\)"),
    (dict(cand=torch.full((3, 3), -1)), "cand holds classes outside"),
    (dict(cand=torch.zeros(3, 3)), "cand must be a int"),
    (dict(ref=torch.tensor([4, 4, 4]), cand=torch.zeros(3, 3, dtype=torch.int64)), "every ref"),
    (dict(ref=torch.zeros(2, dtype=torch.int64)), "ref must have 3 rows like grads"),
    (dict(active=torch.ones(3)), "active must be a bool"),
    (dict(norm=1), "norm must be 2 or inf"),
])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_select_boundary_rejects(change, match, backend):
    args = _select_args()
    change = dict(change)
    norm = change.pop("norm", 2)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.select_boundary(**args, norm=norm, backend=backend)


@pytest.mark.parametrize("call, match", [
    (lambda: ops.boundary_step(torch.randn(3), torch.randn(2, 4)), "w must have 3 rows"),
    (lambda: ops.boundary_step(torch.randn(3, 1), torch.randn(3, 4)), "fdiff must be 1-d"),
    (lambda: ops.deepdefense_penalty(torch.randn(3, 4), torch.randn(3, 5), torch.ones(3, dtype=torch.bool), 1., 1.),
     r"x must have shape \[3, 4\]"),
    (lambda: ops.deepdefense_penalty(torch.randn(3, 4), torch.randn(3, 4), torch.ones(3), 1., 1.),
     "correct must be a bool"),
    (lambda: ops.deepfool_update(torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 5),
                                 torch.ones(3, dtype=torch.bool), 0.02), r"r must have shape \[3, 4\]"),
    (lambda: ops.deepfool_update(torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4),
                                 torch.ones(2, dtype=torch.bool), 0.02), "active must have 3 rows"),
    (lambda: ops.boundary_step(torch.randn(3), torch.randn(3, 4), backend="nope"), "backend must be one of"),
    (lambda: ops.deepfool_update(torch.randn(3, 4).half(), torch.randn(3, 4), torch.randn(3, 4).half(),
                                 torch.ones(3, dtype=torch.bool), 0.02), "x0, r_tot and r must share one dtype"),
])
def test_other_ops_reject(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_empty_batch_ops():
    args = dict(logits=torch.randn(0, 5), grads=torch.randn(0, 3, 4),
                cand=torch.zeros(0, 3, dtype=torch.int64), ref=torch.zeros(0, dtype=torch.int64),
                active=torch.ones(0, dtype=torch.bool))
    l, dist, r = ops.select_boundary(**args, backend="cpu")
    assert l.shape == (0,) and r.shape == (0, 4)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_select_boundary_takes_int32_classes_and_returns_int64(backend):
    """Every backend returns l as int64 (the op's fake kernel says so): int32 classes are widened."""
    args = _select_args()
    args["cand"], args["ref"] = args["cand"].int(), args["ref"].int()
    l, _, _ = ops.select_boundary(**args, backend=backend)
    l64, _, _ = ops.select_boundary(**{**args, "cand": args["cand"].long(), "ref": args["ref"].long()},
                                    backend=backend)
    assert l.dtype == torch.int64 and torch.equal(l, l64)
