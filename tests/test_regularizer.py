"""ddfast.regularizer.deepdefense_loss against ddfast.reference.deepdefense_ref, the slow
implementation of the spec (docs/design.md, "DeepDefense regularizer"), plus its behaviour: modes, no .grad, bad input,
empty batch, float32 guard, the nn.Module form."""
import math

import pytest
import torch
from torch import nn

from ddfast.reference import deepdefense_ref
from ddfast.regularizer import DeepDefense, DeepDefenseInfo, deepdefense_loss


# ----------------------------------------------------------------------- models and data
def bn_mlp(seed=0, d_in=12, k=5):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(d_in, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.3),
                      nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, k)).double()
    _randomise_bn(m)
    return m.train()


def bn_cnn(seed=0, k=4):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Softplus(), nn.Dropout(0.3),
                      nn.Flatten(), nn.Linear(3 * 5 * 5, 8), nn.Tanh(), nn.Linear(8, k)).double()
    _randomise_bn(m)
    return m.train()


def _randomise_bn(m):
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                mod.running_mean.uniform_(-0.3, 0.3)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)


def mixed_labels(model, x, seed=0):
    """Labels that make about half the samples correct (eval-mode prediction) and the others
    misclassified."""
    g = torch.Generator().manual_seed(seed)
    was = model.training
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train(was)
    pred = logits.argmax(1)
    K = logits.shape[1]
    wrong = (pred + torch.randint(1, K, pred.shape, generator=g)) % K
    y = torch.where(torch.arange(len(x)) % 2 == 0, pred, wrong)
    return y


