"""Class-logit gradients of a batch w.r.t. its input.

All routes start from a graph-carrying forward (:func:`forward_with_graph`) and return
``grads[i, j] = d logits[i, classes[i, j]] / d x_i`` as a ``[n, C, D]`` tensor (possibly a
strided view: its last dim is contiguous). Routes:

* ``"batched"``: one vmapped backward over the C one-hot output directions
  (``torch.autograd.grad(..., is_grads_batched=True)``), the fastest where vmap works;
* ``"replicate"``: a fresh forward of the batch repeated C times and one backward with
  one direction per copy: no vmap and no retained graph, so it works where vmap does not
  (e.g. ``torch.compile``d models, whose backward refuses ``retain_graph``) at the price of
  C forwards;
* ``"loop"``: one backward per direction on the existing graph (retain_graph).

``"auto"`` tries ``"batched"`` once per model and remembers a failure; it then uses
``"replicate"`` when the input shape is known, else ``"loop"`` (also, without remembering
anything, while autograd's anomaly mode is on: its checks break the vmapped backward).

The ``"batched"`` route calls the autograd engine under a vmap level itself (what
``autograd.grad(..., is_grads_batched=True)`` does, without that call's per-call Python), since
the attack pays it once per step; on a torch without those private pieces, and for tensor
subclasses, it takes the public call.
"""
from __future__ import annotations

import math
import weakref
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .guard import forward

__all__ = ["competing_classes", "forward_with_graph", "class_grads", "direction_grads", "directions",
           "one_row_with_graph"]

#: The routes of :func:`class_grads`.
METHODS = ("auto", "batched", "replicate", "loop")

_vmap_fails: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_engine_run_backward: Optional[Callable]
try:  # the private pieces autograd.grad(is_grads_batched=True) is made of (torch >= 2.4)
    from torch.autograd.graph import _engine_run_backward
    _ = (torch._C._vmapmode_increment_nesting, torch._C._vmapmode_decrement_nesting,
         torch._add_batch_dim, torch._remove_batch_dim)
except (ImportError, AttributeError):  # pragma: no cover - another torch: the public path
    _engine_run_backward = None


def competing_classes(logits: Tensor, ref: Tensor, k: Optional[int]) -> Tensor:
    """[B, C] classes competing with ``ref`` [B]: every other class (C = K - 1), or with ``k``
    candidates the top k-1 other classes by ``logits`` [B, K] (C = k - 1)."""
    B, K = logits.shape
    if k is None or k >= K:
        others = torch.arange(K - 1, device=logits.device).expand(B, K - 1)
        return others + (others >= ref[:, None]).long()
    masked = logits.scatter(1, ref[:, None], -math.inf)
    return masked.topk(k - 1, dim=1).indices


def forward_with_graph(model: Callable, x_flat: Tensor, shape: torch.Size) -> Tuple[Tensor, Tensor]:
    """Run ``model`` on a leaf copy of ``x_flat`` [n, D] viewed as ``[n, *shape]``.

    Returns ``(xg, logits)``: the leaf [n, D] (requires grad) and the graph-carrying logits."""
    xg = x_flat.detach().requires_grad_(True)
    return xg, forward(model, xg, shape)


def directions(n: int, K: int, classes: Optional[Tensor], like: Tensor,
               minus: Optional[Tensor] = None) -> Tensor:
    """Output directions [C, n, K]: one-hot rows of ``classes`` [n, C] (identity when None),
    each minus the one-hot row of ``minus`` [n] when given (so the backward yields
    ``g_class - g_minus`` directly)."""
    if classes is None and minus is None:
        return torch.eye(K, dtype=like.dtype, device=like.device)[:, None, :].expand(K, n, K)
    if classes is None:
        classes = torch.arange(K, device=like.device).expand(n, K)
    C = classes.shape[1]
    go = torch.zeros(C, n, K, dtype=like.dtype, device=like.device)
    go.scatter_(2, classes.t().unsqueeze(2), 1.0)
    if minus is not None:
        go.scatter_add_(2, minus.view(1, n, 1).expand(C, n, 1),
                        torch.full((C, n, 1), -1.0, dtype=like.dtype, device=like.device))
    return go


def _engine_batched(logits: Tensor, xg: Tensor, go: Tensor, create_graph: bool,
                    retain_graph: bool) -> Tensor:
    """What ``autograd.grad(..., is_grads_batched=True)`` runs -- the engine's backward under
    a legacy-vmap level over go's first dim -- without that call's per-call Python (argument
    normalisation, shape checks of grad_outputs, pytree flattening): about 0.1 ms a call on
    CPU, which the attack pays once per step. ``go`` is built by :func:`directions`, so the
    checks it skips cannot fail."""
    assert _engine_run_backward is not None
    level = torch._C._vmapmode_increment_nesting()
    try:
        gb = torch._add_batch_dim(go, 0, level)
        (g,) = _engine_run_backward((logits,), (gb,), retain_graph, create_graph, (xg,), False,
                                    accumulate_grad=False)
        return torch._remove_batch_dim(g, level, go.shape[0], 0)
    finally:
        torch._C._vmapmode_decrement_nesting()


def _fast_path_ok(*tensors: Tensor) -> bool:
    # Tensor subclasses may override autograd.grad through __torch_function__: they take the public path.
    return _engine_run_backward is not None and all(type(t) is Tensor for t in tensors)


