"""Argument checks shared by the public API, the model-mode guard and the TF32 warning.

Every check raises a ValueError or TypeError whose message names the argument, before
any work is done.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import Callable, Iterator, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["check_input", "as_labels", "check_logits", "check_max_iter", "check_candidates",
           "check_bounds", "check_model_device", "check_nonneg", "explain_model_errors"]


class NonFiniteLogitsError(ValueError):
    """The model returned NaN or Inf logits at the clean inputs: there is no class to leave."""


def check_input(x, name: str = "x", bounds: Tuple[Optional[float], Optional[float]] = (None, None),
                read_values: bool = True) -> Tensor:
    """A floating-point tensor with a batch dimension and finite values, within ``bounds``
    (as :func:`check_bounds` returns them) up to a few units of rounding of its dtype: outside
    them, every iterate's clip would move x there, and that move would read as perturbation."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex() or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [B, ...]: a batch dimension, then the sample's own "
                         f"(at least one), got shape {list(x.shape)}; for one sample pass {name}[None], "
                         f"for samples of one feature {name}[:, None]")
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: it holds no values to attack")
    if x.shape[0] and not x[0].numel():
        raise ValueError(f"{name} has no features (shape {list(x.shape)}): each sample needs at least one value")
    if x.numel() and read_values:                   # (a host read: not in a captured step)
        lo, hi = torch.aminmax(x.detach())          # one pass; NaN propagates to both
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            raise ValueError(f"{name} contains NaN or Inf")
        if bounds != (None, None):
            _check_within(float(lo), float(hi), torch.finfo(x.dtype).eps, bounds, name)
    return x


def _check_within(xmin: float, xmax: float, eps: float, bounds: Tuple[Optional[float], Optional[float]],
                  name: str) -> None:
    lo, hi = bounds

    def slack(bound: float) -> float:
        return 4 * eps * max(1.0, abs(bound))

    if (lo is not None and xmin < lo - slack(lo)) or (hi is not None and xmax > hi + slack(hi)):
        raise ValueError(f"{name} lies outside bounds ({lo}, {hi}): its values span [{xmin:.6g}, {xmax:.6g}] "
                         f"(pixels in [0, 255] with bounds (0, 1)?); rescale {name} or widen bounds")


def as_labels(y, B: int, K: Optional[int], device: torch.device, name: str = "y") -> Tensor:
    """[B] int64 labels on ``device``; checked against K classes when K is known."""
    if not isinstance(y, Tensor):
        try:
            y = torch.as_tensor(y)
        except Exception as exc:
            raise TypeError(f"{name} must be a tensor of integer labels, got {type(y).__name__}") from exc
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise TypeError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    if y.dim() != 1 or y.shape[0] != B:
        raise ValueError(f"{name} must have shape [{B}] (one label per sample), got {list(y.shape)}")
    y = y.to(device=device, dtype=torch.int64)
    if K is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= K):
        raise ValueError(f"{name} holds labels outside [0, {K}): min {int(y.min())}, max {int(y.max())}")
    return y


def check_logits(out, B: int) -> Tensor:
    """The model's output: floating [B, K] logits with K >= 2."""
    if not isinstance(out, Tensor):
        raise TypeError(f"model must return a logits tensor [B, K], got {type(out).__name__}")
    if out.dim() != 2 or out.shape[0] != B:
        raise ValueError(f"model must return logits of shape [B, K] = [{B}, K], got {list(out.shape)}")
    if out.shape[1] < 2:
        raise ValueError(f"model must return at least 2 classes (logits [B, K], K >= 2), got K = {out.shape[1]}")
    if not out.is_floating_point():
        raise TypeError(f"model must return floating-point logits, got dtype {out.dtype}")
    return out


def check_graph_logits(out, B: int) -> Tensor:
    """:func:`check_logits` for a forward on an input that requires grad: the logits must
    carry a graph back to it (both the attack and the regularizer need d logits / d x)."""
    out = check_logits(out, B)
    if not out.requires_grad:
        raise ValueError("the model's logits carry no gradient back to its input (no grad_fn): ddfast needs "
                         "d logits / d x, so a model that detaches its output or runs under torch.no_grad() "
                         "inside cannot be attacked or regularized")
    return out