def mlp_data(B=8, seed=1):
    return torch.randn(B, 12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def cnn_data(B=6, seed=2):
    return torch.randn(B, 1, 7, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _params(m):
    return [p for p in m.parameters() if p.requires_grad]


def _assert_rel(a, b, rtol=1e-6):
    scale = float(b.abs().max())
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale + 1e-15)


CONFIGS = [  # lam, c, d, max_iter, overshoot
    (15.0, 25.0, 5.0, 5, 0.02),
    (1.0, 2.0, 0.5, 2, 0.1),
    (3.0, 5.0, 3.0, 1, 0.0),
    (0.5, 1.0, 1.0, 4, 0.05),
]


# ----------------------------------------------------------------------- equality with the spec
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_value_and_parameter_gradients_match_slow(net, cfg):
    lam, c, d, max_iter, overshoot = cfg
    model = bn_mlp() if net == "mlp" else bn_cnn()
    x = mlp_data() if net == "mlp" else cnn_data()
    y = mixed_labels(model, x)
    kw = dict(lam=lam, c=c, d=d, max_iter=max_iter, overshoot=overshoot)

    reg, info = deepdefense_loss(model, x, y, return_info=True, **kw)
    assert reg.dtype == torch.float64 and reg.dim() == 0
    g_fast = torch.autograd.grad(reg, _params(model))
    want, iters, correct = deepdefense_ref(model, x, y, **kw)
    g_slow = torch.autograd.grad(want, _params(model))

    assert correct.any() and (~correct).any()                  # a real mix
    assert torch.equal(info.correct, correct)
    assert torch.equal(info.iterations, iters)
    _assert_rel(reg.detach(), want.detach())
    for a, b in zip(g_fast, g_slow):
        _assert_rel(a, b)
    assert model.training                                      # the caller's mode is back


@pytest.mark.parametrize("reforward", [True, False])
def test_both_active_set_routes_match_slow(monkeypatch, reforward):
    """Shrinking the active set by a fresh forward or by masking rows of the reused graph:
    both equal the spec."""
    import ddfast.regularizer as R
    calls = []
    monkeypatch.setattr(R, "_reforward", lambda *a: calls.append(a) or reforward)
    model, x = bn_cnn(seed=21), cnn_data(B=8, seed=22)
    y = mixed_labels(model, x, seed=6)
    reg = deepdefense_loss(model, x, y, c=3.0, d=1.0)
    want, _, _ = deepdefense_ref(model, x, y, c=3.0, d=1.0)
    assert calls                                             # the active set did shrink
    _assert_rel(reg.detach(), want.detach())
    for a, b in zip(torch.autograd.grad(reg, _params(model)), torch.autograd.grad(want, _params(model))):
        _assert_rel(a, b)


def test_steps_actually_vary():
    """The data above exercise early exit: samples stop at different steps."""
    model, x = bn_cnn(), cnn_data()
    _, info = deepdefense_loss(model, x, mixed_labels(model, x), max_iter=5, return_info=True)
    assert len(set(info.iterations.tolist())) >= 2


@pytest.mark.parametrize("candidates", [2, 3])
def test_candidates_match_slow(candidates):
    model, x = bn_mlp(seed=3), mlp_data(B=10, seed=4)
    y = mixed_labels(model, x, seed=1)
    reg = deepdefense_loss(model, x, y, candidates=candidates, lam=1.0, c=3.0, d=1.0)
    want, _, _ = deepdefense_ref(model, x, y, candidates=candidates, lam=1.0, c=3.0, d=1.0)
    _assert_rel(reg.detach(), want.detach())
    for a, b in zip(torch.autograd.grad(reg, _params(model)), torch.autograd.grad(want, _params(model))):
        _assert_rel(a, b)


def test_candidates_matter():
    """Top-2 candidates give a different (larger or equal) distance than all classes somewhere."""
    model, x = bn_mlp(seed=3), mlp_data(B=10, seed=4)
    y = mixed_labels(model, x, seed=1)
    full = deepdefense_loss(model, x, y, lam=1.0, c=3.0, d=1.0)
    top2 = deepdefense_loss(model, x, y, candidates=2, lam=1.0, c=3.0, d=1.0)
    assert not torch.allclose(full, top2)


def test_input_gradient_matches_slow():
    model, x = bn_cnn(seed=5), cnn_data(seed=6)
    y = mixed_labels(model, x, seed=2)
    xf = x.clone().requires_grad_(True)
    xs = x.clone().requires_grad_(True)
    (gf,) = torch.autograd.grad(deepdefense_loss(model, xf, y, c=3.0, d=1.0), xf)
    want, _, _ = deepdefense_ref(model, xs, y, c=3.0, d=1.0)
    (gs,) = torch.autograd.grad(want, xs)
    _assert_rel(gf, gs)


def test_second_order_matches_slow():
    """grad_theta ||dR/dtheta||^2: third derivatives of the model through every unrolled step."""
    model, x = bn_mlp(seed=7), mlp_data(B=6, seed=8)
    y = mixed_labels(model, x, seed=3)
    kw = dict(lam=2.0, c=3.0, d=1.0, max_iter=3)
    ps = _params(model)

    def hv(R):
        g = torch.autograd.grad(R, ps, create_graph=True)
        return torch.autograd.grad(sum((gi * gi).sum() for gi in g), ps)

    fast = hv(deepdefense_loss(model, x, y, **kw))
    slow = hv(deepdefense_ref(model, x, y, **kw)[0])
    assert any(float(a.abs().max()) > 0 for a in slow)
    for a, b in zip(fast, slow):
        _assert_rel(a, b)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_backends_agree(backend):
    model, x = bn_mlp(seed=9), mlp_data(seed=10)
    y = mixed_labels(model, x, seed=4)
    want, _, _ = deepdefense_ref(model, x, y, c=3.0, d=1.0)
    reg = deepdefense_loss(model, x, y, c=3.0, d=1.0, backend=backend)
    _assert_rel(reg.detach(), want.detach())


@pytest.mark.parametrize("method", ["loop", "replicate"])
def test_other_jacobian_routes_match_batched(method):
    model, x = bn_cnn(seed=11), cnn_data(seed=12)
    y = mixed_labels(model, x, seed=5)
    a = deepdefense_loss(model, x, y, c=3.0, d=1.0, method="batched")
    b = deepdefense_loss(model, x, y, c=3.0, d=1.0, method=method)
    ga = torch.autograd.grad(a, _params(model))
    gb = torch.autograd.grad(b, _params(model))
    _assert_rel(a.detach(), b.detach(), 1e-12)
    for u, v in zip(ga, gb):
        _assert_rel(u, v, 1e-10)


# ----------------------------------------------------------------------- behaviour
def test_eval_mode_inside_modes_restored_and_buffers_untouched():
    model, x = bn_cnn(seed=13), cnn_data(seed=14)
    y = mixed_labels(model, x)
    model[1].eval()                      # a mixed pattern of modes must come back as it was
    modes = [m.training for m in model.modules()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    seen = []
    hook = model[3].register_forward_hook(lambda m, i, o: seen.append(m.training))
    try:
        a = deepdefense_loss(model, x, y)
        b = deepdefense_loss(model, x, y)
    finally:
        hook.remove()
    assert seen and not any(seen)        # dropout (and everything) ran in eval mode
    assert torch.equal(a, b)             # deterministic: dropout off
    assert [m.training for m in model.modules()] == modes
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k


def test_no_grad_written_by_the_call():
    model, x = bn_mlp(seed=15), mlp_data(seed=16)
    y = mixed_labels(model, x)
    xr = x.clone().requires_grad_(True)
    reg = deepdefense_loss(model, xr, y)
    assert all(p.grad is None for p in model.parameters())
    assert xr.grad is None
    reg.backward()                        # the caller's backward reaches every parameter
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    assert xr.grad is not None


def test_backward_reaches_every_parameter_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 10))
    x = torch.randn(16, 20)
    y = torch.randint(0, 10, (16,))
    reg = deepdefense_loss(model, x, y)
    assert reg.dtype == torch.float32
    reg.backward()
    for p in model.parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_value_under_no_grad_and_inference_mode(ctx):
    model, x = bn_mlp(seed=23), mlp_data(seed=24)
    y = mixed_labels(model, x)
    want = deepdefense_loss(model, x, y, c=3.0, d=1.0).detach()
    with ctx():
        xi = x.clone()
        got = deepdefense_loss(model, xi, y, c=3.0, d=1.0)
    assert not got.requires_grad
    assert torch.equal(got, want)


