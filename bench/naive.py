"""A straightforward batched torch DeepFool: what one writes without ddfast.

Per-class ``torch.autograd.grad`` calls build the full Jacobian ``[B, K, D]``; the
candidate arithmetic runs on the stacked tensor; finished samples stay in the batch under a
mask. Same math as ddfast (DESIGN.md), L2 only; used by the benchmarks as a baseline."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor


def naive_deepfool(model: Callable[[Tensor], Tensor], x: Tensor, y: Optional[Tensor] = None,
                   max_iter: int = 50, overshoot: float = 0.02) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(x_adv, iterations [B] int64, fooled [B] bool)``."""
    B = x.shape[0]
    x0 = x.detach()
    r_tot = torch.zeros_like(x0)
    iterations = torch.zeros(B, dtype=torch.int64, device=x.device)
    rows = torch.arange(B, device=x.device)
    with torch.enable_grad():
        xt = x0.clone().requires_grad_(True)
        logits = model(xt)
        ref = logits.argmax(1) if y is None else y
        active = logits.argmax(1) == ref
        for _ in range(max_iter):
            if not active.any():
                break
            K = logits.shape[1]
            grads = torch.stack([torch.autograd.grad(logits[:, k].sum(), xt, retain_graph=k < K - 1)[0]
                                 for k in range(K)], 1).flatten(2)                  # [B, K, D]
            w = grads - grads[rows, ref][:, None]
            f = (logits - logits[rows, ref][:, None]).detach()
            wn = w.norm(dim=2)
            dist = f.abs() / wn
            dist[rows, ref] = float("inf")
            l = dist.argmin(1)
            w_l = w[rows, l]
            r = ((dist[rows, l] + 1e-4) / wn[rows, l])[:, None] * w_l
            r_tot = r_tot + (r * active[:, None]).view_as(x0)
            iterations += active.long()
            xt = (x0 + (1 + overshoot) * r_tot).requires_grad_(True)
            logits = model(xt)
            active = active & (logits.argmax(1) == ref)
    x_adv = (x0 + (1 + overshoot) * r_tot).detach()
    return x_adv, iterations, logits.argmax(1) != ref
