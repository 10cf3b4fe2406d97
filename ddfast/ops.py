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
from .reference import PENALTY_EXP_CAP
from .validate import check_finite, check_rows, check_select, need, norm_value

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
                     lo: Optional[float], hi: Optional[float]) -> Tuple[Tensor, Tensor]:
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
    if active is None and isinstance(grads, Tensor):
        active = torch.ones(grads.shape[0], dtype=torch.bool, device=grads.device)
    check_select(logits, grads, cand, ref, active, bool(diff))
    norm, eps = _scalars(norm, eps)
    return _run(backend, grads, torch.ops.ddfast.select_boundary, logits, grads, cand.long(), ref.long(),
                active, norm, eps, bool(diff))


def boundary_step(fdiff: Tensor, w: Tensor, norm: Union[int, float, str] = 2, eps: float = 1e-4,
                  backend: Optional[str] = None) -> Tensor:
    """Differentiable DeepFool step ``r`` [B, D] from ``fdiff`` [B] and ``w`` [B, D]; see
    :func:`ddfast.reference.boundary_step`."""
    check_rows([("fdiff", fdiff, 1, "float"), ("w", w, 2, "float")])
    norm, eps = _scalars(norm, eps)
    return _run(backend, w, torch.ops.ddfast.boundary_step, fdiff, w, norm, eps)


def deepdefense_penalty(delta: Tensor, x: Tensor, correct: Tensor, c: float, d: float,
                        backend: Optional[str] = None) -> Tensor:
    """Per-sample penalty [B] from ``delta``, ``x`` [B, D] and ``correct`` [B] bool; see
    :func:`ddfast.reference.deepdefense_penalty`."""
    check_rows([("delta", delta, 2, "float"), ("x", x, 2, "float"), ("correct", correct, 1, "bool")])
    c, d = check_finite(c, "c"), check_finite(d, "d")
    return _run(backend, delta, torch.ops.ddfast.deepdefense_penalty, delta, x, correct, c, d)


def deepfool_update(x0: Tensor, r_tot: Tensor, r: Tensor, active: Tensor, overshoot: float,
                    lo: Optional[float] = None, hi: Optional[float] = None,
                    backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """(r_tot', x_next), each [B, D]; see :func:`ddfast.reference.deepfool_update`."""
    check_rows([("x0", x0, 2, "float"), ("r_tot", r_tot, 2, "float"), ("r", r, 2, "float"),
                ("active", active, 1, "bool")])
    need(r_tot.dtype == x0.dtype and r.dtype == x0.dtype,
         f"x0, r_tot and r must share one dtype, got {x0.dtype}, {r_tot.dtype} and {r.dtype}")
    overshoot = check_finite(overshoot, "overshoot")
    lo = None if lo is None else check_finite(lo, "lo")
    hi = None if hi is None else check_finite(hi, "hi")
    need(lo is None or hi is None or lo <= hi, f"lo must be <= hi, got lo={lo}, hi={hi}")
    return _run(backend, x0, torch.ops.ddfast.deepfool_update, x0, r_tot, r, active, overshoot, lo, hi)
