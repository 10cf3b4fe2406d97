"""Fitting the tools training scripts already use: autocast, torch.compile."""
import pytest
import torch

import ddfast
from ddfast import ops
from conftest import make_cnn, make_mlp


def test_attack_under_cpu_autocast_bf16():
    model = make_cnn(dtype=torch.float32).eval()
    x = torch.randn(8, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = ddfast.deepfool(model, x, max_iter=20)
    assert res.delta.dtype == torch.float32 and torch.isfinite(res.delta).all()
    assert res.success.float().mean() >= 0.5
    with torch.no_grad():
        fooled = model(res.x_adv).argmax(1) != res.label
    assert (fooled | ~res.success).float().mean() >= 0.75  # bf16 decisions, float32 check


def test_regularizer_under_cpu_autocast_bf16_backpropagates():
    model = make_cnn(dtype=torch.float32)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y) + ddfast.deepdefense_loss(model, x, y)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_regularizer_step_math_runs_in_float32_under_bf16_autocast(monkeypatch):
    from ddfast import backends

    seen = []
    real = backends.implementation

    def spy(op, device, dtype):
        fn = real(op, device, dtype)

        def wrapped(*args):
            if op in ("select_boundary", "boundary_step"):
                seen.append((op, args[0].dtype, args[1].dtype))
            return fn(*args)
        return wrapped

    monkeypatch.setattr(backends, "implementation", spy)
    torch.manual_seed(0)
    model = make_cnn(dtype=torch.float32)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16            # the logits do come in bf16
        ddfast.deepdefense_loss(model, x, y, max_iter=3)
    assert {name for name, *_ in seen} == {"select_boundary", "boundary_step"}
    assert all(a == b == torch.float32 for _, a, b in seen), seen


def _penalty_of_step(delta, x, correct, fdiff, w):
    r = ops.boundary_step(fdiff, w)
    return ops.deepdefense_penalty(delta + r, x, correct, 25.0, 5.0).sum()


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_ops_compile_fullgraph_first_order(backend):
    torch.manual_seed(0)
    delta = (0.01 * torch.randn(4, 6)).requires_grad_(True)
    w = torch.randn(4, 6, requires_grad=True)
    fdiff = torch.randn(4, requires_grad=True)
    x, correct = torch.randn(4, 6), torch.tensor([True, False, True, False])
    eager = _penalty_of_step(delta, x, correct, fdiff, w)
    compiled = torch.compile(_penalty_of_step, fullgraph=True, backend=backend)(delta, x, correct, fdiff, w)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(torch.autograd.grad(eager, (delta, fdiff, w)),
                    torch.autograd.grad(compiled, (delta, fdiff, w))):
        torch.testing.assert_close(a, b)


def test_regularizer_with_compiled_model_uses_the_eager_module():
    model = make_mlp(k=4)
    compiled = torch.compile(model, backend="aot_eager")
    x, y = torch.randn(6, 20, dtype=torch.float64), torch.randint(0, 4, (6,))
    eager_reg = ddfast.deepdefense_loss(model, x, y)
    g_eager = torch.autograd.grad(eager_reg, list(model.parameters()))
    reg = ddfast.deepdefense_loss(compiled, x, y)
    g = torch.autograd.grad(reg, list(model.parameters()))
    torch.testing.assert_close(reg, eager_reg)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)
