"""Pure-torch reference of every ddfast op: the executable spec.

Every backend (C++ CPU, Triton, CUDA) must agree with these functions, which are written
for clarity, work on any device and float dtype, and are exact in float64.
Shapes: B samples, K classes, C candidate classes per sample, D input features.

Conventions shared by all ops:

* ``norm`` is ``2`` or ``inf`` (float). For ``norm=2`` distances use ``||w||_2``; for
  ``norm=inf`` they use the dual norm ``||w||_1`` and steps follow ``sign(w)``.
* Norms never overflow or underflow unless the norm itself lies outside the dtype's range
  (:func:`norm2`): a row whose plain sum of squares may have overflowed (an entry past
  ~1.8e19 in float32) or lost digits to underflow is divided by a power of two near its
  largest ``|entry|`` (exact) before squaring. So scaling the inputs by 1e20 or 1e-20 in
  float32 scales every norm and changes no choice. Backends may instead accumulate squares
  in a type where they cannot overflow (float64 for float32 rows); the fast float32 sum is
  kept where it is exact enough, as here.
* A row whose boundary normal ``w`` is exactly zero never produces NaN or Inf: its
  distance is ``+inf`` and its step ``r`` is 0.
* A NaN distance (NaN logits, say) counts as ``+inf``: it never wins, and a row without a
  finite distance gets ``dist = inf`` and ``r = 0`` (a NaN ``w`` already has no ``norm > 0``).
* Inactive rows (``active[i] == False``) get ``l = ref``, ``dist = 0`` and ``r = 0``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "select_boundary",
    "boundary_step",
    "deepdefense_penalty",
    "deepfool_update",
    "deepfool_ref",
    "deepdefense_ref",
    "norm2",
    "PENALTY_EXP_CAP",
]

#: Exponents of the DeepDefense penalty above this value continue linearly (value and slope
#: of exp at the cap), so a hopeless misclassified sample cannot overflow float32 (whose exp
#: overflows above ~88.7) while every exponent below the cap is untouched.
PENALTY_EXP_CAP = 60.0

#: added to each step's distance so that the step crosses the boundary (DESIGN.md)
STEP_EPS = 1e-4


def _check_norm(norm: float) -> float:
    norm = float(norm)
    if norm != 2.0 and not math.isinf(norm):
        raise ValueError(f"norm must be 2 or inf, got {norm}")
    return norm


def row_scale(w: Tensor) -> Tensor:
    """[..., 1]: a power of two ``s`` with ``max |w| / s`` in [1, 2) for each row of ``w``
    (1/2 for a row that is zero, holds Inf or NaN, or is empty). No gradient."""
    if w.shape[-1] == 0:
        return w.new_full(w.shape[:-1] + (1,), 0.5)
    m = w.detach().abs().amax(-1, keepdim=True)
    _, e = torch.frexp(m)
    return torch.ldexp(torch.ones_like(m), e - 1)


def scaled_norm2(w: Tensor) -> Tensor:
    """||w||_2 over the last dim as ``s * ||w / s||_2``, ``s`` :func:`row_scale`: no square
    overflows or underflows (the division by a power of two is exact); Inf rows give inf,
    NaN rows NaN. No host synchronisation (traceable: the ops' backward formulas use it)."""
    s = row_scale(w)
    return s.squeeze(-1) * torch.linalg.vector_norm(w / s, dim=-1)


def scaled_parts(w: Tensor) -> Tuple[Tensor, Tensor]:
    """(s, q) with ||w||_2 = s * sqrt(q) over the last dim, s :func:`row_scale` and q the sum
    of squares of w / s; as :func:`scaled_norm2`, traceable."""
    s = row_scale(w)
    return s.squeeze(-1), ((w / s) ** 2).sum(-1)


def _tiny_norm(dtype: torch.dtype) -> float:
    """Below this a norm summed plainly may have lost digits to squares under the smallest
    normal number (float32 sums for float32 and half rows)."""
    return 2.0 ** (-500 if dtype == torch.float64 else -50)


def norm2(w: Tensor) -> Tensor:
    """||w||_2 over the last dim: ``torch.linalg.vector_norm``, and :func:`scaled_norm2` for
    the rows where that is not finite or is below :func:`_tiny_norm`. Differentiable as
    ``vector_norm`` (0 at w == 0)."""
    if w.dim() == 1:
        return norm2(w[None])[0]
    n = torch.linalg.vector_norm(w, dim=-1)
    redo = ~(torch.isfinite(n) & (n >= _tiny_norm(w.dtype)))
    if w.shape[-1] == 0 or not bool(redo.any()):
        return n
    return n.index_put((redo,), scaled_norm2(w[redo]))


def norm2_parts(w: Tensor) -> Tuple[Tensor, Tensor]:
    """(s, q) [...] with ||w||_2 = s * sqrt(q) over the last dim: s = 1 and q the plain sum of
    squares where that neither overflowed nor may have underflowed, else s :func:`row_scale`
    and q the sum of squares of w / s. For formulas that need sqrt(q) guarded at q == 0."""
    if w.dim() == 1:
        s1, q1 = norm2_parts(w[None])
        return s1[0], q1[0]
    q = (w * w).sum(-1)
    s = torch.ones_like(q)
    redo = ~(torch.isfinite(q) & (q >= _tiny_norm(w.dtype) ** 2))
    if w.shape[-1] == 0 or not bool(redo.any()):
        return s, q
    s_r, q_r = scaled_parts(w[redo])
    return s.index_put((redo,), s_r), q.index_put((redo,), q_r)


def dual_norm(w: Tensor, norm: float) -> Tensor:
    """||w||_q over the last dim, q the dual of ``norm`` (2 -> 2, inf -> 1); see :func:`norm2`.
    The sum of |w| overflows only where the norm itself does."""
    if math.isinf(norm):
        return w.abs().sum(-1)
    return norm2(w)


def step_direction(w: Tensor, norm: float) -> Tensor:
    """Unit-cost direction of a step along ``w``: ``w / ||w||_2`` (0 where w == 0) or
    ``sign(w)``. Shape of ``w``."""
    if math.isinf(norm):
        return torch.sign(w)
    n2 = norm2(w)[..., None]
    return torch.where(n2 > 0, w / torch.where(n2 > 0, n2, torch.ones_like(n2)), torch.zeros_like(w))


def select_boundary(
    logits: Tensor,
    grads: Tensor,
    cand: Tensor,
    ref: Tensor,
    active: Tensor,
    norm: float = 2.0,
    eps: float = STEP_EPS,
    diff: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Closest linearised decision boundary and the DeepFool step towards it.

    Args:
        logits: [B, K] logits at the current point.
        grads: [B, C, D] gradients of the candidate classes' logits: ``grads[i, j]`` is
            ``d logits[i, cand[i, j]] / dx``.
        cand: [B, C] int64 candidate class indices; ``ref[i]`` must appear in ``cand[i]``.
        ref: [B] int64 reference class (the class to leave).
        active: [B] bool; inactive rows are skipped.
        norm: 2 or inf.
        eps: added to the distance so the step crosses the boundary.
        diff: ``grads`` already holds the boundary normals, ``grads[i, j] = g_{cand[i, j]} -
            g_{ref[i]}`` (one backward per competing class instead of one per class), and
            ``ref[i]`` need not appear in ``cand[i]`` (a candidate equal to it is skipped).

    Returns:
        l: [B] int64, the chosen class ``argmin_k |f_k - f_ref| / ||g_k - g_ref||_q``
           over candidates ``k != ref`` (first index on ties; a NaN distance counts as inf,
           so a row without a finite distance takes its first candidate).
        dist: [B] in the logits' dtype (computed in the wider of the logits' and the grads'
           dtypes), that distance (``inf`` where no candidate has a finite one: every ``w``
           zero or NaN, or NaN logits).
        r: [B, D] in the grads' dtype, ``(dist + eps) * w_l / ||w_l||_2`` (norm 2) or
           ``(dist + eps) * sign(w_l)`` (norm inf); 0 where ``w_l == 0`` or inactive.
    """
    norm = _check_norm(norm)
    B, C, D = grads.shape
    is_ref = cand == ref[:, None]                                   # [B, C]
    if diff:
        w = grads                                                   # [B, C, D]
    else:
        ref_pos = is_ref.to(torch.int64).argmax(dim=1)              # [B]
        g_ref = grads[torch.arange(B, device=grads.device), ref_pos]  # [B, D]
        w = grads - g_ref[:, None, :]                               # [B, C, D]
    work = torch.promote_types(logits.dtype, grads.dtype)          # the wider of the two
    f = logits.to(work)
    fdiff = f.gather(1, cand) - f.gather(1, ref[:, None])           # [B, C]
    wn = dual_norm(w, norm).to(work)                                # [B, C]
    inf = torch.full_like(fdiff, math.inf)
    dist_all = torch.where(wn > 0, fdiff.abs() / torch.where(wn > 0, wn, torch.ones_like(wn)), inf)
    dist_all = torch.where(is_ref | torch.isnan(dist_all), inf, dist_all)   # NaN never wins
    pos = dist_all.argmin(dim=1)                                    # first minimum
    rows = torch.arange(B, device=grads.device)
    dist = dist_all[rows, pos]
    l = cand[rows, pos]
    w_l = w[rows, pos]                                              # [B, D]
    step = torch.isfinite(dist)
    scale = torch.where(step, dist + eps, torch.zeros_like(dist))
    r = torch.where(step[:, None], scale.to(grads.dtype)[:, None] * step_direction(w_l, norm),
                    torch.zeros_like(w_l))                      # 0, not 0 * NaN, where no step
    l = torch.where(active, l, ref)
    dist = torch.where(active, dist, torch.zeros_like(dist)).to(logits.dtype)
    r = torch.where(active[:, None], r, torch.zeros_like(r))
    return l, dist, r


def boundary_step(fdiff: Tensor, w: Tensor, norm: float = 2.0, eps: float = 1e-4) -> Tensor:
    """Differentiable DeepFool step towards one boundary.

    Args:
        fdiff: [B] logit difference ``f_l - f_ref`` (usually negative), taken in w's dtype.
        w: [B, D] boundary normal ``g_l - g_ref``.

    Returns:
        r: [B, D] in w's dtype, ``(|fdiff| / ||w||_q + eps) * w / ||w||_2`` (norm 2) or
        ``(|fdiff| / ||w||_1 + eps) * sign(w)`` (norm inf); 0 where ``w == 0``.
        Differentiable twice in ``fdiff`` and ``w`` (the gradient at ``w == 0`` is 0).
    """
    norm = _check_norm(norm)
    fdiff = fdiff.to(w.dtype)
    wn = dual_norm(w, norm)
    nz = wn > 0
    wn_safe = torch.where(nz, wn, torch.ones_like(wn))
    scale = torch.where(nz, fdiff.abs() / wn_safe + eps, torch.zeros_like(wn))
    # where no step is taken r is 0, also where w holds NaN (0 * sign(NaN) would be NaN)
    return torch.where(nz[:, None], scale[:, None] * step_direction(w, norm), torch.zeros_like(w))


def deepdefense_penalty(delta: Tensor, x: Tensor, correct: Tensor, c: float, d: float) -> Tensor:
    """Per-sample DeepDefense penalty.

    Args:
        delta: [B, D] the DeepFool perturbation ``D_i``.
        x: [B, D] the clean input, taken in delta's dtype.
        correct: [B] bool, sample classified correctly.

    Returns:
        [B] in delta's dtype: ``exp(-c * ||delta|| / ||x||)`` where correct,
        ``exp(d * ||delta|| / ||x||)`` elsewhere; exponents above :data:`PENALTY_EXP_CAP`
        continue linearly. The gradient of ``||delta||`` at ``delta == 0`` is 0 and
        ``||x|| == 0`` counts as ratio 0. Norms as :func:`norm2` (no overflow); a NaN in
        delta or x gives NaN.
    """
    x = x.to(delta.dtype)
    s, dn2 = norm2_parts(delta)                                     # ||delta|| = s * sqrt(dn2)
    nz = dn2 > 0
    dn = s * torch.where(nz, torch.sqrt(torch.where(nz, dn2, torch.ones_like(dn2))),
                         dn2 * 0)                                   # 0, or NaN for a NaN row
    xn = norm2(x)
    x0 = xn == 0
    ratio = torch.where(x0, torch.zeros_like(dn), dn / torch.where(x0, torch.ones_like(xn), xn))
    z = torch.where(correct, -c * ratio, d * ratio)
    cap = PENALTY_EXP_CAP
    over = z > cap
    z_in = torch.where(over, torch.full_like(z, cap), z)
    e = torch.exp(z_in)
    return torch.where(over, e * (1 + (z - cap)), e)


def deepfool_update(
    x0: Tensor,
    r_tot: Tensor,
    r: Tensor,
    active: Tensor,
    overshoot: float,
    lo: Optional[Tensor] = None,
    hi: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Accumulate a DeepFool step and form the next iterate.

    Args:
        x0: [B, D] the clean input; r_tot: [B, D] accumulated steps; r: [B, D] this step.
        active: [B] bool; inactive rows keep their ``r_tot``.
        overshoot: the iterate is ``x0 + (1 + overshoot) * r_tot``.
        lo, hi: optional clip bounds of the iterate, [1, D] (one row for every sample) or
            [B, D], in x0's dtype, without NaN, ``lo <= hi``.

    Returns:
        (r_tot', x_next), both [B, D]; ``x_next = min(max(x, lo), hi)`` (a NaN x stays NaN).
    """
    r_new = torch.where(active[:, None], r_tot + r, r_tot)
    x_next = x0 + (1.0 + overshoot) * r_new
    if lo is not None or hi is not None:
        x_next = torch.clamp(x_next, min=lo, max=hi)
    return r_new, x_next


def bound_row(value, x: Tensor) -> Optional[Tensor]:
    """A bound (None, a number, or a tensor that broadcasts to x [B, ...]) as the [B, D] rows
    :func:`deepfool_update` takes (None stays None)."""
    if value is None:
        return None
    return torch.as_tensor(value, dtype=x.dtype, device=x.device).broadcast_to(x.shape).reshape(x.shape[0], -1)


# ------------------------------------------------------------------ the attack and the regularizer
def _eval_modes(model):
    """Put an ``nn.Module`` in eval mode; returns the modes to restore."""
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, torch.nn.Module) else []
    for m, _ in modes:
        m.training = False
    return modes


