"""The paper's robustness metrics (Section 4.1 and supplementary Table 1), batched.

* :func:`rho2`: ``rho_2 = mean_k ||D_k||_2 / ||x_k||_2`` with ``D_k`` the DeepFool
  perturbation (:func:`ddfast.deepfool`, L2, ``max_iter=50``, overshoot 0.02 by default),
  the attack leaving the model's *prediction* (``y=None``), as in the DeepFool paper; also
  ``rho'_2 = mean ||D_k||_2`` in 0..255 pixel units (``||D|| / scale``) and the fraction of
  samples the attack fooled (samples it did not fool still count with their final D).
* :func:`fgs_eps50` / :func:`rho_inf`: FGS ``D = eps * sign(grad_x CE(f(x), y))`` with ``eps``
  found by bisection so that 50% of the samples are misclassified;
  ``rho_inf = mean ||D||_inf / ||x||_inf``.
* :func:`acc_at_eps`: accuracy under FGS at given eps values (the paper's Acc@{0.2, 0.5,
  1.0} eps_ref, eps_ref the :func:`fgs_eps50` of the DeepDefense model).
* :func:`evaluate`: all of the above for one model, as one results row.

Inputs are preprocessed float tensors ``x [N, ...]`` (N >= 1, finite, on the model's device)
and integer labels ``y [N]`` in ``[0, K)``; anything else raises ``TypeError``/``ValueError``
naming the argument before any work. Every function runs the model in eval mode and restores
every submodule's mode; nothing of the caller's changes: no parameter, ``.grad``, buffer,
``requires_grad`` flag, input, the global RNG state or the grad mode (they work under
``torch.no_grad()`` and ``torch.inference_mode()`` too).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from .guard import model_guard
from .robustness import PixelInput, evaluate_robustness, min_norm, robust_accuracy
from .validate import (
    as_labels,
    check_batch_size,
    check_candidates,
    check_choice,
    check_input,
    check_logits,
    check_max_iter,
    check_model_device,
    check_nonneg,
    explain_model_errors,
)

__all__ = [
    "Rho2",
    "check_data",
    "accuracy",
    "predict",
    "rho2",
    "fgs_direction",
    "fgs_error",
    "fgs_eps50",
    "rho_inf",
    "acc_at_eps",
    "evaluate",
    "evaluate_robustness",
    "robust_accuracy",
    "min_norm",
    "PixelInput",
]


#: A model: any callable mapping ``[N, ...]`` inputs to logits ``[N, K]`` (an ``nn.Module`` runs in eval mode).
Model = Callable[[Tensor], Tensor]

_UNLABELLED = object()


def check_data(model: Model, x: Tensor, y: Optional[Tensor] = _UNLABELLED,  # type: ignore[assignment]
               names: Tuple[str, str] = ("x", "y")) -> Optional[Tensor]:
    """Check a data set before any work: ``x`` a finite float tensor ``[N, ...]`` with N >= 1 on the
    model's device; ``y`` (when passed; ``None`` is refused) integer labels ``[N]`` in ``[0, K)``, K read from one probe
    forward of ``x[:1]`` (eval mode, no graph; also checks the model returns logits ``[1, K]``).
    Returns ``y`` as int64 (or None). Raises ``TypeError``/``ValueError`` naming the argument."""
    xname, yname = names
    check_input(x, xname)
    if x.shape[0] == 0:
        raise ValueError(f"{xname} is empty: a metric needs at least one sample")
    check_model_device(model, x)
    if y is _UNLABELLED:
        return None
    if y is None:
        raise TypeError(f"{yname} (labels [N]) is required, got None")
    y = as_labels(y, x.shape[0], None, x.device, yname)
    with explain_model_errors(model, x, "ddfast.metrics", xname), torch.no_grad(), model_guard(model, x):
        k = check_logits(model(x[:1].clone()), 1).shape[1]
    return as_labels(y, x.shape[0], k, x.device, yname)


def check_labelled(model: Model, x: Tensor, y: Optional[Tensor],
                   names: Tuple[str, str] = ("x", "y")) -> Tensor:
    """:func:`check_data` for a labelled set: ``y`` as int64 ``[N]``."""
    labels = check_data(model, x, y, names)
    assert labels is not None
    return labels


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _batches(n: int, batch_size: int, progress: bool, desc: str):
    starts = range(0, n, batch_size)
    if not progress:
        return starts
    try:  # the bar is optional: tqdm comes with the "paper" extra
        from tqdm.auto import tqdm
    except ImportError:
        return starts
    return tqdm(starts, desc=desc, unit="batch", leave=False)


@torch.no_grad()
def predict(model: Model, x: Tensor, batch_size: int = 1000) -> Tensor:
    """Predicted labels ``int64 [N]`` of ``x [N, ...]`` (eval mode, no graph)."""
    check_data(model, x)
    check_batch_size(batch_size, allow_none=False)
    with model_guard(model, x):
        return torch.cat([model(x[i:i + batch_size].clone()).argmax(1) for i in range(0, x.shape[0], batch_size)])


def accuracy(model: Model, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Fraction (0..1) of ``x [N, ...]`` classified as ``y [N]``."""
    y = check_labelled(model, x, y)
    return (predict(model, x, batch_size) == y).double().mean().item()


