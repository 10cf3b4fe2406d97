"""The ddfast command: train / eval / reproduce on a tiny generated MNIST, and readable errors."""
import gzip
import json
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import child_env
import ddfast.metrics
from ddfast.paper import cli, data, models, reproduce

#: environment of the ``python -m ddfast`` / torchrun children: they import the ddfast this process
#: imported (the checkout under ``python -m pytest``, else the installed package), not a stale other copy
SUBPROCESS_ENV = child_env()


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # main() may set it


def write_idx(path, arr):
    """``arr`` as a gzipped uint8 IDX file (the MNIST format) at ``path``."""
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def make_mnist(d, n_train=200, n_test=100, seed=0):
    """MNIST-format IDX files (gzip) in ``d``: 10 noisy class prototypes, learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, (10, 28, 28))
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n)
        x = np.clip(protos[y] + rng.normal(0, 40, (n, 28, 28)), 0, 255)
        write_idx(d / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(d / f"{split}-labels-idx1-ubyte.gz", y)
    return d


@pytest.fixture
def tiny_mnist(tmp_path):
    """200 train / 100 test images (:func:`make_mnist`)."""
    return make_mnist(tmp_path / "mnist")


def run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_train_then_eval(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", tiny_mnist, "--out", out, "--epochs", "2", "--lr", "0.05", "--batch-size", "50",
            "--eval-subset", "20", "--threads", "1", "--no-progress"]
    rc, stdout, err = run(args, capsys)
    assert rc == 0, err
    assert "epoch 2" in stdout and (out / "model.pt").exists()
    assert len(json.loads((out / "log.json").read_text())) == 3
    rc, _, err = run(args, capsys)  # same out without --resume: refused, readable
    assert rc == 2 and "ddfast: error:" in err and "--resume" in err and "Traceback" not in err
    rc, _, err = run(args[:-1] + ["--epochs", "3", "--resume", "--no-progress"], capsys)
    assert rc == 2 and "other settings" in err  # resume with changed settings is refused
    rc, stdout, err = run(["eval", out / "checkpoint.pt", "--data", tiny_mnist, "--eps-ref", "0.1",
                           "--max-iter", "20", "--json", tmp_path / "row.json", "--no-progress"], capsys)
    assert rc == 0, err
    row = json.loads((tmp_path / "row.json").read_text())
    assert row["acc"] > 0.5 and row["rho2"] > 0 and set(row["acc_at_eps"]) == {"0.2", "0.5", "1.0"}


def test_resume_with_another_init_is_refused(tiny_mnist, tmp_path, capsys):
    base = ["train", "--data", tiny_mnist, "--epochs", "1", "--batch-size", "100", "--eval-subset", "10",
            "--threads", "1", "--no-progress"]
    rc, _, err = run(base + ["--out", tmp_path / "a", "--seed", "1"], capsys)
    assert rc == 0, err
    rc, _, err = run(base + ["--out", tmp_path / "b", "--init", tmp_path / "a" / "model.pt"], capsys)
    assert rc == 0, err
    rc, _, err = run(base + ["--out", tmp_path / "b", "--resume"], capsys)        # --init dropped: other start
    assert rc == 2 and "started from other weights" in err
    rc, _, err = run(base + ["--out", tmp_path / "b", "--resume", "--init", tmp_path / "a" / "model.pt"], capsys)
    assert rc == 0, err                                                           # the same start: resumes


def test_readable_errors(tiny_mnist, tmp_path, capsys):
    rc, _, err = run(["eval", tmp_path / "missing.pt"], capsys)
    assert rc == 2 and "missing.pt" in err
    blocker = tmp_path / "afile"
    blocker.write_text("")
    rc, _, err = run(["eval", tmp_path / "missing.pt", "--json", blocker / "row.json"], capsys)
    assert rc == 2 and "afile" in err and "Traceback" not in err  # --json checked before any work
    text = tmp_path / "log.json"
    text.write_text("[]")
    rc, _, err = run(["eval", text], capsys)
    assert rc == 2 and "log.json: not a torch file" in err
    bad = tmp_path / "bad.pt"
    torch.save({"fc1.weight": torch.zeros(3)}, bad)
    rc, _, err = run(["eval", bad, "--data", tiny_mnist], capsys)
    assert rc == 2 and "bad.pt" in err and "MLP" in err
    rc, _, err = run(["reproduce", "cifar-resnet", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "mnist-mlp" in err
    rc, _, err = run(["train", "--out", tmp_path / "o", "--data", tmp_path / "nodata"], capsys)
    assert rc == 2 and "nodata" in err
    rc, _, err = run(["train", "--out", tmp_path / "o", "--model", "vgg", "--data", tiny_mnist], capsys)
    assert rc == 2 and "vgg" in err
    rc, _, err = run(["train", "--out", tmp_path / "o2", "--model", "convnet", "--data", tiny_mnist,
                      "--no-progress"], capsys)                  # a 3x32x32 network on 1x28x28 images
    assert rc == 2 and "--model convnet does not take --dataset mnist" in err and "Traceback" not in err
    assert not (tmp_path / "o2" / "checkpoint.pt").exists()
    with pytest.raises(SystemExit):
        cli.main(["train", "--out", str(tmp_path / "o"), "--method", "magic"])
    assert "magic" in capsys.readouterr().err


def test_corrupt_data_names_file(tiny_mnist, tmp_path, capsys):
    import hashlib

    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}" for p in sorted(tiny_mnist.iterdir())]
    (tiny_mnist / "SHA256SUMS").write_text("# sums\n" + "\n".join(lines) + "\n")
    f = tiny_mnist / "train-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-3] + b"xyz")
    rc, _, err = run(["train", "--out", tmp_path / "o", "--data", tiny_mnist, "--no-progress"], capsys)
    assert rc == 2 and "train-labels-idx1-ubyte.gz" in err and "SHA-256" in err


def test_provenance_commit_only_from_a_checkout_of_ddfast(tmp_path, monkeypatch):
    def package_in(root):
        (root / "ddfast" / "paper").mkdir(parents=True)
        monkeypatch.setattr(reproduce, "__file__", str(root / "ddfast" / "paper" / "reproduce.py"))

    def git(*args, cwd):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()

    package_in(tmp_path / "plain")                           # no repository: an installed copy
    assert reproduce.provenance(torch.device("cpu"))["git_commit"] is None
    repo = tmp_path / "repo"
    package_in(repo / "lib" / "site-packages")                # inside some repository, not its ddfast
    git("init", "-q", cwd=repo)
    (repo / "f").write_text("x")
    git("add", "f", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "m", cwd=repo)
    assert reproduce.provenance(torch.device("cpu"))["git_commit"] is None
    package_in(repo)                                          # the checkout's own ddfast
    assert reproduce.provenance(torch.device("cpu"))["git_commit"] == git("rev-parse", "HEAD", cwd=repo)[:12]


def test_reproduce_tiny(tiny_mnist, tmp_path, capsys, monkeypatch):
    tiny = dict(batch_size=50, eval_subset=20, eval_max_iter=10)
    exp = dict(model="mlp", dataset="mnist", paper="mlp",
               reference=reproduce.TrainConfig(method="clean", epochs=2, lr=0.05, lr_milestones=(), **tiny),
               finetune=reproduce.TrainConfig(method="clean", epochs=2, lr=0.01, lr_milestones=(1,), pgd_steps=2,
                                              **tiny),
               c=25.0, sweep=(10.0,),
               scratch=reproduce.TrainConfig(method="deepdefense", epochs=2, lr=0.05, lam_warmup=(1, 1), **tiny))
    monkeypatch.setitem(reproduce.EXPERIMENTS, "mnist-mlp", exp)
    out = tmp_path / "rep"
    robust = [] if has_adv_lib() else ["--robust-limit", "0"]
    rc, stdout, err = run(["reproduce", "mnist-mlp", "--data", tiny_mnist, "--out", out, "--eval-max-iter", "20",
                           "--no-progress", *(robust or ["--robust-limit", "8"])], capsys)
    if rc != 0 and "regularizer" in err:
        pytest.skip("ddfast.regularizer not available")
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in res["rows"]] == list(reproduce.ROWS)
    prov = res["provenance"]
    assert prov["torch"] == torch.__version__ and prov["backend"] in ddfast.available_backends("cpu")
    assert prov["git_commit"] is None or re.fullmatch("[0-9a-f]{12}", prov["git_commit"])
    assert f"backend {prov['backend']}" in (out / "results.md").read_text()
    for r in res["rows"]:
        assert r["model"] == "mlp" and 0 <= r["acc"] <= 1 and r["rho2"] > 0 and r["rho_inf"] >= 0
        assert set(r["acc_at_eps"]) == {"0.2", "0.5", "1.0"} and r["rho2_prime"] > 0
        assert r["epoch_seconds"] > 0
        assert 0 < r["rho2_sdf"] and 0 <= r["fooled_sdf"] <= 1
        if not robust:  # the schema of the independent evaluation
            assert r["robust_acc"].keys() == {"l2", "linf"}
            assert list(r["robust_acc"]["l2"]) == ["0.5", "1.0", "1.5", "2.0"]
            assert list(r["robust_acc"]["linf"]) == ["0.05", "0.1", "0.2", "0.3"]
            assert all(0 <= a <= 1 for n in ("l2", "linf") for a in r["robust_acc"][n].values())
            assert r["min_norm_l2_median"] is None or r["min_norm_l2_median"] >= 0
            ev = r["evaluator"]
            assert ev["library"] == "adv-lib" and ev["version"] and ev["n"] == 8 and ev["attacks"] and ev["steps"]
    if not robust:
        assert (out / "robust_accuracy.png").stat().st_size > 1000
        assert "## Independent evaluation (adv-lib) and cost" in (out / "results.md").read_text()
    dd = res["rows"][2]
    assert dd["acc_at_eps"]["1.0"] == pytest.approx(0.5, abs=0.02)  # eps_ref is DeepDefense's own 50% eps
    assert sorted(p["c"] for p in res["sweep"]) == [10.0, 25.0]
    for png in ("convergence.png", "examples.png", "histograms.png", "c_sweep.png"):
        assert (out / png).stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert "| deepdefense | paper | 98.65 |" in md and "| deepdefense | ours |" in md and "| rho_2 SDF |" in md
    # rerun: every training is finished, nothing is retrained, same rows
    rc, _, err = run(["reproduce", "mnist-mlp", "--data", tiny_mnist, "--out", out, "--eval-max-iter", "20",
                      "--no-progress", *(robust or ["--robust-limit", "8"])], capsys)   # adv-lib only if installed
    assert rc == 0, err
    again = json.loads((out / "results.json").read_text())
    assert [r["acc"] for r in again["rows"]] == [r["acc"] for r in res["rows"]]


def has_adv_lib():
    try:
        from ddfast.robustness import load_adv_lib

        load_adv_lib()
        return True
    except ImportError:
        return False


def test_python_m_entry_points():
    for mod in ("ddfast", "ddfast.paper.cli", "ddfast.cli"):
        p = subprocess.run([sys.executable, "-m", mod, "--help"], env=SUBPROCESS_ENV, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0 and "reproduce" in p.stdout


def test_reproduce_rejects_unknown_methods(tmp_path):
    with pytest.raises(ValueError, match="methods"):
        reproduce.reproduce("mnist-mlp", tmp_path, methods=("clean", "magic"))
    assert not any(tmp_path.iterdir())  # nothing written before the check


@pytest.mark.parametrize("device", ["tpu", "cuda:x"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_reproduce_rejects_unusable_device(tmp_path, device):
    with pytest.raises(ValueError, match="device"):
        reproduce.reproduce("mnist-mlp", tmp_path / "out", device=device)
    assert not (tmp_path / "out").exists()  # nothing written before the check


@pytest.mark.parametrize("kw, match", [(dict(eval_max_iter=-1), "eval_max_iter"),
                                       (dict(sweep=(10.0, -5.0)), "sweep")])
def test_reproduce_checks_its_settings_before_any_training(tmp_path, kw, match):
    from ddfast.paper.reproduce import reproduce

    with pytest.raises(ValueError, match=match):
        reproduce("mnist-mlp", tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()          # refused before creating or training anything


# ddfast eval --robust: the independent (adv-lib) evaluation from the command line

@pytest.fixture
def saved(tmp_path):
    root = make_mnist(tmp_path / "mnist", n_train=20, n_test=40)
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save(models.build_model("mlp").state_dict(), path)
    return root, path


def test_eval_robust_adds_the_independent_fields(saved, tmp_path, capsys):
    pytest.importorskip("adv_lib")
    root, weights = saved
    rc, _, err = run(["eval", weights, "--data", root, "--limit", "30", "--robust", "--robust-limit", "12",
                      "--max-iter", "5", "--json", tmp_path / "row.json", "--no-progress", "--threads", "1"], capsys)
    assert rc == 0, err
    row = json.loads((tmp_path / "row.json").read_text())
    assert list(row["robust_acc"]["l2"]) == ["0.5", "1.0", "1.5", "2.0"]
    assert list(row["robust_acc"]["linf"]) == ["0.05", "0.1", "0.2", "0.3"]
    assert row["evaluator"]["library"] == "adv-lib" and row["evaluator"]["n"] == 12
    for acc in [*row["robust_acc"]["l2"].values(), *row["robust_acc"]["linf"].values()]:
        assert 0 <= acc <= row["evaluator"]["clean_acc"]
    l2 = list(row["robust_acc"]["l2"].values())
    assert l2 == sorted(l2, reverse=True)  # a larger ball never holds fewer adversarial examples


def test_eval_attack_superdeepfool_reports_rho2_under_it(saved, tmp_path, capsys):
    """``--attack superdeepfool``: rho_2 under ddfast.superdeepfool (the row names it), below
    DeepFool's on this model (SuperDeepFool keeps the closest adversarial point it meets)."""
    root, weights = saved
    rows = {}
    for attack in ("deepfool", "superdeepfool"):
        rc, _, err = run(["eval", weights, "--data", root, "--attack", attack, "--max-iter", "20",
                          "--json", tmp_path / f"{attack}.json", "--no-progress", "--threads", "1"], capsys)
        assert rc == 0, err
        rows[attack] = json.loads((tmp_path / f"{attack}.json").read_text())
    df, sdf = rows["deepfool"], rows["superdeepfool"]
    assert (df["attack"], sdf["attack"]) == ("deepfool", "superdeepfool")
    model = reproduce.load_weights(models.build_model("mlp"), weights)
    x = data.prepare("mnist", root).x_test
    expect = ddfast.metrics.rho2(model, x, max_iter=20, attack="superdeepfool", progress=False)
    assert sdf["rho2"] == pytest.approx(expect.rho2, rel=1e-6) and sdf["fooled"] == pytest.approx(expect.fooled)
    assert 0 < sdf["rho2"] < df["rho2"] and sdf["acc"] == df["acc"]
    with pytest.raises(SystemExit) as exc:         # argparse's usage error
        run(["eval", weights, "--data", root, "--attack", "cw"], capsys)
    assert exc.value.code == 2 and "--attack" in capsys.readouterr().err


def test_eval_robust_without_adv_lib_names_the_pip_command(saved, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "adv_lib", None)
    root, weights = saved
    rc, _, err = run(["eval", weights, "--data", root, "--robust", "--no-progress"], capsys)
    assert rc == 2 and "pip install --no-deps adv-lib" in err


def test_pixels_and_pixel_model_undo_the_preprocessing(saved):
    root, _ = saved
    prep = data.prepare("mnist", root)
    x01 = prep.pixels(prep.x_test)
    raw, _ = data.load_mnist(root, "test", verify=False)
    assert torch.allclose(x01[:, 0], raw.float() / 255, atol=1e-6)
    net = models.build_model("mlp").eval()
    assert torch.allclose(prep.pixel_model(net)(x01), net(prep.x_test), atol=1e-5)
