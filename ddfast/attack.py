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

import dataclasses
import warnings
from dataclasses import dataclass, fields
from typing import Callable, FrozenSet, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import (
    backends,
    jacobian,
    ops,  # noqa: F401  (registers torch.ops.ddfast.*)
    regions,
)
from .budget import chunk_size
from .guard import check_sample_independence, forward, model_guard
from .jacobian import competing_classes
from .reference import STEP_EPS
from .validate import (
    NonFiniteLogitsError,
    as_labels,
    attack_bounds,
    check_batch_size,
    check_callable,
    check_candidates,
    check_graph_logits,
    check_input,
    check_int,
    check_logits,
    check_max_iter,
    check_model_device,
    check_nonneg,
    explain_model_errors,
    norm_value,
    warn_tf32,
)

__all__ = ["DeepFoolResult", "NonFiniteLogitsError", "deepfool"]

#: Reuse a sample's Jacobian rows while its activation pattern is unchanged (see the top).
REUSE_JACOBIANS = True
#: Steps between two host reads of who is left, per device type (``check_every=None``): on
#: CPU compaction after every step is fastest; on CUDA a block of steps without a host sync
#: (not yet measured on a GPU).
CHECK_EVERY = {"cpu": 1, "cuda": 4}


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


def _fresh_rows(model: Callable, xg: Tensor, logits_g: Tensor, go: Tensor, g_rows: Optional[Tensor],
                need: Optional[Tensor], shape: torch.Size) -> Tensor:
    """Jacobian rows [m, C, D] (directions ``go`` [C, n, K]) of the active samples ``need``
    (None: all n). The graph batch ``(xg, logits_g)`` holds them at its rows ``g_rows`` (None:
    rows 0..n-1, the whole batch). Where few of its rows are wanted, a fresh forward on them
    costs less than a backward over all of them."""
    if g_rows is None:
        if need is None:
            return jacobian.direction_grads(model, xg, logits_g, go, None, shape=shape)
        want = need
    else:
        want = g_rows if need is None else g_rows.index_select(0, need)
    n_graph, K = logits_g.shape
    go_m = go if need is None else go.index_select(1, need)
    m = want.numel()
    if (n_graph - m) * K > m:
        xs, ls = jacobian.forward_with_graph(model, xg.detach().index_select(0, want), shape)
        return jacobian.direction_grads(model, xs, ls, go_m, None, shape=shape)
    go_graph = go.new_zeros(go.shape[0], n_graph, K)
    go_graph.index_copy_(1, want, go_m)        # the graph's other rows get no direction
    return jacobian.direction_grads(model, xg, logits_g, go_graph, want, shape=shape)


@dataclass
class _Active:
    """The samples still attacked, compacted at the last host read: their rows ``idx`` [n] of
    the chunk and working tensors (x0, r_tot [n, D]; ref [n]; cand [n, C]; logits [n, K];
    go [C, n, K]); ``alive`` [n] bool, False once a sample stopped since that read; the Jacobian
    rows ``jac`` [n, C, D] kept for reuse and the activation pattern they belong to."""

    idx: Tensor
    x0: Tensor
    r_tot: Tensor
    ref: Tensor
    cand: Tensor
    logits: Tensor
    go: Tensor
    alive: Tensor
    lo: Optional[Tensor] = None
    hi: Optional[Tensor] = None
    jac: Optional[Tensor] = None
    pattern: Optional[regions.Pattern] = None

    def keep(self, rows: Tensor) -> None:
        """Keep only the active samples at ``rows`` [m]."""
        for name in ("idx", "x0", "r_tot", "ref", "cand", "logits", "alive"):
            setattr(self, name, getattr(self, name).index_select(0, rows))
        self.go = self.go.index_select(1, rows)
        for name in ("lo", "hi"):              # per-sample bounds follow their samples
            bound = getattr(self, name)
            if bound is not None and bound.shape[0] > 1:
                setattr(self, name, bound.index_select(0, rows))
        if self.jac is not None:
            self.jac = self.jac.index_select(0, rows)
        if self.pattern is not None:
            self.pattern = select_pattern(self.pattern, rows)


