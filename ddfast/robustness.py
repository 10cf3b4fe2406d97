"""Independent robustness evaluation: robust accuracy and minimal L2 norms under adv-lib's attacks.

A defense trained against ddfast's own DeepFool cannot be certified by that DeepFool (rho_2
overstates robustness when the attack is weak against the defended model), so these metrics
come from a maintained third-party library, `adv-lib <https://github.com/jeromerony/adversarial-library>`_
(Jérôme Rony et al.; ``pip install --no-deps adv-lib tqdm setuptools``): nothing here implements an attack.

* :func:`min_norm` -- per-sample smallest adversarial perturbation found by adv-lib's
  minimal-norm attacks: FAB (Croce & Hein 2020), then FMN (Pintor et al. 2021) started from
  FAB's adversarial examples; best per sample; ``0`` for a sample the model already
  misclassifies, ``inf`` where no attack succeeded.
* :func:`robust_accuracy` -- fraction of the samples that are classified correctly and that no
  attack fools within ``eps``: adv-lib's APGD with the cross-entropy and the targeted DLR loss
  (the two gradient attacks of AutoAttack, Croce & Hein 2020; L2 by default without the
  targeted one), plus, for L2, every sample whose minimal adversarial norm is at most ``eps``.
* :func:`evaluate_robustness` -- both, at L2 eps ``EPS["l2"]`` and Linf eps ``EPS["linf"]``, as
  one results row (:meth:`RobustnessResult.row`).

Units: the attacks work on images in ``[0, 1]`` (adv-lib refuses anything else), so ``x`` is in
``[0, 1]`` and ``model`` takes such images; eps and norms are in these units. A model trained
on preprocessed inputs is wrapped with :class:`PixelInput` (``net((x - mean) / std)``).

Every adversarial example an attack returns is checked here before it counts: its prediction
differs from ``y``, it lies in ``[0, 1]`` and (fixed-eps attacks) its norm is at most
``eps * (1 + 1e-4)``. The random starts of APGD draw from a generator seeded by ``seed`` (the
global RNG state is restored), so the results are deterministic on one machine. The model runs
in eval mode (every submodule's mode restored); parameters, their ``.grad`` and the inputs are
not changed.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["EPS", "INSTALL_HINT", "PixelInput", "RobustnessResult", "adv_lib_module", "load_adv_lib", "min_norm",
           "robust_accuracy", "evaluate_robustness"]

#: eps grids of :func:`evaluate_robustness`, in [0, 1] pixel units (MNIST conventions: L2 up to
#: 2.0, Linf up to 0.3, the eps of Madry et al.'s MNIST challenge)
EPS: Dict[str, Tuple[float, ...]] = {"l2": (0.5, 1.0, 1.5, 2.0), "linf": (0.05, 0.1, 0.2, 0.3)}

#: adv-lib without its dependency list (torchvision, visdom: unused here) and with what it imports
#: (setuptools: distutils on Python >= 3.12)
INSTALL_HINT = "pip install --no-deps adv-lib tqdm setuptools"

_NORMS = {"l2": 2.0, "linf": float("inf")}
_EPS_RTOL = 1e-4  # a fixed-eps adversarial counts when its norm <= eps * (1 + _EPS_RTOL) (float rounding)


class PixelInput(nn.Module):
    """``net((x - mean) / std)``: lets an attack work on ``[0, 1]`` images for a network trained on
    normalised ones. ``mean``, ``std``: floats or tensors broadcastable to a batch, in [0, 1] units
    (``ddfast.paper``'s MNIST preprocessing ``pixels / 255 - mean_image`` is ``mean = mean_image / 255,
    std = 1``). The buffer is not called ``mean``: torchattacks reads such an attribute as a
    normalisation to undo."""

    pixel_mean: Tensor
    pixel_std: Tensor

    def __init__(self, net: nn.Module, mean: Union[float, Tensor] = 0.0, std: Union[float, Tensor] = 1.0):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
        mean_t = torch.as_tensor(mean, dtype=torch.float32).detach().clone()
        std_t = torch.as_tensor(std, dtype=torch.float32).detach().clone()
        if not bool(torch.isfinite(mean_t).all()):
            raise ValueError("mean must be finite")
        if not bool((std_t > 0).all()) or not bool(torch.isfinite(std_t).all()):
            raise ValueError("std must be finite and > 0 everywhere")
        self.net = net
        self.register_buffer("pixel_mean", mean_t)
        self.register_buffer("pixel_std", std_t)

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.pixel_mean) / self.pixel_std)


@dataclass
class AdvLib:
    """The adv-lib attack functions this module calls, and the library's version."""

    version: str
    apgd: Callable[..., Tensor]
    apgd_targeted: Callable[..., Tensor]
    fmn: Callable[..., Tensor]
    fab: Callable[..., Tensor]


