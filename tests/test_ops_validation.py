"""The public op entry points reject malformed arguments with a message that names them
(before any native kernel could read out of bounds)."""
import math

import numpy as np
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
                                 torch.ones(3, dtype=torch.bool), 0.02), "r_tot must have the dtype of x0"),
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


# ------------------------------------------------------------------------ scalar arguments
def _all_ops(**change):
    """One valid call of each op (float32, B = 3, D = 4) with ``change`` applied to the
    arguments it has; returns the callables."""
    g = torch.Generator().manual_seed(1)
    a = _select_args()
    x = torch.randn(3, 4, generator=g)
    calls = {
        "select_boundary": (ops.select_boundary, dict(**a, norm=2, eps=1e-4, diff=False)),
        "boundary_step": (ops.boundary_step, dict(fdiff=torch.randn(3, generator=g), w=x, norm=2, eps=1e-4)),
        "deepdefense_penalty": (ops.deepdefense_penalty, dict(delta=0.1 * x, x=x + 1, correct=a["active"],
                                                              c=25.0, d=5.0)),
        "deepfool_update": (ops.deepfool_update, dict(x0=x, r_tot=0.1 * x, r=0.2 * x, active=a["active"],
                                                      overshoot=0.02, lo=-1.0, hi=1.0)),
    }
    return {name: (fn, {**kw, **{k: v for k, v in change.items() if k in kw}})
            for name, (fn, kw) in calls.items() if set(change) & set(kw)}


@pytest.mark.parametrize("arg, value, error, match", [
    ("eps", math.nan, ValueError, "eps must be finite"),
    ("eps", math.inf, ValueError, "eps must be finite"),
    ("eps", -1e-3, ValueError, "eps must be >= 0"),
    ("eps", "1e-4", TypeError, "eps must be a real number"),
    ("eps", None, TypeError, "eps must be a real number"),
    ("eps", True, TypeError, "eps must be a real number"),
    ("eps", np.bool_(True), TypeError, "eps must be a real number"),
    ("norm", "l1", ValueError, "norm must be"),
    ("norm", None, TypeError, "norm must be"),
    ("norm", math.nan, ValueError, "norm must be"),
    ("overshoot", math.nan, ValueError, "overshoot must be finite"),
    ("overshoot", -math.inf, ValueError, "overshoot must be finite"),
    ("overshoot", "0.02", TypeError, "overshoot must be a real number"),
    ("c", math.nan, ValueError, "c must be finite"),
    ("d", math.nan, ValueError, "d must be finite"),
    ("d", math.inf, ValueError, "d must be finite"),
    ("c", "25", TypeError, "c must be a real number"),
    ("lo", math.nan, ValueError, "lo must not be NaN"),
    ("hi", np.float32("nan"), ValueError, "hi must not be NaN"),
    ("lo", "0", TypeError, "lo must be a real number"),
    ("hi", -2.0, ValueError, r"lo must be <= hi.*lo=-1, hi=-2"),
    ("diff", "yes", TypeError, "diff must be a bool"),
    ("diff", 1, TypeError, "diff must be a bool"),
])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_scalar_arguments_are_refused(arg, value, error, match, backend):
    calls = _all_ops(**{arg: value})
    assert calls
    for fn, kw in calls.values():
        with pytest.raises(error, match=match):
            fn(**kw, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_numpy_scalars_are_accepted_as_numbers(backend):
    """numpy scalars wherever a Python number goes: the same result as that number."""
    changes = [dict(eps=np.float32(0.02)), dict(eps=np.int64(0)), dict(norm=np.float64(math.inf)),
               dict(norm=np.int64(2)), dict(c=np.float32(2.5), d=np.int64(5)), dict(overshoot=np.float32(0.02)),
               dict(lo=np.float32(-0.5), hi=np.int64(1)), dict(diff=np.bool_(False))]
    for change in changes:
        plain = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in change.items()}
        for name, (fn, kw) in _all_ops(**change).items():
            got = fn(**kw, backend=backend)
            want = _all_ops(**plain)[name][0](**_all_ops(**plain)[name][1], backend=backend)
            for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                assert torch.equal(a, b), (name, change)


