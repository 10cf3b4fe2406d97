"""Batched multi-class DeepFool (L2 and Linf) with per-sample early exit.

The math is DESIGN.md's (and :mod:`ddfast.reference`'s): at each step every still-active
sample linearises the model at its iterate, steps to the closest candidate boundary
(``select_boundary``), and the iterate ``x0 + (1 + overshoot) * r_tot`` (clipped to
``bounds``) is checked. Samples that are done leave the batch (compaction): later Jacobians
are computed for the remaining samples only.

For a piecewise-linear model (ReLU, max-pool, linear and convolution layers: see
:mod:`ddfast.regions`) a sample whose activation pattern has not changed since its last
Jacobian reuses those rows, exactly equal to what a backward would give, instead of a new
backward: with clipping most later steps are such. Without bounds it never happens (a step that
stays in its region crosses the boundary: the sample is done), so the attack does not look.
``deepfool(..., reuse_jacobians=False)`` or ``REUSE_JACOBIANS = False`` turns this off.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import backends, jacobian, ops, regions
from .reference import STEP_EPS
from .validate import (NonFiniteLogitsError, as_labels, check_batch_size, check_bounds, check_candidates,
                        check_graph_logits, check_input, check_logits, check_max_iter, check_model_device,
                        check_nonneg, explain_model_errors, frozen_model, warn_tf32)

__all__ = ["DeepFoolResult", "NonFiniteLogitsError", "deepfool"]

#: Reuse a sample's Jacobian rows while its activation pattern is unchanged (see the top).
REUSE_JACOBIANS = True


@dataclass
class DeepFoolResult:
    """Result of :func:`deepfool` for a batch of B samples.

    Attributes:
        delta: [B, *x.shape[1:]] perturbation applied (overshoot and bounds included),
            in the input's units and dtype.
        x_adv: ``x + delta``.
        iterations: [B] int64 steps taken (0 where none was needed).
        success: [B] bool, the prediction at ``x_adv`` differs from ``label`` (with labels
            given, a sample that was already misclassified counts as a success).
        label: [B] int64 reference class: the given label, else the prediction at x.
        adv_label: [B] int64 prediction at ``x_adv`` (``label`` where the model's logits at
            ``x_adv`` are not finite: such a sample stops there, unsuccessful).
    """

    delta: Tensor
    x_adv: Tensor
    iterations: Tensor
    success: Tensor
    label: Tensor
    adv_label: Tensor

    def __len__(self) -> int:
        return self.delta.shape[0]

    def norms(self, p: float = 2) -> Tensor:
        """[B] ``||delta_i||_p``."""
        return torch.linalg.vector_norm(self.delta.flatten(1), ord=p, dim=1)


def _competing_classes(logits: Tensor, ref: Tensor, k: Optional[int]) -> Tensor:
    """[B, C] classes competing with ``ref``: every other class (C = K - 1), or with ``k``
    candidates the top k-1 other classes by logit at x (C = k - 1)."""
    B, K = logits.shape
    if k is None or k >= K:
        others = torch.arange(K - 1, device=logits.device).expand(B, K - 1)
        return others + (others >= ref[:, None]).long()
    masked = logits.scatter(1, ref[:, None], -math.inf)
    return masked.topk(k - 1, dim=1).indices


def _fresh_rows(model: Callable, xg: Tensor, logits_g: Tensor, go: Tensor, g_rows: Optional[Tensor],
                need: Optional[Tensor], shape: torch.Size) -> Tensor:
    """Jacobian rows [m, C, D] (directions ``go`` [C, n, K]) of the active samples ``need``
    (None: all n). The graph batch ``(xg, logits_g)`` holds them at its rows ``g_rows`` (None:
    rows 0..n-1, the whole batch). Where few of its rows are wanted, a fresh forward on them
    costs less than a backward over all of them."""
    if need is None and g_rows is None:
        return jacobian.direction_grads(model, xg, logits_g, go, None, shape=shape)
    n_graph, K = logits_g.shape
    want = need if g_rows is None else (g_rows if need is None else g_rows.index_select(0, need))
    go_m = go if need is None else go.index_select(1, need)
    m = want.numel()
    if (n_graph - m) * K > m:
        xs, ls = jacobian.forward_with_graph(model, xg.detach().index_select(0, want), shape)
        return jacobian.direction_grads(model, xs, ls, go_m, None, shape=shape)
    go_graph = go.new_zeros(go.shape[0], n_graph, K)
    go_graph.index_copy_(1, want, go_m)        # the graph's other rows get no direction
    return jacobian.direction_grads(model, xg, logits_g, go_graph, want, shape=shape)


def _attack_chunk(model: Callable, x: Tensor, y: Optional[Tensor], max_iter: int,
                  overshoot: float, norm: float, k: Optional[int],
                  lo: Optional[float], hi: Optional[float],
                  reuse_jacobians: bool) -> Tuple[DeepFoolResult, Tensor]:
    """DeepFool on one chunk; also returns how many of its samples stopped at an iterate where
    the model's logits were not finite (a 0-d tensor: read once, after every chunk)."""
    B = x.shape[0]
    shape = x.shape[1:]
    dtype, dev = x.dtype, x.device
    x0 = x.detach().reshape(B, -1)
    if x0.is_inference():                      # a tensor made under torch.inference_mode()
        x0 = x0.clone()
    xg, logits_g = jacobian.forward_with_graph(model, x0, shape)
    logits = check_logits(logits_g, B).detach().to(dtype)
    K = logits.shape[1]
    nonfinite = ~torch.isfinite(logits).all(1)
    if bool(nonfinite.any()):
        bad = nonfinite.nonzero().squeeze(1)
        raise NonFiniteLogitsError(f"model returned NaN or Inf logits at x for {bad.numel()} of {B} samples "
                                   f"(rows {bad[:5].tolist()}{' ...' if bad.numel() > 5 else ''}): "
                                   "nothing to attack there")
    pred = logits.argmax(1)
    if y is not None:
        y = as_labels(y, B, K, dev)
    ref = pred if y is None else y
    cand = _competing_classes(logits, ref, k)
    go = jacobian.directions(B, K, cand, logits_g, ref)   # [C, B, K] output directions e_cand - e_ref

    backend = backends.resolve(None, dev, dtype)   # once: the loop's op calls skip checks and dispatch
    all_active = torch.ones(B, dtype=torch.bool, device=dev)
    x_final = x0.clone()                       # rows are overwritten when a sample stops
    iterations = torch.zeros(B, dtype=torch.int64, device=dev)
    success = torch.zeros(B, dtype=torch.bool, device=dev)
    adv_label = pred.clone()
    n_nonfinite = torch.zeros((), dtype=torch.int64, device=dev)

    # The active set, compacted: idx (its rows of the batch) and its working tensors.
    idx = torch.arange(B, device=dev)
    x0_a, r_tot_a, ref_a, x_cur = x0, torch.zeros_like(x0), ref, x0
    keep = None if y is None else pred == y
    n = n_keep = B
    if keep is not None:
        success |= ~keep
        n_keep = int(keep.sum())
    # Jacobian reuse: the rows [n, C, D] of the active samples and the activation pattern of the
    # iterates they were computed at (None before the first, or for a model without patterns).
    jac_a = pattern_a = None
    reuse = reuse_jacobians and (lo is not None or hi is not None)
    constants = regions.model_constants(model) if reuse else None
    for t in range(max_iter):
        g_rows = None                          # rows of the graph batch holding the active samples
        if keep is not None and n_keep < n:
            g_rows = keep.nonzero().squeeze(1)
            idx, x0_a, r_tot_a, ref_a, cand, logits = (
                t_.index_select(0, g_rows) for t_ in (idx, x0_a, r_tot_a, ref_a, cand, logits))
            go = go.index_select(1, g_rows)
            if jac_a is not None:
                jac_a = jac_a.index_select(0, g_rows)
                pattern_a = (pattern_a[0], [p.index_select(0, g_rows) for p in pattern_a[1]])
        n = idx.numel()
        if n == 0:
            break
        if t == 0:  # the first Jacobian: the logits must carry a graph back to x
            check_graph_logits(logits_g, logits_g.shape[0])
        need = None                            # active samples that need a backward (None: all)
        if reuse:
            pattern = regions.activation_pattern(logits_g, xg, constants)
            if pattern is None:                # not certified piecewise-linear: no reuse in this call
                reuse = False
            else:
                if g_rows is not None:
                    pattern = (pattern[0], [p.index_select(0, g_rows) for p in pattern[1]])
                if jac_a is not None:
                    need = (~regions.same_pattern(pattern, pattern_a, n, dev)).nonzero().squeeze(1)
                pattern_a = pattern            # equal to the old one on every reused row
        if need is None or need.numel():
            # One backward row per competing class: w_k = g_k - g_ref directly.
            grads = _fresh_rows(model, xg, logits_g, go, g_rows, need, shape)
            if need is None:
                jac_a = grads
            else:
                jac_a.index_copy_(0, need, grads)
            del grads
        del xg, logits_g
        ones = all_active[:n]
        _, _, r = ops.select_boundary_unchecked(logits, jac_a.to(dtype), cand, ref_a, ones, norm, STEP_EPS, backend,
                                                diff=True)
        if not reuse:
            jac_a = None
        r_tot_a, x_cur = ops.deepfool_update_unchecked(x0_a, r_tot_a, r, ones, overshoot, lo, hi, backend)
        if t + 1 < max_iter:
            xg, logits_g = jacobian.forward_with_graph(model, x_cur, shape)
            out = logits_g
        else:
            with torch.no_grad():
                out = model(x_cur.view(n, *shape))
        logits = check_logits(out, n).detach().to(dtype)
        new_pred = logits.argmax(1)
        keep = new_pred == ref_a
        # A sample whose logits are not finite stops (argmax of NaN means nothing). One sum
        # finds out whether any is (an Inf or NaN anywhere makes it non-finite; a sum that
        # merely overflows costs the exact per-row test), read with the count of samples kept.
        total, n_keep = torch.stack((logits.float().sum(), keep.sum().float())).tolist()
        finite = None
        if not math.isfinite(total):
            finite = torch.isfinite(logits).all(1)
            new_pred = torch.where(finite, new_pred, ref_a)
            keep = (new_pred == ref_a) & finite
            n_keep = int(keep.sum())
        if n_keep < n:
            done = (~keep).nonzero().squeeze(1)
            stop = idx.index_select(0, done)
            x_final.index_copy_(0, stop, x_cur.index_select(0, done))
            adv_label.index_copy_(0, stop, new_pred.index_select(0, done))
            iterations.index_fill_(0, stop, t + 1)
            if finite is None:
                success.index_fill_(0, stop, True)
            else:
                success.index_copy_(0, stop, finite.index_select(0, done))
                n_nonfinite += (~finite).sum()
        if t + 1 == max_iter:
            x_final[idx[keep]] = x_cur[keep]
            iterations[idx[keep]] = max_iter

    delta = (x_final - x0).view(B, *shape)
    return DeepFoolResult(delta=delta, x_adv=x_final.view(B, *shape), iterations=iterations,
                          success=success, label=ref, adv_label=adv_label), n_nonfinite


