"""The package's layout: the core imports nothing of ddfast.paper (nor matplotlib), and the old names
ddfast.models / data / train / cli / reproduce / plots are the ddfast.paper modules."""
import subprocess
import sys

import pytest

from test_cli import SUBPROCESS_ENV

CORE = ("attack", "attacks", "regularizer", "jacobian", "regions", "ops", "backends", "validate", "reference",
        "metrics", "_cpu", "_cuda")
ALIAS_FILES = ("models", "data", "train", "cli")  # importable as ddfast.<name>
ATTRIBUTES = ALIAS_FILES + ("reproduce", "plots")  # attributes of ddfast only


def _run(code: str) -> None:
    """Run ``code`` in a fresh interpreter (nothing of ddfast imported yet)."""
    p = subprocess.run([sys.executable, "-c", code], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]


def test_core_imports_nothing_of_the_application():
    _run(f"""
import importlib, sys
import ddfast
for name in {CORE!r}:
    importlib.import_module("ddfast." + name)
# (not tqdm: torch.hub imports it when it is installed)
app = sorted(m for m in sys.modules if m.startswith("ddfast.paper") or m.split(".")[0] == "matplotlib")
assert not app, app
""")


@pytest.mark.parametrize("first", ["alias", "paper"])
def test_old_names_are_the_same_module_objects(first):
    """Whichever is imported first, the alias or the ddfast.paper module."""
    _run(f"""
import importlib
import ddfast
if {first!r} == "paper":
    import ddfast.paper.train, ddfast.paper.cli
import ddfast.train
from ddfast import train
from ddfast.train import fit
from ddfast.models import MLP
import ddfast.paper.train as paper_train
assert ddfast.train is train is paper_train and fit is paper_train.fit, (train, paper_train)
assert MLP is importlib.import_module("ddfast.paper.models").MLP
for name in {ALIAS_FILES!r}:
    paper = importlib.import_module("ddfast.paper." + name)
    assert importlib.import_module("ddfast." + name) is paper, name
for name in {ATTRIBUTES!r} + ("paper",):
    want = importlib.import_module("ddfast.paper" + ("" if name == "paper" else "." + name))
    assert getattr(ddfast, name) is want, name
""")
