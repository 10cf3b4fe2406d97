"""ddfast.robustness: adv-lib's attacks on an affine classifier, where the minimal distances are known."""
import math
import sys

import pytest
import torch
from torch import nn

from ddfast import robustness as R


@pytest.fixture(scope="module")
def adv_lib():
    try:
        return R.load_adv_lib()
    except ImportError as exc:
        pytest.skip(f"adv-lib not usable here: {exc}")


def affine_problem(n=12, k=10, dist=1.0, seed=0):
    """``(model, x, y, d2, dinf)``: an affine classifier ``W x + b`` on 1x28x28 images near 0.5
    whose nearest decision boundary lies at L2 distance ``dist`` from every sample (the other
    classes at >= 1.4 ``dist``); ``d2``, ``dinf``: the exact L2 / Linf distances
    ``min_j (f_y - f_j) / ||w_y - w_j||_q`` (the box [0, 1] is far enough not to matter).

    The samples differ by noise in the null space of ``W``: every one has the same logits."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, 784, generator=g, dtype=torch.float64) * 0.1
    center = torch.full((784,), 0.5, dtype=torch.float64)
    noise = 0.1 * (2 * torch.rand(n, 784, generator=g, dtype=torch.float64) - 1)
    noise -= noise @ torch.linalg.pinv(w) @ w  # W noise = 0
    x = center + noise
    scale = torch.tensor([0.0] + [1.4 + 0.1 * j for j in range(1, k)], dtype=torch.float64)
    scale[1] = 1.0
    margins = dist * scale * (w[0] - w).norm(dim=1)
    b = (w[0] - w) @ center - margins  # f_0 - f_j = margins_j at every sample
    b -= b[0].clone()
    lin = nn.Linear(784, k)
    with torch.no_grad():
        lin.weight.copy_(w.float())
        lin.bias.copy_(b.float())
    model = nn.Sequential(nn.Flatten(), lin).eval()
    y = torch.zeros(n, dtype=torch.int64)
    d2, dinf = exact_distances(w, y, x @ w.T + b)
    return model, x.float().view(n, 1, 28, 28), y, d2, dinf


def exact_distances(w, y, logits):
    d2, dinf = [], []
    for i in range(len(y)):
        yi = int(y[i])
        margins = logits[i, yi] - logits[i]
        dw = w[yi] - w
        r2 = margins / dw.norm(dim=1)
        rinf = margins / dw.abs().sum(dim=1)
        r2[yi] = rinf[yi] = math.inf
        d2.append(r2.min())
        dinf.append(rinf.min())
    return torch.stack(d2), torch.stack(dinf)


def test_affine_problem_is_what_it_claims():
    model, x, y, d2, dinf = affine_problem()
    assert (model(x).argmax(1) == y).all()
    assert torch.allclose(d2, torch.ones_like(d2), rtol=1e-6)
    assert (dinf > 0.01).all() and (dinf < 0.1).all()
    assert 0.3 < float(x.min()) and float(x.max()) < 0.7


def test_min_norm_l2_matches_closed_form(adv_lib):
    model, x, y, d2, _ = affine_problem()
    found = R.min_norm(model, x, y, norm="l2")
    assert torch.isfinite(found).all()
    assert torch.allclose(found.double(), d2, rtol=0.01), (found, d2)
    assert (found.double() >= d2 * (1 - 1e-3)).all()  # nothing closer than the boundary is adversarial


def test_min_norm_is_zero_for_misclassified(adv_lib):
    model, x, y, _, _ = affine_problem()
    wrong = y.clone()
    wrong[:3] = (y[:3] + 1) % 10
    found = R.min_norm(model, x, wrong, norm="l2")
    assert (found[:3] == 0).all() and (found[3:] > 0.9).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_robust_accuracy_below_and_above_the_boundary(adv_lib, norm):
    model, x, y, d2, dinf = affine_problem()
    d = d2 if norm == "l2" else dinf
    lo, hi = 0.9 * float(d.min()), 1.1 * float(d.max())
    acc = R.robust_accuracy(model, x, y, [lo, hi], norm=norm)
    assert list(acc.values()) == [1.0, 0.0], acc


def test_evaluate_robustness_row(adv_lib):
    model, x, y, d2, dinf = affine_problem()
    state = torch.get_rng_state()
    res = R.evaluate_robustness(model, x, y, eps_l2=(0.5, 1.5), eps_linf=(0.5 * float(dinf.min()), 0.3))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    row = res.row()
    assert row["robust_acc"] == {"l2": {"0.5": 1.0, "1.5": 0.0}, "linf": {R._eps_key(0.5 * float(dinf.min())): 1.0,
                                                                         "0.3": 0.0}}
    assert row["min_norm_l2_median"] == pytest.approx(float(d2.median()), rel=0.01)
    ev = row["evaluator"]
    assert ev["library"] == "adv-lib" and ev["version"] and ev["n"] == len(y) and ev["clean_acc"] == 1.0
    assert "apgd-ce" in ev["attacks"]["linf"] and ev["steps"]["apgd"] == R.STEPS["apgd"]
    again = R.evaluate_robustness(model, x, y, eps_l2=(0.5, 1.5), eps_linf=(0.3,))
    assert torch.equal(again.min_norm_l2, res.min_norm_l2)  # deterministic


def test_works_under_no_grad(adv_lib):
    model, x, y, d2, _ = affine_problem(n=4)
    with torch.inference_mode():
        xi = x.clone()
    with torch.no_grad():
        found = R.min_norm(model, xi, y)
    assert torch.allclose(found.double(), d2, rtol=0.01)


def test_keys_of_the_default_grids():
    assert [R._eps_key(e) for e in R.EPS["l2"]] == ["0.5", "1.0", "1.5", "2.0"]
    assert [R._eps_key(e) for e in R.EPS["linf"]] == ["0.05", "0.1", "0.2", "0.3"]


def test_bad_arguments_name_themselves(adv_lib):
    model, x, y, _, _ = affine_problem(n=2)
    with pytest.raises(ValueError, match=r"x must be images in \[0, 1\]"):
        R.min_norm(model, x - 0.5, y)
    with pytest.raises(ValueError, match="norm"):
        R.min_norm(model, x, y, norm="l1")
    with pytest.raises(ValueError, match="eps"):
        R.robust_accuracy(model, x, y, [0.0])
    with pytest.raises(ValueError, match="steps"):
        R.min_norm(model, x, y, steps={"fab": 0})
    with pytest.raises(ValueError, match="steps keys"):
        R.min_norm(model, x, y, steps={"pgd": 3})
    with pytest.raises(ValueError, match="min_norms"):
        R.robust_accuracy(model, x, y, [0.1], min_norms=torch.zeros(5))
    with pytest.raises(ValueError, match="y"):
        R.min_norm(model, x, y[:1])


def test_missing_library_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "adv_lib", None)  # import adv_lib raises ImportError
    with pytest.raises(ImportError, match="pip install --no-deps adv-lib"):
        R.load_adv_lib()


def _adv_lib_names():
    return [m for m in sys.modules if m == "adv_lib" or m.startswith("adv_lib.")]


@pytest.fixture
def fresh_adv_lib(monkeypatch):
    """adv-lib's modules forgotten for one test, so that its imports run again; afterwards
    ``sys.modules`` holds exactly the adv-lib modules it held before."""
    pytest.importorskip("adv_lib")
    saved = {m: sys.modules.pop(m) for m in _adv_lib_names()}
    yield monkeypatch
    for m in _adv_lib_names():
        del sys.modules[m]
    sys.modules.update(saved)


def test_adv_lib_module_skips_the_attacks_init(fresh_adv_lib):
    fresh_adv_lib.setitem(sys.modules, "torchvision", None)  # adv_lib.attacks' __init__ needs it
    fresh_adv_lib.setitem(sys.modules, "visdom", None)
    sdf = R.adv_lib_module("superdeepfool").sdf  # imports .deepfool relatively
    assert callable(sdf) and "adv_lib.attacks.deepfool" in sys.modules
    assert "adv_lib.attacks" not in sys.modules  # the bare package is gone again
    with pytest.raises(ImportError, match="pip install torchvision"):
        R.adv_lib_module("augmented_lagrangian")  # ALMA's LPIPS
    with pytest.raises(ImportError, match="no attack module 'nope'"):
        R.adv_lib_module("nope")


@pytest.mark.parametrize("module, pip", [("distutils", "setuptools"), ("tqdm", "tqdm")])
def test_missing_dependency_of_adv_lib_names_its_pip_package(fresh_adv_lib, module, pip):
    for name in [module] + [m for m in sys.modules if m.startswith(module + ".")]:
        fresh_adv_lib.setitem(sys.modules, name, None)  # distutils: Python >= 3.12 without setuptools
    with pytest.raises(ImportError, match=f"imports '{module}', which is not installed: pip install {pip}$"):
        R.load_adv_lib()


def test_pixel_input():
    net = nn.Flatten()
    m = R.PixelInput(net, torch.full((1, 2, 2), 0.25), 0.5)
    assert torch.allclose(m(torch.ones(1, 1, 2, 2)), torch.full((1, 4), 1.5))
    with pytest.raises(ValueError, match="std"):
        R.PixelInput(net, 0.0, 0.0)
    with pytest.raises(TypeError, match="net"):
        R.PixelInput(lambda t: t)


def test_reexported_by_metrics():
    from ddfast import metrics

    for name in ("evaluate_robustness", "robust_accuracy", "min_norm", "PixelInput"):
        assert getattr(metrics, name) is getattr(R, name) and name in metrics.__all__