def test_info():
    model, x = bn_mlp(seed=17), mlp_data(seed=18)
    y = mixed_labels(model, x)
    reg, info = deepdefense_loss(model, x, y, return_info=True, lam=2.0, c=3.0, d=1.0)
    assert isinstance(info, DeepDefenseInfo)
    assert info.ratio.shape == (8,) and not info.ratio.requires_grad
    assert bool((info.iterations >= 1).all()) and bool((info.iterations <= 5).all())
    pen = torch.where(info.correct, torch.exp(-3.0 * info.ratio), torch.exp(1.0 * info.ratio))
    _assert_rel(reg.detach(), 2.0 * pen.mean(), 1e-12)


def test_max_iter_zero_is_constant():
    model, x = bn_mlp(), mlp_data()
    y = mixed_labels(model, x)
    reg = deepdefense_loss(model, x, y, max_iter=0, lam=2.0)
    torch.testing.assert_close(reg, torch.tensor(2.0, dtype=torch.float64))


def test_empty_batch_backpropagates_zero():
    model = bn_mlp()
    reg, info = deepdefense_loss(model, torch.zeros(0, 12, dtype=torch.float64),
                                 torch.zeros(0, dtype=torch.int64), return_info=True)
    assert reg.item() == 0.0 and reg.requires_grad and info.ratio.numel() == 0
    reg.backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) == 0 for p in model.parameters())


def test_module_form_equals_function():
    model, x = bn_mlp(seed=19), mlp_data(seed=20)
    y = mixed_labels(model, x)
    dd = DeepDefense(model, lam=4.0, c=3.0, d=2.0, max_iter=3)
    a = dd(x, y)
    b = deepdefense_loss(model, x, y, lam=4.0, c=3.0, d=2.0, max_iter=3)
    assert torch.equal(a, b)
    r, info = dd(x, y, return_info=True)
    assert isinstance(info, DeepDefenseInfo)
    assert "lam=4.0" in repr(dd)