def check_int(value, name: str, minimum: int, what: str = "") -> int:
    """An integer (Python or numpy, not bool) >= ``minimum``: TypeError for another type,
    ValueError for a smaller value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}{what}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{what}, got {value!r}")
    return int(value)


def check_max_iter(max_iter, name: str = "max_iter") -> int:
    return check_int(max_iter, name, 0)


def check_batch_size(batch_size, allow_none: bool = True) -> Optional[int]:
    if batch_size is None and allow_none:
        return None
    return check_int(batch_size, "batch_size", 1, " or None" if allow_none else "")


def check_candidates(candidates) -> Optional[int]:
    if candidates is None:
        return None
    return check_int(candidates, "candidates", 2, " or None")


def check_nonneg(value, name: str) -> float:
    """A finite real number >= 0 (Python or numpy, not bool)."""
    value = check_finite(value, name)
    if value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def check_bounds(bounds) -> Tuple[Optional[float], Optional[float]]:
    if bounds is None:
        return None, None
    try:
        lo, hi = bounds
    except (TypeError, ValueError):
        raise ValueError(f"bounds must be a pair (lo, hi), got {bounds!r}") from None
    lo, hi = _bound(lo, bounds), _bound(hi, bounds)
    if lo is not None and hi is not None and not lo < hi:
        raise ValueError(f"bounds must satisfy lo < hi, got {bounds!r}")
    return lo, hi


def _bound(value, bounds) -> Optional[float]:
    """One end of ``bounds``: None or a number (not NaN)."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"bounds must be a pair of numbers (or None for no bound), got {bounds!r}") from None
    if math.isnan(v):
        raise ValueError(f"bounds must not be NaN, got {bounds!r}")
    return v


def attack_bounds(bounds, x: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``bounds = (lo, hi)`` of an attack on x [B, ...] as rows for ``deepfool_update``: each
    None, or ``[1, D]`` (every sample) / ``[B, D]`` (a row per sample) in x's dtype and device.
    Each end may be None, a number or a tensor that broadcasts to x (per channel ``[C, 1, 1]``,
    per pixel ``[C, H, W]``, per sample ``[B, ...]``). No NaN, ``lo <= hi`` everywhere (numbers:
    ``lo < hi``), and x within them up to 4 units of rounding of its dtype (a clip that moves x
    would read as perturbation)."""
    if bounds is None:
        return None, None
    try:
        lo, hi = bounds
    except (TypeError, ValueError):
        raise ValueError(f"bounds must be a pair (lo, hi), got {_describe(bounds)}") from None
    if not isinstance(lo, Tensor) and not isinstance(hi, Tensor):
        check_bounds(bounds)                      # numbers: the scalar rules (lo < hi)
    flat = x.detach().reshape(x.shape[0], -1)
    rows = [bound_rows(_per_row(v, x, end), f"bounds {end}", flat) for v, end in ((lo, "lo"), (hi, "hi"))]
    check_order(rows[0], rows[1], (lo, hi))
    _check_x_within(flat, rows[0], rows[1])
    return rows[0], rows[1]


def _describe(v) -> str:
    """A short description of an argument: a tensor by its shape, anything else by its repr."""
    if isinstance(v, Tensor):
        return f"a tensor of shape {list(v.shape)}"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_describe(e) for e in v) + ")"
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _per_row(v, x: Tensor, end: str):
    """A bound broadcastable to x as ``[1, D]`` or ``[B, D]`` (numbers and None as they are)."""
    if not isinstance(v, Tensor):
        return v
    if v.is_complex() or v.dtype == torch.bool:
        raise TypeError(f"bounds {end} must be a real tensor, got dtype {v.dtype}")
    try:
        full = torch.broadcast_to(v.detach().to(device=x.device), x.shape)
    except RuntimeError:
        raise ValueError(f"bounds {end} of shape {list(v.shape)} does not broadcast to x's shape "
                         f"{list(x.shape)}") from None
    B = x.shape[0]
    per_sample = v.dim() == x.dim() and v.shape[0] == B and B > 1
    return full.reshape(B, -1) if per_sample else full[:1].reshape(1, -1)


def _check_x_within(flat: Tensor, lo: Optional[Tensor], hi: Optional[Tensor]) -> None:
    if not flat.numel():
        return
    eps = 4 * torch.finfo(flat.dtype).eps
    for rows, sign, word in ((lo, -1, "below lo"), (hi, 1, "above hi")):
        if rows is None:
            continue
        outside = (flat - rows) * sign > eps * rows.abs().clamp(min=1)
        if bool(outside.any()):
            first = int(outside.flatten().nonzero()[0])
            raise ValueError(f"x lies outside bounds ({word}) at {int(outside.sum())} of {outside.numel()} entries "
                             f"(first at flat index {first}; pixels in [0, 255] with bounds (0, 1)?): rescale x "
                             "or widen bounds")


def check_choice(value, name: str, choices: Tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_callable(model, name: str = "model") -> None:
    if not callable(model):
        raise TypeError(f"{name} must be a callable returning logits [B, K] (an nn.Module, say), "
                        f"got {type(model).__name__}")


def check_model_device(model: Callable, x: Tensor) -> None:
    """x and the model's parameters must live on the same device."""
    if isinstance(model, torch.nn.Module):
        p = next(model.parameters(), None)
        if p is not None and p.device != x.device:
            raise ValueError(f"x is on {x.device} but the model's parameters are on {p.device}")


def _dtype_mismatch(model: Callable, x: Tensor, name: str) -> Optional[str]:
    if not isinstance(model, torch.nn.Module):
        return None
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point()})
    if not dtypes or str(x.dtype) in dtypes:
        return None
    return (f"{name} is {x.dtype} but the model's parameters are {', '.join(dtypes)}; convert one to "
            f"the other ({name}.to({dtypes[0]}) or model.to({x.dtype}))")


