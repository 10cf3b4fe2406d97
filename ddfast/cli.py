"""Compatibility alias: ``ddfast.cli`` is :mod:`ddfast.paper.cli` (the same module object), and
``python -m ddfast.cli`` (or ``torchrun ... -m ddfast.cli``) still runs the command."""
import importlib
import sys

if __name__ == "__main__":
    sys.exit(importlib.import_module("ddfast.paper.cli").main())
sys.modules[__name__] = importlib.import_module("ddfast.paper.cli")