def select_pattern(pattern: regions.Pattern, rows: Optional[Tensor]) -> regions.Pattern:
    """The pattern of the samples at ``rows`` (None: all)."""
    if rows is None:
        return pattern
    return pattern[0], [p.index_select(0, rows) for p in pattern[1]]


@dataclass
class Outcome:
    """Per-sample results of a chunk of B samples, written as samples stop."""

    x_final: Tensor
    iterations: Tensor
    success: Tensor
    adv_label: Tensor
    n_nonfinite: Tensor

    @classmethod
    def start(cls, x0: Tensor, pred: Tensor) -> Outcome:
        B, dev = x0.shape[0], x0.device
        return cls(x0.clone(), torch.zeros(B, dtype=torch.int64, device=dev),
                   torch.zeros(B, dtype=torch.bool, device=dev), pred.clone(),
                   torch.zeros((), dtype=torch.int64, device=dev))

    def judge(self, act: _Active, x_cur: Tensor, t: int) -> None:
        """After step ``t``: the alive samples whose prediction left ``ref``, or whose logits are
        not finite (argmax of NaN means nothing), stop at ``x_cur``; no host read."""
        finite = torch.isfinite(act.logits).all(1)
        now = torch.where(finite, act.logits.argmax(1), act.ref)
        stopped = act.alive & ((now != act.ref) | ~finite)
        self.write(act.idx, stopped, x_cur, now, t + 1)
        self.success.index_copy_(0, act.idx, self.success.index_select(0, act.idx) | (stopped & finite))
        self.n_nonfinite += (stopped & ~finite).sum()
        act.alive = act.alive & ~stopped

    def write(self, idx: Tensor, rows: Tensor, x_cur: Tensor, label: Tensor, steps: int) -> None:
        """Final iterate, label and step count of the samples ``idx[rows]`` (rows: [n] bool)."""
        self.x_final.index_copy_(0, idx, torch.where(rows[:, None], x_cur, self.x_final.index_select(0, idx)))
        self.adv_label.index_copy_(0, idx, torch.where(rows, label, self.adv_label.index_select(0, idx)))
        self.iterations.index_copy_(0, idx, torch.where(rows, steps, self.iterations.index_select(0, idx)))

    def result(self, x0: Tensor, ref: Tensor, shape: torch.Size) -> DeepFoolResult:
        """The chunk's :class:`DeepFoolResult` (x0 [B, D] its clean inputs, ref [B] its classes)."""
        B = x0.shape[0]
        return DeepFoolResult(delta=(self.x_final - x0).view(B, *shape), x_adv=self.x_final.view(B, *shape),
                              iterations=self.iterations, success=self.success, label=ref, adv_label=self.adv_label)


def _clean_logits(model: Callable, x0: Tensor, shape: torch.Size) -> Tuple[Tensor, Tensor, Tensor]:
    """(xg, graph logits, detached logits in x's dtype) at the clean inputs; non-finite logits
    raise :class:`NonFiniteLogitsError`."""
    B = x0.shape[0]
    xg, logits_g = jacobian.forward_with_graph(model, x0, shape)
    logits = check_logits(logits_g, B).detach().to(x0.dtype)
    nonfinite = ~torch.isfinite(logits).all(1)
    if bool(nonfinite.any()):
        bad = nonfinite.nonzero().squeeze(1)
        raise NonFiniteLogitsError(f"model returned NaN or Inf logits at x for {bad.numel()} of {B} samples "
                                   f"(rows {bad[:5].tolist()}{' ...' if bad.numel() > 5 else ''}): "
                                   "nothing to attack there")
    return xg, logits_g, logits