def _batched(logits: Tensor, xg: Tensor, go: Tensor, create_graph: bool,
             retain_graph: bool = False) -> Tensor:
    global _engine_run_backward
    retain_graph = create_graph or retain_graph
    if _fast_path_ok(logits, xg, go):
        try:
            return _engine_batched(logits, xg, go, create_graph, retain_graph)   # [C, n, D]
        except TypeError:  # a torch whose private signatures differ: the public path from now on
            _engine_run_backward = None
    (g,) = torch.autograd.grad(logits, xg, go, is_grads_batched=True, create_graph=create_graph,
                               retain_graph=retain_graph)
    return g                                                           # [C, n, D]


def _loop(logits: Tensor, xg: Tensor, go: Tensor, create_graph: bool,
          retain_graph: bool = False) -> Tensor:
    C = go.shape[0]
    rows = [torch.autograd.grad(logits, xg, go[j], retain_graph=create_graph or retain_graph or j < C - 1,
                                create_graph=create_graph)[0] for j in range(C)]
    return torch.stack(rows, 0)                                        # [C, n, D]


def _replicate(model: Callable, xg: Tensor, go: Tensor, shape: torch.Size,
               create_graph: bool) -> Tensor:
    C, n, K = go.shape
    xr = xg.detach().repeat(C, 1).requires_grad_(True)                # [C * n, D]
    out = forward(model, xr, shape)
    (g,) = torch.autograd.grad(out, xr, go.reshape(C * n, K), create_graph=create_graph)
    return g.view(C, n, -1)                                            # [C, n, D]


def _remember_failure(model) -> None:
    try:
        _vmap_fails[model] = True
    except TypeError:  # not weak-referenceable: retry next time
        pass


def _known_failure(model) -> bool:
    try:
        return model in _vmap_fails
    except TypeError:
        return False


def class_grads(model: Callable, xg: Tensor, logits: Tensor, classes: Optional[Tensor] = None,
                rows: Optional[Tensor] = None, method: str = "auto",
                create_graph: bool = False, retain_graph: bool = False,
                shape: Optional[torch.Size] = None, minus: Optional[Tensor] = None) -> Tensor:
    """Gradients of selected class logits w.r.t. the input, from an existing graph.

    Args:
        model: the model that produced ``logits`` (used to remember a vmap failure).
        xg: [n, D] the leaf the forward ran on; logits: [n, K] graph-carrying logits.
        classes: [m, C] int64 classes per kept row, or None for all K classes.
        rows: [m] int64 rows of the graph batch to return (None: all, m = n).
        method: "auto", "batched", "replicate" or "loop".
        create_graph: keep the result differentiable (second order).
        retain_graph: keep the forward graph alive for later backwards (e.g. a
            graph-carrying row after a no-graph selection); implied by ``create_graph``.
        shape: per-sample input shape the model expects (``xg`` rows are flat); needed by
            the ``"replicate"`` route (default: flat rows).
        minus: [m] int64 class per kept row whose gradient is subtracted from every returned
            row (``g_class - g_minus``: one backward per difference instead of two rows).

    Returns:
        [m, C, D] gradients in ``xg``'s dtype (a view with a contiguous last dim).
    """
    n, K = logits.shape
    if rows is not None:
        if classes is not None:
            full = torch.zeros(n, classes.shape[1], dtype=classes.dtype, device=classes.device)
            full[rows] = classes
            classes = full
        if minus is not None:
            full = torch.zeros(n, dtype=minus.dtype, device=minus.device)
            full[rows] = minus
            minus = full
    go = directions(n, K, classes, logits, minus)
    return direction_grads(model, xg, logits, go, rows, method, create_graph, retain_graph, shape)


def direction_grads(model: Callable, xg: Tensor, logits: Tensor, go: Tensor,
                    rows: Optional[Tensor] = None, method: str = "auto",
                    create_graph: bool = False, retain_graph: bool = False,
                    shape: Optional[torch.Size] = None) -> Tensor:
    """``grads[i, j] = d (go[j, rows[i]] . logits[rows[i]]) / d x_{rows[i]}``: the gradients
    along given output directions ``go`` [C, n, K] (one per row of the graph batch; rows
    that are not returned may hold zeros). Other arguments and the result as in
    :func:`class_grads`: [m, C, D]."""
    if method not in ("auto", "batched", "replicate", "loop"):
        raise ValueError(f"method must be 'auto', 'batched', 'replicate' or 'loop', got {method!r}")
    fallback = "loop" if shape is None else "replicate"

    def run(route: str) -> Tensor:                                     # [C, m, D]
        if route == "replicate":
            x_rows, go_rows = (xg, go) if rows is None else (xg[rows], go[:, rows])
            return _replicate(model, x_rows, go_rows, xg.shape[1:] if shape is None else shape,
                              create_graph)
        fn = _loop if route == "loop" else _batched
        g = fn(logits, xg, go, create_graph, retain_graph)
        return g if rows is None else g[:, rows]

    if method != "auto":
        g = run(method)
    elif _known_failure(model) or torch.is_anomaly_enabled():
        # anomaly mode's checks break the vmapped backward (an .item() under vmap): that is
        # a debugging session, not the model, so the failure is not remembered
        g = run(fallback)
    else:
        try:
            g = run("batched")
        except RuntimeError:
            _remember_failure(model)
            g = run(fallback)
    return g.transpose(0, 1)


def one_row_with_graph(logits: Tensor, xg: Tensor, direction: Tensor) -> Tensor:
    """``d (direction_i . logits_i) / d x_i`` for every row, differentiable (create_graph).

    direction: [n, K] (e.g. ``onehot(l) - onehot(ref)`` for the row ``w_l``). Returns [n, D].
    """
    (g,) = torch.autograd.grad(logits, xg, direction, create_graph=True)
    return g