def _check_no_zero_sample(x: Tensor, metric: str, name: str = "x") -> None:
    """``metric`` divides by each sample's norm: an all-zero sample would make it inf."""
    zero = (x.detach().flatten(1) == 0).all(1)
    if bool(zero.any()):
        rows = zero.nonzero().squeeze(1)
        raise ValueError(f"{name} has {rows.numel()} all-zero sample(s) (rows {rows[:5].tolist()}"
                         f"{' ...' if rows.numel() > 5 else ''}): {metric} divides by each sample's norm")


@dataclass
class Rho2:
    """DeepFool robustness of a model on a set of samples.

    ``rho2``: mean ``||D||_2/||x||_2``; ``rho2_prime``: mean ``||D||_2 / scale`` (0..255 units
    when ``scale`` is the preprocessing scale); ``fooled``: fraction of samples whose
    prediction DeepFool changed; ``ratios`` ``[N]``: per-sample ``||D||_2/||x||_2``;
    ``iterations`` ``[N]``; ``delta``: the perturbations ``[N, ...]`` when kept.
    """

    rho2: float
    rho2_prime: float
    fooled: float
    ratios: Tensor
    iterations: Tensor
    delta: Optional[Tensor] = field(default=None, repr=False)


def rho2(
    model: Model,
    x: Tensor,
    *,
    max_iter: int = 50,
    overshoot: float = 0.02,
    candidates: Optional[int] = None,
    scale: float = 1.0,
    batch_size: int = 500,
    keep_delta: bool = False,
    progress: bool = True,
    attack: str = "deepfool",
) -> Rho2:
    """rho_2 under DeepFool (from each sample's predicted class), rho'_2 and the fooled fraction.

    ``x [N, ...]``; ``scale``: the preprocessing scale (``1/255`` for the [0,1] space); rho'_2
    divides by it. ``max_iter``, ``overshoot``, ``candidates``: :func:`ddfast.deepfool`'s.
    ``attack``: ``"deepfool"`` or ``"superdeepfool"`` (:func:`ddfast.superdeepfool` with its
    default iterations, ``max_iter`` the steps of each of its DeepFool runs, ``candidates=None``
    its default).
    """
    from . import deepfool, superdeepfool  # the batched attacks

    check_choice(attack, "attack", ("deepfool", "superdeepfool"))
    check_data(model, x)
    _check_no_zero_sample(x, "rho_2 = mean ||D||_2 / ||x||_2")
    _positive(scale, "scale")
    check_max_iter(max_iter)
    check_nonneg(overshoot, "overshoot")
    check_candidates(candidates)
    check_batch_size(batch_size, allow_none=False)
    if attack == "deepfool":
        run = functools.partial(deepfool, max_iter=max_iter, overshoot=overshoot, candidates=candidates)
    else:                                      # None: superdeepfool's own default
        from .superdeepfool import CANDIDATES

        run = functools.partial(superdeepfool, df_steps=max_iter, overshoot=overshoot,
                                candidates=CANDIDATES if candidates is None else candidates)
    ratios, norms, iters, fooled, deltas = [], [], [], [], []
    for i in _batches(x.shape[0], batch_size, progress, f"{attack} rho_2"):
        xb = x[i:i + batch_size]
        res = run(model, xb)
        d = res.delta.detach().flatten(1)
        n = torch.linalg.vector_norm(d, dim=1)
        ratios.append(n / torch.linalg.vector_norm(xb.detach().flatten(1), dim=1))
        norms.append(n)
        iters.append(res.iterations)
        fooled.append(res.success)
        if keep_delta:
            deltas.append(res.delta.detach())
    ratios_t = torch.cat(ratios)
    return Rho2(
        rho2=ratios_t.double().mean().item(),
        rho2_prime=(torch.cat(norms).double().mean() / scale).item(),
        fooled=torch.cat(fooled).double().mean().item(),
        ratios=ratios_t,
        iterations=torch.cat(iters),
        delta=torch.cat(deltas) if keep_delta else None,
    )


