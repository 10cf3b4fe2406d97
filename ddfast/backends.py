"""Backend registry: which implementation of the ops runs for a tensor.

A backend is a module that exposes the four ops with the signatures of
:mod:`ddfast.reference` plus ``supports(device, dtype) -> bool``. Backends:

* ``torch``  -- :mod:`ddfast.reference`, any device and float dtype;
* ``cpu``    -- C++/OpenMP (``ddfast._C``), CPU float32/float64;
* ``triton`` -- :mod:`ddfast.kernels`, CUDA tensors (CPU too under ``TRITON_INTERPRET=1``);
* ``cuda``   -- ``ddfast._C_cuda``, CUDA tensors.

torch's dispatcher picks the device (each op registers one kernel per device type in
:mod:`ddfast.ops`); this registry picks the backend of that device: an explicit ``backend=``
argument of a public entry point (which sets :func:`set_backend` for the call), else
:func:`set_backend`, else the ``DDFAST_BACKEND`` environment variable, else the fastest
backend available for the tensor's device and dtype.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
from types import ModuleType
from typing import Callable, Dict, Iterator, List, Optional, Union

import torch

__all__ = ["BACKENDS", "available_backends", "set_backend", "get_backend", "using", "resolve", "load",
           "check_name", "implementation"]

#: Every backend name.
BACKENDS = ("cuda", "triton", "cpu", "torch")
#: Order of preference of the default choice, per device type (the Triton interpreter on
#: CPU tensors exists for testing and is the slowest).
_PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "triton", "torch")}

_MODULES = {
    "torch": "ddfast.reference",
    "cpu": "ddfast._cpu",
    "triton": "ddfast.kernels",
    "cuda": "ddfast._cuda",
}

_loaded: Dict[str, Optional[ModuleType]] = {}
_load_errors: Dict[str, str] = {}
_state = threading.local()


def load(name: str) -> Optional[ModuleType]:
    """The backend's module, or None when it cannot be imported here (reason kept)."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {sorted(_MODULES)}, got {name!r}")
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except Exception as exc:  # an optional backend that is absent here
            _loaded[name] = None
            _load_errors[name] = f"{type(exc).__name__}: {exc}"
    return _loaded[name]


def _supports(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    if name == "torch":
        return dtype.is_floating_point
    mod = load(name)
    return mod is not None and bool(mod.supports(device, dtype))


def available_backends(device: Union[str, torch.device, None] = None,
                       dtype: torch.dtype = torch.float32) -> List[str]:
    """Names of the backends usable for tensors of ``device`` (default CPU) and ``dtype``,
    fastest first."""
    device = torch.device(device if device is not None else "cpu")
    return [b for b in _preference(device) if _supports(b, device, dtype)]


def _preference(device: torch.device):
    return _PREFERENCE.get(device.type, BACKENDS)


def check_name(name: Optional[str], what: str = "backend") -> Optional[str]:
    """``name`` is None or a backend name; else a ValueError naming ``what``."""
    if name is not None and name not in _MODULES:
        raise ValueError(f"{what} must be one of {sorted(_MODULES)} or None, got {name!r}")
    return name


class set_backend:
    """Choose the backend for later calls (``None`` restores the default choice).

    Works as a plain call or as a context manager that restores the previous choice::

        ddfast.set_backend("torch")
        with ddfast.set_backend("cpu"):
            ...
    """

    def __init__(self, name: Optional[str]):
        check_name(name)
        self._previous = getattr(_state, "name", None)
        _state.name = name

    def __enter__(self) -> set_backend:
        return self

    def __exit__(self, *exc) -> None:
        _state.name = self._previous


def get_backend() -> Optional[str]:
    """The backend chosen by :func:`set_backend` or ``DDFAST_BACKEND`` (None: automatic)."""
    name = getattr(_state, "name", None)
    if name is None:
        name = os.environ.get("DDFAST_BACKEND") or None
    return name


@contextlib.contextmanager
def using(name: Optional[str]) -> Iterator[None]:
    """:func:`set_backend` for a block when ``name`` is given; nothing when it is None."""
    if name is None:
        yield
        return
    with set_backend(name):
        yield


def implementation(op: str, device: torch.device, dtype: torch.dtype) -> Callable:
    """The function of the backend that runs ``op`` for tensors of ``device`` and ``dtype``."""
    return getattr(load(resolve(None, device, dtype)), op)


def resolve(name: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs a call on ``device``/``dtype``; an explicit choice that cannot
    run there raises a ValueError that says why."""
    if name is None:
        name = get_backend()
    if name is None:
        for b in _preference(device):
            if _supports(b, device, dtype):
                return b
        raise ValueError(f"no ddfast backend supports {device} tensors of dtype {dtype}")
    check_name(name)
    if not _supports(name, device, dtype):
        why = _load_errors.get(name, f"it does not take {device} tensors of dtype {dtype}")
        raise ValueError(f"backend {name!r} cannot run here: {why}")
    return name
