"""ddfast.deepfool against closed forms and a slow per-sample implementation (float64)."""
import math
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

import ddfast
from conftest import assert_no_side_effects, make_cnn, make_mlp
from ddfast.reference import deepfool_ref

INF = float("inf")


def _affine(K=4, D=6, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(D, K).double()
    return lin


def test_affine_one_step_closed_form():
    lin = _affine()
    W, b = lin.weight.detach(), lin.bias.detach()
    x = torch.randn(8, 6, dtype=torch.float64)
    res = ddfast.deepfool(lin, x, overshoot=0.02)
    f = x @ W.t() + b
    ref = f.argmax(1)
    for i in range(8):
        k0 = int(ref[i])
        best = min((abs(float(f[i, k] - f[i, k0])) / float((W[k] - W[k0]).norm()), k)
                   for k in range(4) if k != k0)
        dist, l = best
        w = W[l] - W[k0]
        expected = 1.02 * (dist + 1e-4) * w / w.norm()
        torch.testing.assert_close(res.delta[i], expected, rtol=1e-12, atol=1e-12)
        assert int(res.adv_label[i]) == l
    assert res.iterations.tolist() == [1] * 8
    assert res.success.all()
    torch.testing.assert_close(res.x_adv, x + res.delta)
    assert torch.equal(res.label, ref)


def test_affine_linf_one_step_closed_form():
    lin = _affine(seed=1)
    W, b = lin.weight.detach(), lin.bias.detach()
    x = torch.randn(5, 6, dtype=torch.float64)
    res = ddfast.deepfool(lin, x, norm=INF, overshoot=0.0)
    f = x @ W.t() + b
    for i in range(5):
        k0 = int(f[i].argmax())
        dist, l = min((abs(float(f[i, k] - f[i, k0])) / float((W[k] - W[k0]).abs().sum()), k)
                      for k in range(4) if k != k0)
        expected = (dist + 1e-4) * torch.sign(W[l] - W[k0])
        torch.testing.assert_close(res.delta[i], expected, rtol=1e-12, atol=1e-12)
    assert res.success.all()


def _compare(model, x, y=None, **kw):
    res = ddfast.deepfool(model, x, y, **kw)
    sd, si, ss, sl, sa = deepfool_ref(model, x, y, **{("max_iter" if k == "max_iter" else k): v
                                                        for k, v in kw.items()})
    torch.testing.assert_close(res.delta.flatten(1), sd.flatten(1), rtol=1e-9, atol=1e-10)
    assert torch.equal(res.iterations, si)
    assert torch.equal(res.success, ss)
    assert torch.equal(res.label, sl)
    assert torch.equal(res.adv_label, sa)
    return res


@pytest.mark.parametrize("norm", [2.0, INF])
@pytest.mark.parametrize("candidates", [None, 3])
def test_matches_slow_mlp(norm, candidates):
    model = make_mlp(k=6)
    x = torch.randn(12, 20, dtype=torch.float64)
    res = _compare(model, x, norm=norm, candidates=candidates, max_iter=30)
    assert res.success.float().mean() > 0.5  # the attack does something


def test_matches_slow_with_labels_and_bounds():
    model = make_mlp(k=5, seed=3)
    x = torch.rand(16, 20, dtype=torch.float64)
    y = torch.randint(0, 5, (16,))
    res = _compare(model, x, y, bounds=(0.0, 1.0), max_iter=20, overshoot=0.05)
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    mis = model(x).argmax(1) != y
    assert mis.any() and (~mis).any()
    assert (res.iterations[mis] == 0).all() and res.success[mis].all()
    assert (res.delta[mis] == 0).all()


def test_matches_slow_cnn_batchnorm_dropout_in_train_mode():
    model = make_cnn()
    model.train()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    model.eval()
    expected = deepfool_ref(model, x, max_iter=10)
    model.train()
    res = ddfast.deepfool(model, x, max_iter=10)
    assert model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(res.delta, expected[0], rtol=1e-9, atol=1e-10)
    assert torch.equal(res.iterations, expected[1])


def test_compaction_equals_per_sample_runs():
    model = make_mlp(k=7, seed=5)
    x = torch.randn(20, 20, dtype=torch.float64)
    whole = ddfast.deepfool(model, x)
    single = ddfast.deepfool(model, x, batch_size=1)
    chunks = ddfast.deepfool(model, x, batch_size=7)
    for other in (single, chunks):
        torch.testing.assert_close(whole.delta, other.delta, rtol=1e-12, atol=1e-13)
        assert torch.equal(whole.iterations, other.iterations)
    assert whole.iterations.unique().numel() > 1  # samples really left at different steps


def test_jacobian_routes_agree():
    from ddfast import jacobian
    model = make_cnn()
    model.eval()
    x = torch.randn(5, 64, dtype=torch.float64)
    xg, logits = jacobian.forward_with_graph(model, x, torch.Size([1, 8, 8]))
    a = jacobian.class_grads(model, xg, logits, method="batched")
    xg, logits = jacobian.forward_with_graph(model, x, torch.Size([1, 8, 8]))
    b = jacobian.class_grads(model, xg, logits, method="loop")
    xg, logits = jacobian.forward_with_graph(model, x, torch.Size([1, 8, 8]))
    rep = jacobian.class_grads(model, xg, logits, method="replicate", shape=torch.Size([1, 8, 8]))
    full = torch.autograd.functional.jacobian(lambda v: model(v.view(5, 1, 8, 8)), x)  # [5,K,5,D]
    expected = torch.stack([full[i, :, i] for i in range(5)])
    torch.testing.assert_close(a, expected)
    torch.testing.assert_close(b, expected)
    torch.testing.assert_close(rep, expected)
    cls = torch.tensor([[0, 2], [1, 3], [3, 0], [2, 1], [0, 1]])
    rows = torch.tensor([0, 2, 4])
    xg, logits = jacobian.forward_with_graph(model, x, torch.Size([1, 8, 8]))
    c = jacobian.class_grads(model, xg, logits, cls[rows], rows)
    torch.testing.assert_close(c, torch.stack([expected[i, cls[i]] for i in rows.tolist()]))
    d = jacobian.class_grads(model, xg, logits, cls[rows], rows, method="replicate",
                             shape=torch.Size([1, 8, 8]))
    torch.testing.assert_close(d, c)


@pytest.mark.parametrize("create_graph", [False, True])
def test_engine_batched_backward_equals_autograd_grad(create_graph):
    """The attack's vmapped backward skips autograd.grad's per-call Python; it must give what
    autograd.grad(is_grads_batched=True) gives, bit for bit, first and second order."""
    from ddfast import jacobian
    assert jacobian._engine_run_backward is not None, "the fast batched backward is unavailable on this torch"
    model = make_cnn(dtype=torch.float32).eval()
    x = torch.randn(5, 64)
    go = jacobian.directions(5, 4, torch.tensor([[1, 2], [0, 3], [1, 0], [3, 2], [2, 1]]),
                             torch.zeros(1), torch.tensor([0, 1, 2, 3, 0]))
    out = []
    for fast in (True, False):
        xg, logits = jacobian.forward_with_graph(model, x, torch.Size([1, 8, 8]))
        if fast:
            g = jacobian._engine_batched(logits, xg, go, create_graph, create_graph)
        else:
            (g,) = torch.autograd.grad(logits, xg, go, is_grads_batched=True, create_graph=create_graph)
        assert g.requires_grad == create_graph
        second = torch.autograd.grad(g.square().sum(), model[0].weight)[0] if create_graph else None
        out.append((g, second))
    assert torch.equal(out[0][0], out[1][0])
    if create_graph:
        assert torch.equal(out[0][1], out[1][1])


def test_engine_signature_mismatch_falls_back_to_autograd_grad(monkeypatch):
    """A torch whose private engine call takes other arguments: the public call from then on."""
    from ddfast import jacobian

    def other_signature(*args, **kwargs):
        raise TypeError("run_backward(): incompatible function arguments")

    model = make_mlp(k=5, seed=3)
    x = torch.randn(6, 20, dtype=torch.float64)
    expected = ddfast.deepfool(model, x)
    monkeypatch.setattr(jacobian, "_engine_run_backward", other_signature)
    res = ddfast.deepfool(model, x)
    assert jacobian._engine_run_backward is None
    torch.testing.assert_close(res.delta, expected.delta, rtol=1e-12, atol=1e-13)
    assert torch.equal(res.iterations, expected.iterations)


def test_tensor_subclass_input_takes_the_public_autograd_path():
    from ddfast import jacobian

    class Tagged(torch.Tensor):
        pass

    model = make_mlp(k=5, seed=3)
    x = torch.randn(6, 20, dtype=torch.float64)
    expected = ddfast.deepfool(model, x)
    xg, logits = jacobian.forward_with_graph(model, x.as_subclass(Tagged), torch.Size([20]))
    assert type(xg) is Tagged and not jacobian._fast_path_ok(logits, xg)
    res = ddfast.deepfool(model, x.as_subclass(Tagged))
    torch.testing.assert_close(res.delta.as_subclass(torch.Tensor), expected.delta, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_model_gives_eager_result(backend):
    model = make_cnn(dtype=torch.float32).eval()
    x = torch.randn(6, 1, 8, 8)
    eager = ddfast.deepfool(model, x, max_iter=10)
    compiled = torch.compile(model, backend=backend)
    res = ddfast.deepfool(compiled, x, max_iter=10)
    torch.testing.assert_close(res.delta, eager.delta, rtol=1e-4, atol=1e-5)
    assert torch.equal(res.iterations, eager.iterations)


class _NoVmapSquare(torch.autograd.Function):
    """x**2 whose backward reads a Python number from its input (.item()), which a vmapped
    backward cannot do: the batched Jacobian route fails on it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        scale = g.new_tensor(2.0 + 0.0 * g.sum().item())
        return scale * x * g


def test_vmap_failure_falls_back_to_replicate_with_the_same_result():
    from ddfast import jacobian
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(6, 8).double(), torch.nn.Linear(8, 4).double()

    def plain(v):
        return lin2(torch.tanh(lin1(v)) ** 2)

    def custom(v):
        return lin2(_NoVmapSquare.apply(torch.tanh(lin1(v))))

    x = torch.randn(7, 6, dtype=torch.float64)
    expected = ddfast.deepfool(plain, x, max_iter=10)
    res = ddfast.deepfool(custom, x, max_iter=10)
    assert jacobian._known_failure(custom)      # vmap failed once and the fallback was used
    torch.testing.assert_close(res.delta, expected.delta, rtol=1e-10, atol=1e-12)
    assert torch.equal(res.iterations, expected.iterations)


def test_anomaly_mode_uses_the_fallback_without_marking_the_model():
    """Anomaly mode breaks the vmapped backward; one debugging call must not slow the model
    down for the rest of the process, nor print anomaly mode's error traces."""
    import warnings

    from ddfast import jacobian
    torch.manual_seed(0)
    model = make_mlp(k=4)
    x = torch.randn(6, 20, dtype=torch.float64)
    expected = ddfast.deepfool(model, x, max_iter=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # anomaly mode reports a failed backward as a warning
        with torch.autograd.set_detect_anomaly(True):
            res = ddfast.deepfool(model, x, max_iter=10)
    assert not jacobian._known_failure(model)
    torch.testing.assert_close(res.delta, expected.delta, rtol=1e-10, atol=1e-12)
    assert torch.equal(res.iterations, expected.iterations)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_float32_close_to_float64(dtype):
    model64 = make_mlp(k=5, seed=2)
    x64 = torch.randn(30, 20, dtype=torch.float64)
    res64 = ddfast.deepfool(model64, x64)
    model = make_mlp(k=5, seed=2, dtype=dtype)
    res = ddfast.deepfool(model, x64.to(dtype))
    assert res.delta.dtype == dtype and res.x_adv.dtype == dtype
    same = res.iterations == res64.iterations
    assert same.float().mean() > 0.9
    rel = (res.norms()[same].double() - res64.norms()[same]).abs() / res64.norms()[same]
    assert float(rel.max()) < (1e-4 if dtype == torch.float32 else 1e-12)


def test_flat_classifier_never_nan():
    def flat(x):
        return torch.zeros(x.shape[0], 3, dtype=x.dtype) + 0.0 * x.sum(1, keepdim=True)
    x = torch.randn(4, 5, dtype=torch.float64)
    res = ddfast.deepfool(flat, x, max_iter=3)
    assert torch.isfinite(res.delta).all()
    assert (res.delta == 0).all() and not res.success.any()
    assert res.iterations.tolist() == [3] * 4


def test_max_iter_zero_and_empty_batch():
    model = make_mlp()
    x = torch.randn(3, 20, dtype=torch.float64)
    res = ddfast.deepfool(model, x, max_iter=0)
    assert (res.delta == 0).all() and not res.success.any() and (res.iterations == 0).all()
    empty = ddfast.deepfool(model, x[:0])
    assert empty.delta.shape == (0, 20) and empty.iterations.shape == (0,)
    assert len(empty) == 0


def test_no_side_effects():
    assert_no_side_effects(lambda model, x: ddfast.deepfool(model, x, max_iter=5),
                           torch.randn(4, 1, 8, 8, dtype=torch.float64))


def test_inference_mode_input():
    model = make_mlp()
    with torch.inference_mode():
        x = torch.randn(3, 20, dtype=torch.float64)
        res = ddfast.deepfool(model, x, max_iter=5)
    assert res.success.any()


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.tensor([[float("nan")] * 20])), "x contains NaN"),
    (dict(x=torch.ones(2, 20, dtype=torch.int64)), "x must be a floating"),
    (dict(x=torch.ones(2, 20, dtype=torch.complex64)), "x must be a floating"),
    (dict(y=torch.tensor([0, 9])), r"y holds labels outside \[0, 5\)"),
    (dict(y=torch.tensor([0, 1, 2])), r"y must have shape \[2\]"),
    (dict(y=torch.tensor([0.0, 1.0])), "y must hold integer"),
    (dict(norm=3), "norm must be 2 or inf"),
    (dict(norm="l3"), "norm must be"),
    (dict(max_iter=-1), "max_iter"),
    (dict(candidates=1), "candidates"),
    (dict(overshoot=-0.1), "overshoot"),
    (dict(bounds=(1.0, 0.0)), "bounds"),
    (dict(norm=-math.inf), "norm must be 2 or inf"),
    (dict(bounds=(math.nan, None)), "bounds must not be NaN"),
    (dict(bounds=(None, math.nan)), "bounds must not be NaN"),
    (dict(bounds="ab"), "bounds must be a pair of numbers"),
    (dict(bounds=(torch.zeros(20), torch.ones(20))), "x lies outside bounds"),   # tensor bounds are checked too
    (dict(x=torch.randn(20, dtype=torch.float64)), r"x must have shape \[B, \.\.\.\].*x\[None\]"),
    (dict(batch_size=0), "batch_size"),
    (dict(x=torch.full((2, 20), 255.0, dtype=torch.float64), bounds=(0.0, 1.0)),
     r"x lies outside bounds \(above hi\) at 40 of 40 entries"),
    (dict(x=torch.full((2, 20), -0.5, dtype=torch.float64), bounds=(0.0, None)), r"x lies outside bounds \(below lo\) at 40 of 40 entries"),
])
def test_bad_input(bad, match):
    model = make_mlp(k=5)
    args = dict(x=torch.randn(2, 20, dtype=torch.float64), y=None)
    args.update(bad)
    x, y = args.pop("x"), args.pop("y")
    with pytest.raises((ValueError, TypeError), match=match):
        ddfast.deepfool(model, x, y, **args)


