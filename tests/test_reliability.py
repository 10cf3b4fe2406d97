"""Reliability of the library's entry points: settings checked up front, no draws from torch's global
generator, no code path that unpickles arbitrary objects, the TF32 warning. (The command line and
the training loop: tests/paper/test_cli_reliability.py.)"""
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import ddfast
from ddfast.reference import deepfool_ref


@pytest.mark.parametrize("arg,value", [("lam", -1.0), ("c", float("nan")), ("d", -2), ("overshoot", -0.1),
                                       ("max_iter", -1), ("max_iter", 2.0), ("candidates", 1)])
def test_deepdefense_module_checks_settings(arg, value):
    from ddfast import DeepDefense

    with pytest.raises(TypeError if isinstance(value, float) and arg == "max_iter" else ValueError, match=arg):
        DeepDefense(torch.nn.Linear(4, 3), **{arg: value})


def test_attack_regularizer_metrics_use_no_global_rng():
    """None of them draws from torch's global generator (nor changes the grad mode)."""
    import ddfast
    from conftest import make_cnn
    from ddfast import metrics

    m = make_cnn(k=4)
    m.train()  # dropout would draw random numbers if it were left on
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=g)
    calls = {
        "deepfool": lambda: ddfast.deepfool(m, x, y, max_iter=5),
        "deepdefense_loss": lambda: ddfast.deepdefense_loss(m, x, y, max_iter=3).backward(),
        "evaluate": lambda: metrics.evaluate(m, x, y, eps_ref=0.1, max_iter=5, progress=False),
    }
    for name, call in calls.items():
        rng = torch.get_rng_state()
        call()
        assert torch.equal(torch.get_rng_state(), rng), name
        assert torch.is_grad_enabled() and m.training, name


def test_no_code_path_unpickles_arbitrary_objects():
    """Static guard over the package source: every ``torch.load`` passes ``weights_only=True``, and
    ``pickle.load``/``loads``/``Unpickler`` appear only in the restricted CIFAR reader."""
    import ast

    import ddfast

    root = Path(ddfast.__file__).parent
    loads, bare = 0, []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            if (owner, node.func.attr) == ("torch", "load"):
                loads += 1
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                assert ok, f"{path}:{node.lineno}: torch.load without weights_only=True"
            elif owner == "pickle" and node.func.attr in ("load", "loads", "Unpickler"):
                bare.append(f"{path.name}:{node.lineno}")
    assert loads >= 1  # the guard sees the reader
    assert not bare, bare


class _FakeCuda:
    """Stands in for a float32 CUDA tensor where only ``is_cuda`` and ``dtype`` are read."""
    is_cuda = True
    dtype = torch.float32


@pytest.fixture
def tf32_flags():
    saved = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    yield
    torch.backends.cudnn.allow_tf32 = saved[0]
    torch.set_float32_matmul_precision(saved[1])


def test_tf32_warning_names_what_runs_in_tf32(tf32_flags):
    from ddfast.validate import tf32_in_use, warn_tf32

    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 26 * 26, 10))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("highest")
    assert tf32_in_use(conv, _FakeCuda()) == "convolutions"
    assert tf32_in_use(mlp, _FakeCuda()) is None
    assert tf32_in_use(conv, torch.zeros(1)) is None               # CPU tensors: never
    torch.set_float32_matmul_precision("high")
    assert tf32_in_use(mlp, _FakeCuda()) == "matmuls"
    assert tf32_in_use(conv, _FakeCuda()) == "convolutions and matmuls"
    with pytest.warns(UserWarning, match="allow_tf32 = False"):
        warn_tf32(conv, _FakeCuda(), "ddfast.deepfool")
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    assert tf32_in_use(conv, _FakeCuda()) is None


def test_deepfool_on_cpu_does_not_warn_about_tf32():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 26 * 26, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ddfast.deepfool(model, torch.rand(2, 1, 28, 28), max_iter=2)


# ------------------------------------------------------------------- round 2 (issue 19)
def _mlp(seed=0, k=4, d=6):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 12), nn.ReLU(), nn.Linear(12, k)).double()


def _coupled_models(net):
    bn = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12, track_running_stats=False), nn.ReLU(),
                       nn.Linear(12, 4)).double()
    return {"mean over the batch": lambda z: net(z - z.mean(0, keepdim=True)), "batch statistics": bn}


@pytest.mark.parametrize("kind", ["mean over the batch", "batch statistics"])
def test_batch_coupled_models_are_refused(kind):
    net = _mlp()
    model = _coupled_models(net)[kind]
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    with pytest.raises(ddfast.BatchCoupledModelError, match="sample"):
        ddfast.deepfool(model, x)
    with pytest.raises(ddfast.BatchCoupledModelError, match="sample"):
        ddfast.deepfool(model, x, batch_size=2)
    with pytest.raises(ddfast.BatchCoupledModelError, match="sample"):
        ddfast.deepdefense_loss(model, x, y)
    if kind == "mean over the batch":
        ddfast.deepfool(model, x[:1])                  # one sample has no batch to depend on


