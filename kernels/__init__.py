"""The ``triton`` backend of the ddfast ops (installed as ``ddfast.kernels``).

Importing this package is cheap: triton and the kernels are imported on first use. The
ops have the signatures and semantics of :mod:`ddfast.reference`; each lives in its own
module (``select_boundary.py``, ...) with its kernels and launcher.

Tensors: CUDA float32 / float16 / bfloat16 (float32 accumulation, outputs in the input
dtype). With ``TRITON_INTERPRET=1`` in the environment (set before triton is imported) the
same kernels also run on CPU tensors through triton's interpreter: that is how the tests
run them on a machine without a GPU.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["supports", "interpreting", "module", "select_boundary", "boundary_step", "deepdefense_penalty",
           "deepfool_update"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_triton_ok: Optional[bool] = None


def interpreting() -> bool:
    """True when triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_works() -> bool:
    global _triton_ok
    if _triton_ok is None:
        try:
            importlib.import_module("triton")
            _triton_ok = True
        except Exception:
            _triton_ok = False
    return _triton_ok


def supports(device, dtype: torch.dtype) -> bool:
    """Whether these kernels take tensors of ``device`` and ``dtype``: CUDA tensors of
    float32/float16/bfloat16 when triton and CUDA work, and CPU tensors of the same dtypes
    under ``TRITON_INTERPRET=1``."""
    kind = torch.device(device).type
    if dtype not in DTYPES:
        return False
    if kind == "cuda":
        return torch.cuda.is_available() and _triton_works()
    if kind == "cpu":
        return interpreting() and _triton_works()
    return False


def module(name: str):
    """The module ``kernels/<name>.py`` (its kernels and launcher), imported on first use.

    Importing a submodule makes the import system bind the *module* to the package
    attribute of the same name, which is the op's entry point here; the launcher is bound
    over it at once. Import the kernel modules through this function, not directly."""
    mod = importlib.import_module(f"{__name__}.{name}")
    globals()[name] = getattr(mod, name)
    return mod


def _op(name: str):
    return getattr(module(name), name)


def select_boundary(logits: Tensor, grads: Tensor, cand: Tensor, ref: Tensor, active: Tensor,
                    norm: float = 2.0, eps: float = 1e-4, diff: bool = False,
                    **config) -> Tuple[Tensor, Tensor, Tensor]:
    """See :func:`ddfast.reference.select_boundary`; ``config``: launcher block sizes."""
    return _op("select_boundary")(logits, grads, cand, ref, active, norm, eps, diff, **config)


def boundary_step(fdiff: Tensor, w: Tensor, norm: float = 2.0, eps: float = 1e-4,
                  **config) -> Tensor:
    """See :func:`ddfast.reference.boundary_step`."""
    return _op("boundary_step")(fdiff, w, norm, eps, **config)


def deepdefense_penalty(delta: Tensor, x: Tensor, correct: Tensor, c: float, d: float,
                        **config) -> Tensor:
    """See :func:`ddfast.reference.deepdefense_penalty`."""
    return _op("deepdefense_penalty")(delta, x, correct, c, d, **config)


def deepfool_update(x0: Tensor, r_tot: Tensor, r: Tensor, active: Tensor, overshoot: float,
                    lo: Optional[Tensor] = None, hi: Optional[Tensor] = None,
                    **config) -> Tuple[Tensor, Tensor]:
    """See :func:`ddfast.reference.deepfool_update`."""
    return _op("deepfool_update")(x0, r_tot, r, active, overshoot, lo, hi, **config)