def test_hopeless_misclassified_sample_stays_finite_float32():
    """A misclassified sample far behind its boundary: d * ||D||/||x|| >> 88, where exp
    overflows float32. The loss and its gradients stay finite."""
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.01, 0, 0, 0], [-0.01, 0, 0, 0]]))
        model.bias.copy_(torch.tensor([5.0, -5.0]))
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    y = torch.tensor([1, 0])                               # sample 0 is hopelessly wrong
    reg, info = deepdefense_loss(model, x, y, return_info=True)
    assert not info.correct[0] and 5.0 * float(info.ratio[0]) > 88
    assert bool(torch.isfinite(reg))
    reg.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_float16_model_penalty_does_not_overflow():
    """exp overflows float16 above ~11: a float16 model's penalty is computed in float32."""
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.3, 0, 0, 0], [-0.3, 0, 0, 0]]))
        model.bias.copy_(torch.tensor([1.0, -1.0]))
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    y = torch.tensor([1, 0])                               # sample 0 misclassified, d * ratio ~ 15
    reg32, info32 = deepdefense_loss(model, x, y, return_info=True)
    assert 11.1 < 5.0 * float(info32.ratio[0]) < 60       # exp of it overflows float16, not float32
    reg16, info16 = deepdefense_loss(model.half(), x.half(), y, return_info=True)
    assert reg16.dtype == torch.float32 and bool(torch.isfinite(reg16))
    torch.testing.assert_close(reg16, reg32, rtol=2e-2, atol=0)


@pytest.mark.parametrize("where", ["at x", "at the iterates"])
def test_nonfinite_logits_make_the_loss_nan(where):
    """NaN logits must not come back as a finite R (the step op reads a NaN normal as a zero
    step, which gave R = lam with NaN gradients): R is NaN, as a cross-entropy would be."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))

    def model(z):
        out = net(z)
        if where == "at x":
            return out * math.nan
        moved = torch.cdist(z, x).min(1).values[:, None] > 0     # NaN once an iterate leaves x
        return torch.where(moved, torch.full_like(out, math.nan), out)

    reg = deepdefense_loss(model, x, y, max_iter=3)
    assert torch.isnan(reg)
    assert bool(torch.isfinite(deepdefense_loss(net, x, y, max_iter=3)))


# ----------------------------------------------------------------------- bad input
class _BadShape(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.lin = nn.Linear(12, 5).double()
        self.out = out

    def forward(self, x):
        z = self.lin(x)
        return z.sum(1) if self.out == "1d" else z[..., None]


@pytest.mark.parametrize("bad, arg", [
    (lambda x, y: (x.index_fill(0, torch.tensor([1]), math.nan), y), "x"),
    (lambda x, y: (x.index_fill(0, torch.tensor([2]), math.inf), y), "x"),
    (lambda x, y: (x, None), "y"),
    (lambda x, y: (x, y[:-1]), "y"),
    (lambda x, y: (x, y + 10), "y"),
    (lambda x, y: (x, y - 10), "y"),
    (lambda x, y: (x[0], y[:1]), "x"),                        # one sample without its batch dim
])
def test_bad_input_names_the_argument(bad, arg):
    model, x = bn_mlp(), mlp_data()
    y = mixed_labels(model, x)
    xb, yb = bad(x, y)
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        deepdefense_loss(model, xb, yb)


def test_logits_without_a_graph_to_x_are_refused():
    def detached(z):
        return bn_mlp()(z).detach()

    x = mlp_data()
    with pytest.raises(ValueError, match="carry no gradient back to its input"):
        deepdefense_loss(detached, x, torch.zeros(x.shape[0], dtype=torch.int64))


@pytest.mark.parametrize("out", ["1d", "3d"])
def test_logits_not_2d(out):
    with pytest.raises(ValueError, match="logits"):
        deepdefense_loss(_BadShape(out), mlp_data(), torch.zeros(8, dtype=torch.int64))


@pytest.mark.parametrize("kw, arg", [({"lam": -1.0}, "lam"), ({"c": math.nan}, "c"), ({"d": -2}, "d"),
                                     ({"max_iter": -1}, "max_iter"), ({"overshoot": -0.1}, "overshoot"),
                                     ({"candidates": 1}, "candidates")])
def test_bad_hyperparameters(kw, arg):
    model, x = bn_mlp(), mlp_data()
    with pytest.raises(ValueError, match=arg):
        deepdefense_loss(model, x, mixed_labels(model, x), **kw)
