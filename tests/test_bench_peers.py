"""ddfast.deepfool against the attack libraries the benchmark compares it with (bench/peers.py).

Each peer test is skipped when that library is not installed (bench/install-peers.sh installs
them). The agreement is per sample, in float64, on a few MNIST test images and a seeded
(untrained) MNIST MLP, so it takes seconds.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import ddfast  # noqa: E402
from ddfast import data, models  # noqa: E402

N = 12


@pytest.fixture(scope="module")
def peer_status():
    """peer name -> None where it imports, else why not (as bench/peers.py decides)."""
    import peers

    return peers.available()


def _need(status, name: str) -> None:
    if status.get(name) is not None:
        pytest.skip(f"{name} does not import here ({status[name]}); bench/install-peers.sh installs it")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = models.MLP()
    images, _ = data.load_mnist(split="test", verify=False)
    x = images[:N].unsqueeze(1).to(torch.float64) / 255.0
    model = net.double().eval()
    with torch.no_grad():
        ref = model(x).argmax(1)
    return model, x, ref


def _norms(t):
    return t.flatten(1).norm(dim=1)


def _fooled(model, x_adv, ref):
    with torch.no_grad():
        return model(x_adv).argmax(1) != ref


def test_peers_module_reports_availability():
    import peers

    av = peers.available()
    assert set(av) == set(peers.RUNNERS) == set(peers.DIFFERENCES)
    assert av["ddfast"] is None and av["naive"] is None


@pytest.mark.parametrize("candidates", [None, 3])
def test_foolbox_agrees_per_sample(setup, peer_status, candidates):
    _need(peer_status, "foolbox")
    import peers

    model, x, ref = setup
    fb = peers.foolbox_run(model, x, ref, batch_size=N, candidates=candidates)
    dd = peers.ddfast_run(model, x, ref, batch_size=N, candidates=candidates)
    f_fb, f_dd = _fooled(model, fb.x_adv, ref), _fooled(model, dd.x_adv, ref)
    assert f_dd.all() and torch.equal(f_fb, f_dd)
    assert (fb.x_adv >= 0).all() and (fb.x_adv <= 1).all() and (dd.x_adv >= 0).all() and (dd.x_adv <= 1).all()
    n_fb, n_dd = _norms(fb.x_adv - x), _norms(dd.x_adv - x)
    torch.testing.assert_close(n_dd, n_fb, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(dd.x_adv, fb.x_adv, rtol=0, atol=1e-3)


def test_deeprobust_agrees_per_sample_without_bounds(setup, peer_status):
    _need(peer_status, "deeprobust")
    import peers

    model, x, ref = setup
    dr = peers.deeprobust_run(model, x, ref, batch_size=N)
    dd = peers.ddfast_run(model, x, ref, batch_size=N, bounds=None)
    assert _fooled(model, dr.x_adv, ref).all() and _fooled(model, dd.x_adv, ref).all()
    # deeprobust accumulates r_tot in float32: agreement to ~1e-6 relative, not 1e-12
    torch.testing.assert_close(_norms(dr.x_adv.double() - x), _norms(dd.x_adv - x), rtol=1e-3, atol=1e-6)
    assert torch.equal(dr.iterations, dd.iterations)


def test_naive_baseline_agrees_without_bounds(setup):
    import peers

    model, x, ref = setup
    nv = peers.naive_run(model, x, ref, batch_size=5)  # several batches
    dd = peers.ddfast_run(model, x, ref, batch_size=N, bounds=None)
    torch.testing.assert_close(nv.x_adv, dd.x_adv, rtol=0, atol=1e-6)
    assert torch.equal(nv.iterations, dd.iterations)


def test_torchattacks_lands_on_the_same_boundary(setup, peer_status):
    """torchattacks projects every iterate to [0, 1] and adds no 1e-4: where it fools the model,
    its perturbation has nearly ddfast's norm (it stops just past the same boundary)."""
    _need(peer_status, "torchattacks")
    import peers

    model, x, ref = setup
    m32, x32 = copy.deepcopy(model).float(), x.float()
    ta = peers.torchattacks_run(m32, x32, ref, batch_size=N, max_iter=50)
    dd = peers.ddfast_run(m32, x32, ref, batch_size=N)
    assert (ta.x_adv >= 0).all() and (ta.x_adv <= 1).all()
    f_ta = _fooled(m32, ta.x_adv, ref)
    n_ta, n_dd = _norms(ta.x_adv - x32), _norms(dd.x_adv - x32)
    if f_ta.any():
        torch.testing.assert_close(n_ta[f_ta], n_dd[f_ta], rtol=1e-2, atol=1e-5)


