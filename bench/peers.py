"""Every DeepFool implementation of the benchmark behind one call signature.

``run(model, x, ref, *, batch_size, max_iter, overshoot, candidates) -> Outcome`` for each
name in :data:`RUNNERS`; ``available()`` lists the ones that import here. All get

* the same float32 images ``x`` on the [0, 1] pixel scale and the same model (eval mode);
* ``ref``: the class to leave, which is the model's prediction at ``x`` (so every library
  attacks every image, and ART / deeprobust, which always start from the prediction, have
  the same semantics as the others);
* the same batch size (where the library batches at all), 50 steps, overshoot 0.02, all
  classes (``candidates=None``; foolbox and ddfast also take a top-k).

What still differs is listed in ``DIFFERENCES`` (and in bench/README.md). The peers are only
installed (bench/install-peers.sh) and called, never copied. Two are imported past package
``__init__`` files that import heavy packages their DeepFool does not use: deeprobust
(torchvision and a dozen more; :func:`_skip_package_inits`) and adv-lib (``adv_lib.attacks``
imports torchvision and visdom; :func:`ddfast.robustness.adv_lib_module`). The module that holds
the attack is imported as it is.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import Tensor, nn

BOUNDS = (0.0, 1.0)


@dataclass
class Outcome:
    x_adv: Tensor  # [N, ...] float32
    iterations: Optional[Tensor] = None  # [N] int64 where the implementation reports it
    steps_per_batch: Optional[float] = None  # mean steps of the library's internal batches, where counted (ART)


# ----------------------------------------------------------------------------- ddfast


def ddfast_run(model, x, ref, *, batch_size, max_iter=50, overshoot=0.02, candidates=None, backend=None,
               bounds=BOUNDS) -> Outcome:
    import ddfast

    def call():
        return ddfast.deepfool(model, x, ref, max_iter=max_iter, overshoot=overshoot, candidates=candidates,
                               bounds=bounds, batch_size=batch_size)

    if backend is None:
        res = call()
    else:
        with ddfast.set_backend(backend):
            res = call()
    return Outcome(res.x_adv, res.iterations)


def ddfast_backends(device="cpu") -> List[str]:
    import ddfast

    return list(ddfast.available_backends(device))


# ------------------------------------------------------- naive (ddfast.reference.deepfool_ref)


def naive_run(model, x, ref, *, batch_size, max_iter=50, overshoot=0.02, candidates=None) -> Outcome:
    from ddfast.reference import deepfool_ref

    if candidates is not None:
        raise ValueError("naive: all classes only")
    advs, its = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        delta, it, *_ = deepfool_ref(model, xb, ref[i : i + batch_size], max_iter=max_iter, overshoot=overshoot)
        advs.append(xb + delta)
        its.append(it)
    return Outcome(torch.cat(advs), torch.cat(its))


# ----------------------------------------------------------------------------- foolbox 3


def foolbox_run(model, x, ref, *, batch_size, max_iter=50, overshoot=0.02, candidates=None) -> Outcome:
    import foolbox as fb

    fmodel = fb.PyTorchModel(model, bounds=BOUNDS, device=x.device)
    k = candidates if candidates is not None else None
    attack = fb.attacks.L2DeepFoolAttack(steps=max_iter, candidates=k, overshoot=overshoot, loss="logits")
    advs = []
    for i in range(0, len(x), batch_size):
        raw, _clipped, _success = attack(fmodel, x[i : i + batch_size], ref[i : i + batch_size], epsilons=None)
        advs.append(raw.detach())
    return Outcome(torch.cat(advs))


# ----------------------------------------------------------------------------- torchattacks


def torchattacks_run(model, x, ref, *, batch_size, max_iter=50, overshoot=0.02, candidates=None) -> Outcome:
    import torchattacks

    if candidates is not None:
        raise ValueError("torchattacks: all classes only")
    atk = torchattacks.DeepFool(model, steps=max_iter, overshoot=overshoot)
    advs = [atk(x[i : i + batch_size], ref[i : i + batch_size]).detach() for i in range(0, len(x), batch_size)]
    return Outcome(torch.cat(advs))


# ----------------------------------------------------------------------------- ART


def art_run(model, x, ref, *, batch_size, max_iter=50, overshoot=0.02, candidates=None) -> Outcome:
    from art.attacks.evasion import DeepFool
    from art.estimators.classification import PyTorchClassifier

    with torch.no_grad():
        nb_classes = model(x[:1]).shape[1]
    clf = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                            nb_classes=nb_classes, clip_values=BOUNDS,
                            device_type="gpu" if x.is_cuda else "cpu")
    atk = DeepFool(clf, max_iter=max_iter, epsilon=overshoot,
                   nb_grads=candidates if candidates is not None else nb_classes,
                   batch_size=batch_size, verbose=False)
    # ART reports no iteration count: count its class-gradient calls (with all classes, one per
    # batch before its loop and one per step)
    calls = [0]
    gradient = clf.class_gradient

    def counted(*args, **kwargs):
        calls[0] += 1
        return gradient(*args, **kwargs)

    clf.class_gradient = counted
    adv = atk.generate(x.detach().cpu().numpy())
    model.eval()  # ART's class_gradient leaves the model in the mode it set; keep eval for the others
    n_batches = -(-len(x) // batch_size)
    steps = calls[0] / n_batches - 1 if candidates is None else None
    return Outcome(torch.from_numpy(np.ascontiguousarray(adv)).to(x.device), steps_per_batch=steps)


# ----------------------------------------------------------------------------- deeprobust


def _skip_package_inits(package: str, subpackages: List[str]) -> None:
    """Register ``package`` and its ``subpackages`` (paths relative to it) as empty packages
    pointing at the installed directories, so that importing one module below them runs that
    module (and what it imports) but not those packages' ``__init__``. Packages already
    imported stay as they are."""
    if package in sys.modules:
        root = list(sys.modules[package].__path__)[0]
    else:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ImportError(f"{package} is not installed")
        root = os.path.dirname(spec.origin)
    for sub in [""] + subpackages:
        name = ".".join([package] + [p for p in sub.split("/") if p])
        if name not in sys.modules:
            m = types.ModuleType(name)
            m.__path__ = [os.path.join(root, sub)]
            sys.modules[name] = m


def _load_deeprobust_deepfool():
    """deeprobust's package __init__ imports torchvision and a dozen other packages; its
    DeepFool module itself needs only numpy and torch: only that module (and base_attack) runs."""
    if "deeprobust.image.attack.deepfool" not in sys.modules:
        _skip_package_inits("deeprobust", ["image", "image/attack"])
    from deeprobust.image.attack.deepfool import deepfool

    return deepfool


def deeprobust_run(model, x, ref, *, batch_size, max_iter=50, overshoot=0.02, candidates=None) -> Outcome:
    deepfool = _load_deeprobust_deepfool()
    with torch.no_grad():
        K = model(x[:1]).shape[1]
    k = candidates if candidates is not None else K
    advs, its = [], []
    for i in range(len(x)):  # deeprobust's DeepFool takes one image at a time
        adv, _r, it = deepfool(model, x[i : i + 1], k, overshoot, max_iter, x.device)
        advs.append(adv.detach())
        its.append(it + 1)  # it is the index of the last step taken
    return Outcome(torch.cat(advs).to(x.dtype), torch.tensor(its, dtype=torch.int64))


# ----------------------------------------------------------------------------- adv-lib


def _load_advlib_df():
    """adv-lib's ``df``, without ``adv_lib.attacks``' __init__ (it imports torchvision and visdom,
    which its DeepFool does not use): :func:`ddfast.robustness.adv_lib_module`."""
    from ddfast.robustness import adv_lib_module

    return adv_lib_module("deepfool").df


def advlib_run(model, x, ref, *, batch_size, max_iter=50, overshoot=0.02, candidates=None) -> Outcome:
    df = _load_advlib_df()
    if candidates is not None:
        raise ValueError("adv-lib: all classes only")
    advs = [df(model, x[i : i + batch_size], ref[i : i + batch_size], steps=max_iter, overshoot=overshoot).detach()
            for i in range(0, len(x), batch_size)]
    return Outcome(torch.cat(advs))


# ----------------------------------------------------------------------------- registry


RUNNERS: Dict[str, Callable[..., Outcome]] = {
    "ddfast": ddfast_run,
    "naive": naive_run,
    "foolbox": foolbox_run,
    "torchattacks": torchattacks_run,
    "art": art_run,
    "deeprobust": deeprobust_run,
    "advlib": advlib_run,
}

_IMPORTS = {
    "ddfast": lambda: __import__("ddfast").deepfool,
    "naive": lambda: None,
    "foolbox": lambda: __import__("foolbox").attacks.L2DeepFoolAttack,
    "torchattacks": lambda: __import__("torchattacks").DeepFool,
    "art": lambda: (importlib.import_module("art.attacks.evasion").DeepFool,
                    importlib.import_module("art.estimators.classification").PyTorchClassifier),
    "deeprobust": _load_deeprobust_deepfool,
    "advlib": _load_advlib_df,
}


def available() -> Dict[str, Optional[str]]:
    """name -> None if it imports, else the reason it does not."""
    out: Dict[str, Optional[str]] = {}
    for name, imp in _IMPORTS.items():
        try:
            imp()
            out[name] = None
        except Exception as e:  # noqa: BLE001 - report any import failure
            out[name] = f"{type(e).__name__}: {e}"
    return out


#: what still differs from ddfast's semantics (DESIGN.md) after configuring each peer
DIFFERENCES = {
    "ddfast": "DESIGN.md: x_{t+1} = clip(x + (1+overshoot) r_tot), linearised at the clipped iterate, "
              "r_t = (dist + 1e-4) w/||w||; per-sample early exit with active-set compaction.",
    "naive": "ddfast.reference.deepfool_ref: same step formula as ddfast but no bounds (iterates are not clipped "
             "to [0, 1]); "
             "finished samples stay in the batch under a mask; full [B, K, D] Jacobian by K autograd.grad calls.",
    "foolbox": "Same step formula (1e-8 added to the norms) and the same clip of x + (1+overshoot) r_tot; "
               "the whole batch keeps iterating until every sample is adversarial (finished samples are "
               "recomputed, then masked); one forward + backward per candidate class per step "
               "(K-1 forwards where one would do); no iteration count returned.",
    "torchattacks": "Per-sample loop (batch of 1 inside, whatever the batch size); steps "
                    "x_{t+1} = clamp(x_t + (1+overshoot) r_t, 0, 1): the projection accumulates in the iterate "
                    "(ddfast clips x + (1+overshoot) r_tot); no 1e-4 added to the distance; backward through "
                    "the model's parameters too (K backward calls per step); no iteration count returned.",
    "art": "Steps without overshoot, x_{t+1} = clip(x_t + r_t, 0, 1), done when x_t (not the overshot "
           "point) is fooled; overshoot applied once at the end, x + (1+epsilon)(x_T - x), clipped; no 1e-4, "
           "1e-7 added to norms; gradients and predictions of the whole batch every step (only active rows "
           "move), numpy round trips; no iteration count returned.",
    "deeprobust": "One image at a time; numpy round trips; no clipping to [0, 1]; same step formula as "
                  "DESIGN.md otherwise (r_t with +1e-4, iterate x + (1+overshoot) r_tot).",
    "advlib": "adv-lib `df` (batched, GPU-oriented): steps x_{t+1} = clamp(x_t + (1+overshoot) r_t, 0, 1) "
              "(the projection accumulates in the iterate, as torchattacks; ddfast clips x + (1+overshoot) r_tot); "
              "+1e-4 on the distance, norms clamped at 1e-6; a sample is done when x_t itself is adversarial "
              "(checked before each step) and leaves the batch; one forward per step and one backward per other "
              "class on its graph (retain_graph); no iteration count returned.",
}
