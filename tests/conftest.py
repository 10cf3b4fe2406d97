"""Shared fixtures: small seeded models in float64 and float32; the environment of child
processes."""
import os
from pathlib import Path

import pytest
import torch

import ddfast


def child_env(**extra):
    """os.environ for a child Python that imports the same ddfast as this process (the
    checkout's or the installed one, whichever the tests run), plus ``extra``."""
    root = str(Path(ddfast.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=root if not path else root + os.pathsep + path, **extra)


def make_mlp(d_in=20, hidden=16, k=5, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d_in, hidden), torch.nn.Tanh(),
                            torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, k))
    return m.to(dtype)


def make_cnn(k=4, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                            torch.nn.Dropout(0.3), torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 6, k))
    return m.to(dtype)


def assert_no_side_effects(attack, x):
    """Run ``attack(model, x)`` under ``torch.no_grad()`` on a mixed-mode CNN with ``.grad`` set and
    one frozen weight; assert nothing of the caller changed. Returns the attack's result."""
    model = make_cnn()
    model.train()
    model[1].eval()  # a mixed-mode model keeps its mixture
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x_copy = x.clone()
    rng = torch.get_rng_state()
    with torch.no_grad():
        result = attack(model, x)
    assert torch.is_grad_enabled() is True
    assert torch.equal(x, x_copy) and not x.requires_grad
    assert model.training and not model[1].training
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad
    for p in model.parameters():
        assert torch.equal(p.grad, torch.full_like(p, 7.0))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(torch.get_rng_state(), rng)
    return result


@pytest.fixture
def mlp64():
    return make_mlp()


@pytest.fixture
def cnn64():
    return make_cnn()
