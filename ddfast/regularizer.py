"""The DeepDefense regularizer: DeepFool unrolled differentiably (DESIGN.md, "DeepDefense
regularizer" and "Why it can be fast").

For a batch ``x`` [B, ...] with labels ``y`` [B]::

    R = lam / B * ( sum_{i correct} exp(-c ||D_i|| / ||x_i||) + sum_{i wrong} exp(d ||D_i|| / ||x_i||) )

``D_i = (1 + overshoot) * r_tot_i`` is the DeepFool perturbation after at most ``max_iter``
steps (no clipping), untargeted from the prediction for correctly classified samples and
two-class towards the true label for misclassified ones. ``R`` is differentiable w.r.t. the
model's parameters (and ``x``): through the logits, through every boundary normal ``w``
(mixed second derivatives) and through every iterate ``x_t``.

How one step runs (the fast path), for the samples still active:

1. one graph-carrying forward at ``x_t`` (it also served the done check of the previous step);
2. correct samples only: all-class (or top-k candidate) input gradients from that same graph
   WITHOUT ``create_graph`` (``retain_graph`` keeps the forward alive), then the fused
   ``select_boundary`` op picks the closest boundary ``l`` -- a piecewise-constant choice whose
   gradient is zero almost everywhere; misclassified samples have ``l = y`` and need no choice;
3. one ``create_graph`` backward for the single row ``w = d(f_l - f_ref)/dx`` of every sample
   at once (``ref`` the current prediction), and the differentiable ``boundary_step`` op.

Samples that are done leave the active set; ``D`` is never clipped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Tuple, Union, overload

import torch
from torch import Tensor, nn

from . import (
    backends,
    jacobian,
    ops,  # noqa: F401  (registers torch.ops.ddfast.*)
)
from .guard import check_sample_independence, forward, model_guard
from .jacobian import competing_classes
from .reference import STEP_EPS
from .validate import (
    as_labels,
    check_callable,
    check_candidates,
    check_choice,
    check_graph_logits,
    check_input,
    check_logits,
    check_max_iter,
    check_model_device,
    check_nonneg,
    explain_model_errors,
)

__all__ = ["DeepDefense", "DeepDefenseInfo", "deepdefense_loss"]


@dataclass
class DeepDefenseInfo:
    """Per-sample diagnostics of one :func:`deepdefense_loss` call (detached, for logging).

    Attributes:
        ratio: [B] ``||D_i||_2 / ||x_i||_2`` (0 where ``x_i == 0``), in x's dtype (float32 at least).
        correct: [B] bool, the prediction at ``x_i`` (eval mode) equals ``y_i``.
        iterations: [B] int64, DeepFool steps taken by each sample (<= max_iter).
    """

    ratio: Tensor
    correct: Tensor
    iterations: Tensor


def _inner_model(model: Callable) -> Callable:
    """The module the unrolled passes call, unwrapping (in any nesting):

    * (Distributed)DataParallel -> ``.module``, so the many inner forwards never touch DDP's
      reducer; the gradients still land in the same parameters, which DDP all-reduces in
      the caller's backward;
    * ``torch.compile``d modules -> the original module (same parameters), because compiled
      graphs do not support the double backward the unrolled steps need; the caller's own
      forward (the cross-entropy) keeps running compiled.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(model, nn.Module) and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def _graph_input(z: Tensor) -> Tensor:
    """``z`` itself when it already carries a graph (an iterate that depends on the
    parameters, or an ``x`` that requires grad), else a leaf copy that requires grad, so
    that input gradients of the logits exist."""
    return z if z.requires_grad else z.detach().requires_grad_(True)


def _zero_loss(model: Callable, x: Tensor) -> Tensor:
    """A 0.0 scalar connected to every parameter (and ``x``) that requires grad, so that
    ``backward()`` works (and writes zero gradients) for an empty batch."""
    parts = []
    if isinstance(model, nn.Module):
        parts = [p.reshape(-1)[:0].sum() for p in model.parameters() if p.requires_grad]
    if x.requires_grad:
        parts.append(x.reshape(-1)[:0].sum())
    zero = torch.zeros((), dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)  # as R
    return zero + sum(parts) if parts else zero


