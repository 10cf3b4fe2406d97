"""The application's optional dependencies, the ``paper`` extra (tqdm: progress bars, matplotlib:
plots): imported where used, with an ``ImportError`` that says how to install them. The core
library needs neither."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Iterable

__all__ = ["INSTALL", "import_extra", "require_extras", "progress_bar"]

INSTALL = 'pip install "ddfast[paper]"'
_PROGRESS = ("progress bars", 'turn them off instead: progress=False, CLI --no-progress')


def import_extra(name: str, needed_for: str, instead: str = "") -> ModuleType:
    """Module ``name`` of the ``paper`` extra; ``ImportError`` naming what needs it (``needed_for``),
    the install command and ``instead``, another way out, when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        alt = f" ({instead})" if instead else ""
        raise ImportError(f"{needed_for} need {name.split('.')[0]}, which is not installed: {INSTALL}{alt}") from exc


def require_extras(*, progress_bars: bool, plots: bool = False) -> None:
    """Fail before any work (``ImportError``, see :func:`import_extra`) when the progress bars or the
    plots asked for cannot be made."""
    if progress_bars:
        import_extra("tqdm.auto", *_PROGRESS)
    if plots:
        import_extra("matplotlib", "the plots")


def progress_bar(iterable: Iterable, **tqdm_kwargs) -> Iterable:
    """``tqdm(iterable, **tqdm_kwargs)`` (``tqdm.auto``)."""
    return import_extra("tqdm.auto", *_PROGRESS).tqdm(iterable, **tqdm_kwargs)
