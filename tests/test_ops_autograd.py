"""First and second order of the differentiable ops (``boundary_step``,
``deepdefense_penalty``): gradcheck, gradgradcheck, opcheck, the zero-gradient guards, and
the exponent guard of the penalty (DESIGN.md: it changes nothing in the normal range and keeps
a hopeless sample finite in float32)."""
import math

import pytest
import torch

import ddfast

from ddfast import ops, reference
from ddfast.backends import available_backends
from ddfast.reference import PENALTY_EXP_CAP

BACKENDS = [b for b in ("torch", "cpu") if b in available_backends("cpu", torch.float64)]
NORMS = [2.0, math.inf]


def _step_inputs(B=4, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    # |fdiff| and |w| away from 0: |.| and sign() are smooth there
    fdiff = (torch.rand(B, generator=g, dtype=torch.float64) + 0.2) * torch.tensor([-1.0, 1.0, -1.0, -1.0])[:B].double()
    w = torch.randn(B, D, generator=g, dtype=torch.float64)
    w = w + 0.3 * torch.sign(w)
    return fdiff.requires_grad_(), w.requires_grad_()


def _penalty_inputs(B=4, D=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    delta = (0.3 * torch.randn(B, D, generator=g, dtype=torch.float64)).requires_grad_()
    x = (2.0 * torch.randn(B, D, generator=g, dtype=torch.float64)).requires_grad_()
    correct = torch.tensor([True, False, True, False])[:B]
    return delta, x, correct


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_boundary_step_gradcheck_gradgradcheck(backend, norm):
    fdiff, w = _step_inputs()
    fn = lambda f, ww: ops.boundary_step(f, ww, norm=norm, eps=1e-4, backend=backend)
    assert torch.autograd.gradcheck(fn, (fdiff, w))
    assert torch.autograd.gradgradcheck(fn, (fdiff, w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_boundary_step_grad_matches_reference_autograd(backend, norm):
    """The registered backward equals autograd through the reference formula."""
    fdiff, w = _step_inputs(seed=3)
    G = torch.randn(4, 6, dtype=torch.float64)
    got = torch.autograd.grad((ops.boundary_step(fdiff, w, norm, 1e-4, backend) * G).sum(), (fdiff, w))
    want = torch.autograd.grad((reference.boundary_step(fdiff, w, norm, 1e-4) * G).sum(), (fdiff, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_gradcheck_gradgradcheck(backend):
    delta, x, correct = _penalty_inputs()
    fn = lambda dl, xx: ops.deepdefense_penalty(dl, xx, correct, 3.0, 2.0, backend=backend)
    assert torch.autograd.gradcheck(fn, (delta, x))
    assert torch.autograd.gradgradcheck(fn, (delta, x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_gradcheck_past_the_cap(backend):
    """Past the exponent cap the penalty continues linearly: still smooth, twice."""
    delta, x, correct = _penalty_inputs()
    fn = lambda dl, xx: ops.deepdefense_penalty(dl, xx, correct, 3.0, 2000.0, backend=backend)
    with torch.no_grad():
        z = 2000.0 * delta.norm(dim=1) / x.norm(dim=1)
    assert bool((z[~correct] > PENALTY_EXP_CAP).all())
    assert torch.autograd.gradcheck(fn, (delta, x))
    assert torch.autograd.gradgradcheck(fn, (delta, x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    fdiff, w = _step_inputs()
    delta, x, correct = _penalty_inputs()
    with ddfast.set_backend(backend):
        for norm in NORMS:
            torch.library.opcheck(torch.ops.ddfast.boundary_step.default, (fdiff, w, norm, 1e-4))
        torch.library.opcheck(torch.ops.ddfast.deepdefense_penalty.default, (delta, x, correct, 3.0, 2.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_boundary_step_zero_w_gives_zero_step_and_gradient(backend, norm):
    fdiff = torch.tensor([-0.5, -0.7], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    r = ops.boundary_step(fdiff, w, norm, 1e-4, backend)
    assert bool((r[0] == 0).all())
    gf, gw = torch.autograd.grad(r.sum(), (fdiff, w), create_graph=True)
    assert gf[0] == 0 and bool((gw[0] == 0).all())
    (h,) = torch.autograd.grad((gw ** 2).sum() + gf.sum(), w)
    assert bool(torch.isfinite(h).all()) and bool((h[0] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_zero_delta_has_zero_gradient(backend):
    delta = torch.zeros(2, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, dtype=torch.float64)
    correct = torch.tensor([True, False])
    p = ops.deepdefense_penalty(delta, x, correct, 25.0, 5.0, backend)
    torch.testing.assert_close(p, torch.ones(2, dtype=torch.float64))
    (g,) = torch.autograd.grad(p.sum(), delta, create_graph=True)
    assert bool((g == 0).all())
    (h,) = torch.autograd.grad(g.sum(), delta, allow_unused=True)
    assert h is None or bool(torch.isfinite(h).all())


# ------------------------------------------------------------------- the exponent guard
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_guard_changes_nothing_in_normal_range(backend, dtype):
    """Every exponent up to the cap: value and gradient are those of the plain exp formula."""
    g = torch.Generator().manual_seed(5)
    B, D = 64, 10
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    correct = torch.arange(B) % 2 == 0
    c, d = 25.0, 5.0
    # ratios spread over [0, 0.99 * cap / d], so the misclassified exponents reach 0.99 * cap
    ratio = torch.linspace(0, 0.99 * PENALTY_EXP_CAP / d, B, dtype=torch.float64)
    u = torch.randn(B, D, generator=g, dtype=torch.float64)
    delta = u / u.norm(dim=1, keepdim=True) * (ratio * x.norm(dim=1))[:, None]
    delta, x = delta.to(dtype).requires_grad_(), x.to(dtype).requires_grad_()
    got = ops.deepdefense_penalty(delta, x, correct, c, d, backend)

    dn = delta.norm(dim=1)
    xn = x.norm(dim=1)
    plain = torch.where(correct, torch.exp(-c * dn / xn), torch.exp(d * dn / xn))
    rtol = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got, plain, rtol=rtol, atol=0)
    G = torch.randn(B, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(dtype)
    a = torch.autograd.grad((got * G).sum(), (delta, x))
    b = torch.autograd.grad((plain * G).sum(), (delta, x))
    for ga, gb in zip(a, b):
        torch.testing.assert_close(ga, gb, rtol=rtol, atol=rtol * float(gb.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hopeless_sample_stays_finite_in_float32(backend):
    """A misclassified sample with d * ratio >> 88 (exp overflows float32) stays finite, with a
    finite, positive slope; the unguarded formula would give inf."""
    x = torch.ones(2, 4, dtype=torch.float32)
    delta = torch.tensor([[40.0, 0, 0, 0], [0.1, 0, 0, 0]], dtype=torch.float32, requires_grad=True)
    correct = torch.tensor([False, True])
    d = 5.0
    assert math.isinf(float(torch.exp(torch.tensor(d * 40.0 / 2.0))))     # the unguarded value
    p = ops.deepdefense_penalty(delta, x, correct, 25.0, d, backend)
    assert bool(torch.isfinite(p).all())
    (g,) = torch.autograd.grad(p.sum(), delta)
    assert bool(torch.isfinite(g).all()) and g[0, 0] > 0