@pytest.mark.parametrize("out, match", [
    (lambda x: x.sum(1), r"logits of shape \[B, K\]"),
    (lambda x: x[:, :1], "at least 2 classes"),
    (lambda x: x[:1, :3], r"logits of shape \[B, K\] = \[2, K\]"),
    (lambda x: "no", "must return a logits tensor"),
    (lambda x: torch.cat([x[:, :2], torch.full_like(x[:, :1], math.nan)], 1), r"NaN or Inf logits at x for 2 of 2"),
    (lambda x: x[:, :3].detach(), "carry no gradient back to its input"),
])
def test_bad_model_output(out, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ddfast.deepfool(out, torch.randn(2, 4, dtype=torch.float64))


def test_detached_logits_are_refused_only_when_a_step_needs_gradients():
    lin = torch.nn.Linear(6, 3).double()
    x = torch.randn(4, 6, dtype=torch.float64)

    def detached(z):
        return lin(z).detach()

    assert not ddfast.deepfool(detached, x, max_iter=0).delta.any()          # no step, no gradient
    wrong = (lin(x).argmax(1) + 1) % 3                                        # every sample misclassified
    assert ddfast.deepfool(detached, x, wrong).success.all()
    with pytest.raises(ValueError, match="carry no gradient back to its input"):
        ddfast.deepfool(detached, x)


def test_model_dtype_mismatch_error_names_the_dtypes():
    """float64 x into a float32 model: torch's own error ("mat1 and mat2 must have the same
    dtype") gets a note that names x's dtype and the model's; a model that casts x itself
    still works."""
    model = make_mlp(k=5, seed=2).float()
    x = torch.randn(4, 20, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.int64)
    note = r"x is torch.float64 but the model's parameters are torch.float32"
    with pytest.raises(RuntimeError, match=note):
        ddfast.deepfool(model, x)
    with pytest.raises(RuntimeError, match=note):
        ddfast.deepdefense_loss(model, x, y)
    with pytest.raises(RuntimeError, match=note):
        ddfast.metrics.accuracy(model, x, y)

    class Casting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, t):
            return self.net(t.float()).double()

    res = ddfast.deepfool(Casting(), x)
    assert res.delta.dtype == torch.float64 and bool(res.success.all())