@contextlib.contextmanager
def explain_model_errors(model: Callable, x: Tensor, where: str, name: str = "x") -> Iterator[None]:
    """A RuntimeError raised inside the block (by the model, typically) gets a note naming the
    likely cause when x's dtype is none of the model's parameters' (torch's own message, e.g.
    "mat1 and mat2 must have the same dtype", does not say which argument). The error stays
    the model's own; a model that casts x itself never raises and is not refused."""
    try:
        yield
    except RuntimeError as e:
        hint = _dtype_mismatch(model, x, name)
        if hint is not None:
            note = f"{where}: {hint}"
            if hasattr(e, "add_note"):
                e.add_note(note)
            else:  # Python < 3.11
                e.args = (f"{e.args[0] if e.args else ''}\n{note}",) + tuple(e.args[1:])
        raise


def _flag(legacy: Callable[[], bool], new: Callable[[], bool]) -> bool:
    """A TF32 setting read through the legacy API, or through the new one where torch refuses
    the legacy read (the two APIs were mixed)."""
    try:
        return bool(legacy())
    except RuntimeError:
        try:
            return bool(new())
        except (AttributeError, RuntimeError):
            return False


def tf32_in_use(model: Callable, x: Tensor) -> Optional[str]:
    """What runs in TF32 when ``model`` sees float32 CUDA ``x``: "convolutions" (cuDNN's
    ``allow_tf32``, PyTorch's default, for a module holding convolutions), "matmuls"
    (``torch.get_float32_matmul_precision() != "highest"``), both, or None."""
    if not (x.is_cuda and x.dtype == torch.float32):
        return None
    used = []
    if _flag(lambda: torch.backends.cudnn.allow_tf32, lambda: torch.backends.cudnn.conv.fp32_precision == "tf32"):  # type: ignore[attr-defined]
        convs = (not isinstance(model, torch.nn.Module)
                 or any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules()))
        if convs:
            used.append("convolutions")
    if _flag(lambda: torch.get_float32_matmul_precision() != "highest",
             lambda: torch.backends.cuda.matmul.fp32_precision == "tf32"):
        used.append("matmuls")
    return " and ".join(used) or None


def warn_tf32(model: Callable, x: Tensor, what: str) -> None:
    """Warn (once per call site) that TF32 makes the logits too coarse for DeepFool's margin."""
    used = tf32_in_use(model, x)
    if used:
        warnings.warn(
            f"{what}: float32 {used} run in TF32 on this GPU (cuDNN convolutions do by default), so "
            "the logits carry ~1e-3 relative error, more than DeepFool's margin past the boundary: "
            "a later evaluation of x_adv can disagree with `success` (20-30% of a ConvNet's "
            "adversarials on an H100). For exact float32 results set "
            "torch.backends.cudnn.allow_tf32 = False and torch.backends.cuda.matmul.allow_tf32 = False.",
            UserWarning, stacklevel=3)


