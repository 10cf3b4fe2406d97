"""How many samples one chunk of :func:`ddfast.deepfool` may hold: a memory budget divided
by an estimate of one sample's peak memory.

The budget is ``ddfast.budget.MEMORY_BUDGET`` bytes when set, else the ``DDFAST_MEMORY_BUDGET``
environment variable, else half of what is free: ``torch.cuda.mem_get_info`` on CUDA, the
kernel's ``MemAvailable`` on CPU, where a chunk also stays under :data:`CPU_CHUNK_BYTES` and
:data:`CPU_CHUNK_SAMPLES` (for speed). One sample's peak is read off one forward of one sample (the
outputs of every op that allocates) and the Jacobian's shape: the forward graph, C vmapped
backward copies of its largest activation and of the input, and the attack's own rows.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from .guard import forward

__all__ = ["MEMORY_BUDGET", "CPU_CHUNK_BYTES", "CPU_CHUNK_SAMPLES", "memory_budget", "sample_bytes", "chunk_size"]

#: Bytes a chunk may use; None: the environment variable, else half of the free memory.
MEMORY_BUDGET: Optional[int] = None

#: On the CPU a chunk also stays under this many bytes and :data:`CPU_CHUNK_SAMPLES` samples:
#: larger chunks are slower there, not faster (fresh pages for every step's big buffers: the
#: 10000-image ConvNet run in one budget-sized chunk of 3525 spent more time in the kernel than in
#: torch, at half the speed of chunks of 100). Best measured chunks: ConvNet 100, LeNet 250, MLP
#: 500 (bench/results/chunking_cpu_*.json); the caps give 116, 353 and 512.
CPU_CHUNK_BYTES = 384 << 20
CPU_CHUNK_SAMPLES = 512


class _Activations(TorchDispatchMode):
    """Sum and largest of the element counts of every op output that allocates."""

    def __init__(self) -> None:
        super().__init__()
        self.total = self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, Tensor):
                    self.total += t.numel()
                    self.largest = max(self.largest, t.numel())
        return out


def memory_budget(device: torch.device) -> int:
    """Bytes a chunk on ``device`` may use."""
    if MEMORY_BUDGET is not None:
        return int(MEMORY_BUDGET)
    if os.environ.get("DDFAST_MEMORY_BUDGET"):
        return int(float(os.environ["DDFAST_MEMORY_BUDGET"]))
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kib * 1024 // 2
    except (OSError, StopIteration, ValueError):
        return 4 << 30


def sample_bytes(model: Callable, x1: Tensor, n_rows: int) -> int:
    """Peak bytes of one sample ``x1`` [1, ...] in an attack with ``n_rows`` Jacobian rows."""
    counter = _Activations()
    with torch.no_grad(), counter:
        forward(model, x1.detach().reshape(1, -1), x1.shape[1:])
    D = x1[0].numel()
    elements = counter.total + n_rows * (3 * D + 2 * counter.largest) + 8 * D
    return elements * x1.element_size()


def chunk_size(model: Callable, x: Tensor, n_rows: int) -> int:
    """Samples per chunk (>= 1) that fit the budget on x's device (and, on the CPU,
    :data:`CPU_CHUNK_BYTES` and :data:`CPU_CHUNK_SAMPLES`)."""
    per_sample = max(1, sample_bytes(model, x[:1], n_rows))
    limit = memory_budget(x.device)
    n = x.shape[0]
    if x.device.type == "cpu":
        limit, n = min(limit, CPU_CHUNK_BYTES), min(n, CPU_CHUNK_SAMPLES)
    return max(1, min(n, limit // per_sample))