def load_adv_lib() -> AdvLib:
    """adv-lib's APGD, APGD-T, FMN and FAB, from :func:`adv_lib_module`. ``ImportError`` naming the
    pip command for what is missing (adv-lib itself, or a package its attacks import)."""
    try:
        import adv_lib  # noqa: F401  (its __version__ is read by _installed_version)
    except ImportError as err:
        raise ImportError(f"ddfast.robustness evaluates with adv-lib's attacks, which is not installed: "
                          f"{INSTALL_HINT}") from err
    pgd = adv_lib_module("auto_pgd")
    return AdvLib(_installed_version(), pgd.apgd, pgd.apgd_targeted, adv_lib_module("fast_minimum_norm").fmn,
                  adv_lib_module("fast_adaptive_boundary").fab)


#: module adv-lib's attacks import -> the pip package that provides it (distutils: Python >= 3.12)
_PIP_NAME = {"distutils": "setuptools"}


def adv_lib_module(name: str) -> ModuleType:
    """``adv_lib.attacks.<name>``, imported without running ``adv_lib.attacks``' ``__init__``.

    That ``__init__`` imports every attack of the library, and two need packages most do not
    (ALMA's LPIPS distance imports torchvision; DDN and ALMA import visdom for optional plots).
    While the module named is imported, ``adv_lib.attacks`` is a bare package of the installed
    folder; it is removed afterwards, so a later ``import adv_lib.attacks`` runs as usual.
    ``ImportError`` naming the pip command when adv-lib or a package the module imports is missing.
    """
    full = f"adv_lib.attacks.{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.find_spec("adv_lib")
    if spec is None or spec.origin is None:
        raise ImportError(f"adv_lib is not installed: {INSTALL_HINT}")
    bare = None
    if "adv_lib.attacks" not in sys.modules:
        bare = ModuleType("adv_lib.attacks")
        bare.__path__ = [str(Path(spec.origin).parent / "attacks")]
        sys.modules["adv_lib.attacks"] = bare
    try:
        _with_distutils()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # adv-lib's distutils LooseVersion
            return importlib.import_module(full)
    except ModuleNotFoundError as err:
        missing = (err.name or "").split(".")[0]
        if missing == "adv_lib":
            what = f"attack module {name!r}" if err.name == full else f"module {err.name!r}, which {full} imports"
            raise ImportError(f"adv-lib (version {_installed_version()}) has no {what}; {INSTALL_HINT}") from err
        raise ImportError(f"adv-lib's {full} imports {missing!r}, which is not installed: "
                          f"pip install {_PIP_NAME.get(missing, missing)}") from err
    finally:
        if bare is not None and sys.modules.get("adv_lib.attacks") is bare:
            del sys.modules["adv_lib.attacks"]


def _installed_version() -> str:
    """adv-lib's ``__version__`` once ``adv_lib`` is imported, else "unknown"."""
    return str(getattr(sys.modules.get("adv_lib"), "__version__", "unknown"))


def _with_distutils() -> None:
    """Make ``distutils`` importable (adv-lib imports ``distutils.version``): Python >= 3.12 has
    it only through setuptools, whose import installs it."""
    if "distutils" in sys.modules or importlib.util.find_spec("distutils") is not None:
        return
    try:
        import setuptools  # noqa: F401
    except ImportError:
        pass  # the module's own import of distutils then names it


@dataclass
class RobustnessResult:
    """What :func:`evaluate_robustness` measured on ``n`` samples.

    ``clean_acc``: fraction classified correctly. ``robust_acc``: ``{"l2": {"0.5": a, ...},
    "linf": {...}}``, fractions of the ``n`` samples. ``min_norm_l2`` ``[n]``: smallest L2
    adversarial perturbation found (0 where misclassified, inf where none found);
    ``min_norm_l2_median`` its median. ``evaluator``: library, version, attacks, steps, seed.
    """

    n: int
    clean_acc: float
    robust_acc: Dict[str, Dict[str, float]]
    min_norm_l2_median: float
    evaluator: Dict[str, object]
    min_norm_l2: Tensor = field(repr=False)
    seconds: float = 0.0

    def row(self) -> Dict[str, object]:
        """The results-row fields: ``robust_acc``, ``min_norm_l2_median``, ``evaluator`` (with ``n``)."""
        return {"robust_acc": self.robust_acc, "min_norm_l2_median": self.min_norm_l2_median,
                "evaluator": {**self.evaluator, "n": self.n, "clean_acc": self.clean_acc,
                              "seconds": round(self.seconds, 1)}}