# ------------------------------------------------------------------------ the ops' arguments
def need(cond: bool, msg: str) -> None:
    """Raise ``ValueError(msg)`` unless ``cond``."""
    if not cond:
        raise ValueError(msg)


#: The dtypes each kind of op argument may have (the kernels read no other).
OP_DTYPES = {
    "float": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "int": (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64),
    "bool": (torch.bool,),
}


def check_tensor(t, name: str, ndim: int, kind: str) -> Tensor:
    """``t`` is a dense ``kind`` ("float", "int", "bool"; :data:`OP_DTYPES`) tensor of
    ``ndim`` dims with values (not on the meta device)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_quantized or t.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in OP_DTYPES[kind]:
        names = ", ".join(str(d).replace("torch.", "") for d in OP_DTYPES[kind])
        raise TypeError(f"{name} must be a {kind} tensor ({names}), got dtype {t.dtype}")
    need(t.device.type != "meta", f"{name} is on the meta device: it holds no values")
    need(t.dim() == ndim, f"{name} must be {ndim}-d, got shape {list(t.shape)}")
    return t


def check_same_dtype(*named: Tuple[str, Tensor]) -> None:
    """The tensors share the dtype of the first (a TypeError names the first that does not)."""
    first, t0 = named[0]
    for name, t in named[1:]:
        if t.dtype != t0.dtype:
            raise TypeError(f"{name} must have the dtype of {first} ({t0.dtype}), got {t.dtype}")


def check_bool(value, name: str) -> bool:
    """A Python or numpy bool."""
    if not isinstance(value, (bool, np_bool())):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def np_bool():
    """numpy's bool type, or bool where numpy is absent."""
    try:
        import numpy
    except ImportError:  # pragma: no cover
        return bool
    return numpy.bool_


def check_same_device(*named: Tuple[str, Tensor]) -> None:
    dev = named[0][1].device
    for name, t in named[1:]:
        need(t.device == dev, f"{name} is on {t.device} but {named[0][0]} is on {dev}")


def check_rows(named, B: Optional[int] = None, D: Optional[int] = None) -> None:
    """Each (name, tensor, ndim, kind) has B rows (and D columns when 2-d), on one device."""
    first = named[0][0]
    for name, t, ndim, kind in named:
        check_tensor(t, name, ndim, kind)
        B = t.shape[0] if B is None else B
        need(t.shape[0] == B, f"{name} must have {B} rows like {first} (one per sample), got shape {list(t.shape)}")
        if ndim == 2:
            D = t.shape[1] if D is None else D
            need(t.shape[1] == D, f"{name} must have shape [{B}, {D}] like {first}, got {list(t.shape)}")
    check_same_device(*[(n, t) for n, t, _, _ in named])


def check_classes(t: Tensor, name: str, K: int) -> None:
    """Every entry of the int tensor ``t`` is a class in ``[0, K)`` (read before any kernel)."""
    if t.numel():
        lo, hi = torch.aminmax(t)
        need(int(lo) >= 0 and int(hi) < K,
             f"{name} holds classes outside [0, {K}): min {int(lo)}, max {int(hi)}")


def check_select(logits, grads, cand, ref, active, diff: bool) -> None:
    """The arguments of ``select_boundary`` (see :func:`ddfast.reference.select_boundary`)."""
    check_rows([("grads", grads, 3, "float"), ("ref", ref, 1, "int"), ("active", active, 1, "bool")])
    check_rows([("grads", grads, 3, "float"), ("logits", logits, 2, "float")])
    check_rows([("grads", grads, 3, "float"), ("cand", cand, 2, "int")])
    B, C, _ = grads.shape
    K = logits.shape[1]
    need(tuple(cand.shape) == (B, C), f"cand must have shape [{B}, {C}] like grads' first dims, "
                                      f"got {list(cand.shape)}")
    if B and not C:
        raise ValueError("cand must hold at least one class per row" + ("" if diff else " (the reference)"))
    check_classes(cand, "cand", K)
    check_classes(ref, "ref", K)
    if B and not diff:
        need(bool((cand == ref[:, None]).any(1).all()), "every ref[i] must appear in cand[i]")


