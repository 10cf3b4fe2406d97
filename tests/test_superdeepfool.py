"""ddfast.superdeepfool against its slow reference (float64), a closed form, DeepFool and bad input."""
import inspect
import math
import re
import sys

import pytest
import torch
from conftest import assert_no_side_effects, make_cnn, make_mlp

import ddfast
from ddfast.metrics import rho2
from ddfast.reference import superdeepfool_ref

SDF = sys.modules["ddfast.superdeepfool"]   # the module: ddfast.superdeepfool is the function


def _compare(model, x, y=None, **kw):
    res = ddfast.superdeepfool(model, x, y, **kw)
    kw.pop("batch_size", None)
    kw.setdefault("candidates", inspect.signature(ddfast.superdeepfool).parameters["candidates"].default)
    delta, iterations, success, label, adv_label = superdeepfool_ref(
        model, x, y, restart_candidates=SDF.RESTART_CANDIDATES, projection_overshoot=SDF.PROJECTION_OVERSHOOT, **kw)
    torch.testing.assert_close(res.delta, delta, rtol=1e-9, atol=1e-10)
    assert torch.equal(res.iterations, iterations)
    assert torch.equal(res.success, success)
    assert torch.equal(res.label, label)
    assert torch.equal(res.adv_label, adv_label)
    torch.testing.assert_close(res.x_adv, x + res.delta)
    return res


@pytest.mark.parametrize("candidates", [None, 3, "default"])
def test_matches_slow_mlp(candidates):
    model = make_mlp(k=6)
    x = torch.randn(12, 20, dtype=torch.float64)
    kw = {} if candidates == "default" else {"candidates": candidates}    # default: SDF.CANDIDATES of 6
    res = _compare(model, x, max_iter=5, **kw)
    assert res.success.all()
    assert (res.iterations > 1).any()          # more than one iteration really ran


def test_default_candidates_is_the_module_constant_and_none_means_all_classes():
    assert inspect.signature(ddfast.superdeepfool).parameters["candidates"].default == SDF.CANDIDATES
    assert inspect.signature(superdeepfool_ref).parameters["candidates"].default == SDF.CANDIDATES   # the spec
    model = make_mlp(k=8, seed=2)
    x = torch.randn(16, 20, dtype=torch.float64)
    every = ddfast.superdeepfool(model, x, candidates=None)
    torch.testing.assert_close(every.delta, ddfast.superdeepfool(model, x, candidates=8).delta, rtol=0, atol=0)


@pytest.mark.parametrize("batch_size", [None, 5])
def test_matches_slow_with_labels_bounds_and_chunks(batch_size):
    model = make_mlp(k=5, seed=3)
    x = torch.rand(16, 20, dtype=torch.float64)
    y = torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(1))
    res = _compare(model, x, y, bounds=(0.0, 1.0), max_iter=4, overshoot=0.05, batch_size=batch_size)
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    mis = model(x).argmax(1) != y
    assert mis.any() and (~mis).any()
    assert (res.iterations[mis] == 0).all() and res.success[mis].all() and (res.delta[mis] == 0).all()


