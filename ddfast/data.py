"""Compatibility alias: ``ddfast.data`` is :mod:`ddfast.paper.data` (the same module object)."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("ddfast.paper.data")
