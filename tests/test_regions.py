"""ddfast.regions: activation patterns certify equal Jacobians; models that are not
piecewise-linear get None; the attack reuses Jacobian rows only where that changes nothing."""
import pytest
import torch
from torch import nn

import ddfast
from ddfast import attack, jacobian, regions
from ddfast.reference import deepfool_ref


class Residual(nn.Module):
    """conv -> BN (eval) -> leaky ReLU, a skip connection (two x-dependent branches added),
    threshold, max-pool, average pool, flatten, linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 2 * 2, 5)

    def forward(self, x):
        h = nn.functional.leaky_relu(self.bn(self.conv1(x)), 0.1)
        h = nn.functional.threshold(self.conv2(h) + 0.5 * x, 0.5, 0.0)   # (0, 0.5] is a region boundary
        h = nn.functional.avg_pool2d(nn.functional.max_pool2d(h, 2), 2)
        return self.fc(h.flatten(1))


class Relu(nn.Module):
    def forward(self, x):
        return torch.relu(x)


def relu_mlp(inplace=False):
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU(inplace=inplace), nn.Linear(10, 8), Relu(),
                         nn.Linear(8, 4))


class Clamped(nn.Module):
    """ReLU6, clamp, reflection padding, nearest upsampling, pixel shuffle."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(1 * 6 * 6, 5)

    def forward(self, x):
        h = nn.functional.relu6(3 * self.conv(x))                                  # [n, 4, 6, 6]
        h = nn.functional.pad(h, (1, 1, 1, 1), mode="reflect")                       # [n, 4, 8, 8]
        h = nn.functional.pixel_shuffle(nn.functional.interpolate(h, scale_factor=0.5), 2)  # [n, 1, 8, 8]
        h = nn.functional.avg_pool2d(h.clamp(min=-0.2, max=1.0), 2, ceil_mode=True)  # [n, 1, 4, 4]
        return self.fc(nn.functional.pad(h, (1, 1, 1, 1)).flatten(1))


PIECEWISE_LINEAR = {
    "clamped-cnn": (Clamped, (2, 8, 8)),
    "relu-mlp": (relu_mlp, (12,)),
    "relu-inplace": (lambda: relu_mlp(inplace=True), (12,)),
    "residual-cnn": (Residual, (2, 8, 8)),
    "affine": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 4)), (12,)),
}


def _build(name, frozen=True):
    torch.manual_seed(0)
    make, shape = PIECEWISE_LINEAR[name]
    model = make().double().eval()
    for m in model.modules():        # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    for p in model.parameters():
        p.requires_grad_(not frozen)
    return model, shape


def _pattern(model, x):
    xg, logits = jacobian.forward_with_graph(model, x.flatten(1), x.shape[1:])
    return regions.activation_pattern(logits, xg, regions.model_constants(model)), xg, logits


def _pattern_and_jacobian(model, x):
    pattern, xg, logits = _pattern(model, x)
    J = torch.stack([torch.autograd.grad(logits[:, k].sum(), xg, retain_graph=True)[0]
                     for k in range(logits.shape[1])], 1)
    return pattern, J


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "params-require-grad"])
@pytest.mark.parametrize("name", sorted(PIECEWISE_LINEAR))
def test_equal_patterns_mean_equal_jacobians(name, frozen):
    """Soundness: wherever two inputs' patterns agree, so do their Jacobians, over pairs that
    are near (mostly one region) and far (mostly not)."""
    model, shape = _build(name, frozen)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, *shape, generator=gen, dtype=torch.float64)
    scale = torch.logspace(-6, 0, 64, dtype=torch.float64).view(64, *[1] * len(shape))
    x2 = x + scale * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    p1, J1 = _pattern_and_jacobian(model, x)
    p2, J2 = _pattern_and_jacobian(model, x2)
    assert p1 is not None and p2 is not None
    same = regions.same_pattern(p1, p2, 64, x.device)
    J_equal = torch.isclose(J1, J2, rtol=1e-12, atol=1e-14).flatten(1).all(1)
    assert not (same & ~J_equal).any(), "equal patterns with different Jacobians"
    if name != "affine":   # the test sees both kinds of pairs
        assert same.any() and (~same).any()
    else:
        assert same.all() and p1[1] == []


