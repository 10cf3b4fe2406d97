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


@pytest.fixture
def mlp64():
    return make_mlp()


@pytest.fixture
def cnn64():
    return make_cnn()
