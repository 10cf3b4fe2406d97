"""bench/matrix.py and what it added to bench/: the ResNet-18, adv-lib's DeepFool as a peer, one
DeepFool cell, the training-step part and the outputs, on untrained seeded models and a few
MNIST test images (seconds). Tests that need a peer skip without it (bench/install-peers.sh)."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402
import matrix  # noqa: E402
import peers  # noqa: E402

from ddfast import models  # noqa: E402

N = 12


@pytest.fixture(scope="module")
def status():
    return peers.available()


def _need(status, *names):
    for name in names:
        if status.get(name) is not None:
            pytest.skip(f"{name} does not import here ({status[name]}); bench/install-peers.sh installs it")


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = models.MLP().eval().requires_grad_(False)
    x, _ = common.mnist_test(N, model="mlp")
    with torch.no_grad():
        ref = model(x).argmax(1)
    return model, x, ref


def _args(**kw):
    base = dict(device="cpu", max_iter=50, overshoot=0.02, repeat=1, repeat_below_s=5.0, train_rounds=None)
    return types.SimpleNamespace(**{**base, **kw})


def test_resnet18_is_the_cifar_style_network():
    torch.manual_seed(0)
    net = common.build_net("resnet18").eval()
    assert sum(p.numel() for p in net.parameters()) == 11173962  # the standard CIFAR ResNet-18
    assert [len(stage) for stage in net.layers] == [2, 2, 2, 2]
    assert net.conv1.kernel_size == (3, 3) and not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        out = net(x)
        assert out.shape == (3, 10)
        torch.testing.assert_close(net(x[1:2]), out[1:2], rtol=1e-4, atol=1e-5)  # eval mode: sample-independent


def test_resnet18_cache_tag_leaves_the_other_models_alone():
    assert common._cache_path("mlp", 12, 0).name == "mlp-e12-s0-733c1c79.pt"
    assert common._cache_path("resnet18", 1, 0) != common._cache_path("resnet18", 2, 0)


def test_advlib_agrees_with_foolbox_per_sample(mlp, status):
    _need(status, "advlib", "foolbox")
    model, x, ref = mlp
    adv = peers.advlib_run(model, x, ref, batch_size=5)
    fb = peers.foolbox_run(model, x, ref, batch_size=5)
    with torch.no_grad():
        assert (model(adv.x_adv).argmax(1) != ref).all()
    assert adv.x_adv.min() >= 0 and adv.x_adv.max() <= 1
    n_adv, n_fb = (adv.x_adv - x).flatten(1).norm(dim=1), (fb.x_adv - x).flatten(1).norm(dim=1)
    # the projection accumulates in adv-lib's iterate (ddfast and foolbox clip x + r_tot): close, not equal
    assert ((n_adv - n_fb).abs() / n_fb).median() < 1e-3
    with pytest.raises(ValueError):
        peers.advlib_run(model, x, ref, batch_size=5, candidates=3)


def test_cell_rows_speedups_on_the_same_images(mlp, status):
    _need(status, "foolbox")
    model, x, ref = mlp
    plan = [("ddfast", N), ("foolbox", N)] + ([("advlib", 7)] if status.get("advlib") is None else [])
    rows = matrix.run_cell(model, "mlp", x, ref, 5, plan, _args())
    by = {r["impl"]: r for r in rows}
    assert by["ddfast"]["speedup"] == pytest.approx(1.0)
    assert by["foolbox"]["speedup"] > 0 and by["foolbox"]["vs_ref_median_rel"] == 0.0
    assert by["ddfast"]["vs_ref_median_rel"] < 1e-5 and by["ddfast"]["vs_ref_within_1e-3"] == 1.0
    if "advlib" in by:  # 7 images at batch 5: a full batch and a partial one, ddfast timed alike
        assert by["advlib"]["n_images"] == 7 and by["advlib"]["speedup"] > 0


def test_a_failing_implementation_is_a_row_with_its_error(mlp, monkeypatch):
    model, x, ref = mlp

    def broken(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setitem(peers.RUNNERS, "art", broken)
    rows = matrix.run_cell(model, "mlp", x, ref, 6, [("ddfast", N), ("art", N)], _args())
    by = {r["impl"]: r for r in rows}
    assert "out of memory" in by["art"]["error"] and by["ddfast"]["img_per_s"] > 0


def test_cell_plan_caps_and_skips():
    sizes = {"ddfast": 100, "foolbox": 500, "torchattacks": 3, "art": 50}
    N, plan, skipped = matrix._cell_plan(sizes, 100, True, {"foolbox": None, "art": "ImportError: x"},
                                         ["ddfast", "foolbox", "art", "torchattacks"])
    assert N == 100 and plan == [("ddfast", 100), ("foolbox", 100), ("torchattacks", 3)]
    assert "not installed" in skipped["art"]
    _, plan, skipped = matrix._cell_plan({"ddfast": 10}, 1000, False, {}, list(matrix.IMPLS))
    assert plan == [("ddfast", 10)] and "smallest batch" in skipped["torchattacks"]


def test_library_training_lookup(monkeypatch):
    from ddfast.paper import train

    for name in ("pgd_at_loss", "trades_loss"):
        monkeypatch.delattr(train, name, raising=False)
    fn, why = matrix._library_loss("pgd10")
    assert fn is None and "not available in this checkout" in why and "pgd_at_loss" in why
    calls = []

    def pgd_at_loss(model, x, y, *, steps=7):
        calls.append(steps)
        return torch.nn.functional.cross_entropy(model(x), y)

    monkeypatch.setattr(train, "pgd_at_loss", pgd_at_loss, raising=False)
    fn, why = matrix._library_loss("pgd10")
    assert "pgd_at_loss" in why
    net = torch.nn.Linear(4, 3)
    fn(net, torch.rand(2, 4), torch.tensor([0, 2]), False)
    assert calls == [matrix.INNER_STEPS]


def test_training_part_on_lenet(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(common, "trained_model", lambda name, **kw: models.LeNet().eval())
    rows = matrix.train_model("lenet", _args(), batch=8, rounds=1)
    by = {(r["method"], r["variant"]): r for r in rows}
    assert set(by) == {(m, "eager") for m in ("ce", "pgd10", "trades10", "deepdefense", "deepdefense_top3")}
    for m in ("ce", "deepdefense", "deepdefense_top3"):
        assert by[(m, "eager")]["median_s"] > 0 and by[(m, "eager")]["peak_mib"] > 0
    assert by[("ce", "eager")]["ratio_to_ce"] == 1.0
    from ddfast.paper import train

    for m in ("pgd10", "trades10"):                             # the library's pgd_at_loss / trades_loss
        assert hasattr(train, "pgd_at_loss") and by[(m, "eager")]["median_s"] > 0, by[(m, "eager")]


def test_targets_and_plot(tmp_path):
    rows = [{"model": "mlp", "impl": "ddfast", "batch": 100, "batch_size": 100, "img_per_s": 5e4, "speedup": 1.0},
            {"model": "mlp", "impl": "advlib", "batch": 100, "batch_size": 100, "img_per_s": 5e3, "speedup": 10.0},
            {"model": "mlp", "impl": "foolbox", "batch": 100, "batch_size": 100, "img_per_s": 1e4, "speedup": 5.0}]
    train_rows = [{"model": "resnet18", "method": "deepdefense", "variant": "eager", "batch": 128, "median_s": 0.2},
                  {"model": "resnet18", "method": "pgd10", "variant": "eager", "batch": 128,
                   "unavailable": "not available in this checkout"}]
    out = {"rows": rows, "train_rows": train_rows, "device": "cpu: test", "torch": "t", "git_commit": "abc"}
    checks = {c["target"]: c for c in matrix.targets(out)}
    assert checks["ddfast MNIST MLP >= 40000 img/s at batch 100"]["met"] is True
    assert checks["ddfast >= 5x adv-lib df (MLP, batch 100)"]["met"] is True
    assert checks["ddfast >= 10x foolbox (MLP, batch 100)"]["met"] is False
    assert checks["ddfast MNIST MLP >= 150000 img/s at batch 10000"]["met"] is None
    assert [c for c in checks if c.startswith("DeepDefense")][0]
    png = tmp_path / "m.png"
    matrix.plot(out, png)
    assert png.stat().st_size > 1000
