"""The ddfast these tests import runs the compiled backends that the build produced: a checkout
that shadows the installed package without its native modules must fail here."""
import importlib
import importlib.metadata
import re
from pathlib import Path

import pytest
import torch

import ddfast
from ddfast import backends

PACKAGE_DIR = Path(ddfast.__file__).resolve().parent
NATIVE = {"_C": "cpu", "_C_cuda": "cuda"}


def _built_modules():
    """Names of the native modules the build produced: those the installed distribution
    records, and those beside the imported package."""
    names = set()
    try:
        files = importlib.metadata.files("ddfast") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in list(files) + list(PACKAGE_DIR.glob("_C*")):
        m = re.fullmatch(r"(_C(?:_cuda)?)\..*(so|pyd)", Path(str(f)).name)
        if m:
            names.add(m.group(1))
    return names


BUILT = _built_modules()


@pytest.mark.skipif(not BUILT, reason="no native module was built")
@pytest.mark.parametrize("module", sorted(NATIVE))
def test_every_built_module_is_beside_the_imported_package(module):
    if module not in BUILT:
        pytest.skip(f"ddfast.{module} was not built")
    found = [p.name for p in PACKAGE_DIR.glob(f"{module}.*") if p.suffix in (".so", ".pyd")]
    assert found, (f"ddfast.{module} was built, but the imported ddfast ({PACKAGE_DIR}) has no copy of it: "
                   f"a source tree without its compiled modules shadows the installed package")
    mod = importlib.import_module(f"ddfast.{module}")
    assert Path(mod.__file__).resolve().parent == PACKAGE_DIR


@pytest.mark.skipif("_C" not in BUILT, reason="ddfast._C was not built")
def test_the_cpu_backend_runs_by_default():
    assert backends.load("cpu") is not None, backends._load_errors.get("cpu")
    assert ddfast.available_backends("cpu")[0] == "cpu"
    assert backends.resolve(None, torch.device("cpu"), torch.float32) == "cpu"