class _InPlace(nn.Module):
    """Works on its input in place first, as many real models do."""

    def __init__(self, net, how):
        super().__init__()
        self.net, self.how = net, how

    def forward(self, z):
        z = z.mul_(2) if self.how == "mul_" else torch.relu_(z)
        return self.net(z)


@pytest.mark.parametrize("how", ["mul_", "relu_"])
def test_models_that_work_in_place_run_and_leave_x_untouched(how):
    net = _mlp(1)
    plain = (lambda z: net(z * 2)) if how == "mul_" else (lambda z: net(torch.relu(z)))
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    x_before = x.clone()
    got, want = ddfast.deepfool(_InPlace(net, how), x), ddfast.deepfool(plain, x)
    assert torch.equal(x, x_before)
    torch.testing.assert_close(got.delta, want.delta)
    r_got = ddfast.deepdefense_loss(_InPlace(net, how), x, y)
    torch.testing.assert_close(r_got, ddfast.deepdefense_loss(plain, x, y))
    xr = x.clone().requires_grad_(True)
    ddfast.deepdefense_loss(_InPlace(net, how), xr, y).backward()
    assert torch.equal(x, x_before) and xr.grad is not None


class _Stateful(nn.Module):
    """Draws random numbers it does not use, counts its calls in a buffer in place and by
    rebinding another."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.register_buffer("rebound", torch.zeros(()))

    def forward(self, z):
        self.calls += 1
        self.rebound = self.rebound + 1
        return self.net(z) + 0 * torch.rand(()).to(z.dtype)


@pytest.mark.parametrize("entry", ["deepfool", "deepdefense_loss", "metrics.rho2"])
def test_rng_state_and_buffers_are_restored(entry):
    model = _Stateful(_mlp(2))
    x, y = torch.randn(6, 6, dtype=torch.float64), torch.randint(0, 4, (6,))
    calls, rebound = model.calls, model.rebound
    torch.manual_seed(123)
    state = torch.get_rng_state()
    {"deepfool": lambda: ddfast.deepfool(model, x), "deepdefense_loss": lambda: ddfast.deepdefense_loss(model, x, y),
     "metrics.rho2": lambda: ddfast.metrics.rho2(model, x, progress=False)}[entry]()
    assert torch.equal(torch.get_rng_state(), state)
    assert model.calls is calls and int(calls) == 0
    assert model.rebound is rebound and float(rebound) == 0.0


def test_numpy_scalars_are_taken_like_python_numbers():
    np = pytest.importorskip("numpy")
    model, x = _mlp(3), torch.randn(6, 6, dtype=torch.float64)
    want = ddfast.deepfool(model, x, max_iter=5, overshoot=0.02, candidates=3, batch_size=2, norm=2)
    got = ddfast.deepfool(model, x, max_iter=np.int64(5), overshoot=np.float32(0.02), candidates=np.int64(3),
                          batch_size=np.int64(2), norm=np.float64(2))
    torch.testing.assert_close(got.delta, want.delta, rtol=1e-6, atol=1e-9)  # overshoot 0.02 in float32


@pytest.mark.parametrize("kw, exc, arg", [
    ({"max_iter": "5"}, TypeError, "max_iter"), ({"max_iter": 2.0}, TypeError, "max_iter"),
    ({"overshoot": "0.1"}, TypeError, "overshoot"), ({"candidates": 2.5}, TypeError, "candidates"),
    ({"batch_size": "2"}, TypeError, "batch_size"), ({"max_iter": -1}, ValueError, "max_iter"),
    ({"overshoot": float("nan")}, ValueError, "overshoot"), ({"norm": "l3"}, ValueError, "norm"),
])
def test_wrong_types_raise_type_error_and_wrong_values_value_error(kw, exc, arg):
    with pytest.raises(exc, match=arg):
        ddfast.deepfool(_mlp(), torch.randn(3, 6, dtype=torch.float64), **kw)


def test_messages_name_the_real_problem():
    x = torch.randn(3, 6, dtype=torch.float64)
    with pytest.raises(TypeError, match="model must be a callable"):
        ddfast.deepfool(3, x)
    with pytest.raises(TypeError, match="model must be a callable"):
        ddfast.deepdefense_loss(3, x, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="no features"):
        ddfast.deepfool(_mlp(), torch.randn(3, 0, dtype=torch.float64))
    with pytest.raises(ValueError, match="backend"):
        ddfast.DeepDefense(_mlp(), backend="nope")
    with pytest.raises(ValueError, match="method"):
        ddfast.deepdefense_loss(_mlp(), x, torch.zeros(3, dtype=torch.int64), max_iter=0, method="nope")


@pytest.mark.parametrize("name", ["predict", "accuracy", "fgs_direction", "fgs_error", "fgs_eps50", "rho_inf",
                                  "acc_at_eps", "evaluate", "rho2"])
def test_metrics_take_plain_callables_and_leave_x_untouched(name):
    from ddfast import metrics

    net = _mlp(5)
    x, x_before = torch.rand(6, 6, dtype=torch.float64), None
    x_before = x.clone()
    y = net(x).argmax(1)
    in_place = _InPlace(net, "relu_")                          # relu_ on its input first
    plain = lambda z: net(torch.relu(z))                       # noqa: E731
    direction = torch.ones_like(x)
    calls = {"predict": lambda m: metrics.predict(m, x), "accuracy": lambda m: metrics.accuracy(m, x, y),
             "fgs_direction": lambda m: metrics.fgs_direction(m, x, y),
             "fgs_error": lambda m: metrics.fgs_error(m, x, y, direction, 0.1),
             "fgs_eps50": lambda m: metrics.fgs_eps50(m, x, y), "rho_inf": lambda m: metrics.rho_inf(m, x, y),
             "acc_at_eps": lambda m: metrics.acc_at_eps(m, x, y, [0.1]),
             "evaluate": lambda m: metrics.evaluate(m, x, y, progress=False)["acc"],
             "rho2": lambda m: metrics.rho2(m, x, progress=False).rho2}
    a, b = calls[name](plain), calls[name](in_place)
    assert torch.equal(x, x_before)
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == pytest.approx(b, rel=1e-9) if not isinstance(a, tuple) else a == pytest.approx(b, rel=1e-9)


def test_fgs_error_names_a_nan_direction():
    from ddfast import metrics

    net, x = _mlp(6), torch.rand(4, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="direction contains NaN"):
        metrics.fgs_error(net, x, net(x).argmax(1), torch.full_like(x, float("nan")), 0.1)


def _conv(seed=7):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).double()


@pytest.mark.parametrize("kind", ["per channel", "per pixel", "per sample", "numbers"])
@pytest.mark.parametrize("kw", [{}, {"batch_size": 3}, {"labels": True}, {"check_every": 4}])
def test_tensor_bounds_match_the_reference(kind, kw):
    kw = dict(kw)
    model = _conv()
    torch.manual_seed(1)
    x = torch.rand(8, 3, 6, 6, dtype=torch.float64)
    lo = {"per channel": torch.tensor([-0.2, 0.0, -0.1], dtype=torch.float64).view(3, 1, 1),
          "per pixel": -0.3 * torch.rand(3, 6, 6, dtype=torch.float64),
          "per sample": x - 0.05 - 0.2 * torch.rand_like(x), "numbers": -0.1}[kind]
    hi = {"per channel": torch.tensor([1.0, 1.2, 1.1], dtype=torch.float64).view(3, 1, 1),
          "per pixel": 1 + 0.3 * torch.rand(3, 6, 6, dtype=torch.float64),
          "per sample": x + 0.05 + 0.2 * torch.rand_like(x), "numbers": 1.1}[kind]
    y = None
    if kw.pop("labels", False):
        y = model(x).argmax(1)
        y[::3] = (y[::3] + 1) % 5
    got = ddfast.deepfool(model, x, y, bounds=(lo, hi), max_iter=20, **kw)
    delta, it, success, label, adv = deepfool_ref(model, x, y, bounds=(lo, hi), max_iter=20)
    torch.testing.assert_close(got.delta, delta, rtol=1e-9, atol=1e-12)
    assert torch.equal(got.iterations, it) and torch.equal(got.success, success)
    lo_b, hi_b = (torch.as_tensor(b, dtype=x.dtype).expand_as(x) for b in (lo, hi))
    assert bool((got.x_adv >= lo_b).all() and (got.x_adv <= hi_b).all())


def test_bounds_errors_are_short_and_name_the_problem():
    model, x = _conv(), torch.rand(4, 3, 6, 6, dtype=torch.float64)
    cases = [((torch.zeros(5, 1, 1), 1.0), "does not broadcast"), ((0.0, torch.full((3, 1, 1), float("nan"))), "NaN"),
             ((torch.ones(3, 1, 1), torch.zeros(3, 1, 1)), "lo > hi"), ((torch.full((3, 6, 6), 0.5), 1.0),
                                                                       "x lies outside bounds")]
    for bounds, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            ddfast.deepfool(model, x, bounds=bounds)
        assert len(str(info.value)) < 300, str(info.value)


def test_the_applications_normalised_bounds_work():
    """Mean-subtracted MNIST: Prepared.bounds are [1, C, H, W] tensors (per pixel)."""
    from ddfast.paper import data

    prep = data.prepare("mnist")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    res = ddfast.deepfool(model, prep.x_test[:16], bounds=prep.bounds, max_iter=10)
    lo, hi = prep.bounds
    assert bool((res.x_adv >= lo).all() and (res.x_adv <= hi).all()) and bool(res.success.any())
