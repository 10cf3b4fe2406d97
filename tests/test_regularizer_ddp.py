"""deepdefense_loss under DistributedDataParallel: two gloo processes (loopback; file
rendezvous, so no port can be taken by a concurrent run), each on
half of the batch, give the same parameter gradients as one process on the whole batch.
The user's recipe: ``F.cross_entropy(ddp(x), y) + deepdefense_loss(ddp, x, y)``."""
import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from ddfast.regularizer import deepdefense_loss

KW = dict(lam=2.0, c=3.0, d=1.0, max_iter=4, overshoot=0.02)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).double()


def _data(B=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (B,), generator=g)
    return x, y


def _loss(model, x, y):
    return F.cross_entropy(model(x), y) + deepdefense_loss(model, x, y, **KW)


def _worker(rank, world, out_dir, find_unused):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(out_dir, "rendezvous"), rank=rank,
                            world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(_model(), find_unused_parameters=find_unused)
        x, y = _data()
        part = x.shape[0] // world
        sl = slice(rank * part, (rank + 1) * part)
        loss = _loss(model, x[sl], y[sl])
        loss.backward()
        torch.save([p.grad for p in model.module.parameters()], os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()       # neither rank tears gloo down while the other still talks to it
        open(os.path.join(out_dir, f"rank{rank}.done"), "w").close()   # every rank's result is saved
    finally:
        dist.destroy_process_group()


def _spawn(world, out, find_unused):
    """mp.spawn of the workers. Once in a few dozen runs a gloo worker has aborted in teardown
    ("terminate called without an active exception", SIGABRT); such a death is accepted (with a
    warning) only when every rank had passed the final barrier, i.e. every result was saved."""
    try:
        mp.spawn(_worker, args=(world, out, find_unused), nprocs=world, join=True)
    except mp.ProcessExitedException as exc:
        if not all(os.path.exists(os.path.join(out, f"rank{r}.done")) for r in range(world)):
            raise
        warnings.warn(f"a worker died at exit after finishing its work: {exc}")


@pytest.mark.parametrize("find_unused", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_ddp_two_processes_equal_one_process(find_unused):
    model = _model()
    x, y = _data()
    want = torch.autograd.grad(_loss(model, x, y), list(model.parameters()))
    with tempfile.TemporaryDirectory() as out:
        _spawn(2, out, find_unused)
        got = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]
    for a, b in zip(got[0], got[1]):          # all-reduced: identical on both ranks
        assert torch.equal(a, b)
    assert any(float(g.abs().max()) > 0 for g in want)
    for a, b in zip(got[0], want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
