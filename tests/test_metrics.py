"""Metrics against closed forms on affine classifiers."""
import math

import pytest
import torch
from torch import nn

from ddfast import metrics


def affine(K, D, seed):
    g = torch.Generator().manual_seed(seed)
    m = nn.Linear(D, K).double()
    with torch.no_grad():
        m.weight.copy_(torch.randn(K, D, generator=g, dtype=torch.float64))
        m.bias.copy_(torch.randn(K, generator=g, dtype=torch.float64))
    x = torch.randn(200, D, generator=g, dtype=torch.float64) * 0.5
    return m, x


def test_rho2_affine_closed_form():
    m, x = affine(5, 12, 0)
    with torch.no_grad():
        f = m(x)
    ref = f.argmax(1)
    W = m.weight
    w = W[None, :, :] - W[ref][:, None, :]  # [N, K, D]
    fd = (f - f.gather(1, ref[:, None])).abs()
    dist = fd / w.norm(dim=2)
    dist[torch.arange(len(x)), ref] = math.inf
    expect = 1.02 * (dist.min(1).values + 1e-4)  # one DeepFool step reaches the nearest hyperplane
    r = metrics.rho2(m, x, scale=0.5, batch_size=64, progress=False)
    assert r.fooled == 1.0
    assert torch.all(r.iterations == 1)
    assert torch.allclose(r.ratios, expect / x.norm(dim=1), rtol=1e-9)
    assert r.rho2 == pytest.approx((expect / x.norm(dim=1)).mean().item(), rel=1e-9)
    assert r.rho2_prime == pytest.approx(expect.mean().item() / 0.5, rel=1e-9)


def test_fgs_affine_two_class_closed_form():
    m, x = affine(2, 10, 1)
    with torch.no_grad():
        f = m(x)
    y = torch.randint(0, 2, (len(x),), generator=torch.Generator().manual_seed(3))
    u1 = (m.weight[1] - m.weight[0]).abs().sum()
    margin = f.gather(1, y[:, None])[:, 0] - f.gather(1, (1 - y)[:, None])[:, 0]
    flip = (margin / u1).clamp_min(0)  # eps at which sample i becomes misclassified
    k = math.ceil(len(x) / 2)
    eps_true = flip.sort().values[k - 1].item()
    assert 0 < eps_true  # the test needs a nontrivial answer
    eps = metrics.fgs_eps50(m, x, y, rel_tol=1e-7)
    assert eps == pytest.approx(eps_true, rel=1e-5)
    ri, eps2 = metrics.rho_inf(m, x, y)
    assert ri == pytest.approx(eps2 * (1 / x.abs().amax(1)).mean().item(), rel=1e-9)
    accs = metrics.acc_at_eps(m, x, y, [0.5 * eps_true, 0.0])
    assert accs[0] == pytest.approx((flip > 0.5 * eps_true).double().mean().item())
    assert accs[1] == pytest.approx((margin > 0).double().mean().item())


def test_evaluate_row_and_model_untouched():
    m, x = affine(3, 8, 2)
    y = m(x).argmax(1).detach()
    y[:20] = (y[:20] + 1) % 3
    m.train()
    before = [p.detach().clone() for p in m.parameters()]
    row = metrics.evaluate(m, x, y, eps_ref=0.1, progress=False)
    assert m.training
    assert all(p.grad is None for p in m.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert row["acc"] == pytest.approx(0.9)
    assert set(row["acc_at_eps"]) == {"0.2", "0.5", "1.0"}
    assert row["acc_at_eps"]["0.2"] >= row["acc_at_eps"]["1.0"]
    assert 0 < row["rho2"] and 0 < row["rho_inf"]


def test_bad_input():
    m, x = affine(3, 8, 2)
    with pytest.raises(TypeError, match="y"):
        metrics.fgs_eps50(m, x, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="scale"):
        metrics.rho2(m, x, scale=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        metrics.rho2(m, x, batch_size=0, progress=False)
