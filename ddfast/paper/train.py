"""Training and fine-tuning: clean, DeepDefense, adversarial training, Parseval training.

:func:`fit` runs one method on preprocessed tensors and, with an ``out_dir``, writes after
every epoch (atomically: temp file + ``os.replace``):

* ``checkpoint.pt``: model, optimizer, epoch, RNG state, log, config and the tag of the
  starting weights (plain tensors and containers, read back with
  ``torch.load(weights_only=True)``); ``--resume`` continues from it;
* ``log.json``: one entry per epoch (epoch 0 is the starting model): loss, cross-entropy,
  regularizer, train and test accuracy, rho_2 and fooled fraction on a fixed test subset,
  learning rate, seconds, skipped steps (strict JSON: NaN or inf is written as null);
* ``model.pt``: the model's ``state_dict`` after the last finished epoch.

The data order of epoch ``e`` is a permutation drawn from a generator seeded by
``(seed, e)``, and an interrupted epoch is redone from the previous epoch's checkpoint, so a
run resumed after an interruption ends bit-identical to an uninterrupted one.

Distributed (``torch.distributed`` initialised, e.g. by ``ddfast train`` under ``torchrun``):
the model is wrapped in ``DistributedDataParallel``; every rank draws the same permutation and
``cfg.batch_size`` is the *global* batch: each global batch is split into ``world_size``
near-equal contiguous parts, rank ``r`` takes part ``r``, and its loss is weighted by
``world_size * n_r / n`` so that DDP's gradient average equals the gradient of one process on
the whole global batch (also for a last, uneven batch). The regularizer is called with the
wrapped model (``deepdefense_loss(ddp, x, y)``, the README's recipe). Evaluation, logs and
checkpoint files come from rank 0 only (the others wait at a barrier); the returned log of
the other ranks holds the training statistics (global, all-reduced) without the test metrics.

Learning rates: the paper fine-tunes at 5e-4 in its 0..255 MatConvNet setup; that rate does
not carry over to PyTorch-initialised models on [0,1]-scaled inputs (DESIGN.md). The
defaults here (:class:`TrainConfig`) are the paper's schedule shape (batch 100, 5 epochs, SGD
momentum 0.9, weight decay 5e-4, lr halved for the last epoch) at lr 0.01 in the [0,1] space.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import re
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..metrics import accuracy, check_data, rho2
from ..validate import NonFiniteLogitsError, check_max_iter, check_nonneg
from .extras import progress_bar, require_extras

__all__ = ["METHODS", "TrainConfig", "NonFiniteLossError", "fit", "lr_at", "parseval_project",
           "adversarial_set", "shared_adversarial_set", "atomic_save", "finite_or_none", "load_checkpoint",
           "read_tensor_file", "load_state", "weights_fingerprint", "adversarial_losses", "pgd_at_loss",
           "trades_loss", "pgd_examples"]

METHODS = ("clean", "deepdefense", "adversarial", "parseval", "pgd_at", "trades")


@dataclass
class TrainConfig:
    """Settings of one training run (defaults: the paper's MNIST fine-tuning, lr for [0,1] inputs).

    ``lr`` is multiplied by ``lr_gamma`` once for every milestone in ``lr_milestones`` that
    the epoch (1-based) has passed: milestones ``(4,)`` halve it for epoch 5.
    ``lam, c, d, dd_max_iter, overshoot``: DeepDefense (:func:`ddfast.deepdefense_loss`).
    ``layers``: regularize only these layers (names of :func:`ddfast.paper.models.layer_names`;
    paper Fig. 5): the regularizer's gradient reaches only their parameters.
    ``parseval_beta``, ``parseval_frac``: projection step and the fraction of rows sampled.
    ``adv_max_iter``: DeepFool iterations for the fixed adversarial training set.
    ``pgd_norm, pgd_eps, pgd_steps, pgd_step_size``: the inner attack of ``pgd_at`` (Madry et al.:
    train on PGD examples only) and ``trades`` (Zhang et al.: cross-entropy on clean images plus
    ``trades_beta`` times the KL divergence to the prediction at the PGD point maximizing it);
    ``pgd_eps`` in [0, 1] pixel units (converted with the ``scale`` passed to :func:`fit`), step
    size ``2.5 * pgd_eps / pgd_steps`` when ``pgd_step_size`` is None (Madry et al.'s rule).
    ``lam_warmup``: DeepDefense from scratch (docs/robustness.md): the regularizer is off for the
    first ``lam_warmup[0]`` epochs, then lambda ramps linearly, step by step, from 0 to ``lam`` over
    the next ``lam_warmup[1]`` epochs; ``(0, 0)``: ``lam`` from the first step.
    ``eval_subset``, ``eval_max_iter``: per-epoch rho_2 on the first ``eval_subset`` test images.
    ``on_nonfinite``: ``"stop"`` (raise :class:`NonFiniteLossError`) or ``"skip"`` the step.
    ``grad_clip``: scale the gradient down to this global L2 norm before each step
    (``torch.nn.utils.clip_grad_norm_``) and skip a step whose gradient norm is not finite
    (counted in ``skipped_steps``); None: neither.
    """

    method: str = "clean"
    epochs: int = 5
    batch_size: int = 100
    lr: float = 0.01
    lr_milestones: Tuple[int, ...] = (4,)
    lr_gamma: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lam: float = 15.0
    c: float = 25.0
    d: float = 5.0
    dd_max_iter: int = 5
    overshoot: float = 0.02
    layers: Optional[Tuple[str, ...]] = None
    parseval_beta: float = 1e-4
    parseval_frac: float = 0.3
    adv_max_iter: int = 50
    pgd_norm: str = "l2"
    pgd_eps: float = 1.5
    pgd_steps: int = 10
    pgd_step_size: Optional[float] = None
    trades_beta: float = 6.0
    lam_warmup: Tuple[int, int] = (0, 0)
    seed: int = 0
    eval_subset: int = 1000
    eval_max_iter: int = 50
    on_nonfinite: str = "stop"
    grad_clip: Optional[float] = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.pgd_norm not in ("l2", "linf"):
            raise ValueError(f"pgd_norm must be 'l2' or 'linf', got {self.pgd_norm!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        for name in ("epochs", "batch_size", "eval_subset"):
            _check_int(getattr(self, name), name, 1)
        _check_int(self.seed, "seed", None)
        low, high = self.seed * _SEED_STRIDE, self.seed * _SEED_STRIDE + self.epochs
        if low < -2 ** 63 or high >= 2 ** 64:  # the range torch.Generator.manual_seed takes
            raise ValueError(f"seed must keep seed * {_SEED_STRIDE} + epoch within [-2**63, 2**64) "
                             f"(torch's seed range), got {self.seed}")
        _check_int(self.pgd_steps, "pgd_steps", 1)
        for name in ("dd_max_iter", "adv_max_iter", "eval_max_iter"):
            check_max_iter(getattr(self, name), name)
        for name in ("lr", "lr_gamma"):
            v = getattr(self, name)
            if check_nonneg(v, name) == 0:
                raise ValueError(f"{name} must be positive, got {v!r}")
        for name in ("momentum", "weight_decay", "lam", "c", "d", "overshoot", "parseval_beta", "pgd_eps",
                     "trades_beta"):
            check_nonneg(getattr(self, name), name)
        for name in ("pgd_step_size", "grad_clip"):
            v = getattr(self, name)
            if v is not None and check_nonneg(v, name) == 0:
                raise ValueError(f"{name} must be positive or None, got {v!r}")
        self.lam_warmup = _check_warmup(self.lam_warmup)
        frac = self.parseval_frac
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1:
            raise ValueError(f"parseval_frac must be a number in (0, 1], got {frac!r}")
        if isinstance(self.lr_milestones, (str, bytes)) or not isinstance(self.lr_milestones, Sequence):
            raise ValueError(f"lr_milestones must be a sequence of epochs, got {self.lr_milestones!r}")
        self.lr_milestones = tuple(_check_int(m, "lr_milestones", 0) for m in self.lr_milestones)
        if self.layers is not None:
            if isinstance(self.layers, str) or not all(isinstance(n, str) for n in self.layers):
                raise TypeError(f"layers must be a sequence of layer names, got {self.layers!r}")
            if self.method != "deepdefense":  # it would be ignored: only the regularizer is layer-wise
                raise ValueError(f"layers restricts the DeepDefense regularizer: it needs method='deepdefense', "
                                 f"got method={self.method!r}")
            self.layers = tuple(self.layers)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        d["lam_warmup"] = list(self.lam_warmup)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d


def _check_warmup(value) -> Tuple[int, int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"lam_warmup must be (off_epochs, ramp_epochs), got {value!r}")
    return (_check_int(value[0], "lam_warmup[0] (epochs without the regularizer)", 0),
            _check_int(value[1], "lam_warmup[1] (epochs of the lambda ramp)", 0))


def lam_at(cfg: TrainConfig, epoch: int, step: int, steps: int) -> float:
    """DeepDefense's lambda at ``step`` (0-based, of ``steps`` per epoch) of 1-based ``epoch``
    under ``cfg.lam_warmup`` (0 during the off epochs, then a linear ramp to ``cfg.lam``)."""
    off, ramp = cfg.lam_warmup
    done = (epoch - 1 - off) + step / max(steps, 1)  # epochs since the ramp began
    if done < 0:
        return 0.0
    return cfg.lam if ramp == 0 else cfg.lam * min(1.0, (done + 1 / max(steps, 1)) / ramp)


def _labels(model: nn.Module, x: Tensor, y: Tensor, names: Tuple[str, str] = ("x", "y")) -> Tensor:
    """:func:`ddfast.metrics.check_data` of labelled data: ``y`` as int64 (``None`` is refused there)."""
    labels = check_data(model, x, y, names)
    if labels is None:  # not reached: check_data raises a TypeError for y=None
        raise TypeError(f"{names[1]} (labels [N]) is required, got None")
    return labels


def _check_int(value, name: str, minimum: Optional[int]) -> int:
    """``value`` as an int (``ValueError`` naming ``name`` unless it is an int >= ``minimum``)."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be an int{bound}, got {value!r}")
    return value


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf; the message names the step and the last good checkpoint."""


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of 1-based ``epoch``."""
    return cfg.lr * cfg.lr_gamma ** sum(epoch > m for m in cfg.lr_milestones)


def atomic_save(obj: object, path: os.PathLike) -> None:
    """``torch.save`` (or JSON for ``.json`` paths) to a temp file in the same dir, then ``os.replace``."""
    path = Path(path)
    tmp = path.parent / f"{path.name}.{uuid.uuid4().hex[:12]}.tmp"  # named before it exists: an
    try:                                                             # interrupt cannot orphan it
        if path.suffix == ".json":  # strict JSON: NaN / inf become null
            tmp.write_text(json.dumps(finite_or_none(obj), indent=1, allow_nan=False))
        else:  # by name: torch's own writer, which an interrupt cannot leave half-written
            torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def finite_or_none(obj: object) -> object:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def read_tensor_file(path: os.PathLike) -> object:
    """Read a file written by ``torch.save`` with ``torch.load(weights_only=True)`` onto the CPU:
    tensors and plain containers only, no code is unpickled.

    Raises ``FileNotFoundError`` if ``path`` is not a file and ``ValueError`` naming ``path`` if it
    is corrupt or truncated, or if it holds arbitrary Python objects (refused, never executed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):  # torch.save: a zip archive, or a pickle (legacy)
        raise ValueError(f"{path}: not a torch file (it starts with {head!r}; torch.save writes a zip archive)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol notices of the weights-only unpickler
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f" (it references {found.group(1)})" if found else ""
        raise ValueError(f"{path}: refused: holds Python objects other than tensors and plain containers{what}; "
                         "only weights are loaded (torch.load weights_only=True)") from exc
    except Exception as exc:  # zip/stream errors, EOF: a truncated or non-torch file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: corrupt or not a torch file ({first})") from exc


_CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "rng", "log", "config")


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's state (names, dtypes, shapes, values): which weights a run started from."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # reshape: 0-d buffers (BatchNorm's count)
    return h.hexdigest()


def load_checkpoint(path: os.PathLike) -> dict:
    """A checkpoint written by :func:`fit` (read with :func:`read_tensor_file`; ``ValueError``
    naming the file if it is unreadable or lacks any of the keys ``fit`` writes)."""
    ck = read_tensor_file(path)
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing or not isinstance(ck, dict):
        raise ValueError(f"{path}: not a ddfast training checkpoint (missing {missing})")
    return ck


def _state_dict_file(path: os.PathLike) -> dict:
    """A ``state_dict`` written by ``atomic_save`` (``ValueError`` naming ``path`` if it holds something else)."""
    state = read_tensor_file(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict, got a {type(state).__name__}")
    return state


def load_state(model: nn.Module, state: dict, path: os.PathLike) -> nn.Module:
    """``model.load_state_dict(state)``; ``ValueError`` naming ``path`` (where ``state`` came
    from) when the weights belong to another architecture."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"{path} does not hold weights of this {type(model).__name__} ({first} ...)") from exc
    return model


def _weights(model: nn.Module) -> List[Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@torch.no_grad()
def parseval_project(model: nn.Module, beta: float, frac: float, generator: torch.Generator) -> None:
    """Parseval step on every Linear/Conv weight W (conv: ``[out, in*k*k]``), on a random
    ``frac`` of its rows S: ``W_S <- (1 + beta) W_S - beta W_S W_S^T W_S`` (in place).
    ``beta >= 0``; ``frac`` in (0, 1]; ``generator`` draws the rows."""
    check_nonneg(beta, "beta")
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1], got {frac!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    for w in _weights(model):
        w2 = w.view(w.shape[0], -1)
        k = max(1, int(round(frac * w2.shape[0])))
        rows = torch.randperm(w2.shape[0], generator=generator)[:k]
        ws = w2[rows]
        w2[rows] = (1 + beta) * ws - beta * (ws @ ws.T) @ ws


def adversarial_set(model: nn.Module, x: Tensor, y: Tensor, *, max_iter: int = 50, overshoot: float = 0.02,
                    batch_size: int = 1000, progress: bool = True) -> Tensor:
    """DeepFool adversarial examples of ``(x, y)`` against ``model`` (the fixed set of
    adversarial training, Moosavi-Dezfooli et al.), ``[N, ...]`` like ``x``; misclassified
    samples stay unperturbed. ``x [N, ...]`` float, ``y [N]`` labels in ``[0, K)``."""
    from ..attack import deepfool

    labels = _labels(model, x, y)
    check_max_iter(max_iter)
    check_nonneg(overshoot, "overshoot")
    _check_int(batch_size, "batch_size", 1)

    out = []
    starts: Iterable[int] = range(0, x.shape[0], batch_size)
    if progress:
        starts = progress_bar(starts, desc="DeepFool training set", unit="batch", leave=False)
    for i in starts:
        out.append(deepfool(model, x[i:i + batch_size], labels[i:i + batch_size], max_iter=max_iter,
                            overshoot=overshoot).x_adv.detach())
    return torch.cat(out)


def shared_adversarial_set(src: nn.Module, x: Tensor, y: Tensor, cfg: TrainConfig, progress: bool,
                            rank: int, world: int, chunk: int = 1000) -> Tensor:
    """:func:`adversarial_set` of ``(x, y)``, computed once across the ranks: rank r attacks the
    chunks r, r + world, ... (the same chunks one process attacks, so the result is the same
    bit for bit) and each chunk is broadcast from its rank to the others."""
    def attack(xs: Tensor, ys: Tensor, bar: bool) -> Tensor:
        return adversarial_set(src, xs, ys, max_iter=cfg.adv_max_iter, overshoot=cfg.overshoot, batch_size=chunk,
                               progress=bar)

    if world == 1:
        return attack(x, y, progress)
    starts = list(range(0, x.shape[0], chunk))
    mine = {s: attack(x[s:s + chunk], y[s:s + chunk], False) for s in starts[rank::world]}
    out = torch.empty_like(x)
    for i, s in enumerate(starts):
        buf = mine[s] if i % world == rank else torch.empty_like(x[s:s + chunk])
        dist.broadcast(buf, src=i % world)
        out[s:s + chunk] = buf
    return out


def _layer_params(model: nn.Module, layers: Sequence[str]) -> List[Tensor]:
    mods = dict(model.named_modules())
    missing = [n for n in layers if n not in mods]
    if missing:
        from .models import layer_names

        raise ValueError(f"layers {missing} not in the model; it has {layer_names(model)}")
    return [p for n in layers for p in mods[n].parameters()]


def _evaluate_epoch(model, x_test, y_test, cfg, scale, progress) -> dict:
    sub = x_test[: cfg.eval_subset]
    try:
        r = rho2(model, sub, max_iter=cfg.eval_max_iter, scale=scale, progress=progress)
    except NonFiniteLogitsError:  # non-finite weights, kept by on_nonfinite="skip": nothing to measure
        return {"test_acc": math.nan, "rho2": math.nan, "fooled": math.nan}
    return {"test_acc": accuracy(model, x_test, y_test), "rho2": r.rho2, "fooled": r.fooled}


_SEED_STRIDE = 1_000_003  # epoch e of seed s draws from seed s * _SEED_STRIDE + e


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * _SEED_STRIDE + epoch)


def fit(
    model: nn.Module,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    cfg: TrainConfig,
    *,
    out_dir: Optional[os.PathLike] = None,
    resume: bool = False,
    scale: float = 1.0,
    progress: bool = True,
    step_callback: Optional[Callable[[int, int], None]] = None,
    start_tag: Optional[str] = None,
    bounds: Optional[Tuple[Tensor, Tensor]] = None,
) -> List[dict]:
    """Train ``model`` in place with ``cfg`` and return the per-epoch log.

    ``x_*``: preprocessed float tensors ``[N, ...]``; ``y_*``: int64 ``[N]``. ``scale``: the
    preprocessing scale (for rho'_2 in logs). ``out_dir``: where checkpoints and logs go
    (required for ``resume``). ``step_callback(epoch, step)`` runs after each step.
    ``start_tag``: names the weights the run starts from (e.g. :func:`weights_fingerprint` of
    the model as passed); kept in the checkpoint, and a resume with another tag is refused
    (without a tag, a resume takes everything from the checkpoint, whatever the model holds).
    ``bounds``: ``(lo, hi)`` of valid inputs in the units of ``x`` (:attr:`Prepared.bounds`): the
    PGD examples of ``pgd_at`` / ``trades`` are clipped to them.
    Raises :class:`NonFiniteLossError` on a NaN/Inf loss when ``cfg.on_nonfinite == "stop"``, and
    ``ImportError`` before any work when ``progress`` is set and tqdm is not installed.
    """
    model, wrapped, y_train, y_test = _checked_fit_inputs(model, x_train, y_train, x_test, y_test, cfg, scale)
    rank, world = _dist_rank_world()
    require_extras(progress_bars=progress and rank == 0)  # (metrics' progress bars need tqdm too)
    out = _output_dir(out_dir, resume)
    reg_params = _regularized_params(model, cfg, world)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    log: List[dict] = []
    start_epoch = 1
    if resume and out is not None and (out / _CHECKPOINT).exists():
        log, start_epoch = _resume(out / _CHECKPOINT, model, opt, cfg, start_tag)
    _barrier(world)  # every rank has checked and read the output directory before rank 0 writes to it
    run = _FitRun(model=model, opt=opt, cfg=cfg, x_test=x_test, y_test=y_test, scale=scale, out=out,
                  start_tag=start_tag, rank=rank, world=world, progress=progress and rank == 0,
                  reg_params=reg_params, step_callback=step_callback, log=log, bounds=bounds)
    x_fit = x_train
    if cfg.method == "adversarial" and start_epoch <= cfg.epochs:
        x_fit = _adversarial_training_set(run, x_train, y_train)
    if start_epoch == 1 and not log:
        _record_epoch(run, {"epoch": 0, "lr": 0.0}, time.time())
    net = _training_net(model, wrapped, world)
    was_training = model.training
    for epoch in range(start_epoch, cfg.epochs + 1):
        _train_epoch(run, net, epoch, x_fit, y_train)
    model.train(was_training)
    return log


_CHECKPOINT = "checkpoint.pt"  # in out_dir, beside model.pt, log.json and (adversarial) init.pt


@dataclass
class _FitRun:
    """What the epochs and steps of one :func:`fit` share."""

    model: nn.Module  # the plain module: the optimizer, checkpoints and evaluation use it
    opt: torch.optim.Optimizer
    cfg: TrainConfig
    x_test: Tensor
    y_test: Tensor
    scale: float
    out: Optional[Path]  # output directory; None: no files
    start_tag: Optional[str]
    rank: int
    world: int
    progress: bool  # progress bars and per-epoch lines (rank 0 only)
    reg_params: Optional[List[Tensor]]  # layer-wise regularizer: the parameters its gradient reaches
    step_callback: Optional[Callable[[int, int], None]]
    log: List[dict]  # one entry per finished epoch (epoch 0: the starting model)
    bounds: Optional[Tuple[Tensor, Tensor]] = None  # valid inputs (lo, hi), for the PGD examples

    @property
    def write_dir(self) -> Optional[Path]:
        """The output directory when this process writes the files (rank 0), else None."""
        return self.out if self.rank == 0 else None


def _checked_fit_inputs(model, x_train, y_train, x_test, y_test, cfg, scale):
    """``(module, ddp_wrapper_or_None, y_train, y_test)`` after checking :func:`fit`'s arguments:
    a DDP ``model`` is unwrapped (checkpoints, evaluation and the optimizer use the plain module)."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    wrapped = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
    if wrapped is not None:
        model = wrapped.module
    y_train = check_data(model, x_train, y_train, ("x_train", "y_train"))
    y_test = check_data(model, x_test, y_test, ("x_test", "y_test"))
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a number > 0, got {scale!r}")
    return model, wrapped, y_train, y_test


def _output_dir(out_dir: Optional[os.PathLike], resume: bool) -> Optional[Path]:
    """``out_dir`` as a created ``Path`` (None without one); a checkpoint there needs ``resume``."""
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ValueError("resume needs out_dir")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if (out / _CHECKPOINT).exists() and not resume:
            raise FileExistsError(f"{out / _CHECKPOINT} exists: pass resume=True (CLI: --resume) or another "
                                  "output directory")
    return out


def _regularized_params(model: nn.Module, cfg: TrainConfig, world: int) -> Optional[List[Tensor]]:
    """The parameters of ``cfg.layers`` (layer-wise regularizer), None when every parameter is regularized."""
    if world > 1 and cfg.layers is not None:
        raise ValueError("layers (layer-wise regularizer) is not supported in distributed training: "
                         "it needs two backward passes per step, DDP reduces gradients in one")
    if cfg.method == "deepdefense" and cfg.layers is not None:
        return _layer_params(model, cfg.layers)
    return None


def _resume(ckpt_path: Path, model: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig,
            start_tag: Optional[str]) -> Tuple[List[dict], int]:
    """Load the checkpoint into ``model``, ``opt`` and torch's global RNG; return its log and the
    next epoch. ``ValueError`` if it was written with other settings or from other starting weights."""
    ck = load_checkpoint(ckpt_path)
    saved = json.loads(ck["config"])
    defaults = TrainConfig().to_dict()  # a setting added after the checkpoint was written ran as its default
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    if saved != cfg.to_dict():
        diff = {k: (saved.get(k), v) for k, v in cfg.to_dict().items() if saved.get(k) != v}
        raise ValueError(f"{ckpt_path} was written with other settings (saved, now): {diff}")
    saved_tag = ck.get("start_tag")
    if start_tag is not None and saved_tag is not None and saved_tag != start_tag:
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if shapes != {k: tuple(v.shape) for k, v in ck["model"].items()}:
            load_state(model, ck["model"], ckpt_path)  # another architecture: that is the error to name
        raise ValueError(f"{ckpt_path} was started from other weights than this run (another --init or "
                         "reference): resuming would mix the two; use another output directory")
    load_state(model, ck["model"], ckpt_path)
    opt.load_state_dict(ck["optimizer"])
    torch.set_rng_state(ck["rng"])
    return json.loads(ck["log"]), int(ck["epoch"]) + 1


def _adversarial_training_set(run: _FitRun, x_train: Tensor, y_train: Tensor) -> Tensor:
    """The fixed DeepFool set of the *starting* model, ``[N, ...]`` like ``x_train``. That model is
    kept in ``init.pt`` so that a resume rebuilds the same set (read back only when this run resumes
    a checkpoint: a fresh run's ``init.pt`` may be stale)."""
    init_path = run.out / "init.pt" if run.out is not None else None
    if init_path is not None and run.log and init_path.exists():
        src = _clone_with(run.model, _state_dict_file(init_path))
    else:
        src = _clone_with(run.model, run.model.state_dict())
        if run.write_dir is not None:
            atomic_save(src.state_dict(), run.write_dir / "init.pt")
    return shared_adversarial_set(src, x_train, y_train, run.cfg, run.progress, run.rank, run.world)


def _training_net(model: nn.Module, wrapped: Optional[nn.Module], world: int) -> nn.Module:
    """What the steps call: the DDP model passed to :func:`fit`, a new DDP wrapper of ``model``
    when several processes train, else ``model`` itself."""
    if wrapped is not None:
        return wrapped
    if world > 1:
        dev = next(model.parameters()).device
        return nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    return model


def _train_epoch(run: _FitRun, net: nn.Module, epoch: int, x_fit: Tensor, y_train: Tensor) -> None:
    """One epoch (1-based) over ``x_fit`` in the order drawn for it, then its log entry and files."""
    cfg = run.cfg
    t0 = time.time()
    lr = lr_at(cfg, epoch)
    for g in run.opt.param_groups:
        g["lr"] = lr
    gen = _epoch_generator(cfg.seed, epoch)  # the data order, then the Parseval rows
    order = torch.randperm(x_fit.shape[0], generator=gen)
    steps: Iterable[int] = range(0, x_fit.shape[0], cfg.batch_size)
    if run.progress:
        steps = progress_bar(steps, desc=f"{cfg.method} epoch {epoch}/{cfg.epochs}", unit="step", leave=False)
    sums = {"loss": 0.0, "ce": 0.0, "reg": 0.0, "correct": 0, "seen": 0, "skipped": 0}
    net.train()
    for step, i in enumerate(steps):
        stepped = _train_step(run, net, x_fit, y_train, order[i:i + cfg.batch_size], gen, sums, (epoch, step))
        if stepped and run.step_callback is not None:
            run.step_callback(epoch, step)
    stats = _train_statistics(epoch, lr, sums)
    stats["train_s"] = time.time() - t0  # the steps only (time_s adds the epoch's evaluation)
    entry = _record_epoch(run, stats, t0)
    if run.progress:
        print(f"[{cfg.method}] epoch {epoch}: loss {entry['train_loss']:.4f} test acc {entry['test_acc']:.4f} "
              f"rho2 {entry['rho2']:.4f} ({entry['time_s']:.0f}s)", flush=True)


def _train_step(run: _FitRun, net: nn.Module, x_fit: Tensor, y_train: Tensor, idx: Tensor,
                gen: torch.Generator, sums: dict, where: Tuple[int, int]) -> bool:
    """One optimizer step on the global batch ``idx`` (this rank takes its part), added to
    ``sums``; False if the step was skipped (non-finite loss, ``on_nonfinite="skip"``).
    ``where``: ``(epoch, step)`` for the error message."""
    cfg, world = run.cfg, run.world
    part = torch.tensor_split(idx, world)[run.rank]
    xb, yb = x_fit[part], y_train[part]
    run.opt.zero_grad(set_to_none=True)
    epoch, step = where
    lam = lam_at(cfg, epoch, step, math.ceil(x_fit.shape[0] / cfg.batch_size))
    ce, reg, correct = _step_losses(run, net, xb, yb, gen, lam)
    ce_sum, reg_sum, correct, bad = _global_sums(ce, reg, correct, len(part), world)
    if bad:
        if cfg.on_nonfinite == "stop":
            raise _nonfinite_loss_error(run, where, ce_sum, reg_sum, len(idx))
        sums["skipped"] += 1
        return False
    weight = world * len(part) / len(idx)  # 1.0 in one process: DDP's mean becomes the global mean
    if run.reg_params is None or not reg.requires_grad:  # (the layer-wise regularizer may be warming up)
        ((ce + reg) * weight).backward()
    else:
        ce.backward(retain_graph=True)
        reg.backward(inputs=run.reg_params)
    if cfg.grad_clip is not None and not torch.isfinite(
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)):
        sums["skipped"] += 1            # every rank sees the same all-reduced gradient: all skip
        return False
    run.opt.step()
    if cfg.method == "parseval":
        parseval_project(run.model, cfg.parseval_beta, cfg.parseval_frac, gen)
    sums["loss"] += ce_sum + reg_sum
    sums["ce"] += ce_sum
    sums["reg"] += reg_sum
    sums["correct"] += correct
    sums["seen"] += len(idx)
    return True


def _nonfinite_loss_error(run: _FitRun, where: Tuple[int, int], ce_sum: float, reg_sum: float,
                          n: int) -> NonFiniteLossError:
    """The error for a non-finite loss at ``where = (epoch, step)``; sums over a global batch of ``n``."""
    epoch, step = where
    at = (f"epoch {epoch}, step {step} (loss {(ce_sum + reg_sum) / n}, "
          f"cross-entropy {ce_sum / n}, regularizer {reg_sum / n})")
    last = f"{run.out / _CHECKPOINT} (end of epoch {epoch - 1})" if run.out is not None else "none (no out_dir)"
    return NonFiniteLossError(f"non-finite loss at {at}; stopped. Last checkpoint: {last}. "
                              "A new run (another output directory) with a lower learning rate "
                              "or lambda/c usually avoids it; on_nonfinite='skip' skips such steps.")


def _train_statistics(epoch: int, lr: float, sums: dict) -> dict:
    """The training part of an epoch's log entry: means per sample over the steps taken."""
    seen = sums["seen"] if sums["seen"] else math.nan  # every step skipped: no statistics (null in log.json)
    return {"epoch": epoch, "lr": lr, "train_loss": sums["loss"] / seen, "train_ce": sums["ce"] / seen,
            "train_reg": sums["reg"] / seen, "train_acc": sums["correct"] / seen, "skipped_steps": sums["skipped"]}


def _record_epoch(run: _FitRun, entry: dict, t0: float) -> dict:
    """Complete ``entry`` with the test metrics (rank 0) and the seconds since ``t0``, append it
    to the log and write the files of the epoch; returns it."""
    if run.rank == 0:
        entry.update(_evaluate_epoch(run.model, run.x_test, run.y_test, run.cfg, run.scale, run.progress))
    entry["time_s"] = time.time() - t0
    run.log.append(entry)
    _save_epoch(run, entry["epoch"])
    return entry


def _save_epoch(run: _FitRun, epoch: int) -> None:
    """Write ``checkpoint.pt``, ``model.pt`` and ``log.json`` (rank 0), then wait for every rank."""
    out = run.write_dir
    if out is not None:
        atomic_save({"model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "epoch": epoch,
                     "rng": torch.get_rng_state(), "log": json.dumps(run.log),
                     "config": json.dumps(run.cfg.to_dict()), "start_tag": run.start_tag}, out / _CHECKPOINT)
        atomic_save(run.model.state_dict(), out / "model.pt")
        atomic_save(run.log, out / "log.json")
    _barrier(run.world)


def _dist_rank_world() -> Tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _step_losses(run: _FitRun, net: nn.Module, xb: Tensor, yb: Tensor, gen: torch.Generator,
                 lam: float) -> Tuple[Tensor, Tensor, int]:
    """``(ce, reg, correct)`` of one (local) batch: mean cross-entropy and the regularizer (scalars
    with graph; an empty batch gives zeros still attached to every parameter, so DDP's all-reduce
    runs on every rank) and the number of correctly classified samples (of the images the
    cross-entropy is taken on: PGD examples for ``pgd_at``). ``lam``: DeepDefense's lambda now."""
    cfg = run.cfg
    if cfg.method in ("pgd_at", "trades") and len(yb):
        return _adversarial_losses(run, net, xb, yb, gen)
    logits = net(xb)
    ce = F.cross_entropy(logits, yb) if len(yb) else logits.sum() * 0.0
    reg = torch.zeros((), device=logits.device)
    if cfg.method == "deepdefense" and lam > 0:
        from ..regularizer import deepdefense_loss  # lazy: the regularizer lives in its own module

        reg = deepdefense_loss(net, xb, yb, lam=lam, c=cfg.c, d=cfg.d, max_iter=cfg.dd_max_iter,
                               overshoot=cfg.overshoot)
    return ce, reg, int((logits.argmax(1) == yb).sum())


def _adversarial_losses(run: _FitRun, net: nn.Module, xb: Tensor, yb: Tensor,
                        gen: torch.Generator) -> Tuple[Tensor, Tensor, int]:
    return adversarial_losses(run.model, net, xb, yb, run.cfg, scale=run.scale, bounds=run.bounds, generator=gen)


def adversarial_losses(model: nn.Module, net: nn.Module, xb: Tensor, yb: Tensor, cfg: TrainConfig, *,
                       scale: float = 1.0, bounds: Optional[Tuple[Tensor, Tensor]] = None,
                       generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor, int]:
    """``(ce, reg, correct)`` of one ``pgd_at`` / ``trades`` step (``cfg.method``): ``pgd_at``, the
    cross-entropy at the PGD examples of ``model``; ``trades``, the cross-entropy at ``xb`` and
    ``trades_beta * KL(p(xb) || p(x_adv))`` (batch mean). One forward of ``net`` (``model`` or
    its DDP wrapper)."""
    x_adv = pgd_examples(model, xb, yb, cfg, scale=scale, bounds=bounds, generator=generator)
    if cfg.method == "pgd_at":
        logits = net(x_adv)
        return F.cross_entropy(logits, yb), torch.zeros((), device=logits.device), int((logits.argmax(1) == yb).sum())
    both = net(torch.cat([xb, x_adv]))
    clean, adv = both[: len(yb)], both[len(yb):]
    kl = F.kl_div(F.log_softmax(adv, 1), F.softmax(clean, 1), reduction="batchmean")
    return F.cross_entropy(clean, yb), cfg.trades_beta * kl, int((clean.argmax(1) == yb).sum())


def _pixel_step_loss(method: str, model: nn.Module, x: Tensor, y: Tensor, steps: int, eps: float) -> Tensor:
    cfg = TrainConfig(method=method, pgd_steps=steps, pgd_eps=eps)
    ones = torch.ones((), dtype=x.dtype, device=x.device)
    ce, reg, _ = adversarial_losses(model, model, x, y, cfg, scale=1 / 255.0, bounds=(0 * ones, ones))
    return ce + reg


def pgd_at_loss(model: nn.Module, x: Tensor, y: Tensor, *, steps: int = 10, eps: float = 1.5) -> Tensor:
    """The ``pgd_at`` training loss of a batch of images ``x`` in [0, 1] pixels: the
    cross-entropy at L2 PGD examples (``steps`` steps, radius ``eps``, clipped to [0, 1])."""
    return _pixel_step_loss("pgd_at", model, x, y, steps, eps)


def trades_loss(model: nn.Module, x: Tensor, y: Tensor, *, steps: int = 10, eps: float = 1.5) -> Tensor:
    """The ``trades`` training loss of a batch of images ``x`` in [0, 1] pixels (beta 6)."""
    return _pixel_step_loss("trades", model, x, y, steps, eps)


def pgd_examples(model: nn.Module, x: Tensor, y: Tensor, cfg: TrainConfig, *, scale: float = 1.0,
                 bounds: Optional[Tuple[Tensor, Tensor]] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
    """The inner maximisation of PGD adversarial training / TRADES (a training procedure: robustness
    is measured with :mod:`ddfast.robustness`, never with this). ``cfg.pgd_steps`` steps of size
    ``cfg.pgd_step_size`` in the ``cfg.pgd_norm`` ball of radius ``cfg.pgd_eps`` ([0, 1] pixel
    units; ``pgd_eps * 255 * scale`` in the units of ``x``), clipped to ``bounds``; maximises the
    cross-entropy (``pgd_at``: random start in the ball) or, for ``trades``, the KL divergence to
    the prediction at ``x`` (start ``x + 0.001 N(0, 1)``, Zhang et al.). Eval mode; no graph kept."""
    from ..guard import eval_modes

    eps = cfg.pgd_eps * 255.0 * scale
    step = cfg.pgd_step_size * 255.0 * scale if cfg.pgd_step_size is not None else 2.5 * eps / cfg.pgd_steps
    noise = torch.randn(x.shape, generator=generator).to(x)
    with eval_modes(model), torch.enable_grad():
        target = F.softmax(model(x), 1).detach() if cfg.method == "trades" else None
        delta = 0.001 * noise if target is not None else _project(noise * eps * torch.rand(
            (x.shape[0],) + (1,) * (x.ndim - 1), generator=generator).to(x) / _norms(noise, cfg.pgd_norm), eps,
            cfg.pgd_norm)
        for _ in range(cfg.pgd_steps):
            delta = _clip(x, delta, bounds).requires_grad_(True)
            out = model(x + delta)
            loss = (F.kl_div(F.log_softmax(out, 1), target, reduction="sum") if target is not None
                    else F.cross_entropy(out, y, reduction="sum"))
            (g,) = torch.autograd.grad(loss, delta)
            direction = g.sign() if cfg.pgd_norm == "linf" else g / _norms(g, "l2").clamp_min(1e-12)
            delta = _project(delta.detach() + step * direction, eps, cfg.pgd_norm)
    return (x + _clip(x, delta, bounds)).detach()


def _norms(t: Tensor, norm: str) -> Tensor:
    """Per-sample norms of ``t``, shaped to broadcast against it."""
    flat = t.flatten(1)
    n = flat.norm(dim=1) if norm == "l2" else flat.abs().amax(1)
    return n.view((-1,) + (1,) * (t.ndim - 1))


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _norms(delta, "l2").clamp_min(1e-12)).clamp(max=1.0)


def _clip(x: Tensor, delta: Tensor, bounds: Optional[Tuple[Tensor, Tensor]]) -> Tensor:
    """``delta`` such that ``x + delta`` lies within ``bounds`` (unchanged without them)."""
    if bounds is None:
        return delta
    lo, hi = (b.to(x) for b in bounds)
    return torch.max(torch.min(x + delta, hi), lo) - x


def _global_sums(ce: Tensor, reg: Tensor, correct: int, n_local: int, world: int) -> Tuple[float, float, int, bool]:
    """Sums over the global batch of the per-sample cross-entropy and regularizer, correct count,
    and whether any rank's loss is non-finite (all-reduced, so every rank skips or stops alike)."""
    ce_v, reg_v = ce.detach().double(), reg.detach().double()
    bad = ~torch.isfinite(ce_v + reg_v)
    t = torch.stack([ce_v * n_local, reg_v * n_local, ce_v.new_tensor(float(correct)), bad.double()])
    if world > 1:
        dist.all_reduce(t)  # on the loss's device: gloo for CPU tensors, nccl for CUDA ones
    t = t.cpu()
    return t[0].item(), t[1].item(), int(t[2].item()), bool(t[3].item() > 0)


def _clone_with(model: nn.Module, state: dict) -> nn.Module:
    import copy

    m = copy.deepcopy(model)
    m.load_state_dict(state)
    return m
