"""ddfast: fast batched DeepFool and the differentiable DeepDefense regularizer for PyTorch.

* :func:`deepfool` -- batched multi-class DeepFool (L2 / Linf) with per-sample early exit.
* :func:`deepdefense_loss` / :class:`DeepDefense` -- the DeepDefense regularizer, an unrolled
  differentiable DeepFool (gradients reach the parameters through every step).
* :mod:`ddfast.ops` -- the fused step ops (``torch.library`` custom ops) and their backends.
"""
from . import attacks, ops, reference
from .attack import DeepFoolResult, deepfool
from .backends import available_backends, get_backend, set_backend
from .regularizer import DeepDefense, deepdefense_loss

__version__ = "0.1.0"

__all__ = [
    "deepfool",
    "DeepFoolResult",
    "deepdefense_loss",
    "DeepDefense",
    "attacks",
    "ops",
    "reference",
    "available_backends",
    "set_backend",
    "get_backend",
]
