"""Shared fixtures: small seeded models in float64 and float32."""
import pytest
import torch


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