def _candidates(logits: Tensor, ref: Tensor, k: Optional[int]) -> Tensor:
    """[B, C] classes that compete, ``ref`` included: all K, or ref and the k-1 others of
    highest logit."""
    B, K = logits.shape
    if k is None or k >= K:
        return torch.arange(K, device=logits.device).expand(B, K)
    others = logits.scatter(1, ref[:, None], -math.inf).topk(k - 1, dim=1).indices
    return torch.cat([ref[:, None], others], 1)


def _class_grads(logits: Tensor, x: Tensor, cand: Tensor, create_graph: bool) -> Tensor:
    """[B, C, D]: the gradient of logit ``cand[i, j]`` of sample i w.r.t. its input, one
    autograd call per column."""
    cols = [torch.autograd.grad(logits.gather(1, cand[:, j:j + 1]).sum(), x, retain_graph=True,
                                create_graph=create_graph)[0] for j in range(cand.shape[1])]
    return torch.stack(cols, 1).flatten(2)


def deepfool_ref(model, x: Tensor, y: Optional[Tensor] = None, *, max_iter: int = 50,
                 overshoot: float = 0.02, norm: float = 2.0, candidates: Optional[int] = None,
                 bounds=None):
    """DeepFool, slowly: the whole batch every step (done samples masked), every candidate's
    gradient by its own autograd call, the step by :func:`select_boundary` and
    :func:`deepfool_update`. Returns ``(delta, iterations, success, label, adv_label)`` as
    :class:`ddfast.DeepFoolResult` defines them."""
    lo, hi = (bound_row(v, x) for v in (bounds if bounds is not None else (None, None)))
    modes = _eval_modes(model)
    try:
        B, shape = x.shape[0], x.shape[1:]
        x0 = x.detach().reshape(B, -1)
        with torch.no_grad():
            logits = model(x0.view(B, *shape))
        pred = logits.argmax(1)
        ref = pred if y is None else y.long()
        cand = _candidates(logits, ref, candidates)
        active = pred == ref
        success, adv_label = ~active, pred.clone()
        iterations = torch.zeros(B, dtype=torch.int64, device=x.device)
        r_tot, x_cur = torch.zeros_like(x0), x0
        for t in range(max_iter):
            if not bool(active.any()):
                break
            with torch.enable_grad():
                xv = x_cur.clone().requires_grad_(True)
                logits = model(xv.view(B, *shape).clone())
                grads = _class_grads(logits, xv, cand, create_graph=False)
            _, _, r = select_boundary(logits.detach(), grads, cand, ref, active, norm, STEP_EPS)
            r_tot, x_next = deepfool_update(x0, r_tot, r, active, overshoot, lo, hi)
            x_cur = torch.where(active[:, None], x_next, x_cur)
            with torch.no_grad():
                logits = model(x_cur.view(B, *shape))
            finite = torch.isfinite(logits).all(1)
            now = torch.where(finite, logits.argmax(1), ref)
            stopped = active & ((now != ref) | ~finite)
            iterations = torch.where(active, torch.full_like(iterations, t + 1), iterations)
            adv_label = torch.where(active, now, adv_label)
            success = success | (stopped & finite)
            active = active & ~stopped
        return (x_cur - x0).view(B, *shape), iterations, success, ref, adv_label
    finally:
        for m, mode in modes:
            m.training = mode