def _eps_key(eps: float) -> str:
    """The results key of ``eps``: ``"0.05"``, ``"0.5"``, ``"1.0"`` (as ``ddfast.metrics.acc_at_eps``' keys)."""
    s = f"{eps:g}"
    return s if "." in s or "e" in s else f"{eps:.1f}"


@contextlib.contextmanager
def _attack_context(model: nn.Module, seed: int, device: torch.device) -> Iterator[None]:
    """Eval mode (modes restored), gradients on (also inside ``no_grad`` / ``inference_mode``) and
    torch's RNG seeded by ``seed`` for the block, the caller's RNG state restored afterwards."""
    from .guard import eval_modes

    devices = [device] if device.type == "cuda" else []
    with torch.inference_mode(False), torch.enable_grad(), eval_modes(model), \
            torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _checked(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> Tuple[Tensor, Tensor]:
    """``(x, y)`` after the checks of :func:`ddfast.metrics.check_data`, ``x`` in ``[0, 1]``; a copy
    of ``x`` usable by autograd (also when it was made under ``inference_mode``)."""
    from .metrics import check_data
    from .validate import check_batch_size

    labels = check_data(model, x, y)
    if labels is None:  # not reached: check_data refuses y=None
        raise TypeError("y (labels [N]) is required, got None")
    check_batch_size(batch_size, allow_none=False)
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"x must be images in [0, 1] (the attacks' units; wrap the model with PixelInput), "
                         f"got values in [{lo:.4g}, {hi:.4g}]")
    with torch.inference_mode(False):
        return x.detach().clone(), labels.clone()


def _fooled(model: nn.Module, x: Tensor, adv: Tensor, y: Tensor, p: float,
            eps: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """``(fooled [B] bool, norms [B])``: which of the attack's outputs ``adv`` are checked
    adversarial examples of ``(x, y)`` (misclassified, in [0, 1], norm within ``eps`` when given)."""
    with torch.no_grad():
        adv = adv.detach().to(x.dtype)
        norms = (adv - x).flatten(1).norm(p=p, dim=1)
        ok = (model(adv).argmax(1) != y) & (adv.flatten(1).amin(1) >= 0) & (adv.flatten(1).amax(1) <= 1)
        if eps is not None:
            ok &= norms <= eps * (1 + _EPS_RTOL)
    return ok, norms


def _predictions(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)])


def _chunks(idx: Tensor, batch_size: int) -> Iterator[Tensor]:
    for i in range(0, idx.numel(), batch_size):
        yield idx[i:i + batch_size]


def _check_norm(norm: str) -> float:
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {sorted(_NORMS)}, got {norm!r}")
    return _NORMS[norm]