def _step_rows(model: Callable, act: _Active, xg: Tensor, logits_g: Tensor, g_rows: Optional[Tensor],
               shape: torch.Size, constants: Optional[FrozenSet[int]]) -> Tuple[Tensor, Optional[FrozenSet[int]]]:
    """The Jacobian rows [n, C, D] of the active samples at their iterates, reusing ``act.jac``
    where a sample's activation pattern is unchanged (``constants`` not None: reuse is on).
    Returns them and the reuse setting for later steps (None once the model is not certified)."""
    need = None                                # active samples that need a backward (None: all)
    if constants is not None:
        pattern = regions.activation_pattern(logits_g, xg, constants)
        if pattern is None:                    # not certified piecewise-linear: no reuse in this chunk
            constants = None
        else:
            pattern = select_pattern(pattern, g_rows)
            if act.jac is not None and act.pattern is not None:
                need = (~regions.same_pattern(pattern, act.pattern, act.idx.numel(), xg.device)).nonzero().squeeze(1)
            act.pattern = pattern              # equal to the old one on every reused row
    if need is None:
        act.jac = _fresh_rows(model, xg, logits_g, act.go, g_rows, None, shape)
    elif need.numel():
        assert act.jac is not None
        act.jac.index_copy_(0, need, _fresh_rows(model, xg, logits_g, act.go, g_rows, need, shape))
    assert act.jac is not None
    return act.jac, constants


def forward_points(model: Callable, x_cur: Tensor, shape: torch.Size, graph: bool):
    """(xg, graph logits) at the iterates, or (None, logits) without a graph."""
    if graph:
        return jacobian.forward_with_graph(model, x_cur, shape)
    with torch.no_grad():
        return None, forward(model, x_cur, shape)


@dataclass(frozen=True)
class Settings:
    """DeepFool's checked settings; ``lo`` / ``hi``: clip rows [1, D] or [B, D] (or None)."""

    max_iter: int
    overshoot: float
    norm: float
    k: Optional[int]
    lo: Optional[Tensor]
    hi: Optional[Tensor]
    reuse: bool
    every: int


def deepfool_chunk(model: Callable, x: Tensor, y: Optional[Tensor], cfg: Settings) -> Tuple[Tensor, Tensor, Outcome]:
    """DeepFool on one chunk x [B, ...]: its clean inputs x0 [B, D], reference classes ref [B]
    and outcome (with ``n_nonfinite``: how many samples stopped at an iterate where the model's
    logits were not finite, a 0-d tensor read once, after every chunk)."""
    B, shape = x.shape[0], x.shape[1:]
    x0 = x.detach().reshape(B, -1)
    if x0.is_inference():                      # a tensor made under torch.inference_mode()
        x0 = x0.clone()
    xg, logits_g, logits = _clean_logits(model, x0, shape)
    pred = logits.argmax(1)
    ref = pred if y is None else as_labels(y, B, logits.shape[1], x.device)
    out = Outcome.start(x0, pred)
    alive = None if y is None else pred == ref
    if alive is not None:
        out.success |= ~alive                  # labelled samples already misclassified
    deepfool_steps(model, x0, shape, ref, logits, (xg, logits_g), alive, out, cfg)
    return x0, ref, out