def deepdefense_ref(model, x: Tensor, y: Tensor, *, lam: float = 15.0, c: float = 25.0, d: float = 5.0,
                    max_iter: int = 5, overshoot: float = 0.02, candidates: Optional[int] = None):
    """The DeepDefense regularizer, slowly: the whole batch every step (done samples masked),
    every candidate's gradient with ``create_graph`` by its own autograd call; correct samples
    step towards the closest candidate boundary (a choice without a graph), wrong ones towards
    y. Returns ``(R, iterations [B], correct [B])``, R differentiable."""
    modes = _eval_modes(model)
    try:
        B, shape = x.shape[0], x.shape[1:]
        x0 = x.reshape(B, -1)
        r_tot = torch.zeros_like(x0)
        iterations = torch.zeros(B, dtype=torch.int64, device=x.device)
        with torch.enable_grad():
            xt = x0 if x0.requires_grad else x0.detach().requires_grad_(True)
            for t in range(max_iter):
                if t > 0:
                    xt = x0 + (1 + overshoot) * r_tot
                    xt = xt if xt.requires_grad else xt.detach().requires_grad_(True)
                logits = model(xt.view(B, *shape).clone())
                cur = logits.detach().argmax(1)
                if t == 0:
                    pred, correct = cur, cur == y
                    cand = _candidates(logits.detach(), pred, candidates)
                    active = torch.ones(B, dtype=torch.bool, device=x.device)
                else:
                    active = active & torch.where(correct, cur == pred, cur != y)
                if not bool(active.any()):
                    break
                everything = torch.arange(logits.shape[1], device=x.device).expand(B, -1)
                grads = _class_grads(logits, xt, everything, create_graph=True)      # [B, K, D]
                g_cand = grads.detach().gather(1, cand[:, :, None].expand(-1, -1, grads.shape[2]))
                l_sel, _, _ = select_boundary(logits.detach(), g_cand, cand, cur, active & correct, 2.0, STEP_EPS)
                l = torch.where(correct, l_sel, y)
                a = active.nonzero().squeeze(1)      # done rows take no step (w may be 0 there)
                w = grads[a, l[a]] - grads[a, cur[a]]
                r = boundary_step(logits[a, l[a]] - logits[a, cur[a]], w, 2.0, STEP_EPS)
                r_tot = r_tot.index_add(0, a, r)
                iterations = torch.where(active, torch.full_like(iterations, t + 1), iterations)
        penalty = deepdefense_penalty((1 + overshoot) * r_tot, x0, correct, c, d)
        return lam / B * penalty.sum(), iterations, correct
    finally:
        for m, mode in modes:
            m.training = mode