def test_matches_slow_cnn_with_bounds_and_few_deepfool_steps():
    model = make_cnn()                         # piecewise linear in eval mode: Jacobians reused
    model.train()
    x = torch.rand(10, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    res = _compare(model, x, bounds=(0.0, 1.0), max_iter=4, df_steps=5)
    assert model.training
    assert not res.success.all() and res.success.any()   # some first runs end without crossing
    assert ((res.iterations > 1) & (res.iterations < 4)).any()   # and some later ones


@pytest.mark.parametrize("overshoot", [0.0, 0.02])
def test_affine_one_iteration_lands_at_the_minimal_distance(overshoot):
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    f, W = lin(x).detach(), lin.weight.detach()
    ref = f.argmax(1)
    normals = W[None] - W[ref][:, None]                                      # [8, K, D]
    dist = (f - f.gather(1, ref[:, None])).abs() / normals.norm(dim=2)       # [8, K]: to each boundary
    d_min, l = dist.scatter(1, ref[:, None], math.inf).min(1)               # the minimal L2 distance
    res = ddfast.superdeepfool(lin, x, overshoot=overshoot)
    unit = normals[torch.arange(8), l] / normals[torch.arange(8), l].norm(dim=1, keepdim=True)
    torch.testing.assert_close(res.delta, (1 + overshoot) * (d_min + 1e-4)[:, None] * unit, rtol=1e-12, atol=1e-12)
    assert torch.equal(res.adv_label, l) and res.success.all()
    assert res.iterations.tolist() == [1] * 8                                # DeepFool + one projection


def test_no_side_effects():
    res = assert_no_side_effects(lambda model, x: ddfast.superdeepfool(model, x, bounds=(0.0, 1.0)),
                                 torch.rand(4, 1, 8, 8, dtype=torch.float64))
    assert res.success.any()


@pytest.mark.parametrize("bad", [
    dict(x=torch.tensor([[float("nan")] * 20])),
    dict(x=torch.ones(2, 20, dtype=torch.int64)),
    dict(y=torch.tensor([0, 9])),
    dict(y=torch.tensor([0, 1, 2])),
    dict(y=torch.tensor([0.0, 1.0])),
    dict(max_iter=-1),
    dict(max_iter=1.5),
    dict(candidates=1),
    dict(overshoot=-0.1),
    dict(bounds=(1.0, 0.0)),
    dict(bounds=(math.nan, None)),
    dict(bounds="ab"),
    dict(x=torch.randn(20, dtype=torch.float64)),
    dict(batch_size=0),
    dict(x=torch.full((2, 20), 255.0, dtype=torch.float64), bounds=(0.0, 1.0)),
    dict(model=lambda x: x.sum(1)),
    dict(model=lambda x: x[:, :1]),
    dict(model=lambda x: torch.full_like(x[:, :3], math.nan)),
    dict(model=lambda x: x[:, :3].detach()),
    dict(model="not a model"),
], ids=lambda bad: ",".join(bad))
def test_bad_input_raises_what_deepfool_raises(bad):
    args = dict(model=make_mlp(k=5), x=torch.randn(2, 20, dtype=torch.float64), y=None)
    args.update(bad)
    model, x, y = args.pop("model"), args.pop("x"), args.pop("y")
    with pytest.raises((ValueError, TypeError)) as expected:
        ddfast.deepfool(model, x, y, **args)
    with pytest.raises(expected.type, match="^" + re.escape(str(expected.value)).replace("deepfool", "superdeepfool")
                       + "$"):
        ddfast.superdeepfool(model, x, y, **args)


@pytest.mark.parametrize("df_steps, error", [(-1, ValueError), (2.0, TypeError), (True, TypeError)])
def test_bad_df_steps_is_named(df_steps, error):
    with pytest.raises(error, match="df_steps must be an int >= 0"):
        ddfast.superdeepfool(make_mlp(), torch.randn(2, 20, dtype=torch.float64), df_steps=df_steps)


def test_empty_batch_and_no_iterations():
    model = make_mlp()
    x = torch.randn(5, 20, dtype=torch.float64)
    none = ddfast.superdeepfool(model, x, max_iter=0)
    assert (none.delta == 0).all() and (none.iterations == 0).all() and not none.success.any()
    empty = ddfast.superdeepfool(model, x[:0])
    assert empty.delta.shape == (0, 20) and len(empty) == 0


def _trained_mlp(seed=0):
    """A small ReLU classifier fitted for a few hundred steps to 4 Gaussian blobs in [0, 1]^16."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(4, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (400,), generator=g)
    x = (centers[y] + 0.15 * torch.randn(400, 16, generator=g, dtype=torch.float64)).clamp(0, 1)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x[:100], y[:100]


@pytest.mark.parametrize("bounds", [None, (0.0, 1.0)])
def test_never_worse_than_deepfool_and_every_success_is_adversarial(bounds):
    model, x, y = _trained_mlp()
    df = ddfast.deepfool(model, x, y, bounds=bounds)
    sdf = ddfast.superdeepfool(model, x, y, bounds=bounds)
    assert torch.equal(sdf.success, df.success) and sdf.success.float().mean() > 0.9
    assert (sdf.norms() <= df.norms() * (1 + 1e-12)).all()
    assert float(sdf.norms().median()) < float(df.norms().median())    # strictly better in median
    with torch.no_grad():
        again = model(sdf.x_adv).argmax(1)
    assert torch.equal(again, sdf.adv_label)
    assert (again[sdf.success] != y[sdf.success]).all()


def test_rho2_with_superdeepfool():
    model, x, _ = _trained_mlp(seed=1)
    by_df = rho2(model, x, progress=False)
    by_sdf = rho2(model, x, attack="superdeepfool", progress=False, keep_delta=True)
    assert by_sdf.rho2 < by_df.rho2 and by_sdf.fooled == by_df.fooled
    expected = ddfast.superdeepfool(model, x)
    torch.testing.assert_close(by_sdf.delta, expected.delta, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="attack must be one of 'deepfool', 'superdeepfool', got 'ddn'"):
        rho2(model, x, attack="ddn", progress=False)