def _reforward(n_graph: int, n: int, C: int) -> bool:
    """Whether ``n`` of ``n_graph`` rows of the current graph survive so few that a fresh
    graph forward on them is cheaper than the ``C`` selection rows, the create_graph row and
    the second-order graph over the whole graph batch (in units of one row pass)."""
    return (n_graph - n) * (C + 1) > n


class _Unroll:
    """The state of one differentiable DeepFool unroll of a batch of B samples.

    x0 [B, D] flat inputs; y, pred [B]; correct [B] bool; cand [B, C] classes competing with
    the prediction; gidx [n] the batch rows of the current graph (x_in [n, D], logits [n, K]);
    r_tot [B, D] graph-carrying once a step was taken; iterations [B]; finite 0-d bool."""

    def __init__(self, net: Callable, x0: Tensor, shape: torch.Size, y: Tensor, k: Optional[int],
                 overshoot: float, method: str, steps: int, capturable: bool = False):
        B = x0.shape[0]
        self.net, self.x0, self.shape, self.overshoot, self.method = net, x0, shape, overshoot, method
        self.x_in = _graph_input(x0)
        # a graph back to x is needed only if a step is taken
        self.logits = (check_graph_logits if steps > 0 else check_logits)(forward(net, self.x_in, shape), B)
        K = self.logits.shape[1]
        if not capturable:                    # value checks read the device: not in a captured step
            check_sample_independence(net, x0, shape, "ddfast.deepdefense_loss", self.logits)
        self.y = as_labels(y, B, None if capturable else K, x0.device)
        self.finite = torch.isfinite(self.logits.detach()).all()
        self.pred = self.logits.detach().argmax(1)
        self.correct = self.pred == self.y
        self.cand = competing_classes(self.logits.detach(), self.pred, k)
        self.r_tot: Optional[Tensor] = None
        self.iterations = torch.zeros(B, dtype=torch.int64, device=x0.device)
        self.gidx = torch.arange(B, device=x0.device)
        # the step math runs in x's dtype, or the logits' when wider (autocast upcasts here)
        self.work = torch.promote_types(self.logits.dtype, x0.dtype)
        self.eye = torch.eye(K, dtype=self.work, device=x0.device)
        self.alive = torch.ones(B, dtype=torch.bool, device=x0.device)   # the masked unroll's active set

    def forward(self, rows: Tensor) -> None:
        """A graph-carrying forward at the iterates of the batch rows ``rows``."""
        self.gidx = rows
        x = self.x0[rows] if rows.numel() < self.x0.shape[0] else self.x0
        if self.r_tot is not None:
            r = self.r_tot[rows] if rows.numel() < self.x0.shape[0] else self.r_tot
            x = x + (1.0 + self.overshoot) * r
        self.x_in = _graph_input(x)
        n = rows.numel()
        self.logits = check_logits(forward(self.net, self.x_in, self.shape), n)
        self.finite = self.finite & torch.isfinite(self.logits.detach()).all()

    def active_rows(self, cur: Tensor) -> Tuple[Optional[Tensor], Tensor]:
        """Drop the rows that are done (correct rows left the prediction, wrong rows reached
        y). Returns the active rows of the current graph (None: all of them) and their
        predictions ``cur``; sets ``gidx`` (empty: every sample is done)."""
        g = self.gidx
        keep = torch.where(self.correct[g], cur == self.pred[g], cur != self.y[g])
        act = keep.nonzero().squeeze(1)
        if act.numel() == g.numel():
            return None, cur
        if act.numel() and _reforward(g.numel(), act.numel(), self.cand.shape[1]):
            self.forward(g[act])                                  # a fresh graph of the active rows
            return None, cur[act]
        self.gidx = g[act]
        return act, cur

    def targets(self, cur_a: Tensor, rows: Optional[Tensor]) -> Tensor:
        """[n] the boundary class of every active row: y where misclassified, else the closest
        linearised boundary among the candidates (a choice without a graph)."""
        target = self.y[self.gidx].clone()
        sel = self.correct[self.gidx].nonzero().squeeze(1)        # active correct rows, in [0, n)
        if not sel.numel():
            return target
        srows = sel if rows is None else rows[sel]                # their rows in the graph
        whole = srows.numel() == self.logits.shape[0]
        g = jacobian.class_grads(self.net, self.x_in, self.logits, self.cand[self.gidx[sel]],
                                 None if whole else srows, method=self.method, create_graph=False,
                                 retain_graph=True, shape=self.shape, minus=cur_a[sel])
        logits_d = self.logits.detach().to(self.work)
        ones = torch.ones(sel.numel(), dtype=torch.bool, device=target.device)
        l_sel, _, _ = torch.ops.ddfast.select_boundary(logits_d if whole else logits_d[srows], g.to(self.work),
                                                       self.cand[self.gidx[sel]], cur_a[sel], ones, 2.0,
                                                       STEP_EPS, True)
        target[sel] = l_sel
        return target

    def towards(self, direction: Tensor, rows: Optional[Tensor]) -> Tensor:
        """The differentiable step r [n, D] of the graph rows ``rows`` (None: all) along the
        output ``direction`` [graph rows, K] (e_l - e_ref; a zero row gives r = 0)."""
        w = jacobian.one_row_with_graph(self.logits, self.x_in, direction.to(self.logits.dtype))
        fdiff = (self.logits.to(self.work) * direction).sum(1)
        if rows is not None:
            w, fdiff = w[rows], fdiff[rows]
        return torch.ops.ddfast.boundary_step(fdiff, w.to(self.x0.dtype), 2.0, STEP_EPS)

    def masked_step(self, t: int, cur: Tensor) -> None:
        """One step of every row, done rows masked: fixed shapes, no host read (capturable)."""
        if t > 0:
            self.alive = self.alive & torch.where(self.correct, cur == self.pred, cur != self.y)
        grads = jacobian.class_grads(self.net, self.x_in, self.logits, self.cand, None, method=self.method,
                                     create_graph=False, retain_graph=True, shape=self.shape, minus=cur)
        l_sel, _, _ = torch.ops.ddfast.select_boundary(self.logits.detach().to(self.work), grads.to(self.work),
                                                       self.cand, cur, self.alive & self.correct, 2.0,
                                                       STEP_EPS, True)
        target = torch.where(self.correct, l_sel, self.y)
        r = self.towards((self.eye[target] - self.eye[cur]) * self.alive[:, None], None)
        self.r_tot = r if self.r_tot is None else self.r_tot + r
        self.iterations = torch.where(self.alive, t + 1, self.iterations)

    def step(self, t: int, cur: Tensor, rows: Optional[Tensor]) -> None:
        """One differentiable step of the active rows towards their boundaries."""
        cur_a = cur if rows is None else cur[rows]
        direction = self.eye[self.targets(cur_a, rows)] - self.eye[cur_a]              # [n, K]
        if rows is not None:
            direction = direction.new_zeros(self.logits.shape).index_copy(0, rows, direction)
        r = self.towards(direction, rows)                                             # [n, D]
        B = self.x0.shape[0]
        if self.r_tot is None and self.gidx.numel() == B:
            self.r_tot = r
        else:
            base = r.new_zeros(B, r.shape[1]) if self.r_tot is None else self.r_tot
            self.r_tot = base.index_add(0, self.gidx, r)
        self.iterations[self.gidx] = t + 1


