"""End to end on a GPU (marked ``gpu``; skipped without one): ``deepfool`` and ``deepdefense_loss``
on CUDA tensors, with each backend that runs there, against the same calls on the CPU.

float64 runs the torch composition on both devices and must agree to rounding; float32 runs
the fused kernels and must agree with the CPU's float32 run to float32 accuracy (a DeepFool
path can fork where a sample sits within rounding of two boundaries, so iterations are
compared on all but a few samples and norms on the samples whose paths agree).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import ddfast

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def _no_tf32():
    """float32 convolutions in float32: cuDNN may use TF32 (10-bit mantissas) by default."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _model_and_data(dtype: torch.dtype, n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(6 * 12 * 12, 64), nn.ReLU(), nn.Linear(64, 10)).to(dtype)
    x = torch.rand(n, 1, 28, 28, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (n,), generator=g)
    return model, x, y


def _gpu_backends(dtype):
    return ddfast.available_backends("cuda", dtype)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_float64_matches_cpu(norm):
    model, x, _ = _model_and_data(torch.float64)
    cpu = ddfast.deepfool(model, x, norm=norm, max_iter=20)
    gpu = ddfast.deepfool(copy.deepcopy(model).cuda(), x.cuda(), norm=norm, max_iter=20)
    assert torch.equal(gpu.iterations.cpu(), cpu.iterations)
    assert torch.equal(gpu.success.cpu(), cpu.success)
    torch.testing.assert_close(gpu.delta.cpu(), cpu.delta, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_deepfool_float32_backends_match_cpu(backend, norm):
    if backend not in _gpu_backends(torch.float32):
        pytest.skip(f"backend {backend} does not run here")
    model, x, _ = _model_and_data(torch.float32, n=200)
    cpu = ddfast.deepfool(model, x, norm=norm, max_iter=30)
    with ddfast.set_backend(backend):
        gpu = ddfast.deepfool(copy.deepcopy(model).cuda(), x.cuda(), norm=norm, max_iter=30)
    dn_gpu, dn_cpu = gpu.norms().cpu(), cpu.norms()
    rel = (dn_gpu - dn_cpu).abs() / dn_cpu.clamp_min(1e-12)
    # a path forks where a sample sits within rounding of two boundaries or (linf) where a
    # gradient component is within rounding of 0 and its sign flips: a few samples, no more
    same = (gpu.iterations.cpu() == cpu.iterations) & (gpu.success.cpu() == cpu.success) & (rel <= 1e-3)
    assert same.float().mean() >= 0.97, f"{int((~same).sum())} of {len(same)} samples differ"
    assert rel[same].median() <= 1e-5


@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_deepdefense_loss_and_gradients_match_cpu(backend):
    if backend not in _gpu_backends(torch.float32):
        pytest.skip(f"backend {backend} does not run here")
    model, x, y = _model_and_data(torch.float64, n=32, seed=1)
    with torch.no_grad():
        y = model(x).argmax(1)
        y[::3] = (y[::3] + 1) % 10  # some samples misclassified: the other branch of the penalty
    ref_loss = ddfast.deepdefense_loss(model, x, y, max_iter=3)
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))

    gpu_model = copy.deepcopy(model).float().cuda()
    loss = ddfast.deepdefense_loss(gpu_model, x.float().cuda(), y.cuda(), max_iter=3, backend=backend)
    grads = torch.autograd.grad(loss, list(gpu_model.parameters()))
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=2e-3, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        scale = r.abs().max().clamp_min(1e-12)
        assert ((g.double().cpu() - r).abs().max() / scale) < 5e-3


def test_deepdefense_second_order_float64_matches_cpu():
    model, x, y = _model_and_data(torch.float64, n=8, seed=2)
    with torch.no_grad():
        y = model(x).argmax(1)

    def grad_norm(m, xx, yy):
        loss = ddfast.deepdefense_loss(m, xx, yy, max_iter=2)
        gs = torch.autograd.grad(loss, list(m.parameters()), create_graph=True)
        total = sum((g * g).sum() for g in gs)
        return torch.autograd.grad(total, list(m.parameters()))

    want = grad_norm(model, x, y)
    gpu_model = copy.deepcopy(model).cuda()
    got = grad_norm(gpu_model, x.cuda(), y.cuda())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-7, atol=1e-10)


def test_tf32_convolutions_warn_and_exact_float32_keeps_success():
    """With TF32 convolutions (PyTorch's cuDNN default) deepfool warns; in exact float32 every
    reported success survives a re-evaluation of x_adv in another batch size."""
    model, x, _ = _model_and_data(torch.float32, n=100, seed=3)
    model, x = model.cuda(), x.cuda()
    torch.backends.cudnn.allow_tf32 = True
    with pytest.warns(UserWarning, match="TF32"):
        ddfast.deepfool(model, x[:4], max_iter=5)
    torch.backends.cudnn.allow_tf32 = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = ddfast.deepfool(model, x, bounds=(0, 1))
    with torch.no_grad():
        again = torch.cat([model(res.x_adv[i:i + 7]).argmax(1) for i in range(0, len(x), 7)])
    assert torch.equal(again[res.success], res.adv_label[res.success])
