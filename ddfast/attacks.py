"""Drop-in attack classes for users of other libraries.

``ddfast.attacks.DeepFool(model, steps=50, overshoot=0.02)(images, labels)`` returns the
adversarial images, like ``torchattacks.DeepFool``, computed by :func:`ddfast.deepfool`.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

from torch import Tensor

from .attack import DeepFoolResult, deepfool
from .validate import check_batch_size, check_bounds, check_candidates, check_max_iter, check_nonneg, norm_value

__all__ = ["DeepFool"]


class DeepFool:
    """torchattacks-style DeepFool.

    Args:
        model: callable mapping images [B, ...] to logits [B, K].
        steps: maximum DeepFool iterations (``max_iter``).
        overshoot: iterate is ``x + (1 + overshoot) * r_tot``.
        norm: 2 or ``float("inf")``.
        candidates: top-k classes considered (None: all).
        bounds: clip of every iterate; ``(0, 1)`` by default as torchattacks' images are in
            [0, 1] (torchattacks clamps each step to [0, 1]); None for no clipping.
        batch_size: optional chunk size.

    Calling it with ``(images, labels)`` returns adversarial images of the images' shape;
    the full result of the last call is kept in ``self.last_result``. Bad settings raise a
    ValueError or TypeError naming the argument here, not at the first call.
    """

    def __init__(self, model: Callable[[Tensor], Tensor], steps: int = 50, overshoot: float = 0.02,
                 norm: Union[int, float, str] = 2, candidates: Optional[int] = None,
                 bounds: Optional[Tuple[Optional[float], Optional[float]]] = (0.0, 1.0),
                 batch_size: Optional[int] = None):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        self.model = model
        self.steps = check_max_iter(steps, "steps")
        self.overshoot = check_nonneg(overshoot, "overshoot")
        norm_value(norm)
        self.norm = norm
        self.candidates = check_candidates(candidates)
        check_bounds(bounds)
        self.bounds = bounds
        self.batch_size = check_batch_size(batch_size)
        self.last_result: Optional[DeepFoolResult] = None

    def __call__(self, images: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        res = deepfool(self.model, images, labels, max_iter=self.steps, overshoot=self.overshoot,
                       norm=self.norm, candidates=self.candidates, bounds=self.bounds,
                       batch_size=self.batch_size)
        self.last_result = res
        return res.x_adv

    forward = __call__

    def __repr__(self) -> str:
        return (f"DeepFool(steps={self.steps}, overshoot={self.overshoot}, norm={self.norm}, "
                f"candidates={self.candidates}, bounds={self.bounds})")