class Square(nn.Module):
    def forward(self, x):
        return x * x


class Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class Hidden(nn.Module):
    """Linear -> f(h) -> Linear, with f depending on the input off the autograd graph."""

    def __init__(self, f, d_in=12, width=6):
        super().__init__()
        self.l1, self.l2, self.f = nn.Linear(d_in, width), nn.Linear(width, 4), f

    def forward(self, x):
        return self.l2(self.f(self.l1(x)))


class BatchLast(nn.Module):
    """Hidden units x batch: a ReLU pattern whose first dim is not the batch (12 units, and the
    test's batch is 12 too)."""

    def __init__(self):
        super().__init__()
        self.W, self.V = nn.Parameter(torch.randn(12, 12)), nn.Parameter(torch.randn(4, 12))

    def forward(self, x):
        return (self.V @ torch.relu(self.W @ x.t())).t()


NOT_CERTIFIED = {
    "tanh": lambda: nn.Sequential(nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 4)),
    "sigmoid": lambda: nn.Sequential(nn.Linear(12, 6), nn.Sigmoid(), nn.Linear(6, 4)),
    "gelu": lambda: nn.Sequential(nn.Linear(12, 6), nn.GELU(), nn.Linear(6, 4)),
    "elu": lambda: nn.Sequential(nn.Linear(12, 6), nn.ELU(), nn.Linear(6, 4)),
    "x*x": lambda: nn.Sequential(nn.Linear(12, 6), Square(), nn.Linear(6, 4)),
    "softmax": lambda: nn.Sequential(nn.Linear(12, 4), nn.Softmax(dim=1)),
    "layernorm": lambda: nn.Sequential(nn.Linear(12, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 4)),
    "custom-function": lambda: nn.Sequential(nn.Linear(12, 4), type("F", (nn.Module,), {
        "forward": lambda self, x: Scale.apply(x)})()),
    "sorted-features": lambda: Hidden(lambda h: h.index_select(1, h.detach().sum(0).argsort())),
    "dropout-left-on": lambda: Hidden(lambda h: nn.functional.dropout(h, 0.5), width=400),
    "large-detached-factor": lambda: Hidden(lambda h: h * torch.sigmoid(h).detach(), width=400),
    # samples that are not the first dim, or that mix
    "batch-last": BatchLast,
    "minus-batch-mean": lambda: Hidden(lambda h: torch.relu(h - h.mean(0, keepdim=True))),
    "batch-flip": lambda: Hidden(lambda h: torch.relu(h).flip(0)),
    "batch-transpose": lambda: Hidden(lambda h: torch.relu(h.t() @ h.detach()[:, :6]).t(), width=12),
    "batch-reshaped": lambda: Hidden(lambda h: torch.relu(h.reshape(h.shape[1], -1)).reshape(h.shape)),
}

#: Models whose Jacobian depends on the input through small tensors the graph does not connect
#: to it: certified, with those tensors' bytes in the signature.
HIDDEN_SMALL = {
    "relu-as-mask": lambda: Hidden(lambda h: h * (h > 0).to(h.dtype)),
    "times-detached": lambda: Hidden(lambda h: h * torch.sigmoid(h).detach()),
    "over-detached-norm": lambda: Hidden(lambda h: h / h.detach().norm(dim=1, keepdim=True)),
}


