"""``ddfast train`` under torchrun: two gloo processes on loopback train with
DistributedDataParallel, rank 0 alone writes the files, and the weights equal those of one
process on the same global batches (the per-rank loss weighting makes DDP's gradient average the
global-batch gradient even for uneven splits; the regularizer runs on the DDP-wrapped model).

The children run with ``cwd=tests/paper`` and import the ddfast this process imported
(``SUBPROCESS_ENV``: the checkout under ``python -m pytest``, else the installed package)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddfast.paper import cli
from test_cli import SUBPROCESS_ENV, tiny_mnist  # noqa: F401  (fixture: 200/100 generated MNIST-format images)

TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_cmd(args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "ddfast", *map(str, args)]


ENV = {**SUBPROCESS_ENV, "OMP_NUM_THREADS": "1"}


def _torchrun(args, nproc=2, timeout=240):
    return subprocess.run(_torchrun_cmd(args, nproc), cwd=TESTS_DIR, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _train_args(data, out, method="deepdefense"):
    # 200 images in global batches of 45: 45, 45, 45, 45, 20 -> per-rank parts 23/22 and 10/10 (uneven)
    return ["train", "--data", data, "--out", out, "--method", method, "--epochs", "1", "--batch-size", "45",
            "--lr", "0.01", "--lam", "2", "--c", "5", "--eval-subset", "10", "--threads", "1", "--no-progress"]


def test_torchrun_two_processes_equal_one_process(tiny_mnist, tmp_path):  # noqa: F811
    p = _torchrun(_train_args(tiny_mnist, tmp_path / "ddp"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("done: epoch 1") == 1  # rank 0 alone prints
    files = sorted(f.name for f in (tmp_path / "ddp").iterdir())
    assert files == ["checkpoint.pt", "log.json", "model.pt"]  # one writer, no temp files left
    assert cli.main([str(a) for a in _train_args(tiny_mnist, tmp_path / "one")]) == 0
    got = torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)
    want = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    start = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    log_ddp = json.loads((tmp_path / "ddp" / "log.json").read_text())
    log_one = json.loads((tmp_path / "one" / "log.json").read_text())
    for key in ("train_loss", "train_ce", "train_reg", "train_acc", "test_acc"):
        assert log_ddp[1][key] == pytest.approx(log_one[1][key], rel=1e-5, abs=1e-7), key
    assert log_one[1]["train_reg"] > 0 and log_one[1]["test_acc"] > 0.5 and start["epoch"] == 1


@pytest.mark.slow
def test_torchrun_resume_finished_run_and_parseval(tiny_mnist, tmp_path):  # noqa: F811
    args = _train_args(tiny_mnist, tmp_path / "ddp", method="parseval")
    assert _torchrun(args).returncode == 0
    before = torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)
    p = _torchrun(args + ["--resume"])  # nothing left to do: every rank loads, nobody hangs
    assert p.returncode == 0, p.stderr[-3000:]
    after = torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert cli.main([str(a) for a in _train_args(tiny_mnist, tmp_path / "one", method="parseval")]) == 0
    want = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    for k in want:
        torch.testing.assert_close(after[k], want[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_torchrun_killed_mid_run_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL to the whole torchrun session (agent and both ranks) after the epoch-1 checkpoint,
    then ``--resume`` under torchrun: the final weights equal an uninterrupted torchrun run.

    (Not a one-process run: over 3 DeepDefense epochs the float order of the gradient
    all-reduce is enough to move the weights by ~2e-4, as is training with 1 thread instead
    of 2, because the unrolled DeepFool's discrete choices amplify rounding; DDP equals one
    process to 1e-6 over the short run of the first test.)"""
    import signal

    from test_cli import make_mnist
    from test_cli_reliability import wait_for_epoch

    data = make_mnist(tmp_path / "mnist", n_train=1000, n_test=100)
    args = _train_args(data, tmp_path / "ddp")
    args[args.index("--epochs") + 1] = "3"
    proc = subprocess.Popen(_torchrun_cmd(args), cwd=TESTS_DIR, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_epoch(proc, tmp_path / "ddp", 1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the session this test started: agent and workers
        proc.wait()
    at_kill = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= at_kill < 3
    p = _torchrun(args + ["--resume"])
    assert p.returncode == 0, p.stderr[-3000:]
    ref = list(args)
    ref[ref.index(tmp_path / "ddp")] = tmp_path / "ref"
    p = _torchrun(ref)
    assert p.returncode == 0, p.stderr[-3000:]
    got = torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)
    want = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_fit_accepts_an_already_wrapped_model(tmp_path):
    """A DDP model handed to ``fit`` trains like the plain model and the files hold the plain
    module's weights (no ``module.`` prefix). One gloo process (file rendezvous), in this process."""
    import torch.distributed as dist
    from torch import nn

    from ddfast.paper import models, train
    from test_train import tiny_cfg, tiny_data

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        ddp = nn.parallel.DistributedDataParallel(models.MLP())
        log = train.fit(ddp, *tiny_data(n_train=100, n_test=20), tiny_cfg(epochs=1), out_dir=tmp_path / "o",
                        progress=False)
    finally:
        dist.destroy_process_group()
    torch.manual_seed(0)
    plain = models.MLP()
    want = train.fit(plain, *tiny_data(n_train=100, n_test=20), tiny_cfg(epochs=1), progress=False)
    state = torch.load(tmp_path / "o" / "model.pt", weights_only=True)
    assert set(state) == set(plain.state_dict())  # no "module." prefix
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=1e-6, msg=k)
    assert log[1]["train_loss"] == pytest.approx(want[1]["train_loss"], rel=1e-6)


_SHARD_WORKER = """
import sys, torch, torch.distributed as dist
from ddfast.paper import models, train
rank, path = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="file://" + path + "/rendezvous", rank=rank, world_size=2)
torch.manual_seed(0)
model = models.MLP(hidden=(16,)).eval()
x = torch.randn(95, 1, 28, 28)
y = model(x).argmax(1)
cfg = train.TrainConfig(method="adversarial", adv_max_iter=10)
out = train.shared_adversarial_set(model, x, y, cfg, False, rank, 2, chunk=20)
torch.save(out, f"{path}/rank{rank}.pt")
dist.barrier()
dist.destroy_process_group()
"""


def test_adversarial_set_is_shared_across_ranks_bit_for_bit(tmp_path):
    """Under DDP each rank attacks every other chunk of the fixed set and receives the rest:
    both ranks end with exactly the set one process computes (chunks 0, 2, 4 on rank 0; 1, 3 on 1)."""
    from ddfast.paper import models, train

    procs = [subprocess.Popen([sys.executable, "-c", _SHARD_WORKER, str(r), str(tmp_path)], cwd=TESTS_DIR,
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    torch.set_num_threads(1)  # as in the workers: the numerics of a batch depend on the thread count
    torch.manual_seed(0)
    model = models.MLP(hidden=(16,)).eval()
    x = torch.randn(95, 1, 28, 28)
    y = model(x).argmax(1)
    want = train.adversarial_set(model, x, y, max_iter=10, batch_size=20, progress=False)
    assert not torch.equal(want, x)
    for r in (0, 1):
        assert torch.equal(torch.load(tmp_path / f"rank{r}.pt", weights_only=True), want)