def _check_steps(value: int, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _min_norms(lib: AdvLib, model: nn.Module, x: Tensor, y: Tensor, correct: Tensor, p: float,
               steps: Dict[str, int], batch_size: int) -> Tensor:
    """Best checked adversarial norm per sample: FAB, then FMN started from FAB's adversarial examples
    (FMN refines them; from a zero start adv-lib 0.2.8's FMN rarely crosses the boundary, see
    docs/robustness.md). 0 where ``correct`` is False, inf where neither succeeded."""
    best = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    best[correct] = math.inf
    for b in _chunks(correct.nonzero().squeeze(1), batch_size):
        adv = lib.fab(model, x[b], y[b], norm=p, n_iter=steps["fab"])
        ok, norms = _fooled(model, x[b], adv, y[b], p)
        best[b] = torch.where(ok, norms, best[b])
        if steps["fmn"] and bool(ok.any()):
            w = b[ok]
            refined = lib.fmn(model, x[w], y[w], norm=p, steps=steps["fmn"], starting_points=adv[ok].detach())
            ok2, norms2 = _fooled(model, x[w], refined, y[w], p)
            best[w] = torch.where(ok2, torch.minimum(norms2, best[w]), best[w])
    return best


def _apgd_broken(lib: AdvLib, model: nn.Module, x: Tensor, y: Tensor, todo: Tensor, p: float, eps: float,
                 steps: Dict[str, int], batch_size: int) -> Tensor:
    """``[N]`` bool: the samples of ``todo`` (indices) that APGD-CE or APGD-T (DLR; when it has
    targets for this norm) fools within ``eps``."""
    broken = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    targets = _targets(steps, p)
    for attack in ("apgd-ce", "apgd-t") if targets else ("apgd-ce",):
        todo = todo[~broken[todo]]
        for b in _chunks(todo, batch_size):
            if attack == "apgd-ce":
                adv = lib.apgd(model, x[b], y[b], eps=eps, norm=p, n_iter=steps["apgd"], loss_function="ce")
            else:
                adv = lib.apgd_targeted(model, x[b], y[b], eps=eps, norm=p, n_iter=steps["apgd"],
                                        loss_function="dlr", num_targets=targets)
            broken[b] = _fooled(model, x[b], adv, y[b], p, eps)[0]
    return broken


def _targets(steps: Dict[str, int], p: float) -> int:
    return steps["apgd_targets_l2"] if p == 2.0 else steps["apgd_targets"]


def _robust_acc(lib: AdvLib, model: nn.Module, x: Tensor, y: Tensor, correct: Tensor, p: float,
                eps: Sequence[float], steps: Dict[str, int], batch_size: int,
                min_norms: Optional[Tensor]) -> Dict[str, float]:
    """Robust accuracy at each eps (ascending): a sample broken at some eps stays broken at larger
    ones, so APGD attacks at each eps only the samples no attack has broken yet."""
    robust = correct.clone()
    out = {}
    for e in sorted(eps):
        if min_norms is not None:
            robust &= ~(min_norms <= e * (1 + _EPS_RTOL))
        todo = robust.nonzero().squeeze(1)
        robust &= ~_apgd_broken(lib, model, x, y, todo, p, e, steps, batch_size)
        out[_eps_key(e)] = robust.double().mean().item()
    return out


#: default attack budgets: FAB iterations, FMN steps (from FAB's adversarials; 0: no FMN), APGD
#: iterations (AutoAttack's 100), APGD-T's target classes for Linf (AutoAttack: 9 on 10 classes)
#: and for L2 (0: no APGD-T; the minimal-norm attacks run there). docs/robustness.md has the
#: ablation behind these choices.
STEPS: Dict[str, int] = {"fab": 20, "fmn": 100, "apgd": 100, "apgd_targets": 3, "apgd_targets_l2": 0}


def _steps(overrides: Optional[Dict[str, int]]) -> Dict[str, int]:
    steps = dict(STEPS)
    for k, v in (overrides or {}).items():
        if k not in STEPS:
            raise ValueError(f"steps keys must be among {sorted(STEPS)}, got {k!r}")
        steps[k] = _check_steps(v, f"steps[{k!r}]", minimum=0 if k in ("fmn", "apgd_targets_l2") else 1)
    return steps


def min_norm(model: nn.Module, x: Tensor, y: Tensor, *, norm: str = "l2", steps: Optional[Dict[str, int]] = None,
             batch_size: int = 1000, seed: int = 0) -> Tensor:
    """``[N]`` smallest ``norm`` (``"l2"`` or ``"linf"``) adversarial perturbation of each sample
    of ``x [N, ...]`` (images in [0, 1]) found by adv-lib's minimal-norm attacks (FAB, then FMN
    from FAB's adversarials; best per sample), in [0, 1] units: 0 where ``model`` misclassifies
    the sample, inf where neither found one. ``steps``: overrides of :data:`STEPS`."""
    x, y = _checked(model, x, y, batch_size)
    p, st = _check_norm(norm), _steps(steps)
    lib = load_adv_lib()
    with _attack_context(model, seed, x.device):
        correct = _predictions(model, x, batch_size) == y
        return _min_norms(lib, model, x, y, correct, p, st, batch_size)


def robust_accuracy(model: nn.Module, x: Tensor, y: Tensor, eps: Sequence[float], *, norm: str = "l2",
                    steps: Optional[Dict[str, int]] = None, min_norms: Optional[Tensor] = None,
                    batch_size: int = 1000, seed: int = 0) -> Dict[str, float]:
    """``{"<eps>": fraction}``: the fraction of ``x [N, ...]`` (images in [0, 1]) classified as
    ``y`` and not fooled within each ``eps`` (``norm`` ball, [0, 1] units) by adv-lib's APGD-CE
    and APGD-T (DLR loss). ``min_norms [N]`` (from :func:`min_norm` with the same ``norm``):
    samples whose minimal adversarial norm is at most ``eps`` count as fooled too. APGD-T runs
    with ``steps["apgd_targets"]`` (Linf) or ``steps["apgd_targets_l2"]`` (L2; 0: not) targets."""
    x, y = _checked(model, x, y, batch_size)
    p, st = _check_norm(norm), _steps(steps)
    eps = _checked_eps(eps, "eps")
    if min_norms is not None and (not isinstance(min_norms, Tensor) or min_norms.shape != (x.shape[0],)):
        raise ValueError(f"min_norms must be a tensor [N] = [{x.shape[0]}], got "
                         f"{getattr(min_norms, 'shape', type(min_norms).__name__)}")
    lib = load_adv_lib()
    with _attack_context(model, seed, x.device):
        correct = _predictions(model, x, batch_size) == y
        mn = None if min_norms is None else min_norms.to(x.device)
        return _robust_acc(lib, model, x, y, correct, p, eps, st, batch_size, mn)


def _checked_eps(eps: Sequence[float], name: str) -> Tuple[float, ...]:
    if isinstance(eps, (str, bytes)) or not isinstance(eps, Sequence):
        raise ValueError(f"{name} must be a sequence of numbers > 0, got {eps!r}")
    for e in eps:
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e <= 0:
            raise ValueError(f"{name} must hold finite numbers > 0, got {e!r}")
    return tuple(float(e) for e in eps)


def evaluate_robustness(model: nn.Module, x: Tensor, y: Tensor, *, eps_l2: Sequence[float] = EPS["l2"],
                        eps_linf: Sequence[float] = EPS["linf"], steps: Optional[Dict[str, int]] = None,
                        batch_size: int = 1000, seed: int = 0,
                        log: Optional[Callable[[str], None]] = None) -> RobustnessResult:
    """Robust accuracy at ``eps_l2`` and ``eps_linf`` and the minimal L2 norms, on ``x [N, ...]``
    (images in [0, 1]; ``model`` takes them: see :class:`PixelInput`) and labels ``y [N]``.

    L2: the minimal-norm attacks (:func:`min_norm`) run first; APGD-CE (and APGD-T when
    ``steps["apgd_targets_l2"]``) then attack, at each eps, the samples they left unbroken.
    Linf: APGD-CE and APGD-T. ``steps`` overrides
    :data:`STEPS`; ``log`` gets one line per stage. Needs adv-lib (``ImportError`` naming the pip
    command without it, before any work).
    """
    import time

    x, y = _checked(model, x, y, batch_size)
    grids = {"l2": _checked_eps(eps_l2, "eps_l2"), "linf": _checked_eps(eps_linf, "eps_linf")}
    st = _steps(steps)
    lib = load_adv_lib()
    say = log or (lambda _msg: None)
    t0 = time.time()
    with _attack_context(model, seed, x.device):
        correct = _predictions(model, x, batch_size) == y
        norms = _min_norms(lib, model, x, y, correct, 2.0, st, batch_size)
        say(f"  min L2 norm (fab+fmn): median {norms.median().item():.4f} ({time.time() - t0:.0f} s)")
        acc = {"l2": _robust_acc(lib, model, x, y, correct, 2.0, grids["l2"], st, batch_size, norms)}
        acc["linf"] = _robust_acc(lib, model, x, y, correct, math.inf, grids["linf"], st, batch_size, None)
    say(f"  robust acc L2 {acc['l2']} Linf {acc['linf']} ({time.time() - t0:.0f} s)")
    min_norm_attacks = ["fab", "fmn"] if st["fmn"] else ["fab"]
    evaluator: Dict[str, object] = {
        "library": "adv-lib", "version": lib.version, "seed": seed, "steps": st,
        "attacks": {"l2": [*min_norm_attacks, "apgd-ce", *(["apgd-t"] if st["apgd_targets_l2"] else [])],
                    "linf": ["apgd-ce", "apgd-t"],
                    "min_norm_l2": min_norm_attacks},
    }
    return RobustnessResult(n=x.shape[0], clean_acc=correct.double().mean().item(), robust_acc=acc,
                            min_norm_l2_median=norms.median().item(), evaluator=evaluator,
                            min_norm_l2=norms.cpu(), seconds=time.time() - t0)
