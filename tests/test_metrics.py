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
    with pytest.raises(ValueError, match="y must have shape"):  # the shared rule: wrong count is a ValueError
        metrics.fgs_eps50(m, x, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="scale"):
        metrics.rho2(m, x, scale=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        metrics.rho2(m, x, batch_size=0, progress=False)


# ---------------------------------------------------------------- bad input, no side effects


def _metric_calls(m, x, y):
    """Every public metric, called on (m, x, y) with small settings."""
    return {
        "predict": lambda: metrics.predict(m, x),
        "accuracy": lambda: metrics.accuracy(m, x, y),
        "rho2": lambda: metrics.rho2(m, x, max_iter=5, progress=False),
        "fgs_direction": lambda: metrics.fgs_direction(m, x, y),
        "fgs_error": lambda: metrics.fgs_error(m, x, y, torch.ones_like(x), 0.1),
        "fgs_eps50": lambda: metrics.fgs_eps50(m, x, y, rel_tol=1e-2),
        "rho_inf": lambda: metrics.rho_inf(m, x, y, eps=0.1),
        "acc_at_eps": lambda: metrics.acc_at_eps(m, x, y, [0.1]),
        "evaluate": lambda: metrics.evaluate(m, x, y, eps_ref=0.1, max_iter=5, progress=False),
    }


LABELLED = ("accuracy", "fgs_direction", "fgs_error", "fgs_eps50", "rho_inf", "acc_at_eps", "evaluate")


def _small():
    m, x = affine(3, 8, 2)
    return m, x[:12], m(x[:12]).argmax(1).detach()


@pytest.mark.parametrize("name", list(_metric_calls(None, None, None)))
@pytest.mark.parametrize("case", ["nan", "inf", "int", "complex", "empty", "1d", "meta"])
def test_bad_x_named_before_work(name, case):
    m, x, y = _small()
    bad = {"nan": x.clone().index_fill_(0, torch.tensor([3]), float("nan")),
           "inf": x.clone().index_fill_(0, torch.tensor([0]), float("inf")),
           "int": x.long(), "complex": x.to(torch.complex128), "empty": x[:0], "1d": x[0],
           "meta": x}[case]
    if case == "meta":
        m = m.to("meta")  # x and the model's parameters on different devices
    yy = y[: bad.shape[0]] if case in ("empty", "1d") else y
    err = TypeError if case in ("int", "complex") else ValueError
    with pytest.raises(err, match=r"\bx\b"):
        _metric_calls(m, bad, yy)[name]()


@pytest.mark.parametrize("name", LABELLED)
@pytest.mark.parametrize("case", ["range", "negative", "float", "count", "missing"])
def test_bad_labels_named(name, case):
    m, x, y = _small()
    bad = {"range": y.clone().fill_(3), "negative": y.clone().fill_(-1), "float": y.double(), "count": y[:-1],
           "missing": None}[case]
    err = TypeError if case in ("float", "missing") else ValueError
    with pytest.raises(err, match=r"\by\b"):
        _metric_calls(m, x, bad)[name]()


def test_bad_model_output_and_settings():
    m, x, y = _small()
    flat = nn.Sequential(m, nn.Flatten(0))          # logits [B*K]: not [B, K]
    one = nn.Linear(8, 1).double()                  # K = 1
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        metrics.accuracy(flat, x, y)
    with pytest.raises(ValueError, match="K >= 2"):
        metrics.fgs_direction(one, x, torch.zeros_like(y))
    cases = [
        (lambda: metrics.rho2(m, x, scale=float("nan"), progress=False), "scale"),
        (lambda: metrics.rho2(m, x, max_iter=-1, progress=False), "max_iter"),
        (lambda: metrics.rho2(m, x, overshoot=-0.1, progress=False), "overshoot"),
        (lambda: metrics.rho2(m, x, candidates=1, progress=False), "candidates"),
        (lambda: metrics.predict(m, x, batch_size=0), "batch_size"),
        (lambda: metrics.fgs_eps50(m, x, y, target=0), "target"),
        (lambda: metrics.fgs_eps50(m, x, y, rel_tol=0), "rel_tol"),
        (lambda: metrics.fgs_error(m, x, y, torch.ones(3), 0.1), "direction"),
        (lambda: metrics.fgs_error(m, x, y, torch.ones_like(x), -0.1), "eps"),
        (lambda: metrics.rho_inf(m, x, y, eps=float("inf")), "eps"),
        (lambda: metrics.acc_at_eps(m, x, y, [0.1, -1.0]), "eps"),
        (lambda: metrics.evaluate(m, x, y, eps_ref=-1.0, progress=False), "eps_ref"),
    ]
    for call, arg in cases:
        with pytest.raises(ValueError, match=arg):
            call()
    with pytest.raises(TypeError, match="eps"):
        metrics.acc_at_eps(m, x, y, 0.1)


def test_all_zero_sample_is_refused_by_the_ratio_metrics():
    """rho_2 and rho_inf divide by ||x_i||: one all-zero sample made the whole mean inf."""
    m, x, y = _small()
    x0 = x.index_fill(0, torch.tensor([2]), 0.0)
    with pytest.raises(ValueError, match=r"x has 1 all-zero sample\(s\) \(rows \[2\]\): rho_2"):
        metrics.rho2(m, x0, progress=False)
    with pytest.raises(ValueError, match=r"rows \[2\]\): rho_inf"):
        metrics.rho_inf(m, x0, y, eps=0.1)
    assert math.isfinite(metrics.rho2(m, x, progress=False).rho2)        # the others are fine


def test_rho2_ratios_carry_no_graph():
    m, x, _ = _small()
    r = metrics.rho2(m, x.clone().requires_grad_(True), progress=False)
    assert not r.ratios.requires_grad


def _owned_state(model, x):
    """Everything of the caller's a metric must leave alone."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "flags": [p.requires_grad for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "modes": [mod.training for mod in model.modules()],
        "x": x.clone(),
        "rng": torch.get_rng_state(),
        "grad_mode": torch.is_grad_enabled(),
    }


def _same(a, b):
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("context", ["grad", "no_grad", "inference_mode"])
def test_metrics_leave_the_caller_alone(context):
    from conftest import make_cnn

    m = make_cnn(k=4)
    m.train()
    m[3].eval()                                   # mixed modes: this dropout is in eval mode, the rest train
    m[0].bias.requires_grad_(False)
    m[5].weight.grad = torch.full_like(m[5].weight, 0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (10,), generator=g)
    ctx = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[context]
    for name, call in _metric_calls(m, x, y).items():
        before = _owned_state(m, x)
        with ctx():
            call()
            assert torch.is_grad_enabled() == (context == "grad"), name
        after = _owned_state(m, x)
        for key in before:
            assert _same(before[key], after[key]), (name, key)