@pytest.mark.parametrize("batch_size", [None, 3])
def test_nonfinite_logits_at_an_iterate_stop_that_sample_unsuccessful(batch_size):
    """A model that returns NaN (or Inf) at some iterates (e.g. a float16 overflow): those
    samples stop there with success=False and a warning; argmax of a NaN row is never taken
    for a changed prediction. The other samples get exactly their normal result."""
    model = make_mlp(k=5, seed=2)
    x = torch.randn(8, 20, dtype=torch.float64)
    poisoned = torch.arange(8) % 3 == 0                   # samples 0, 3, 6

    def flaky(t):
        out = model(t)
        nearest = torch.cdist(t, x).argmin(1)             # which sample this row belongs to
        moved = (t - x[nearest]).abs().amax(1) > 0
        bad = moved & poisoned[nearest]
        fill = torch.where(nearest == 3, math.inf, math.nan).to(out.dtype)   # +Inf for one, NaN for two
        return torch.where(bad[:, None], fill[:, None].expand_as(out), out)

    with pytest.warns(RuntimeWarning, match="NaN or Inf logits at the iterate of 3 sample"):
        res = ddfast.deepfool(flaky, x, batch_size=batch_size)
    normal = ddfast.deepfool(model, x)
    assert not res.success[poisoned].any()
    assert (res.iterations[poisoned] == 1).all()
    assert torch.equal(res.adv_label[poisoned], res.label[poisoned])
    ok = ~poisoned
    torch.testing.assert_close(res.delta[ok], normal.delta[ok], rtol=1e-12, atol=1e-13)
    assert torch.equal(res.success[ok], normal.success[ok]) and bool(normal.success[ok].all())