@pytest.mark.parametrize("name", sorted(HIDDEN_SMALL))
def test_small_tensors_computed_from_the_input_are_compared_by_value(name):
    """Soundness for hidden dependence: equal signatures and masks mean equal Jacobians."""
    torch.manual_seed(0)
    model = HIDDEN_SMALL[name]().double().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    p1, J1 = _pattern_and_jacobian(model, x)
    p2, J2 = _pattern_and_jacobian(model, x + 1e-3 * torch.randn(12, 12, generator=gen, dtype=torch.float64))
    p3, J3 = _pattern_and_jacobian(model, x.clone())
    assert p1 is not None
    assert regions.same_pattern(p1, p3, 12, x.device).all() and torch.equal(J1, J3)
    same = regions.same_pattern(p1, p2, 12, x.device)
    J_equal = torch.isclose(J1, J2, rtol=1e-12, atol=1e-14).flatten(1).all(1)
    assert not (same & ~J_equal).any()


@pytest.mark.parametrize("name", sorted(NOT_CERTIFIED))
def test_models_that_are_not_certified_get_none(name):
    torch.manual_seed(0)
    model = NOT_CERTIFIED[name]().double().eval()
    x = torch.randn(12, 12, dtype=torch.float64)
    assert _pattern(model, x)[0] is None


def test_batchnorm_in_training_mode_and_plain_callables_get_none():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).double()
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    assert _pattern(model.train(), x)[0] is None
    assert _pattern(model.eval(), x)[0] is not None
    assert _pattern(lambda v: model(v), x)[0] is None          # no parameters to certify constant


def test_the_signature_sees_python_control_flow_and_scalars():
    """Branches that read the input's values give different signatures, so rows computed on
    one branch are not reused on the other."""
    torch.manual_seed(0)
    a, b = nn.Linear(12, 4).double(), nn.Linear(12, 4).double()
    branch = nn.ModuleDict({"a": a, "b": b})
    x = torch.rand(5, 12, dtype=torch.float64)

    def pat(f):
        xg, logits = jacobian.forward_with_graph(f, x, x.shape[1:])
        return regions.activation_pattern(logits, xg, regions.model_constants(branch))

    p_a, p_b = pat(lambda v: a(torch.relu(v))), pat(lambda v: b(torch.relu(v)))
    p_2, p_3 = pat(lambda v: a(torch.relu(v)) * 2.0), pat(lambda v: a(torch.relu(v)) * 3.0)
    n = x.shape[0]
    assert regions.same_pattern(p_a, pat(lambda v: a(torch.relu(v))), n, x.device).all()
    assert not regions.same_pattern(p_a, p_b, n, x.device).any()
    assert not regions.same_pattern(p_2, p_3, n, x.device).any()


def _counting_rows(monkeypatch):
    """Counts the Jacobian rows the attack computes."""
    count = {"rows": 0}
    fresh = attack._fresh_rows

    def counted(*args):
        g = fresh(*args)
        count["rows"] += g.shape[0]
        return g
    monkeypatch.setattr(attack, "_fresh_rows", counted)
    return count


@pytest.mark.parametrize("norm", [2.0, float("inf")])
@pytest.mark.parametrize("name", ["relu-mlp", "residual-cnn", "clamped-cnn", "affine"])
def test_attack_reuses_rows_and_matches_the_deepfool_ref(name, norm, monkeypatch):
    """With bounds most later steps keep their region: fewer Jacobian rows than sample-steps,
    and the result of the per-sample DeepFool that computes every Jacobian."""
    model, shape = _build(name)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(24, *shape, generator=gen, dtype=torch.float64)
    count = _counting_rows(monkeypatch)
    res = ddfast.deepfool(model, x, bounds=(0.0, 1.0), norm=norm, max_iter=30)
    sd, si, ss, _, _ = deepfool_ref(model, x, bounds=(0.0, 1.0), norm=norm, max_iter=30)
    torch.testing.assert_close(res.delta, sd, rtol=1e-9, atol=1e-10)
    assert torch.equal(res.iterations, si) and torch.equal(res.success, ss)
    steps = int(res.iterations.sum())
    assert res.iterations.max() > 1 and count["rows"] < steps, (count, steps)