def deepfool_steps(model: Callable, x0: Tensor, shape: torch.Size, ref: Tensor, logits: Tensor,
                   graph: Tuple[Tensor, Tensor], alive: Optional[Tensor], out: Outcome, cfg: Settings) -> None:
    """DeepFool's steps away from the classes ``ref`` [B] starting at the points ``x0`` [B, D]
    (samples of shape ``shape``), given the forward there: ``logits`` [B, K] (detached) and
    ``graph`` = (leaf, graph logits). Only the samples where ``alive`` [B] (None: all) step;
    where each stops is written to ``out``."""
    B = x0.shape[0]
    xg, logits_g = graph
    cand = competing_classes(logits, ref, cfg.k)
    act = _Active(torch.arange(B, device=x0.device), x0, torch.zeros_like(x0), ref, cand, logits,
                  jacobian.directions(B, logits.shape[1], cand, logits_g, ref),
                  torch.ones(B, dtype=torch.bool, device=x0.device) if alive is None else alive, cfg.lo, cfg.hi)
    constants = regions.model_constants(model) if cfg.reuse and cfg.every == 1 else None
    x_cur = x0
    for t in range(cfg.max_iter):
        g_rows = None                          # rows of the graph batch holding the active samples
        if t % cfg.every == 0:                 # a block's one host read: who is left
            n_alive = B if t == 0 and alive is None else int(act.alive.sum())
            if n_alive == 0:
                break
            if n_alive < act.idx.numel():
                g_rows = act.alive.nonzero().squeeze(1)
                act.keep(g_rows)
        if t == 0:                             # the first Jacobian: the logits must carry a graph to x
            check_graph_logits(logits_g, logits_g.shape[0])
        jac, constants = _step_rows(model, act, xg, logits_g, g_rows, shape, constants)
        del xg, logits_g
        _, _, r = torch.ops.ddfast.select_boundary(act.logits, jac.to(x0.dtype), act.cand, act.ref, act.alive,
                                                   cfg.norm, STEP_EPS, True)
        if constants is None:
            act.jac = None
        act.r_tot, x_cur = torch.ops.ddfast.deepfool_update(act.x0, act.r_tot, r, act.alive, cfg.overshoot,
                                                            act.lo, act.hi)
        xg, logits_g = forward_points(model, x_cur, shape, graph=t + 1 < cfg.max_iter)
        act.logits = check_logits(logits_g, act.idx.numel()).detach().to(x0.dtype)
        out.judge(act, x_cur, t)
    if cfg.max_iter:                           # who is alive now ran every step
        out.write(act.idx, act.alive, x_cur, out.adv_label.index_select(0, act.idx), cfg.max_iter)


def _attack_chunk(model: Callable, x: Tensor, y: Optional[Tensor], cfg: Settings) -> Tuple[DeepFoolResult, Tensor]:
    """DeepFool on one chunk, and how many of its samples stopped at non-finite logits (0-d)."""
    x0, ref, out = deepfool_chunk(model, x, y, cfg)
    return out.result(x0, ref, x.shape[1:]), out.n_nonfinite


def for_chunk(cfg, start: int, step: int):
    """``cfg`` (a :class:`Settings`, or a dataclass holding some) for the chunk of samples
    ``start:start + step``: per-sample bound rows cut to the chunk's."""
    if isinstance(cfg, Settings):
        return dataclasses.replace(cfg, lo=_chunk_rows(cfg.lo, start, step), hi=_chunk_rows(cfg.hi, start, step))
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        inner = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        return dataclasses.replace(cfg, **{name: for_chunk(v, start, step) for name, v in inner.items()
                                           if isinstance(v, Settings)})
    return cfg


def _chunk_rows(bound: Optional[Tensor], start: int, step: int) -> Optional[Tensor]:
    """A chunk's clip rows: the shared [1, D] row, or its samples' rows of a [B, D] bound."""
    return bound if bound is None or bound.shape[0] == 1 else bound[start:start + step]


def _classes(model: Callable, x: Tensor) -> int:
    """K, from one forward of one sample."""
    with torch.no_grad():
        return check_logits(forward(model, x[:1].detach().reshape(1, -1), x.shape[1:]), 1).shape[1]


def _empty_result(x: Tensor) -> DeepFoolResult:
    z = torch.zeros(0, dtype=torch.int64, device=x.device)
    return DeepFoolResult(delta=torch.zeros_like(x), x_adv=x.detach().clone(), iterations=z,
                          success=z.bool(), label=z, adv_label=z.clone())


