"""ddfast: fast batched DeepFool and the differentiable DeepDefense regularizer for PyTorch.

* :func:`deepfool` -- batched multi-class DeepFool (L2 / Linf) with per-sample early exit.
* :func:`deepdefense_loss` / :class:`DeepDefense` -- the DeepDefense regularizer, an unrolled
  differentiable DeepFool (gradients reach the parameters through every step).
* :mod:`ddfast.ops` -- the fused step ops (``torch.library`` custom ops) and their backends.
* :mod:`ddfast.metrics`, :mod:`ddfast.data`, :mod:`ddfast.models`, :mod:`ddfast.train` --
  the paper's robustness metrics, MNIST/CIFAR readers, networks and training (imported on
  first use, so ``import ddfast`` stays light).
"""
import importlib

from . import attacks, ops, reference
from .attack import DeepFoolResult, NonFiniteLogitsError, deepfool
from .backends import available_backends, get_backend, set_backend
from .guard import BatchCoupledModelError
from .regularizer import DeepDefense, DeepDefenseInfo, deepdefense_loss
from .superdeepfool import superdeepfool

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("data", "models", "metrics", "train", "reproduce", "plots", "cli", "jacobian", "paper")

__all__ = [
    "deepfool",
    "superdeepfool",
    "DeepFoolResult",
    "NonFiniteLogitsError",
    "BatchCoupledModelError",
    "deepdefense_loss",
    "DeepDefense",
    "DeepDefenseInfo",
    "attacks",
    "ops",
    "reference",
    "available_backends",
    "set_backend",
    "get_backend",
    *_LAZY_SUBMODULES,
]


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        # the paper's application lives in ddfast.paper; ddfast.train etc. are the same modules
        paper = name in ("data", "models", "train", "reproduce", "plots", "cli")
        return importlib.import_module(f".paper.{name}" if paper else f".{name}", __name__)
    raise AttributeError(f"module 'ddfast' has no attribute {name!r}")
