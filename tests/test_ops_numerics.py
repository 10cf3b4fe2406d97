"""Numerics every backend must share with :mod:`ddfast.reference` (its module docstring):

* norms neither overflow nor underflow: DeepFool is invariant to the scale of the logits, so
  inputs scaled by 1e20 or 1e-20 in float32 (squares past float32's range, or below its
  normal numbers) give the same ``l``, ``dist``, ``r`` and penalty as unscaled ones, on every
  backend, and the backends agree with each other there;
* a NaN distance (NaN logits) never wins: a row without a finite distance gets ``dist =
  inf``, ``r = 0`` and its first candidate.

Backends x devices as in ``test_ops_backends.py`` (triton on CPU runs in the interpreter
subprocess of ``test_triton.py``).
"""
from __future__ import annotations

import math

import pytest
import torch

import ddfast
from ddfast import ops, reference

from test_ops_backends import COMBOS, NORMS, assert_rule, check_select, need, select_case

SCALES = [1e20, 1e-20]
#: every backend x device, the reference (torch) included: it is the spec, so it must not overflow either
ALL = COMBOS + [pytest.param("torch", "cpu", id="torch")]
# the float32 fast sums overflow by design before the exact fallback (numpy warns under triton's interpreter)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


def _close_to_unscaled(got, want, what):
    """Scaling by 1e20 rounds every input once (relative 6e-8): outputs move by a few float32
    roundings, never by the overflow or underflow of a square."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()) if want.numel() else 0,
                               msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------- overflow / underflow
@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("diff", [False, True])
def test_select_boundary_is_scale_invariant(backend, device, norm, scale, diff):
    """Logits and gradients scaled together (a model times 1e20): the same choice, distance and
    step; and the backend meets the tolerance rule against the reference at that scale."""
    need(backend, device)
    for s, (B, K, C, D) in enumerate([(8, 10, 10, 50), (3, 7, 4, 37)]):
        logits, grads, cand, ref, active = select_case(B, K, C, D, torch.float32, device, seed=20 + s)
        plain = ops.select_boundary(logits, grads, cand, ref, active, norm, diff=diff, backend=backend)
        scaled_args = (logits * scale, grads * scale, cand, ref, active)
        l, dist, r = check_select(backend, scaled_args, norm, diff=diff)
        assert torch.equal(l, plain[0])
        _close_to_unscaled(dist, plain[1], "dist")
        _close_to_unscaled(r, plain[2], "r")


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("scale", SCALES)
def test_boundary_step_is_scale_invariant(backend, device, norm, scale):
    need(backend, device)
    gen = torch.Generator().manual_seed(31)
    fdiff = torch.randn(6, generator=gen).to(device)
    w = torch.randn(6, 300, generator=gen).to(device)
    plain = ops.boundary_step(fdiff, w, norm, backend=backend)
    got = ops.boundary_step(fdiff * scale, w * scale, norm, backend=backend)
    _close_to_unscaled(got, plain, "r")
    assert_rule(got, reference.boundary_step(fdiff * scale, w * scale, norm),
                reference.boundary_step((fdiff * scale).double(), (w * scale).double(), norm), "r")


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("scale", SCALES)
def test_deepdefense_penalty_is_scale_invariant(backend, device, scale):
    need(backend, device)
    gen = torch.Generator().manual_seed(32)
    x = torch.randn(8, 300, generator=gen).to(device)
    delta = (0.05 * torch.randn(8, 300, generator=gen)).to(device)
    correct = (torch.arange(8) % 2 == 0).to(device)
    plain = ops.deepdefense_penalty(delta, x, correct, 25.0, 5.0, backend=backend)
    got = ops.deepdefense_penalty(delta * scale, x * scale, correct, 25.0, 5.0, backend=backend)
    _close_to_unscaled(got, plain, "penalty")
    d64, x64 = (delta * scale).double(), (x * scale).double()
    assert_rule(got, reference.deepdefense_penalty(delta * scale, x * scale, correct, 25.0, 5.0),
                reference.deepdefense_penalty(d64, x64, correct, 25.0, 5.0), "penalty")


@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_float64_norms_do_not_overflow_either(scale):
    """float64 squares overflow past 1.3e154: the same invariance at 1e+-200 (cpu and torch)."""
    args = select_case(5, 9, 6, 41, torch.float64, "cpu", seed=33)
    logits, grads, cand, ref, active = args
    gen = torch.Generator().manual_seed(34)
    w, fdiff = torch.randn(4, 30, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)
    x = torch.randn(4, 30, generator=gen, dtype=torch.float64)
    correct = torch.tensor([True, False, True, False])
    for backend in ("cpu", "torch"):
        for norm in NORMS:
            want = ops.select_boundary(*args, norm, backend=backend)
            got = ops.select_boundary(logits * scale, grads * scale, cand, ref, active, norm, backend=backend)
            assert torch.equal(got[0], want[0])
            for a, b in zip(got[1:], want[1:]):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(ops.boundary_step(fdiff * scale, w * scale, norm, backend=backend),
                                       ops.boundary_step(fdiff, w, norm, backend=backend), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(ops.deepdefense_penalty(0.1 * w * scale, x * scale, correct, 25.0, 5.0, backend=backend),
                                   ops.deepdefense_penalty(0.1 * w, x, correct, 25.0, 5.0, backend=backend),
                                   rtol=1e-12, atol=0)


def test_backends_agree_at_1e20():
    """The op outputs of every CPU backend here, on inputs scaled by 1e20, against each other."""
    names = [b for b in ddfast.available_backends("cpu") if b != "torch"] + ["torch"]
    args = select_case(8, 10, 10, 50, torch.float32, "cpu", seed=35)
    big = (args[0] * 1e20, args[1] * 1e20) + args[2:]
    outs = {b: ops.select_boundary(*big, backend=b) for b in names}
    for b in names[:-1]:
        assert torch.equal(outs[b][0], outs["torch"][0]), b
        for a, c in zip(outs[b][1:], outs["torch"][1:]):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)
    x, delta = big[1][:, 0], 0.01 * big[1][:, 1]
    pens = [ops.deepdefense_penalty(delta, x, args[4], 25.0, 5.0, backend=b) for b in names]
    for p in pens[:-1]:
        torch.testing.assert_close(p, pens[-1], rtol=1e-5, atol=0)


def _scaled_mlp(scale):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    return lambda z: m(z) * scale


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_deepfool_on_a_model_times_1e20(backend):
    """The issue's case: ``lambda z: m(z) * 1e20`` is fooled as m is, on every backend."""
    if backend not in ddfast.available_backends("cpu"):
        pytest.skip(f"backend {backend} is not available here")
    x = torch.randn(8, 20, generator=torch.Generator().manual_seed(1))
    with ddfast.set_backend(backend):
        plain = ddfast.deepfool(_scaled_mlp(1.0), x, max_iter=20)
        big = ddfast.deepfool(_scaled_mlp(1e20), x, max_iter=20)
    assert bool(plain.success.all())
    assert torch.equal(big.success, plain.success) and torch.equal(big.iterations, plain.iterations)
    torch.testing.assert_close(big.delta, plain.delta, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ NaN logits
def _nan_case(device):
    """Rows of a select_boundary call (cand [0, 1, 2, 3], ref 0): 0, f_ref NaN (every distance
    NaN); 1, the closest candidate's logit NaN; 2, the first candidate's logit NaN; 3, every
    other logit NaN; 4, no NaN; 5, a NaN logit and the others' w zero."""
    gen = torch.Generator().manual_seed(40)
    logits = torch.randn(6, 4, generator=gen) + torch.tensor([3.0, 0.0, 0.0, 0.0])
    grads = torch.randn(6, 4, 9, generator=gen)
    logits[0, 0] = math.nan
    logits[1, 2] = math.nan
    logits[2, 1] = math.nan
    logits[3, 1:] = math.nan
    logits[5, 3] = math.nan
    grads[5, 1:3] = grads[5, 0]
    cand = torch.arange(4).expand(6, 4).contiguous()
    ref = torch.zeros(6, dtype=torch.int64)
    active = torch.ones(6, dtype=torch.bool)
    return [t.to(device) for t in (logits, grads, cand, ref, active)]


def _rule_choice(logits, grads, cand, ref, norm, diff):
    """The rule in plain Python (float64): the first candidate of least finite distance, NaN
    and a zero norm counting as inf, ref skipped; the first candidate when none is finite."""
    out = []
    lg, g = logits.double().cpu(), grads.double().cpu()
    for i in range(lg.shape[0]):
        best, pos = math.inf, 0
        rp = int((cand[i] == ref[i]).long().argmax())
        for j in range(cand.shape[1]):
            if int(cand[i, j]) == int(ref[i]):
                continue
            w = g[i, j] if diff else g[i, j] - g[i, rp]
            n = float(reference.dual_norm(w, norm))
            d = abs(float(lg[i, cand[i, j]] - lg[i, ref[i]])) / n if n > 0 else math.inf
            if d < best:                                  # False for NaN
                best, pos = d, j
        out.append(int(cand[i, pos]))
    return out


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("diff", [False, True])
def test_a_nan_distance_never_wins(backend, device, norm, diff):
    need(backend, device)
    logits, grads, cand, ref, active = _nan_case(device)
    l, dist, r = ops.select_boundary(logits, grads, cand, ref, active, norm, diff=diff, backend=backend)
    assert l.tolist() == _rule_choice(logits, grads, cand, ref, norm, diff)
    for i in (0, 3):                                      # no finite distance
        assert math.isinf(float(dist[i])) and not r[i].any() and int(l[i]) == int(cand[i, 0])
    assert int(l[2]) != 1 and int(l[1]) != 2              # a NaN candidate never chosen
    assert not torch.isnan(dist).any() and not torch.isnan(r).any()
    l64, dist64, r64 = reference.select_boundary(logits.double(), grads.double(), cand, ref, active, norm, diff=diff)
    assert torch.equal(l, l64)
    torch.testing.assert_close(dist.double(), dist64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r.double(), r64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", ALL)
def test_nan_in_the_penalty_gives_nan(backend, device):
    """NaN in delta or x gives a NaN penalty (not the penalty 1 of a zero perturbation); a zero
    x still counts as ratio 0."""
    need(backend, device)
    x = torch.ones(4, 5, device=device)
    delta = torch.full((4, 5), 0.1, device=device)
    delta[0, 2] = math.nan
    x[1, 3] = math.nan
    x[2] = 0
    correct = torch.tensor([True, False, True, False], device=device)
    p = ops.deepdefense_penalty(delta, x, correct, 25.0, 5.0, backend=backend)
    assert torch.isnan(p[:2]).all() and float(p[2]) == 1.0 and math.isfinite(float(p[3]))
