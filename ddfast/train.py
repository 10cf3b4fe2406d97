"""Compatibility alias: ``ddfast.train`` is :mod:`ddfast.paper.train` (the same module object)."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("ddfast.paper.train")