@pytest.mark.parametrize("call, error, match", [
    (lambda: ops.boundary_step(torch.randn(3, dtype=torch.float64), torch.randn(3, 4)), TypeError,
     r"fdiff must have the dtype of w \(torch.float32\)"),
    (lambda: ops.deepdefense_penalty(torch.randn(3, 4), torch.randn(3, 4).double(), torch.ones(3, dtype=torch.bool),
                                     1., 1.), TypeError, "x must have the dtype of delta"),
    (lambda: ops.boundary_step(torch.randn(3), torch.randn(3, 4).to_sparse()), TypeError,
     "w must be a dense"),
    (lambda: ops.select_boundary(**{**_select_args(), "cand": _select_args()["cand"].to(torch.uint32)}),
     TypeError, "cand must be a int tensor"),
    (lambda: ops.boundary_step(torch.randn(3).to(torch.float8_e4m3fn), torch.randn(3, 4).to(torch.float8_e4m3fn)),
     TypeError, "fdiff must be a float tensor"),
    (lambda: ops.deepfool_update(*(torch.randn(3, 4, dtype=torch.float64),) * 3, torch.ones(3, dtype=torch.bool),
                                 0.02, backend="triton"), ValueError, "backend 'triton' cannot run here"),
], ids=["fdiff-dtype", "x-dtype", "sparse", "uint32", "float8", "float64-triton"])
def test_tensor_kinds_are_refused(call, error, match):
    """Only dense tensors of the dtypes the kernels read, one float dtype per op (but logits)."""
    if "uint32" in match and not hasattr(torch, "uint32"):
        pytest.skip("no torch.uint32 here")
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------- deepfool_update bounds
def _update_args(B=3, D=5, seed=2):
    g = torch.Generator().manual_seed(seed)
    x0, r_tot, r = (torch.randn(B, D, generator=g) for _ in range(3))
    return x0, r_tot, r, torch.tensor([True, False, True][:B] + [True] * max(0, B - 3))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bound_forms_agree(backend):
    """A number, a 0-d tensor, [D], [1, D] and [B, D] of the same values clip alike; integer and
    float64 bounds are taken in x0's dtype; a bound per sample clips each row by its own."""
    x0, r_tot, r, active = _update_args()
    row = torch.linspace(-0.9, -0.1, 5)
    run = lambda lo, hi=None: ops.deepfool_update(x0, r_tot, r, active, 0.02, lo, hi, backend=backend)
    want = run(row[None])
    for lo in (row, row[None].expand(3, 5), row[None].expand(3, 5).contiguous(), row.double(),
               torch.stack([row, torch.zeros(5), row])[::2][:1]):
        for a, b in zip(run(lo), want):
            assert torch.equal(a, b)
    for lo in (-0.5, torch.tensor(-0.5), np.float32(-0.5), torch.full((5,), -0.5, dtype=torch.float64)):
        for a, b in zip(run(lo), run(torch.full((1, 5), -0.5))):
            assert torch.equal(a, b)
    for a, b in zip(run(None, torch.ones(5, dtype=torch.int64)), run(None, 1.0)):
        assert torch.equal(a, b)
    per_row = torch.tensor([[-0.1] * 5, [-0.2] * 5, [-0.3] * 5])
    strided = torch.stack([per_row, torch.zeros(3, 5)], 1).view(6, 5)[::2]     # row stride 2 D
    for a, b in zip(run(strided), run(per_row)):
        assert torch.equal(a, b)
    _, x = run(per_row)
    for i in range(3):
        _, xi = run(per_row[i])
        assert torch.equal(x[i], xi[i])
    assert bool((x >= per_row).all())


@pytest.mark.parametrize("lo, hi, error, match", [
    (torch.tensor([0.0, math.nan, 0.0, math.nan, 0.0]), None, ValueError,
     r"lo holds NaN at 2 of 5 entries \(first at \[1\], shape \[5\]\)"),
    (None, torch.full((3, 5), math.nan), ValueError, r"hi holds NaN at 15 of 15 entries \(first at \[0, 0\]"),
    (torch.zeros(2, 5), None, ValueError, r"lo must have shape \[D\], \[1, D\] or \[B, D\] = \[5\], \[1, 5\] or \[3, 5\], got \[2, 5\]"),
    (torch.zeros(5, 1), None, ValueError, r"lo must have shape .* got \[5, 1\]"),
    (None, torch.zeros(1, 1, 5), ValueError, r"hi must have shape .* got \[1, 1, 5\]"),
    (torch.zeros(5, dtype=torch.bool), None, TypeError, "lo must be a dense real tensor"),
    (torch.zeros(5, dtype=torch.complex64), None, TypeError, "lo must be a dense real tensor"),
    (torch.zeros(5, device="meta"), None, ValueError, "lo is on the meta device"),
    ([0.0] * 5, None, TypeError, "lo must be a real number"),
    (torch.zeros(5), torch.tensor([1.0, 1.0, -1.0, 1.0, -2.0]), ValueError,
     r"lo must be <= hi, got lo > hi at 2 of 5 entries \(first at \[0, 2\]: lo=0, hi=-1; shapes \[1, 5\] and \[1, 5\]\)"),
    (torch.zeros(3, 5), 0.5 - torch.eye(3, 5), ValueError, r"lo > hi at 3 of 15 entries \(first at \[0, 0\]"),
    (1.0, torch.zeros(5), ValueError, "lo must be <= hi"),
])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bounds_are_refused(lo, hi, error, match, backend):
    x0, r_tot, r, active = _update_args()
    with pytest.raises(error, match=match):
        ops.deepfool_update(x0, r_tot, r, active, 0.02, lo, hi, backend=backend)


def test_bound_messages_print_no_tensor():
    """A long bound row is described by its shape and first bad entry, not printed."""
    x0, r_tot, r, active = _update_args(D=10000)
    lo = torch.zeros(10000)
    lo[7777] = math.nan
    for lo_, hi_ in ((lo, None), (torch.ones(10000), torch.zeros(10000))):
        with pytest.raises(ValueError) as info:
            ops.deepfool_update(x0, r_tot, r, active, 0.02, lo_, hi_)
        assert len(str(info.value)) < 200, str(info.value)
    assert "[7777]" in str(pytest.raises(ValueError, ops.deepfool_update, x0, r_tot, r, active, 0.02, lo).value)