def test_art_overshoot_at_the_end(setup, peer_status):
    """ART steps without overshoot and applies it once at the end: same boundary, and its
    perturbation is a few percent larger than ddfast's."""
    _need(peer_status, "art")
    import peers

    model, x, ref = setup
    m32, x32 = copy.deepcopy(model).float(), x.float()
    art = peers.art_run(m32, x32, ref, batch_size=N)
    dd = peers.ddfast_run(m32, x32, ref, batch_size=N)
    f_art = _fooled(m32, art.x_adv, ref)
    assert f_art.all()
    rel = (_norms(art.x_adv - x32) - _norms(dd.x_adv - x32)) / _norms(dd.x_adv - x32)
    # ART's final (1 + 0.02) scaling of the un-overshot path: about 2% larger, never far off
    assert 0.005 < rel.median() < 0.05, rel


def test_frozen_parameters_change_no_result_and_art_steps_are_counted(setup, peer_status):
    """The benchmark freezes the model's parameters for every library (their best case): the
    adversarials are bit-identical to those of the model as it comes. ART's steps per batch
    are read from its class-gradient calls (one before its loop, one per step)."""
    import peers

    model, x, ref = setup
    m32, x32 = copy.deepcopy(model).float(), x.float()       # ART runs float32
    frozen = copy.deepcopy(m32).requires_grad_(False)
    names = [n for n in ("ddfast", "foolbox", "art") if peer_status.get(n) is None]
    for name in names:
        a = peers.RUNNERS[name](m32, x32, ref, batch_size=N)
        b = peers.RUNNERS[name](frozen, x32, ref, batch_size=N)
        assert torch.equal(a.x_adv, b.x_adv), name
    if "art" in names:
        assert peers.art_run(frozen, x32, ref, batch_size=N // 2, max_iter=1).steps_per_batch == 1.0
        out = peers.art_run(frozen, x32, ref, batch_size=N // 2, max_iter=7)
        assert 0.0 < out.steps_per_batch <= 7.0
        import deepfool_throughput as bench

        assert bench._steps_per_batch(out, N // 2) == out.steps_per_batch
        dd = peers.ddfast_run(frozen, x32, ref, batch_size=N)
        assert bench._steps_per_batch(dd, N // 2) == float(torch.stack(
            [dd.iterations[:N // 2].max(), dd.iterations[N // 2:].max()]).double().mean())


def test_tables_refresh_replaces_only_the_blocks(tmp_path):
    import json

    import tables

    res = tmp_path / "results"
    res.mkdir()
    (res / "a.md").write_text("| x |\n|---|\n| 1 |\n")
    (res / "b.json").write_text(json.dumps({"device": "cpu: test", "torch": "t", "rows": [{"impl": "ddfast",
                                                                                          "img_per_s": 12.5}],
                                            "speedup": 3.0}))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- BEGIN results:a -->\nold\n<!-- END results:a -->\nmiddle\n"
                      "<!-- BEGIN results:b -->\n<!-- END results:b -->\n<!-- BEGIN results:c -->\nx\n"
                      "<!-- END results:c -->\nend\n")
    assert tables.refresh(readme, res) == ["a", "b", "c"]
    text = readme.read_text()
    assert "old" not in text and "| 1 |" in text and text.startswith("intro\n") and text.endswith("end\n")
    assert "| ddfast | 12.5 |" in text and "| speedup | 3 |" in text and "no results yet" in text
