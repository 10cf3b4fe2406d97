"""Compatibility alias: ``ddfast.models`` is :mod:`ddfast.paper.models` (the same module object)."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("ddfast.paper.models")