def _tangent_projection(model, x0: Tensor, x_t: Tensor, label: Tensor, ref: Tensor, shape,
                        bounds, push: float) -> Tuple[Tensor, Tensor]:
    """SuperDeepFool's projection of every row: ``x_p = x0 + (1 + push) ((x_t - x0) . w / ||w||^2) w``
    clipped (``x_t`` where ``w = 0``), ``w = g_label - g_ref`` at ``x_t``; ``(x_p, logits there)``."""
    modes = _eval_modes(model)
    try:
        with torch.enable_grad():
            xv = x_t.clone().requires_grad_(True)
            g = _class_grads(model(xv.view(-1, *shape)), xv, torch.stack([label, ref], 1), create_graph=False)
        w = g[:, 0] - g[:, 1]
        ww = (w * w).sum(1, keepdim=True)
        along = (1 + push) * ((x_t - x0) * w).sum(1, keepdim=True) / torch.where(ww > 0, ww, 1.0)
        x_p = torch.where(ww > 0, x0 + along * w, x_t)
        if bounds is not None and bounds != (None, None):
            x_p = torch.clamp(x_p, min=bounds[0], max=bounds[1])
        with torch.no_grad():
            return x_p, model(x_p.view(-1, *shape))
    finally:
        for m, mode in modes:
            m.training = mode