def test_logits_beyond_float32_range_are_finite():
    """The per-step finiteness test first sums the logits in float32: float64 logits too large
    for float32 must still count as finite (the exact test decides), with the normal result
    (DeepFool does not change when the logits are scaled)."""
    model = make_mlp(k=5, seed=2)
    x = torch.randn(8, 20, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = ddfast.deepfool(lambda t: model(t) * 1e39, x)
    normal = ddfast.deepfool(model, x)
    assert bool(normal.success.all()) and torch.equal(res.success, normal.success)
    assert torch.equal(res.iterations, normal.iterations)
    torch.testing.assert_close(res.delta, normal.delta, rtol=1e-9, atol=1e-12)


def test_x_on_its_bounds_up_to_rounding_is_accepted():
    """Bounds computed in the preprocessed space may miss x's extremes by an ulp: accepted, and
    the clip's move is that ulp, not a perturbation."""
    model = make_mlp(k=5).float()
    x = torch.rand(4, 20)
    x[0, 0], x[1, 1] = 1.0 + 2e-7, -1e-7           # two float32 ulps past 1, a rounding below 0
    res = ddfast.deepfool(model, x, bounds=(0.0, 1.0))
    assert res.success.any()
    with pytest.raises(ValueError, match="outside bounds"):
        ddfast.deepfool(model, x + 1e-3, bounds=(0.0, 1.0))


def test_torchattacks_style_dropin():
    model = make_mlp(k=5).float()
    x = torch.rand(8, 20)
    y = model(x).argmax(1)
    atk = ddfast.attacks.DeepFool(model, steps=50, overshoot=0.02)
    adv = atk(x, y)
    assert adv.shape == x.shape and float(adv.min()) >= 0 and float(adv.max()) <= 1
    torch.testing.assert_close(adv, atk.last_result.x_adv)
    assert (model(adv).argmax(1) != y).float().mean() > 0.5


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=-1), "steps"), (dict(steps=2.5), "steps"), (dict(overshoot=-0.1), "overshoot"),
    (dict(norm=3), "norm"), (dict(candidates=1), "candidates"), (dict(bounds=(1, 0)), "bounds"),
    (dict(batch_size=0), "batch_size"),
])
def test_torchattacks_style_checks_settings_at_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ddfast.attacks.DeepFool(make_mlp(k=3).float(), **kwargs)
    with pytest.raises(TypeError, match="model"):
        ddfast.attacks.DeepFool("not a model")


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 6), K=st.integers(2, 6), D=st.integers(1, 9),
       norm=st.sampled_from([2.0, INF]), cand=st.sampled_from([None, 2, 3]),
       seed=st.integers(0, 10_000))
