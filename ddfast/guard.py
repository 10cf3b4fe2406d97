"""What every entry point promises the caller, and the one assumption it checks first.

* :func:`model_guard`: inside the block an ``nn.Module`` runs in eval mode; afterwards every
  submodule's mode, every buffer the forward changed (in place or by rebinding) and torch's
  global RNG state (CPU, and the device of ``x`` on CUDA) are as they were.
* :func:`check_sample_independence`: DeepFool treats each sample alone (compaction and
  chunking change the batch), so a model whose logits for a sample depend on the other
  samples of its batch (batch statistics, ``x - x.mean(0)``) is refused, never attacked.
* :func:`forward`: the model sees a copy of its input, so a model that works on its input in
  place (``x.mul_(2)``, ``relu_`` first) runs and the caller's tensors stay untouched.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .validate import check_logits

__all__ = ["eval_modes", "model_guard", "check_sample_independence", "forward", "BatchCoupledModelError"]


class BatchCoupledModelError(ValueError):
    """The model's logits for a sample depend on the other samples of its batch."""


def forward(model: Callable, x_flat: Tensor, shape: torch.Size) -> Tensor:
    """``model`` on a copy of ``x_flat`` [n, D] viewed as ``[n, *shape]`` (gradients reach x_flat)."""
    return model(x_flat.view(x_flat.shape[0], *shape).clone())


def _buffers(model: Callable) -> List[Tuple[nn.Module, str, Tensor, Tensor, int]]:
    if not isinstance(model, nn.Module):
        return []
    return [(m, name, b, b.detach().clone(), b._version) for m in model.modules()
            for name, b in m._buffers.items() if b is not None]


@contextlib.contextmanager
def eval_modes(model: Callable) -> Iterator[None]:
    """Every submodule of an ``nn.Module`` in eval mode inside; each one's mode restored after."""
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def model_guard(model: Callable, x: Tensor, keep_rng: bool = True) -> Iterator[None]:
    """Eval mode inside; modes, buffers and (``keep_rng``) the RNG state of the CPU and of x's
    CUDA device restored after."""
    buffers = _buffers(model)
    devices = [x.device] if x.is_cuda else []
    with torch.random.fork_rng(devices=devices, enabled=keep_rng), eval_modes(model):
        try:
            yield
        finally:
            with torch.no_grad():
                for m, name, b, saved, version in buffers:
                    m._buffers[name] = b
                    if b._version != version:
                        b.copy_(saved)


def _tolerance(*logits: Tensor) -> float:
    """Batch-size-dependent rounding (BLAS blocking, TF32) stays below this, relative: float32's
    at least, as a model may compute in float32 whatever its input and output dtypes."""
    if any(t.dtype in (torch.float16, torch.bfloat16) or t.is_cuda for t in logits):
        return 1e-2
    return math.sqrt(torch.finfo(torch.float32).eps)


def check_sample_independence(model: Callable, x_flat: Tensor, shape: torch.Size, where: str,
                              logits: Optional[Tensor] = None) -> None:
    """The logits of sample 0 alone equal its row of the logits of the batch ``x_flat`` [B, D]
    (``logits`` [B, K] when already computed, else those of its first 8 samples); else
    :class:`BatchCoupledModelError`. One or two forwards of a few samples, without a graph."""
    if x_flat.shape[0] < 2:
        return
    why = ("DeepFool needs each sample's logits to depend on that sample only (it drops finished "
           "samples from the batch and works in chunks): no batch statistics (batch norm in training "
           "mode or with track_running_stats=False), no ops across the batch (x - x.mean(0)), no "
           "randomness in eval mode")
    if logits is None:                          # the model's own errors here are the caller's
        x_flat = x_flat[:8].detach()
        with torch.no_grad():
            logits = check_logits(forward(model, x_flat, shape), x_flat.shape[0])
    try:
        with torch.no_grad():
            alone = check_logits(forward(model, x_flat[:1].detach(), shape), 1).detach()
    except (RuntimeError, ValueError) as exc:
        raise BatchCoupledModelError(f"{where}: the model fails on a batch of one sample ({exc}); {why}") from exc
    ref = logits[:1].detach()
    if not bool(torch.isfinite(ref).all()):     # nothing to compare: the caller handles non-finite logits
        return
    gap = float((alone.to(ref.dtype) - ref).abs().max())
    scale = 1.0 + float(ref.abs().max())
    if not gap <= _tolerance(ref, alone, x_flat) * scale:
        raise BatchCoupledModelError(f"{where}: the model's logits for a sample change with the rest of its "
                                     f"batch (by {gap:.3g} for sample 0 alone vs in the batch of "
                                     f"{x_flat.shape[0]}); {why}")