def _empty_result(x: Tensor) -> DeepFoolResult:
    z = torch.zeros(0, dtype=torch.int64, device=x.device)
    return DeepFoolResult(delta=torch.zeros_like(x), x_adv=x.detach().clone(), iterations=z,
                          success=z.bool(), label=z, adv_label=z.clone())


def deepfool(model: Callable[[Tensor], Tensor], x: Tensor, y: Optional[Tensor] = None, *,
             max_iter: int = 50, overshoot: float = 0.02, norm: Union[int, float, str] = 2,
             candidates: Optional[int] = None,
             bounds: Optional[Tuple[Optional[float], Optional[float]]] = None,
             batch_size: Optional[int] = None, reuse_jacobians: Optional[bool] = None) -> DeepFoolResult:
    """Batched multi-class DeepFool.

    Args:
        model: callable mapping ``[B, *x.shape[1:]]`` to logits ``[B, K]`` (an ``nn.Module``
            runs in eval mode during the attack; every submodule's mode is restored).
        x: [B, ...] floating-point inputs; the attack works in their dtype and on their
            device. Not modified.
        y: optional [B] integer labels. Without labels the reference class is the
            prediction at x; with labels, misclassified samples get zero perturbation,
            ``success=True`` and ``iterations=0``.
        max_iter: maximum number of steps (>= 0).
        overshoot: iterate is ``x + (1 + overshoot) * r_tot``.
        norm: 2 or ``float("inf")`` (or "l2" / "linf").
        candidates: use only the top-k classes by logit at x (reference always included);
            None for all classes.
        bounds: ``(lo, hi)`` clip of every iterate (either may be None); x must lie within
            them (a ValueError says where it does not).
        batch_size: process at most this many samples at once (bounds memory).
        reuse_jacobians: with ``bounds``, reuse a sample's Jacobian rows while its activation
            pattern is unchanged (piecewise-linear models; exact, see :mod:`ddfast.regions`);
            None: ``ddfast.attack.REUSE_JACOBIANS`` (True).

    Returns:
        :class:`DeepFoolResult`. Gradients are taken with ``torch.autograd.grad``: no
        ``.grad`` attribute is written.

    On a GPU with TF32 enabled for float32 convolutions (PyTorch's default for cuDNN) or
    matmuls, a UserWarning says that ``success`` may not survive a re-evaluation: the final
    iterate lies closer to the boundary than TF32's rounding of the logits.
    """
    lo, hi = check_bounds(bounds)
    x = check_input(x, bounds=(lo, hi))
    norm_v = ops._norm_value(norm)
    overshoot = check_nonneg(overshoot, "overshoot")
    max_iter = check_max_iter(max_iter)
    k = check_candidates(candidates)
    batch_size = check_batch_size(batch_size)
    reuse_jacobians = REUSE_JACOBIANS if reuse_jacobians is None else bool(reuse_jacobians)
    B = x.shape[0]
    if y is not None:
        y = as_labels(y, B, None, x.device)
    if B == 0:
        return _empty_result(x)
    check_model_device(model, x)
    warn_tf32(model, x, "ddfast.deepfool")
    step = B if batch_size is None else batch_size
    parts, n_nonfinite = [], 0
    with explain_model_errors(model, x, "ddfast.deepfool"), frozen_model(model), torch.inference_mode(False), \
            torch.enable_grad():
        for s in range(0, B, step):
            part, bad = _attack_chunk(model, x[s:s + step], None if y is None else y[s:s + step],
                                      max_iter, overshoot, norm_v, k, lo, hi, reuse_jacobians)
            parts.append(part)
            n_nonfinite += int(bad)
    if n_nonfinite:
        warnings.warn(f"ddfast.deepfool: the model returned NaN or Inf logits at the iterate of {n_nonfinite} "
                      f"sample(s); they stop there with success=False (e.g. a float16 model that overflows)",
                      RuntimeWarning, stacklevel=2)
    if len(parts) == 1:
        return parts[0]
    return DeepFoolResult(*(torch.cat([getattr(p, f) for p in parts]) for f in
                            ("delta", "x_adv", "iterations", "success", "label", "adv_label")))
