"""The ddfast ops as ``torch.library`` custom ops, with fake (meta) kernels, autograd
formulas and backend dispatch.

Public entry points take ``backend=None`` (see :mod:`ddfast.backends`) and call
``torch.ops.ddfast.<op>``, whose kernel runs the chosen backend's implementation.
The exact semantics of each op are those of the same-named function in
:mod:`ddfast.reference`.

Backward formulas are written in differentiable torch ops, so the differentiable ops
(``boundary_step``, ``deepdefense_penalty``) support double backward.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import backends
from .reference import PENALTY_EXP_CAP

__all__ = ["select_boundary", "boundary_step", "deepdefense_penalty", "deepfool_update"]


def _impl(backend: str, op: str):
    return getattr(backends.load(backend), op)


# --------------------------------------------------------------------------- select_boundary
def _select_impl(logits: Tensor, grads: Tensor, cand: Tensor, ref: Tensor, active: Tensor,
                 norm: float, eps: float, backend: str, diff: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """Every backend takes the difference form (``diff``) natively."""
    return tuple(backends.load(backend).select_boundary(logits, grads, cand, ref, active, norm, eps, diff=diff))


@torch.library.custom_op("ddfast::select_boundary", mutates_args=())
def _select_boundary(logits: Tensor, grads: Tensor, cand: Tensor, ref: Tensor, active: Tensor,
                     norm: float, eps: float, backend: str,
                     diff: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    return _select_impl(logits, grads, cand, ref, active, norm, eps, backend, diff)


@_select_boundary.register_fake
def _(logits, grads, cand, ref, active, norm, eps, backend, diff=False):
    B, C, D = grads.shape
    return (ref.new_empty((B,)), logits.new_empty((B,)), grads.new_empty((B, D)))


def _non_differentiable(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _no_backward(ctx, *grads):
    raise RuntimeError("this ddfast op has no gradient")


torch.library.register_autograd("ddfast::select_boundary", _no_backward,
                                setup_context=_non_differentiable)


# ----------------------------------------------------------------------------- boundary_step
@torch.library.custom_op("ddfast::boundary_step", mutates_args=())
def _boundary_step(fdiff: Tensor, w: Tensor, norm: float, eps: float, backend: str) -> Tensor:
    return _impl(backend, "boundary_step")(fdiff, w, norm, eps)


@_boundary_step.register_fake
def _(fdiff, w, norm, eps, backend):
    return torch.empty_like(w)


def _safe(den: Tensor, nz: Tensor) -> Tensor:
    return torch.where(nz, den, torch.ones_like(den))


def boundary_step_backward(grad_r: Tensor, fdiff: Tensor, w: Tensor, norm: float,
                           eps: float) -> Tuple[Tensor, Tensor]:
    """Gradients of :func:`ddfast.reference.boundary_step` w.r.t. ``fdiff`` [B] and ``w``
    [B, D], in differentiable torch ops. Rows with ``w == 0`` get zero gradients."""
    sgn_f = torch.sign(fdiff)
    absf = fdiff.abs()
    if math.isinf(norm):
        s = torch.sign(w)
        n = w.abs().sum(-1)
        nz = n > 0
        n = _safe(n, nz)
        gs = (grad_r * s).sum(-1)                               # <G, sign w>
        g_f = torch.where(nz, gs * sgn_f / n, torch.zeros_like(n))
        g_w = torch.where(nz, -gs * absf / (n * n), torch.zeros_like(n))[:, None] * s
        return g_f, g_w
    n = torch.linalg.vector_norm(w, dim=-1)
    nz = n > 0
    n = _safe(n, nz)
    u = w / n[:, None]
    gu = (grad_r * u).sum(-1)                                   # <G, u>
    scale = absf / n + eps                                      # the step length
    g_f = torch.where(nz, gu * sgn_f / n, torch.zeros_like(n))
    coef_g = torch.where(nz, scale / n, torch.zeros_like(n))
    coef_u = torch.where(nz, gu * (absf / (n * n) + scale / n), torch.zeros_like(n))
    g_w = coef_g[:, None] * grad_r - coef_u[:, None] * u
    return g_f, g_w


def _boundary_step_setup(ctx, inputs, output):
    fdiff, w, norm, eps, _ = inputs
    ctx.save_for_backward(fdiff, w)
    ctx.norm, ctx.eps = norm, eps


def _boundary_step_bwd(ctx, grad_r):
    fdiff, w = ctx.saved_tensors
    g_f, g_w = boundary_step_backward(grad_r, fdiff, w, ctx.norm, ctx.eps)
    return g_f, g_w, None, None, None


torch.library.register_autograd("ddfast::boundary_step", _boundary_step_bwd,
                                setup_context=_boundary_step_setup)


# ----------------------------------------------------------------------- deepdefense_penalty
@torch.library.custom_op("ddfast::deepdefense_penalty", mutates_args=())
def _deepdefense_penalty(delta: Tensor, x: Tensor, correct: Tensor, c: float, d: float,
                         backend: str) -> Tensor:
    return _impl(backend, "deepdefense_penalty")(delta, x, correct, c, d)


@_deepdefense_penalty.register_fake
def _(delta, x, correct, c, d, backend):
    return delta.new_empty((delta.shape[0],))


def deepdefense_penalty_backward(grad_p: Tensor, delta: Tensor, x: Tensor, correct: Tensor,
                                 c: float, d: float) -> Tuple[Tensor, Tensor]:
    """Gradients of :func:`ddfast.reference.deepdefense_penalty` w.r.t. ``delta`` and ``x``
    ([B, D] each), in differentiable torch ops (zero where ``delta == 0`` or ``x == 0``)."""
    dn2 = (delta * delta).sum(-1)
    dnz = dn2 > 0
    dn = torch.where(dnz, torch.sqrt(_safe(dn2, dnz)), torch.zeros_like(dn2))
    xn = torch.linalg.vector_norm(x, dim=-1)
    xnz = xn > 0
    xn_s = _safe(xn, xnz)
    k = torch.where(correct, torch.full_like(dn, -c), torch.full_like(dn, d))
    z = k * dn / xn_s
    dp_dz = torch.exp(torch.clamp(z, max=PENALTY_EXP_CAP))     # slope is constant past the cap
    gk = torch.where(xnz, grad_p * dp_dz * k / xn_s, torch.zeros_like(dn))
    g_delta = torch.where(dnz, gk / _safe(dn, dnz), torch.zeros_like(dn))[:, None] * delta
    g_x = (-gk * dn / (xn_s * xn_s))[:, None] * x
    return g_delta, g_x


def _penalty_setup(ctx, inputs, output):
    delta, x, correct, c, d, _ = inputs
    ctx.save_for_backward(delta, x, correct)
    ctx.c, ctx.d = c, d


def _penalty_bwd(ctx, grad_p):
    delta, x, correct = ctx.saved_tensors
    g_delta, g_x = deepdefense_penalty_backward(grad_p, delta, x, correct, ctx.c, ctx.d)
    return g_delta, g_x, None, None, None, None


torch.library.register_autograd("ddfast::deepdefense_penalty", _penalty_bwd,
                                setup_context=_penalty_setup)


# --------------------------------------------------------------------------- deepfool_update
@torch.library.custom_op("ddfast::deepfool_update", mutates_args=())
def _deepfool_update(x0: Tensor, r_tot: Tensor, r: Tensor, active: Tensor, overshoot: float,
                     lo: Optional[float], hi: Optional[float],
                     backend: str) -> Tuple[Tensor, Tensor]:
    return tuple(_impl(backend, "deepfool_update")(x0, r_tot, r, active, overshoot, lo, hi))


@_deepfool_update.register_fake
def _(x0, r_tot, r, active, overshoot, lo, hi, backend):
    return torch.empty_like(r_tot), torch.empty_like(x0)


torch.library.register_autograd("ddfast::deepfool_update", _no_backward,
                                setup_context=_non_differentiable)


# ------------------------------------------------------------------------ public entry points
def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _tensor(t, name: str, ndim: int, kind: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _need(t.dim() == ndim, f"{name} must be {ndim}-d, got shape {list(t.shape)}")
    ok = {"float": t.is_floating_point(), "int": not t.is_floating_point() and not t.is_complex()
          and t.dtype != torch.bool, "bool": t.dtype == torch.bool}[kind]
    if not ok:
        raise TypeError(f"{name} must be a {kind} tensor, got dtype {t.dtype}")
    return t


def _same_device(*named) -> None:
    dev = named[0][1].device
    for name, t in named[1:]:
        _need(t.device == dev, f"{name} is on {t.device} but {named[0][0]} is on {dev}")


def _check_select(logits, grads, cand, ref, active, diff: bool = False) -> None:
    _tensor(logits, "logits", 2, "float")
    _tensor(grads, "grads", 3, "float")
    _tensor(cand, "cand", 2, "int")
    _tensor(ref, "ref", 1, "int")
    _tensor(active, "active", 1, "bool")
    B, C, _ = grads.shape
    K = logits.shape[1]
    _need(logits.shape[0] == B, f"logits must have {B} rows like grads, got {list(logits.shape)}")
    _need(tuple(cand.shape) == (B, C), f"cand must have shape [{B}, {C}], got {list(cand.shape)}")
    _need(ref.shape[0] == B and active.shape[0] == B,
          f"ref and active must have shape [{B}], got {list(ref.shape)} and {list(active.shape)}")
    _same_device(("grads", grads), ("logits", logits), ("cand", cand), ("ref", ref),
                 ("active", active))
    if B and C:
        lo, hi = torch.aminmax(cand)
        _need(int(lo) >= 0 and int(hi) < K, f"cand holds classes outside [0, {K})")
        if not diff:
            _need(bool((cand == ref[:, None]).any(1).all()), "every ref[i] must appear in cand[i]")
    elif B:
        raise ValueError("cand must hold at least one class per row" + ("" if diff else " (the reference)"))


def _check_rows(named, B: Optional[int] = None, D: Optional[int] = None) -> None:
    """Each (name, tensor, ndim, kind) has B rows (and D columns when 2-d), one device."""
    for name, t, ndim, kind in named:
        _tensor(t, name, ndim, kind)
        B = t.shape[0] if B is None else B
        _need(t.shape[0] == B, f"{name} must have {B} rows, got shape {list(t.shape)}")
        if ndim == 2:
            D = t.shape[1] if D is None else D
            _need(t.shape[1] == D, f"{name} must have shape [{B}, {D}], got {list(t.shape)}")
    _same_device(*[(n, t) for n, t, _, _ in named])


def _norm_value(norm) -> float:
    if isinstance(norm, str):
        key = norm.lower()
        if key in ("l2", "2"):
            return 2.0
        if key in ("linf", "inf"):
            return math.inf
        raise ValueError(f"norm must be 2, inf, 'l2' or 'linf', got {norm!r}")
    if isinstance(norm, bool) or not isinstance(norm, (int, float)):
        raise TypeError(f"norm must be 2, inf, 'l2' or 'linf', got {type(norm).__name__}")
    value = float(norm)
    if value not in (2.0, math.inf):
        raise ValueError(f"norm must be 2 or inf, got {norm!r}")
    return value


def select_boundary(logits: Tensor, grads: Tensor, cand: Tensor, ref: Tensor,
                    active: Optional[Tensor] = None, norm: Union[int, float, str] = 2, eps: float = 1e-4,
                    backend: Optional[str] = None, diff: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused DeepFool boundary selection; see :func:`ddfast.reference.select_boundary`.

    logits [B, K], grads [B, C, D], cand [B, C] int64, ref [B] int64, active [B] bool
    (default all) -> (l [B] int64, dist [B], r [B, D]). With ``diff=True`` the rows of
    ``grads`` are already ``g_cand - g_ref`` (see the reference)."""
    if active is None and isinstance(grads, Tensor):
        active = torch.ones(grads.shape[0], dtype=torch.bool, device=grads.device)
    _check_select(logits, grads, cand, ref, active, diff)
    cand, ref = cand.long(), ref.long()   # int64, as every backend returns l (no-op when already)
    name = backends.resolve(backend, grads.device, grads.dtype)
    return torch.ops.ddfast.select_boundary(logits, grads, cand, ref, active,
                                            _norm_value(norm), float(eps), name, bool(diff))