def test_hypothesis_shapes_against_slow(B, K, D, norm, cand, seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.Tanh(), torch.nn.Linear(8, K)).double()
    x = torch.randn(B, D, dtype=torch.float64)
    res = ddfast.deepfool(model, x, max_iter=8, norm=norm, candidates=cand)
    sd, si, ss, sl, sa = deepfool_ref(model, x, max_iter=8, norm=norm, candidates=cand)
    torch.testing.assert_close(res.delta, sd, rtol=1e-8, atol=1e-10)
    assert torch.equal(res.iterations, si) and torch.equal(res.success, ss)
    assert torch.isfinite(res.delta).all()


def test_noncontiguous_and_channels_last_inputs():
    model = make_cnn().eval()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    base = ddfast.deepfool(model, x, max_iter=10)
    cl = ddfast.deepfool(model, x.to(memory_format=torch.channels_last), max_iter=10)
    strided = torch.stack([x, torch.zeros_like(x)], -1)[..., 0]   # x through a strided view
    assert not strided.is_contiguous()
    nc = ddfast.deepfool(model, strided, max_iter=10)
    for other in (cl, nc):
        torch.testing.assert_close(other.delta, base.delta, rtol=1e-12, atol=1e-13)
        assert torch.equal(other.iterations, base.iterations)