def _closer(x0: Tensor, x_new: Tensor, label_new: Tensor, ok: Tensor, x_best: Tensor, label: Tensor):
    """``(x_best, label)`` with ``x_new`` and its label in the rows where ``ok`` and it is closer to x0."""
    dist = lambda z: torch.linalg.vector_norm(z - x0, dim=1)  # noqa: E731
    better = ok & (dist(x_new) < dist(x_best))
    return torch.where(better[:, None], x_new, x_best), torch.where(better, label_new, label)


def superdeepfool_ref(model, x: Tensor, y: Optional[Tensor] = None, *, max_iter: int = 3, df_steps: int = 50,
                      overshoot: float = 0.02, candidates: Optional[int] = 4,
                      bounds: Optional[Tuple[Optional[float], Optional[float]]] = None, restart_candidates: int = 2,
                      projection_overshoot: float = 1e-3):
    """SuperDeepFool (L2), slowly: each iteration a :func:`deepfool_ref` run of the whole batch
    from the current points (``df_steps`` steps; after the first, with ``restart_candidates``
    classes or ``candidates`` when fewer), then, for the samples it took across, the projection
    :func:`_tangent_projection` at its end point (``projection_overshoot`` past the tangent plane);
    done samples masked. A sample's result is the adversarial point closest to x0 it met. Returns
    ``(delta, iterations, success, label, adv_label)`` as :func:`ddfast.superdeepfool` defines them."""
    B, shape = x.shape[0], x.shape[1:]
    x0 = x.detach().reshape(B, -1)
    def deepfool_run(z: Tensor, labels: Optional[Tensor], k: Optional[int]):
        return deepfool_ref(model, z, labels, max_iter=df_steps if max_iter else 0, overshoot=overshoot,
                            candidates=k, bounds=bounds)

    delta, steps, success, ref, adv_label = deepfool_run(x, y, candidates)
    later = restart_candidates if candidates is None else min(candidates, restart_candidates)
    x_best = x0 + delta.reshape(B, -1)
    active = success & (steps > 0)             # crossed in the first DeepFool run
    iterations = (steps > 0).long()
    x_t, label = x_best.clone(), adv_label.clone()
    for n in range(1, max_iter + 1):
        if not bool(active.any()):
            break
        x_p, logits = _tangent_projection(model, x0, x_t, label, ref, shape, bounds, projection_overshoot)
        finite = torch.isfinite(logits).all(1)
        pred = torch.where(finite, logits.argmax(1), ref)
        x_best, adv_label = _closer(x0, x_p, pred, active & (pred != ref), x_best, adv_label)
        if n == max_iter:
            break
        go_on = active & finite & (pred == ref)
        d, _, crossed, _, label_t = deepfool_run(x_p.view(B, *shape), ref, later)
        iterations = torch.where(go_on, n + 1, iterations)
        active = go_on & crossed
        x_t, label = torch.where(active[:, None], x_p + d.reshape(B, -1), x_t), torch.where(active, label_t, label)
        x_best, adv_label = _closer(x0, x_t, label, active, x_best, adv_label)
    return (x_best - x0).view(B, *shape), iterations, success, ref, adv_label