def test_a_new_signature_makes_the_attack_recompute_every_row(monkeypatch):
    """Masks equal, signatures not (e.g. control flow took another branch): nothing is reused."""
    model, shape = _build("relu-mlp")
    x = torch.rand(24, *shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    calls = []
    real = regions.activation_pattern

    def relabelled(*a):
        sig, masks = real(*a)
        calls.append(1)
        return (sig, len(calls)), masks
    monkeypatch.setattr(regions, "activation_pattern", relabelled)
    count = _counting_rows(monkeypatch)
    res = ddfast.deepfool(model, x, bounds=(0.0, 1.0))
    assert len(calls) > 1 and count["rows"] == int(res.iterations.sum())


@pytest.mark.parametrize("norm", [2.0, float("inf")])
def test_attack_with_labels_candidates_and_chunks_matches_the_deepfool_ref(norm, monkeypatch):
    """Reference classes that differ between samples (labels; some misclassified at the start),
    top-3 candidates and chunks: the rows reused are each sample's own."""
    model, shape = _build("residual-cnn")
    gen = torch.Generator().manual_seed(8)
    x = torch.rand(30, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (30,), generator=gen)
    count = _counting_rows(monkeypatch)
    kw = dict(bounds=(0.0, 1.0), norm=norm, max_iter=30, candidates=3)
    res = ddfast.deepfool(model, x, y, batch_size=7, **kw)
    sd, si, ss, _, _ = deepfool_ref(model, x, y, **kw)
    torch.testing.assert_close(res.delta, sd, rtol=1e-9, atol=1e-10)
    assert torch.equal(res.iterations, si) and torch.equal(res.success, ss)
    assert count["rows"] < int(res.iterations.sum()) and len(set(y.tolist())) > 2


class Stable(nn.Module):
    """A ReLU layer that stays active everywhere on [0, 1] (its pattern never changes, so rows
    are reused at every step) and a head that depends on x off the graph, by ``head``."""

    def __init__(self, head):
        super().__init__()
        self.l1, self.l2 = nn.Linear(20, 32), nn.Linear(32, 4)
        with torch.no_grad():
            self.l1.bias.fill_(5.0)
        self.W = nn.Parameter(torch.randn(2, 4, 32))
        self.head = head

    def forward(self, x):
        return self.head(self, torch.relu(self.l1(x.flatten(1))), x.detach())


def _view_of_a_parameter(m, h, x):      # a different view of one parameter per branch
    return h @ m.W[int(x.mean() > 0.5)].t()


def _size_only(m, h, x):                # control flow that changes a size only
    reps = 1 + int(x.sum() * 1000) % 3
    return m.l2(h.unsqueeze(1).expand(-1, reps, -1).sum(1))


def _edited_weight(m, h, x):            # a weight edited in place from x (its version changes)
    with torch.no_grad():
        m.l2.weight.mul_(1 + 0.1 * (x.mean() - 0.5))
    return m.l2(h)


class Normalised(nn.Module):
    """Mean / std as plain tensor attributes (not buffers), as many wrappers hold them."""

    def __init__(self, net):
        super().__init__()
        self.net, self.mean, self.std = net, torch.full((20,), 0.4, dtype=torch.float64), torch.full((20,), 0.3, dtype=torch.float64)

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def _near_the_box(B, seed):
    """Inputs with half their coordinates a hair inside [0, 1]: most steps get clipped."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 20, generator=g, dtype=torch.float64)
    edge = torch.rand(B, 20, generator=g) > 0.5
    return torch.where(edge, (x > 0.5).double() * 0.999 + 0.0005, x)


def test_the_signature_sees_views_sizes_and_edits():
    """Masks equal (the ReLU layer is active everywhere), signatures not: another view of a
    parameter, another size, a weight edited in place since."""
    torch.manual_seed(0)
    lo, hi = torch.full((3, 20), 0.2, dtype=torch.float64), torch.full((3, 20), 0.8, dtype=torch.float64)
    for head, a, b in ((_view_of_a_parameter, lo, hi), (_size_only, lo, lo + 1e-3), (_edited_weight, lo, lo)):
        model = Stable(head).double()
        pa, pb, pa2 = _pattern(model, a)[0], _pattern(model, b)[0], _pattern(model, a)[0]
        assert pa is not None and all(torch.equal(p, q) for p, q in zip(pa[1], pb[1]))
        assert not regions.same_pattern(pa, pb, 3, a.device).any(), head.__name__
        if head is not _edited_weight:
            assert regions.same_pattern(pa, pa2, 3, a.device).all(), head.__name__


@pytest.mark.parametrize("head", [_view_of_a_parameter, _size_only, _edited_weight], ids=lambda f: f.__name__)
def test_dependence_off_the_graph_is_seen(head, monkeypatch):
    """Which view of a parameter, a size, an in-place edit: the signature changes, so the
    attack gives what it gives computing every Jacobian. (The size and the edit read the whole
    batch, x.sum() / x.mean(): on more than one sample the attack refuses the model.)"""
    if head is not _view_of_a_parameter:
        with pytest.raises(ddfast.BatchCoupledModelError, match="change with the rest of its batch"):
            ddfast.deepfool(Stable(head).double(), _near_the_box(8, 4), bounds=(0.0, 1.0))
    for B, seed in ((1, 1), (1, 2), (8, 4)) if head is _view_of_a_parameter else ((1, 1), (1, 2), (1, 4)):
        x = _near_the_box(B, seed)
        out = []
        for reuse in (True, False):
            torch.manual_seed(0)
            model = Stable(head).double()
            monkeypatch.setattr(attack, "REUSE_JACOBIANS", reuse)
            out.append(ddfast.deepfool(model, x, bounds=(0.0, 1.0)))
        torch.testing.assert_close(out[0].delta, out[1].delta, rtol=1e-12, atol=1e-14)
        assert torch.equal(out[0].iterations, out[1].iterations)


def test_small_plain_tensor_constants_keep_the_reuse(monkeypatch):
    torch.manual_seed(0)
    model = Normalised(nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))).double()
    x = _near_the_box(24, 5)
    count = _counting_rows(monkeypatch)
    res = ddfast.deepfool(model, x, bounds=(0.0, 1.0))
    sd, si, _, _, _ = deepfool_ref(model, x, bounds=(0.0, 1.0))
    torch.testing.assert_close(res.delta, sd, rtol=1e-9, atol=1e-10)
    assert torch.equal(res.iterations, si) and count["rows"] < int(res.iterations.sum())


def test_attack_without_reuse_is_the_same(monkeypatch):
    model, shape = _build("relu-mlp")
    x = torch.rand(40, *shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    on = ddfast.deepfool(model, x, bounds=(0.0, 1.0))
    count = _counting_rows(monkeypatch)
    off = ddfast.deepfool(model, x, bounds=(0.0, 1.0), reuse_jacobians=False)
    assert count["rows"] == int(off.iterations.sum())
    torch.testing.assert_close(on.delta, off.delta, rtol=1e-12, atol=1e-14)
    assert torch.equal(on.iterations, off.iterations)
    monkeypatch.setattr(attack, "REUSE_JACOBIANS", False)          # the default of the argument
    count["rows"] = 0
    ddfast.deepfool(model, x, bounds=(0.0, 1.0))
    assert count["rows"] == int(off.iterations.sum())


def test_a_model_that_is_not_piecewise_linear_computes_every_row(monkeypatch):
    torch.manual_seed(0)
    model = NOT_CERTIFIED["tanh"]().double().eval()
    x = torch.rand(16, 12, dtype=torch.float64)
    count = _counting_rows(monkeypatch)
    res = ddfast.deepfool(model, x, bounds=(0.0, 1.0))
    assert count["rows"] == int(res.iterations.sum())


def test_without_bounds_the_attack_does_not_look(monkeypatch):
    """A step that stays in its region crosses the boundary: nothing to reuse without a clip."""
    model, shape = _build("relu-mlp")
    x = torch.rand(40, *shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    calls = []
    monkeypatch.setattr(regions, "activation_pattern", lambda *a: calls.append(1))
    res = ddfast.deepfool(model, x)
    assert not calls and res.iterations.max() > 1