def test_model_and_input_on_different_devices():
    model = make_mlp().to("meta")
    with pytest.raises(ValueError, match="x is on cpu but the model's parameters are on meta"):
        ddfast.deepfool(model, torch.randn(2, 20, dtype=torch.float64))


def test_meta_input_is_refused_with_a_message():
    with pytest.raises(ValueError, match="x is on the meta device"):
        ddfast.deepfool(make_mlp(), torch.randn(2, 20, dtype=torch.float64, device="meta"))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_deepfool_runs_the_chosen_backend(backend, monkeypatch):
    """The loop calls its ops without per-call dispatch, on the backend chosen when the attack
    starts (set_backend / DDFAST_BACKEND / the device default): the others are never called."""
    if backend not in ddfast.available_backends():
        pytest.skip(f"backend {backend} is not available here")
    from ddfast import backends

    calls = []
    for name in ddfast.available_backends():
        mod = backends.load(name)
        for op in ("select_boundary", "deepfool_update"):
            real = getattr(mod, op)
            monkeypatch.setattr(mod, op, lambda *a, _r=real, _n=name, **k: (calls.append(_n), _r(*a, **k))[1])
    model = make_mlp(k=4)
    x = torch.randn(6, 20, dtype=torch.float64)
    with ddfast.set_backend(backend):
        res = ddfast.deepfool(model, x, max_iter=10)
    assert calls and set(calls) == {backend}
    want = deepfool_ref(model, x, max_iter=10)[0]
    torch.testing.assert_close(res.delta, want, rtol=1e-8, atol=1e-10)
