"""The GPU path, checked on the CPU: check_every blocks without host reads give the same
results, host syncs fall with the block length, and memory-bounded chunks give the results
of explicit chunking."""
import pytest
import torch
from torch import nn

import ddfast
from ddfast import budget
from sync_counter import SyncCounter


def _net(seed=0, d=10, k=6):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, k)).double()


def _fields(res):
    return (res.delta, res.iterations, res.success, res.label, res.adv_label)


@pytest.mark.parametrize("kw", [{}, {"bounds": (-1.0, 1.0)}, {"norm": "linf"}, {"candidates": 3},
                                {"batch_size": 5}, {"labels": True}, {"max_iter": 2}])
def test_check_every_gives_the_same_results(kw):
    kw = {"max_iter": 12, **kw}
    model, x = _net(1), torch.rand(16, 10, dtype=torch.float64) * 2 - 1
    y = None
    if kw.pop("labels", False):                  # half right, half wrong
        y = model(x).argmax(1)
        y[::2] = (y[::2] + 1) % 6
    want = ddfast.deepfool(model, x, y, check_every=1, **kw)
    assert int(want.iterations.max()) >= 2
    for k in (3, 50):
        got = ddfast.deepfool(model, x, y, check_every=k, **kw)
        for a, b in zip(_fields(got), _fields(want)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_host_syncs_fall_with_check_every():
    model, x = _net(2), torch.rand(32, 10, dtype=torch.float64)
    counts = {}
    for k in (1, 3, 50):
        with SyncCounter() as c:
            res = ddfast.deepfool(model, x, max_iter=50, check_every=k, reuse_jacobians=False)
        counts[k] = c.count
    assert int(res.iterations.max()) > 3
    assert counts[50] < counts[3] < counts[1], counts


def test_check_every_is_validated():
    with pytest.raises(ValueError, match="check_every"):
        ddfast.deepfool(_net(), torch.rand(3, 10, dtype=torch.float64), check_every=0)
    with pytest.raises(TypeError, match="check_every"):
        ddfast.deepfool(_net(), torch.rand(3, 10, dtype=torch.float64), check_every=1.5)


def _assert_chunks_of(model, x, n):
    """batch_size=None picks chunks of n (K = 6 rows) and equals explicit chunking by n."""
    assert budget.chunk_size(model, x, 6) == n
    got = ddfast.deepfool(model, x)
    want = ddfast.deepfool(model, x, batch_size=n)
    for a, b in zip(_fields(got), _fields(want)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_memory_budget_chunks_like_explicit_chunking(monkeypatch):
    model, x = _net(3), torch.rand(20, 10, dtype=torch.float64)
    per_sample = budget.sample_bytes(model, x[:1], 6)   # K = 6 rows, as the attack counts
    assert per_sample > 0
    monkeypatch.setattr(budget, "MEMORY_BUDGET", 3 * per_sample)
    _assert_chunks_of(model, x, 3)
    monkeypatch.setattr(budget, "MEMORY_BUDGET", 1)
    assert budget.chunk_size(model, x, 5) == 1


def test_cpu_chunks_stay_under_the_cpu_chunk_caps(monkeypatch):
    model, x = _net(3), torch.rand(20, 10, dtype=torch.float64)
    per_sample = budget.sample_bytes(model, x[:1], 6)
    monkeypatch.setattr(budget, "MEMORY_BUDGET", 100 * per_sample)     # memory would allow all 20
    monkeypatch.setattr(budget, "CPU_CHUNK_BYTES", 4 * per_sample)
    _assert_chunks_of(model, x, 4)
    monkeypatch.setattr(budget, "CPU_CHUNK_BYTES", 1000 * per_sample)
    assert budget.chunk_size(model, x, 6) == 20
    monkeypatch.setattr(budget, "CPU_CHUNK_SAMPLES", 7)
    assert budget.chunk_size(model, x, 6) == 7


def test_sample_bytes_grow_with_the_model_and_the_rows():
    small, x = _net(4), torch.rand(2, 10, dtype=torch.float64)
    wide = nn.Sequential(nn.Linear(10, 4096), nn.ReLU(), nn.Linear(4096, 6)).double()
    assert budget.sample_bytes(wide, x[:1], 5) > budget.sample_bytes(small, x[:1], 5)
    assert budget.sample_bytes(small, x[:1], 50) > budget.sample_bytes(small, x[:1], 5)


# ------------------------------------------------------------------ capturable regularizer
def _bn_cnn(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    return m.double()


@pytest.mark.parametrize("kw", [{}, {"candidates": 3}, {"max_iter": 1}, {"max_iter": 8}])
def test_capturable_regularizer_has_the_same_value_and_gradients(kw):
    model, x = _bn_cnn(1), torch.randn(10, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    y[::3] = (y[::3] + 1) % 5                                  # some samples misclassified
    model.train()
    params = [p for p in model.parameters()]
    r0, info0 = ddfast.deepdefense_loss(model, x, y, c=3.0, d=1.0, return_info=True, **kw)
    r1, info1 = ddfast.deepdefense_loss(model, x, y, c=3.0, d=1.0, return_info=True, capturable=True, **kw)
    assert int(info0.iterations.max()) >= 1 and bool(info0.correct.any()) and bool((~info0.correct).any())
    torch.testing.assert_close(r1, r0, rtol=1e-10, atol=0)
    assert torch.equal(info1.iterations, info0.iterations) and torch.equal(info1.correct, info0.correct)
    torch.testing.assert_close(info1.ratio, info0.ratio, rtol=1e-10, atol=1e-14)
    for a, b in zip(torch.autograd.grad(r1, params), torch.autograd.grad(r0, params)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_capturable_regularizer_reads_nothing_back():
    model, x = _bn_cnn(2).float(), torch.randn(12, 1, 8, 8)
    y = torch.randint(0, 5, (12,))
    with SyncCounter() as c:
        ddfast.deepdefense_loss(model, x, y, capturable=True).backward()
    assert c.count == 0, c.ops
    with SyncCounter() as c:
        ddfast.deepdefense_loss(model, x, y).backward()
    assert c.count > 0                                      # the counter sees the default path's reads