def fgs_direction(model: Model, x: Tensor, y: Tensor, batch_size: int = 1000) -> Tensor:
    """``sign(grad_x CE(f(x), y))`` per sample, ``[N, ...]`` like ``x`` (eval mode; parameters' .grad untouched)."""
    y = check_labelled(model, x, y)
    check_batch_size(batch_size, allow_none=False)
    out = []
    with model_guard(model, x), torch.inference_mode(False), torch.enable_grad():
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].detach().clone().requires_grad_(True)  # clone: x may be an inference tensor
            loss = F.cross_entropy(model(xb.clone()), y[i:i + batch_size], reduction="sum")
            (g,) = torch.autograd.grad(loss, xb)
            out.append(g.sign())
    return torch.cat(out)


@torch.no_grad()
def fgs_error(model: Model, x: Tensor, y: Tensor, direction: Tensor, eps: float, batch_size: int = 1000) -> float:
    """Fraction (0..1) of ``x`` misclassified (not ``y``) at ``x + eps * direction``."""
    y = check_labelled(model, x, y)
    _check_direction(direction, x)
    check_nonneg(eps, "eps")
    return 1.0 - (predict(model, x + eps * direction, batch_size) == y).double().mean().item()


def fgs_eps50(
    model: Model,
    x: Tensor,
    y: Tensor,
    *,
    direction: Optional[Tensor] = None,
    target: float = 0.5,
    rel_tol: float = 1e-4,
    batch_size: int = 1000,
) -> float:
    """FGS eps misclassifying >= ``target`` of ``x``: doubled until it does, then bisected to a
    relative tolerance ``rel_tol``. That is the smallest such eps when the FGS error grows with
    eps (as it does on the paper's models); where the error dips, a crossing of ``target``.

    ``eps`` is in the units of the preprocessed ``x`` (an L-inf step per pixel). Returns 0 if the
    clean error already reaches ``target``; ``inf`` if no eps up to ``1e6 * mean|x|`` does.
    """
    y = check_labelled(model, x, y)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ValueError(f"target must be in (0, 1], got {target!r}")
    _positive(rel_tol, "rel_tol")
    check_batch_size(batch_size, allow_none=False)
    if direction is not None:
        _check_direction(direction, x)
    s = fgs_direction(model, x, y, batch_size) if direction is None else direction
    err = lambda e: fgs_error(model, x, y, s, e, batch_size)  # noqa: E731
    if err(0.0) >= target:
        return 0.0
    lo, hi = 0.0, max(x.abs().mean().item(), 1e-12) * 1e-3
    limit = hi * 1e9
    while err(hi) < target:
        lo, hi = hi, hi * 2
        if hi > limit:
            return math.inf
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        if err(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def _check_direction(direction, x: Tensor) -> None:
    if not isinstance(direction, Tensor) or direction.shape != x.shape:
        raise ValueError(f"direction must be a tensor shaped like x {list(x.shape)}, "
                         f"got {list(getattr(direction, 'shape', [])) or type(direction).__name__}")
    check_input(direction, "direction")


def rho_inf(model: Model, x: Tensor, y: Tensor, *, eps: Optional[float] = None,
            batch_size: int = 1000) -> Tuple[float, float]:
    """``(rho_inf, eps)``: mean ``||D||_inf/||x||_inf`` of FGS at ``eps`` (default: :func:`fgs_eps50`),
    ``eps`` in the units of the preprocessed ``x``."""
    if eps is not None:
        check_nonneg(eps, "eps")
    check_input(x)  # enough for the zero-sample check; fgs_direction checks the rest (one probe forward)
    _check_no_zero_sample(x, "rho_inf = mean ||D||_inf / ||x||_inf")
    s = fgs_direction(model, x, y, batch_size)
    if eps is None:
        eps = fgs_eps50(model, x, y, direction=s, batch_size=batch_size)
    d_inf = eps * s.flatten(1).abs().amax(1)
    return (d_inf / x.detach().flatten(1).abs().amax(1)).double().mean().item(), eps


def acc_at_eps(model: Model, x: Tensor, y: Tensor, eps: Sequence[float], batch_size: int = 1000) -> List[float]:
    """Accuracy (0..1) under FGS at each of ``eps`` (same order; units of the preprocessed ``x``)."""
    if isinstance(eps, (str, bytes)) or not isinstance(eps, Sequence):
        raise TypeError(f"eps must be a sequence of numbers, got {type(eps).__name__}")
    for e in eps:
        check_nonneg(e, "eps")
    s = fgs_direction(model, x, y, batch_size)
    return [1.0 - fgs_error(model, x, y, s, float(e), batch_size) for e in eps]


@overload
def evaluate(model: Model, x: Tensor, y: Tensor, *, scale: float = ..., eps_ref: Optional[float] = ...,
             fractions: Sequence[float] = ..., max_iter: int = ..., candidates: Optional[int] = ...,
             batch_size: int = ..., progress: bool = ..., return_rho2: Literal[False] = ...,
             attack: str = ...) -> Dict[str, Any]: ...


@overload
def evaluate(model: Model, x: Tensor, y: Tensor, *, scale: float = ..., eps_ref: Optional[float] = ...,
             fractions: Sequence[float] = ..., max_iter: int = ..., candidates: Optional[int] = ...,
             batch_size: int = ..., progress: bool = ..., return_rho2: Literal[True],
             attack: str = ...) -> Tuple[Dict[str, Any], Rho2]: ...


def evaluate(
    model: Model,
    x: Tensor,
    y: Tensor,
    *,
    scale: float = 1.0,
    eps_ref: Optional[float] = None,
    fractions: Sequence[float] = (0.2, 0.5, 1.0),
    max_iter: int = 50,
    candidates: Optional[int] = None,
    batch_size: int = 500,
    progress: bool = True,
    return_rho2: bool = False,
    attack: str = "deepfool",
) -> Union[Dict[str, Any], Tuple[Dict[str, Any], Rho2]]:
    """One results row: ``acc``, ``rho2``, ``rho2_prime`` (0..255 units), ``fooled`` (under
    ``attack``, :func:`rho2`'s, named in the row's ``attack``), ``rho_inf``, ``eps50`` (this
    model's FGS eps for 50% error, preprocessed units) and, when ``eps_ref`` is given,
    ``acc_at_eps = {"0.2": acc, ...}`` at ``fraction * eps_ref``.
    With ``return_rho2`` returns ``(row, Rho2)`` (per-sample ratios for histograms).
    """
    y = check_labelled(model, x, y)
    if eps_ref is not None:
        check_nonneg(eps_ref, "eps_ref")
    for f in fractions:
        check_nonneg(f, "fractions")
    r = rho2(model, x, max_iter=max_iter, candidates=candidates, scale=scale, batch_size=batch_size, progress=progress,
             attack=attack)
    ri, eps = rho_inf(model, x, y, batch_size=batch_size)
    row: Dict[str, Any] = {
        "acc": accuracy(model, x, y),
        "attack": attack,
        "rho2": r.rho2,
        "rho2_prime": r.rho2_prime,
        "fooled": r.fooled,
        "rho_inf": ri,
        "eps50": eps,
    }
    if eps_ref is not None:
        accs = acc_at_eps(model, x, y, [f * eps_ref for f in fractions], batch_size)
        row["acc_at_eps"] = {str(f): a for f, a in zip(fractions, accs)}
    return (row, r) if return_rho2 else row
