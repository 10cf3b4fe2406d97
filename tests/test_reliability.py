"""Reliability of the library's entry points: settings checked up front, no draws from torch's global
generator, no code path that unpickles arbitrary objects, the TF32 warning. (The command line and
the training loop: tests/paper/test_cli_reliability.py.)"""
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import ddfast


@pytest.mark.parametrize("arg,value", [("lam", -1.0), ("c", float("nan")), ("d", -2), ("overshoot", -0.1),
                                       ("max_iter", -1), ("max_iter", 2.0), ("candidates", 1)])
def test_deepdefense_module_checks_settings(arg, value):
    from ddfast import DeepDefense

    with pytest.raises(ValueError, match=arg):
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