def boundary_step(fdiff: Tensor, w: Tensor, norm: Union[int, float, str] = 2, eps: float = 1e-4,
                  backend: Optional[str] = None) -> Tensor:
    """Differentiable DeepFool step ``r`` [B, D] from ``fdiff`` [B] and ``w`` [B, D]; see
    :func:`ddfast.reference.boundary_step`."""
    _check_rows([("fdiff", fdiff, 1, "float"), ("w", w, 2, "float")])
    name = backends.resolve(backend, w.device, w.dtype)
    return torch.ops.ddfast.boundary_step(fdiff, w, _norm_value(norm), float(eps), name)


def deepdefense_penalty(delta: Tensor, x: Tensor, correct: Tensor, c: float, d: float,
                        backend: Optional[str] = None) -> Tensor:
    """Per-sample penalty [B] from ``delta``, ``x`` [B, D] and ``correct`` [B] bool; see
    :func:`ddfast.reference.deepdefense_penalty`."""
    _check_rows([("delta", delta, 2, "float"), ("x", x, 2, "float"), ("correct", correct, 1, "bool")])
    name = backends.resolve(backend, delta.device, delta.dtype)
    return torch.ops.ddfast.deepdefense_penalty(delta, x, correct, float(c), float(d), name)


def deepfool_update(x0: Tensor, r_tot: Tensor, r: Tensor, active: Tensor, overshoot: float,
                    lo: Optional[float] = None, hi: Optional[float] = None,
                    backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """(r_tot', x_next), each [B, D]; see :func:`ddfast.reference.deepfool_update`."""
    _check_rows([("x0", x0, 2, "float"), ("r_tot", r_tot, 2, "float"), ("r", r, 2, "float"),
                 ("active", active, 1, "bool")])
    _need(r_tot.dtype == x0.dtype and r.dtype == x0.dtype,
          f"x0, r_tot and r must share one dtype, got {x0.dtype}, {r_tot.dtype} and {r.dtype}")
    name = backends.resolve(backend, x0.device, x0.dtype)
    lo = None if lo is None else float(lo)
    hi = None if hi is None else float(hi)
    return torch.ops.ddfast.deepfool_update(x0, r_tot, r, active, float(overshoot), lo, hi, name)


# ------------------------------------------------------- internal entry points for ddfast's loops
def select_boundary_unchecked(logits: Tensor, grads: Tensor, cand: Tensor, ref: Tensor, active: Tensor,
                              norm: float, eps: float, backend: str, diff: bool = False
                              ) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`select_boundary` for inputs that ddfast builds itself, with the backend already
    resolved: no argument checks (they cost two device syncs per call) and, in eager mode, no
    custom-op dispatch (these inputs need no autograd; their candidates never include the
    reference class). Under ``torch.compile``, the op."""
    if torch.compiler.is_compiling():
        return torch.ops.ddfast.select_boundary(logits, grads, cand, ref, active, norm, eps, backend, diff)
    return _select_impl(logits, grads, cand, ref, active, norm, eps, backend, diff)


def deepfool_update_unchecked(x0: Tensor, r_tot: Tensor, r: Tensor, active: Tensor, overshoot: float,
                              lo: Optional[float], hi: Optional[float], backend: str) -> Tuple[Tensor, Tensor]:
    """:func:`deepfool_update` for ddfast's own inputs; see :func:`select_boundary_unchecked`."""
    if torch.compiler.is_compiling():
        return torch.ops.ddfast.deepfool_update(x0, r_tot, r, active, overshoot, lo, hi, backend)
    return tuple(_impl(backend, "deepfool_update")(x0, r_tot, r, active, overshoot, lo, hi))