def _unroll(net: Callable, x0: Tensor, shape: torch.Size, y: Tensor, max_iter: int, overshoot: float,
            k: Optional[int], method: str, capturable: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The differentiable DeepFool unroll of x0 [B, D] (``net`` already in eval mode); with
    ``capturable`` every step runs on every row, done rows masked, without a host read.

    Returns ``(D, correct, iterations, finite)``: D [B, D] graph-carrying ``(1 + overshoot) *
    r_tot``; correct [B] bool; iterations [B] int64; finite: 0-d bool, every logit the unroll
    evaluated was finite."""
    u = _Unroll(net, x0, shape, y, k, overshoot, method, max_iter, capturable)
    for t in range(max_iter):
        cur = u.logits.detach().argmax(1)                         # ref of every row of the graph
        if capturable:
            u.masked_step(t, cur)
        else:
            rows, cur = u.active_rows(cur) if t > 0 else (None, cur)
            if not u.gidx.numel():
                break
            u.step(t, cur, rows)
        if t + 1 < max_iter:
            u.forward(u.gidx)
    delta = torch.zeros_like(x0) if u.r_tot is None else (1.0 + overshoot) * u.r_tot
    return delta, u.correct, u.iterations, u.finite


@dataclass(frozen=True)
class _Settings:
    lam: float
    c: float
    d: float
    max_iter: int
    overshoot: float
    k: Optional[int]
    method: str
    capturable: bool


def _settings(lam, c, d, max_iter, overshoot, candidates, method, capturable) -> _Settings:
    return _Settings(check_nonneg(lam, "lam"), check_nonneg(c, "c"), check_nonneg(d, "d"), check_max_iter(max_iter),
                     check_nonneg(overshoot, "overshoot"), check_candidates(candidates),
                     check_choice(method, "method", jacobian.METHODS), bool(capturable))


def _empty(net: Callable, x: Tensor, return_info: bool):
    zero = _zero_loss(net, x)
    if not return_info:
        return zero
    empty = torch.zeros(0, dtype=torch.int64, device=x.device)
    return zero, DeepDefenseInfo(zero.new_zeros(0), empty.bool(), empty)


def _penalty(delta: Tensor, x0: Tensor, correct: Tensor, finite: Tensor,
             cfg: _Settings) -> Tuple[Tensor, Tensor, Tensor]:
    """(R, delta, x0), both [B, D] in the penalty's dtype: float32 at least (exp overflows
    float16 above 11, and bfloat16's 8-bit mantissa blurs it)."""
    pen_dtype = torch.promote_types(delta.dtype, torch.float32)
    delta, x_pen = delta.to(pen_dtype), x0.to(pen_dtype).contiguous()
    reg = torch.ops.ddfast.deepdefense_penalty(delta, x_pen, correct, cfg.c, cfg.d).sum() * (cfg.lam / x0.shape[0])
    # Non-finite logits make R NaN, as they make a cross-entropy NaN (the step op reads a NaN
    # normal as a zero step, which would otherwise give a finite R with NaN gradients).
    return torch.where(finite, reg, torch.full_like(reg, math.nan)), delta, x_pen


@overload
def deepdefense_loss(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, *, lam: float = ..., c: float = ...,
                     d: float = ..., max_iter: int = ..., overshoot: float = ..., candidates: Optional[int] = ...,
                     return_info: Literal[False] = ..., backend: Optional[str] = ..., method: str = ...,
                     capturable: bool = ...) -> Tensor: ...


@overload
def deepdefense_loss(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, *, lam: float = ..., c: float = ...,
                     d: float = ..., max_iter: int = ..., overshoot: float = ..., candidates: Optional[int] = ...,
                     return_info: Literal[True], backend: Optional[str] = ..., method: str = ...,
                     capturable: bool = ...) -> Tuple[Tensor, DeepDefenseInfo]: ...


@overload
def deepdefense_loss(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, *, lam: float = ..., c: float = ...,
                     d: float = ..., max_iter: int = ..., overshoot: float = ..., candidates: Optional[int] = ...,
                     return_info: bool = ..., backend: Optional[str] = ..., method: str = ...,
                     capturable: bool = ...) -> Union[Tensor, Tuple[Tensor, DeepDefenseInfo]]: ...


def deepdefense_loss(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, *,
                     lam: float = 15.0, c: float = 25.0, d: float = 5.0, max_iter: int = 5,
                     overshoot: float = 0.02, candidates: Optional[int] = None,
                     return_info: bool = False, backend: Optional[str] = None,
                     method: str = "auto", capturable: bool = False) -> Union[Tensor, Tuple[Tensor, DeepDefenseInfo]]:
    """The DeepDefense regularizer R of a batch (docs/design.md; DDP, compile, autocast: docs/api.md).

    Args:
        model: maps ``[B, *x.shape[1:]]`` to logits ``[B, K]``; runs in eval mode during the
            call, every mode restored; (Distributed)DataParallel and compiled models unwrapped.
        x: [B, ...] float inputs in the model's space (``||x_i||`` is taken there); R is
            differentiable w.r.t. x when x requires grad.
        y: [B] integer labels in ``[0, K)``.
        lam, c, d: the paper's lambda, c, d (>= 0).
        max_iter: unrolled DeepFool steps. overshoot: ``D = (1 + overshoot) r_tot``.
        candidates: correct samples choose the boundary among the top-k classes at x only.
        return_info: also return a :class:`DeepDefenseInfo`.
        backend: backend of the ops (None: :mod:`ddfast.backends`' choice).
        method: route of the no-graph class gradients (:func:`ddfast.jacobian.class_grads`).
        capturable: no host synchronisation in the call or in R's backward (every step on the
            whole batch, done samples masked; the value checks of x and y and the sample
            independence probe are skipped), so a CUDA graph can capture the training step.

    Returns:
        R, a 0-d tensor in x's dtype (float32 at least), differentiable through every unrolled
        step; NaN where the logits are not finite. With ``return_info``, ``(R, info)``. No
        ``.grad`` is written; an empty batch gives 0.0.
    """
    cfg = _settings(lam, c, d, max_iter, overshoot, candidates, method, capturable)
    x = check_input(x, read_values=not cfg.capturable)
    if y is None:
        raise ValueError("y (the labels) is required: the regularizer treats correctly and "
                         "wrongly classified samples differently")
    y = as_labels(y, x.shape[0], None, x.device)
    net = _inner_model(model)
    if x.shape[0] == 0:
        return _empty(net, x, return_info)
    check_callable(model)
    check_model_device(net, x)
    backends.resolve(backend, x.device, x.dtype)       # the chosen backend can run here
    x0 = x.reshape(x.shape[0], -1)
    with explain_model_errors(net, x, "ddfast.deepdefense_loss"), model_guard(model, x, not cfg.capturable), \
            torch.inference_mode(False), torch.enable_grad(), backends.using(backend):
        if x0.is_inference():  # made under inference_mode: a normal copy can carry a graph
            x0 = x0.clone()
        delta, correct, iterations, finite = _unroll(net, x0, x.shape[1:], y, cfg.max_iter, cfg.overshoot, cfg.k,
                                                     cfg.method, cfg.capturable)
    with backends.using(backend):
        reg, delta, x_pen = _penalty(delta, x0, correct, finite, cfg)
    if not return_info:
        return reg
    with torch.no_grad():
        dn, xn = torch.linalg.vector_norm(delta, dim=1), torch.linalg.vector_norm(x_pen, dim=1)
        ratio = torch.where(xn > 0, dn / torch.where(xn > 0, xn, torch.ones_like(xn)), torch.zeros_like(dn))
    return reg, DeepDefenseInfo(ratio, correct, iterations)


class DeepDefense(nn.Module):
    """``nn.Module`` form of :func:`deepdefense_loss`: ``DeepDefense(model, lam, c, d)(x, y)``
    returns the scalar regularizer (``return_info=True`` in the call adds the info).

    The model is kept as a submodule (``.to()`` moves it); do not hand this module's
    parameters to an optimizer besides the model's own (they are the same tensors).
    """

    def __init__(self, model: nn.Module, lam: float = 15.0, c: float = 25.0, d: float = 5.0,
                 max_iter: int = 5, overshoot: float = 0.02, candidates: Optional[int] = None,
                 backend: Optional[str] = None):
        super().__init__()
        self.model = model
        self.lam = check_nonneg(lam, "lam")
        self.c = check_nonneg(c, "c")
        self.d = check_nonneg(d, "d")
        self.max_iter = check_max_iter(max_iter)
        self.overshoot = check_nonneg(overshoot, "overshoot")
        self.candidates = check_candidates(candidates)
        self.backend = backends.check_name(backend)

    def forward(self, x: Tensor, y: Tensor, return_info: bool = False) -> Union[Tensor, Tuple[Tensor, DeepDefenseInfo]]:
        return deepdefense_loss(self.model, x, y, lam=self.lam, c=self.c, d=self.d,
                                max_iter=self.max_iter, overshoot=self.overshoot,
                                candidates=self.candidates, return_info=return_info,
                                backend=self.backend)

    def extra_repr(self) -> str:
        return (f"lam={self.lam}, c={self.c}, d={self.d}, max_iter={self.max_iter}, "
                f"overshoot={self.overshoot}, candidates={self.candidates}")