def norm_value(norm) -> float:
    """``norm`` as 2.0 or inf (from 2, inf, "l2", "linf", numpy scalars included)."""
    if isinstance(norm, str):
        key = norm.lower()
        if key in ("l2", "2"):
            return 2.0
        if key in ("linf", "inf"):
            return math.inf
        raise ValueError(f"norm must be 2, inf, 'l2' or 'linf', got {norm!r}")
    if isinstance(norm, bool) or not isinstance(norm, numbers.Real):
        raise TypeError(f"norm must be 2, inf, 'l2' or 'linf', got {type(norm).__name__}")
    value = float(norm)
    if value not in (2.0, math.inf):
        raise ValueError(f"norm must be 2 or inf, got {norm!r}")
    return value


def check_real(value, name: str) -> float:
    """A real number (Python or numpy; not a bool), as a float."""
    if isinstance(value, (bool, np_bool())) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_finite(value, name: str) -> float:
    """A real number that is not NaN or Inf."""
    v = check_real(value, name)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def bound_rows(value, name: str, x0: Tensor) -> Optional[Tensor]:
    """A clip bound of ``deepfool_update`` for x0 [B, D]: None, a number (not NaN), or a real
    tensor of shape [], [D], [1, D] or [B, D] without NaN, as a [1, D] or [B, D] tensor in x0's
    dtype and on its device whose columns are contiguous, or of stride 0 (a number, expanded)."""
    if value is None:
        return None
    B, D = x0.shape
    if not isinstance(value, Tensor):
        v = check_real(value, name)
        need(not math.isnan(v), f"{name} must not be NaN")
        return x0.new_full((1, 1), v).expand(1, D)
    if value.layout != torch.strided or value.dtype not in OP_DTYPES["float"] + OP_DTYPES["int"]:
        raise TypeError(f"{name} must be a dense real tensor, got {value.layout} {value.dtype}")
    need(value.device.type != "meta", f"{name} is on the meta device: it holds no values")
    shape = list(value.shape)
    need(shape in ([], [D], [1, D], [B, D]),
         f"{name} must have shape [D], [1, D] or [B, D] = [{D}], [1, {D}] or [{B}, {D}], got {shape}")
    bad = torch.isnan(value.detach())
    if bool(bad.any()):
        first = [int(i) for i in bad.nonzero()[0]] if shape else []
        raise ValueError(f"{name} holds NaN at {int(bad.sum())} of {bad.numel()} entries "
                         f"(first at {first}, shape {shape})")
    rows = value.detach().to(device=x0.device, dtype=x0.dtype)
    rows = rows.reshape(1, 1).expand(1, D) if not shape else rows.view(1, D) if len(shape) == 1 else rows
    return rows if D <= 1 or rows.stride(1) in (0, 1) else rows.contiguous()


def check_order(lo: Optional[Tensor], hi: Optional[Tensor], given=(None, None)) -> None:
    """lo <= hi wherever both bounds are given ([1, D] or [B, D] rows, broadcast); ``given``:
    the bounds as passed, compared as numbers where both are numbers (no tensor op)."""
    if lo is None or hi is None:
        return
    if not any(isinstance(v, Tensor) for v in given) and None not in given:
        need(float(given[0]) <= float(given[1]), f"lo must be <= hi, got lo={float(given[0]):.6g}, "
                                                 f"hi={float(given[1]):.6g}")
        return
    bad = lo > hi
    if bool(bad.any()):
        i = [int(k) for k in bad.nonzero()[0]]
        lo_i, hi_i = lo.expand_as(bad)[tuple(i)], hi.expand_as(bad)[tuple(i)]
        raise ValueError(f"lo must be <= hi, got lo > hi at {int(bad.sum())} of {bad.numel()} entries "
                         f"(first at {i}: lo={float(lo_i):.6g}, hi={float(hi_i):.6g}; "
                         f"shapes {list(lo.shape)} and {list(hi.shape)})")
