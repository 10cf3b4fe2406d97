"""The ddfast ops as ``torch.library`` custom ops: schema, fake (meta) kernel, autograd
formula and one kernel per device type.

``torch.ops.ddfast.<op>`` is the op itself: it checks nothing (ddfast's own loops call it
with tensors they built). The public functions below (``ddfast.ops.<op>``) check every
argument once (:mod:`ddfast.validate`) and call it. torch's dispatcher picks the kernel of the
tensors' device; that kernel runs the backend :mod:`ddfast.backends` picks for the device
(``cpu`` / ``triton`` / ``torch`` on CPU, ``cuda`` / ``triton`` / ``torch`` on CUDA, the
``torch`` reference elsewhere). Semantics: the same-named functions of :mod:`ddfast.reference`.

Backward formulas are differentiable torch ops, so ``boundary_step`` and
``deepdefense_penalty`` support double backward.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from . import backends, reference
from .reference import PENALTY_EXP_CAP, scaled_norm2, scaled_parts
from .validate import (
    bound_rows,
    check_bool,
    check_finite,
    check_order,
    check_rows,
    check_same_dtype,
    check_select,
    need,
    norm_value,
)

__all__ = ["select_boundary", "boundary_step", "deepdefense_penalty", "deepfool_update"]


def _register_device_kernels(op, name: str, like: int) -> None:
    """One kernel per device type: the backend chosen for the dtype of argument ``like``."""
    def kernel(*args):
        t = args[like]
        return backends.implementation(name, t.device, t.dtype)(*args)

    for device_type in ("cpu", "cuda"):
        op.register_kernel(device_type, kernel)


# --------------------------------------------------------------------------- select_boundary
@torch.library.custom_op("ddfast::select_boundary", mutates_args=())
def _select_boundary(logits: Tensor, grads: Tensor, cand: Tensor, ref: Tensor, active: Tensor,
                     norm: float, eps: float, diff: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return reference.select_boundary(logits, grads, cand, ref, active, norm, eps, diff)


@_select_boundary.register_fake
def _(logits, grads, cand, ref, active, norm, eps, diff):
    B, C, D = grads.shape
    return (ref.new_empty((B,), dtype=torch.int64), logits.new_empty((B,)), grads.new_empty((B, D)))


_register_device_kernels(_select_boundary, "select_boundary", like=1)


def _non_differentiable(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _no_backward(ctx, *grads):
    raise RuntimeError("this ddfast op has no gradient")


torch.library.register_autograd("ddfast::select_boundary", _no_backward,
                                setup_context=_non_differentiable)


# ----------------------------------------------------------------------------- boundary_step
@torch.library.custom_op("ddfast::boundary_step", mutates_args=())
def _boundary_step(fdiff: Tensor, w: Tensor, norm: float, eps: float) -> Tensor:
    return reference.boundary_step(fdiff, w, norm, eps)


@_boundary_step.register_fake
def _(fdiff, w, norm, eps):
    return torch.empty_like(w)


_register_device_kernels(_boundary_step, "boundary_step", like=1)


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
    n = scaled_norm2(w)                                         # no overflow; traceable
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
    fdiff, w, norm, eps = inputs
    ctx.save_for_backward(fdiff, w)
    ctx.norm, ctx.eps = norm, eps


def _boundary_step_bwd(ctx, grad_r):
    fdiff, w = ctx.saved_tensors
    g_f, g_w = boundary_step_backward(grad_r, fdiff, w, ctx.norm, ctx.eps)
    return g_f, g_w, None, None


torch.library.register_autograd("ddfast::boundary_step", _boundary_step_bwd,
                                setup_context=_boundary_step_setup)


# ----------------------------------------------------------------------- deepdefense_penalty
@torch.library.custom_op("ddfast::deepdefense_penalty", mutates_args=())
def _deepdefense_penalty(delta: Tensor, x: Tensor, correct: Tensor, c: float, d: float) -> Tensor:
    return reference.deepdefense_penalty(delta, x, correct, c, d)


@_deepdefense_penalty.register_fake
def _(delta, x, correct, c, d):
    return delta.new_empty((delta.shape[0],))


_register_device_kernels(_deepdefense_penalty, "deepdefense_penalty", like=0)


def deepdefense_penalty_backward(grad_p: Tensor, delta: Tensor, x: Tensor, correct: Tensor,
                                 c: float, d: float) -> Tuple[Tensor, Tensor]:
    """Gradients of :func:`ddfast.reference.deepdefense_penalty` w.r.t. ``delta`` and ``x``
    ([B, D] each), in differentiable torch ops (zero where ``delta == 0`` or ``x == 0``)."""
    s, dn2 = scaled_parts(delta)                               # ||delta|| = s * sqrt(dn2): no overflow
    dnz = dn2 > 0
    dn = s * torch.where(dnz, torch.sqrt(_safe(dn2, dnz)), dn2 * 0)   # 0, or NaN for a NaN row
    xn = scaled_norm2(x)
    xnz = xn != 0
    xn_s = _safe(xn, xnz)
    k = torch.where(correct, torch.full_like(dn, -c), torch.full_like(dn, d))
    z = k * dn / xn_s
    dp_dz = torch.exp(torch.clamp(z, max=PENALTY_EXP_CAP))     # slope is constant past the cap
    gk = torch.where(xnz, grad_p * dp_dz * k / xn_s, torch.zeros_like(dn))
    g_delta = torch.where(dnz, gk / _safe(dn, dnz), torch.zeros_like(dn))[:, None] * delta
    g_x = (-gk * dn / (xn_s * xn_s))[:, None] * x
    return g_delta, g_x


def _penalty_setup(ctx, inputs, output):
    delta, x, correct, c, d = inputs
    ctx.save_for_backward(delta, x, correct)
    ctx.c, ctx.d = c, d


def _penalty_bwd(ctx, grad_p):
    delta, x, correct = ctx.saved_tensors
    g_delta, g_x = deepdefense_penalty_backward(grad_p, delta, x, correct, ctx.c, ctx.d)
    return g_delta, g_x, None, None, None


torch.library.register_autograd("ddfast::deepdefense_penalty", _penalty_bwd,
                                setup_context=_penalty_setup)


# --------------------------------------------------------------------------- deepfool_update
@torch.library.custom_op("ddfast::deepfool_update", mutates_args=())
def _deepfool_update(x0: Tensor, r_tot: Tensor, r: Tensor, active: Tensor, overshoot: float,
                     lo: Optional[Tensor], hi: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return reference.deepfool_update(x0, r_tot, r, active, overshoot, lo, hi)


@_deepfool_update.register_fake
def _(x0, r_tot, r, active, overshoot, lo, hi):
    return torch.empty_like(r_tot), torch.empty_like(x0)


_register_device_kernels(_deepfool_update, "deepfool_update", like=0)


torch.library.register_autograd("ddfast::deepfool_update", _no_backward,
                                setup_context=_non_differentiable)


# ------------------------------------------------------------------------ public entry points
def _scalars(norm, eps) -> Tuple[float, float]:
    eps = check_finite(eps, "eps")
    need(eps >= 0, f"eps must be >= 0, got {eps!r}")
    return norm_value(norm), eps


def _run(backend: Optional[str], like: Tensor, op: Callable, *args):
    """``op(*args)`` with ``backend`` chosen (checked for ``like``'s device and dtype first)."""
    backends.resolve(backend, like.device, like.dtype)
    with backends.using(backend):
        return op(*args)


def select_boundary(logits: Tensor, grads: Tensor, cand: Tensor, ref: Tensor,
                    active: Optional[Tensor] = None, norm: Union[int, float, str] = 2, eps: float = 1e-4,
                    backend: Optional[str] = None, diff: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused DeepFool boundary selection; see :func:`ddfast.reference.select_boundary`.

    logits [B, K], grads [B, C, D], cand [B, C] int, ref [B] int, active [B] bool
    (default all) -> (l [B] int64, dist [B], r [B, D]). With ``diff=True`` the rows of
    ``grads`` are already ``g_cand - g_ref``."""
    diff = check_bool(diff, "diff")
    norm, eps = _scalars(norm, eps)
    if active is None and isinstance(grads, Tensor):
        active = torch.ones(grads.shape[0], dtype=torch.bool, device=grads.device)
    check_select(logits, grads, cand, ref, active, diff)
    return _run(backend, grads, torch.ops.ddfast.select_boundary, logits, grads, cand.long(), ref.long(),
                active, norm, eps, diff)


def boundary_step(fdiff: Tensor, w: Tensor, norm: Union[int, float, str] = 2, eps: float = 1e-4,
                  backend: Optional[str] = None) -> Tensor:
    """Differentiable DeepFool step ``r`` [B, D] from ``fdiff`` [B] and ``w`` [B, D] of one
    float dtype; see :func:`ddfast.reference.boundary_step`."""
    check_rows([("fdiff", fdiff, 1, "float"), ("w", w, 2, "float")])
    check_same_dtype(("w", w), ("fdiff", fdiff))
    norm, eps = _scalars(norm, eps)
    return _run(backend, w, torch.ops.ddfast.boundary_step, fdiff, w, norm, eps)


def deepdefense_penalty(delta: Tensor, x: Tensor, correct: Tensor, c: float, d: float,
                        backend: Optional[str] = None) -> Tensor:
    """Per-sample penalty [B] from ``delta``, ``x`` [B, D] of one float dtype and ``correct``
    [B] bool; see :func:`ddfast.reference.deepdefense_penalty`."""
    check_rows([("delta", delta, 2, "float"), ("x", x, 2, "float"), ("correct", correct, 1, "bool")])
    check_same_dtype(("delta", delta), ("x", x))
    c, d = check_finite(c, "c"), check_finite(d, "d")
    return _run(backend, delta, torch.ops.ddfast.deepdefense_penalty, delta, x, correct, c, d)


def deepfool_update(x0: Tensor, r_tot: Tensor, r: Tensor, active: Tensor, overshoot: float,
                    lo: Union[None, float, Tensor] = None, hi: Union[None, float, Tensor] = None,
                    backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """(r_tot', x_next), each [B, D]; see :func:`ddfast.reference.deepfool_update`.

    ``lo`` / ``hi``: None, a number, or a tensor of shape [D], [1, D] or [B, D] (one row for
    every sample, or one per sample), taken in x0's dtype and device; no NaN, lo <= hi."""
    check_rows([("x0", x0, 2, "float"), ("r_tot", r_tot, 2, "float"), ("r", r, 2, "float"),
                ("active", active, 1, "bool")])
    check_same_dtype(("x0", x0), ("r_tot", r_tot), ("r", r))
    overshoot = check_finite(overshoot, "overshoot")
    lo_rows, hi_rows = bound_rows(lo, "lo", x0), bound_rows(hi, "hi", x0)
    check_order(lo_rows, hi_rows, (lo, hi))
    return _run(backend, x0, torch.ops.ddfast.deepfool_update, x0, r_tot, r, active, overshoot, lo_rows, hi_rows)
