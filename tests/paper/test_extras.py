"""Without the ``paper`` extra (tqdm, matplotlib) the application stops before any work with an
ImportError that says ``pip install "ddfast[paper]"``; with progress bars off it needs no tqdm."""
import sys

import pytest
import torch

from ddfast.paper import cli, models, plots, reproduce, train
from test_cli import tiny_mnist  # noqa: F401  (fixture: 200/100 generated MNIST-format images)
from test_train import tiny_cfg, tiny_data

INSTALL = 'pip install "ddfast[paper]"'


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # cli.main sets it


@pytest.fixture
def no_tqdm(monkeypatch):
    for name in ("tqdm", "tqdm.auto"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError


@pytest.fixture
def no_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_fit_without_tqdm(no_tqdm, tmp_path):
    data = tiny_data(n_train=100, n_test=20)
    torch.manual_seed(0)
    with pytest.raises(ImportError, match="progress bars need tqdm") as info:
        train.fit(models.MLP(), *data, tiny_cfg(epochs=1), out_dir=tmp_path / "o", progress=True)
    assert INSTALL in str(info.value) and "progress=False" in str(info.value)
    assert not (tmp_path / "o").exists()  # refused before any work
    log = train.fit(models.MLP(), *data, tiny_cfg(epochs=1), progress=False)
    assert [e["epoch"] for e in log] == [0, 1]


def test_cli_without_tqdm(no_tqdm, tiny_mnist, tmp_path, capsys):  # noqa: F811
    args = ["--data", tiny_mnist, "--threads", "1"]
    assert cli.main([str(a) for a in ["train", "--out", tmp_path / "o", "--epochs", "1", *args]]) == 2
    err = capsys.readouterr().err
    assert "progress bars need tqdm" in err and INSTALL in err and "--no-progress" in err
    assert cli.main([str(a) for a in ["eval", tmp_path / "missing.pt", *args]]) == 2
    assert "progress bars need tqdm" in capsys.readouterr().err  # before reading the weights


def test_plots_and_reproduce_without_matplotlib(no_matplotlib, tmp_path):
    with pytest.raises(ImportError, match="the plots need matplotlib") as info:
        plots.histograms({"clean": [0.1, 0.2]}, tmp_path / "h.png")
    assert INSTALL in str(info.value)
    with pytest.raises(ImportError, match="matplotlib"):
        reproduce.reproduce("mnist-mlp", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # refused before any training