def deepfool(model: Callable[[Tensor], Tensor], x: Tensor, y: Optional[Tensor] = None, *,
             max_iter: int = 50, overshoot: float = 0.02, norm: Union[int, float, str] = 2,
             candidates: Optional[int] = None,
             bounds: Optional[Tuple[Optional[float], Optional[float]]] = None,
             batch_size: Optional[int] = None, reuse_jacobians: Optional[bool] = None,
             check_every: Optional[int] = None) -> DeepFoolResult:
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
        batch_size: process at most this many samples at once; None: as many as fit the memory
            budget (:mod:`ddfast.budget`).
        reuse_jacobians: with ``bounds``, reuse a sample's Jacobian rows while its activation
            pattern is unchanged (piecewise-linear models; exact, see :mod:`ddfast.regions`);
            None: ``ddfast.attack.REUSE_JACOBIANS`` (True).
        check_every: read back to the host once every this many steps (samples that finish in
            between are masked: the same results); None: :data:`CHECK_EVERY` of the device.

    Returns:
        :class:`DeepFoolResult`. No ``.grad`` is written. Warns where TF32 rounds the logits
        more coarsely than DeepFool's margin (docs/api.md).
    """
    x, y, cfg, step = settings(x, y, bounds=bounds, max_iter=max_iter, overshoot=overshoot, norm=norm,
                               candidates=candidates, batch_size=batch_size, reuse_jacobians=reuse_jacobians,
                               check_every=check_every)
    return run_chunks(model, x, y, cfg, step, _attack_chunk, "ddfast.deepfool")


def settings(x: Tensor, y: Optional[Tensor], *, bounds, max_iter, overshoot, norm, candidates, batch_size,
             reuse_jacobians, check_every) -> Tuple[Tensor, Optional[Tensor], Settings, Optional[int]]:
    """:func:`deepfool`'s arguments checked: x, y as [B] int64 (or None), the settings, the chunk size."""
    x = check_input(x)
    lo, hi = attack_bounds(bounds, x)
    reuse = REUSE_JACOBIANS if reuse_jacobians is None else bool(reuse_jacobians)
    every = CHECK_EVERY.get(x.device.type, 1) if check_every is None else check_int(check_every, "check_every", 1)
    cfg = Settings(check_max_iter(max_iter), check_nonneg(overshoot, "overshoot"), norm_value(norm),
                   check_candidates(candidates), lo, hi, reuse and (lo is not None or hi is not None), every)
    step = check_batch_size(batch_size)
    if y is not None:
        y = as_labels(y, x.shape[0], None, x.device)
    return x, y, cfg, step


def run_chunks(model: Callable, x: Tensor, y: Optional[Tensor], cfg, step: Optional[int],
               chunk: Callable, where: str) -> DeepFoolResult:
    """``chunk(model, x_part, y_part, cfg) -> (DeepFoolResult, n_nonfinite)`` on consecutive chunks
    of ``step`` samples of x (None: as many as fit the memory budget), with the model checked and
    guarded (eval mode, state restored) and gradients on; ``where`` names the caller in messages."""
    if x.shape[0] == 0:
        return _empty_result(x)
    check_callable(model)
    check_model_device(model, x)
    backends.resolve(None, x.device, x.dtype)          # the chosen backend can run here
    warn_tf32(model, x, where)
    parts, n_nonfinite = [], 0
    with explain_model_errors(model, x, where), model_guard(model, x), torch.inference_mode(False), \
            torch.enable_grad():
        check_sample_independence(model, x.detach().reshape(x.shape[0], -1), x.shape[1:], where)
        step = step or chunk_size(model, x, cfg.k or _classes(model, x))
        for s in range(0, x.shape[0], step):
            part, bad = chunk(model, x[s:s + step], None if y is None else y[s:s + step], for_chunk(cfg, s, step))
            parts.append(part)
            n_nonfinite += int(bad)
    if n_nonfinite:
        warnings.warn(f"{where}: the model returned NaN or Inf logits at the iterate of {n_nonfinite} "
                      f"sample(s); they stop there with success=False (e.g. a float16 model that overflows)",
                      RuntimeWarning, stacklevel=3)
    return parts[0] if len(parts) == 1 else concat_results(parts)


def concat_results(parts: Sequence[DeepFoolResult]) -> DeepFoolResult:
    """The results of consecutive chunks as one."""
    return DeepFoolResult(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(DeepFoolResult)))
