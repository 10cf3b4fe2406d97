#!/usr/bin/env bash
# Install the attack libraries that bench/deepfool_throughput.py compares ddfast against,
# into the environment of the given interpreter (default: `python`), WITHOUT touching torch.
#
#   bench/install-peers.sh [PYTHON]
#   bench/install-peers.sh --download DIR [PYTHON_VERSION]   # wheels for a machine without a registry
#
# --download puts the wheels of every peer and dependency below into DIR (no install) for
# CPython PYTHON_VERSION (default 3.12, the lent GPU machines' Python) on manylinux x86_64:
# `bench/install-peers.sh --download .whl` before a GPU session, whose `peers` stage
# (bench/gpu_session.sh) installs them with --no-index --no-deps (~50 MB).
#
# Every package is installed with `pip install --no-deps`, so pip never resolves (and never
# up- or downgrades) torch or torchvision. The peers' own dependency lists name torchvision
# (torchattacks, deeprobust) and, for deeprobust, a dozen heavy packages; none of them is
# needed for the DeepFool code paths the benchmark calls, so only the small packages that the
# imports below really need are installed. The script fails if torch's version changed.
#
# Peers (versions the benchmark was written against):
#   foolbox 3.3.4                          needs eagerpy, GitPython (gitdb, smmap), typing_extensions, requests, scipy
#   torchattacks 3.5.1                     needs scipy, tqdm, requests
#   adversarial-robustness-toolbox 1.20.1  needs scipy, scikit-learn (joblib, threadpoolctl, narwhals, cloudpickle), six, tqdm
#   deeprobust 0.2.11                      its package __init__ imports torchvision and more; bench/peers.py loads
#                                          only deeprobust/image/attack/deepfool.py (numpy + torch), so no extra deps
#   adv-lib 0.2.8                          ddfast.robustness (the independent evaluation: APGD, FAB, FMN) and
#                                          bench/peers.py (its df); they need tqdm, numpy, setuptools (distutils on
#                                          Python >= 3.12); adv_lib.attacks' __init__ imports torchvision (ALMA's LPIPS)
#                                          and visdom, which both loaders avoid
set -euo pipefail
BENCH="$(cd "$(dirname "$0")" && pwd)"

PEERS=(
    "foolbox==3.3.4"
    "eagerpy==0.30.0"
    "torchattacks==3.5.1"
    "adversarial-robustness-toolbox==1.20.1"
    "deeprobust==0.2.11"
    "adv-lib==0.2.8"
)
# Small dependencies the peers import (checked by importing them, see the table above).
DEPS=(
    "GitPython" "gitdb" "smmap"          # foolbox (foolbox.zoo imports git at import time)
    "typing_extensions" "requests" "urllib3" "idna" "charset-normalizer" "certifi"
    "scipy" "tqdm" "six" "setuptools"
    "scikit-learn" "joblib" "threadpoolctl" "narwhals" "cloudpickle"   # ART imports sklearn (joblib: cloudpickle)
    "numpy" "packaging"                  # every peer imports numpy; ART packaging (torch does not pull them)
)

if [ "${1:-}" = "--download" ]; then
    DIR="${2:?install-peers: --download needs a directory}"
    PYV="${3:-3.12}"
    abi="cp${PYV/./}"
    set -x
    python -m pip download --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp --abi "$abi" \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        -d "$DIR" "${PEERS[@]}" "${DEPS[@]}"
    exit 0
fi

PY="${1:-python}"
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "install-peers: interpreter '$PY' not found" >&2
    exit 2
fi

torch_version() { "$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo "none"; }
before="$(torch_version)"
echo "install-peers: $("$PY" -c 'import sys; print(sys.executable)'), torch $before"
# Only install a dependency that is missing: an existing scipy / numpy stays as it is.
missing=()
for d in "${DEPS[@]}"; do
    if ! "$PY" -m pip show -q "$d" >/dev/null 2>&1; then
        missing+=("$d")
    fi
done

"$PY" -m pip install --no-deps --disable-pip-version-check -q "${PEERS[@]}"
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-peers: installing missing dependencies: ${missing[*]}"
    "$PY" -m pip install --no-deps --disable-pip-version-check -q "${missing[@]}"
fi

after="$(torch_version)"
if [ "$before" != "$after" ]; then
    echo "install-peers: torch changed from $before to $after -- this must not happen" >&2
    exit 1
fi

# Check that every peer's DeepFool imports (this is what the benchmark calls).
status=0
BENCH="$BENCH" "$PY" - <<'EOF' || status=$?
import sys, os
here = os.getcwd()
ok = True
def check(name, fn):
    global ok
    try:
        fn()
        print(f"install-peers: {name:14s} ok")
    except Exception as e:  # report and go on: the benchmark skips what does not import
        ok = False
        print(f"install-peers: {name:14s} FAILED: {type(e).__name__}: {e}")

check("foolbox", lambda: __import__("foolbox").attacks.L2DeepFoolAttack)
check("torchattacks", lambda: __import__("torchattacks").DeepFool)
def art():
    from art.attacks.evasion import DeepFool  # noqa: F401
    from art.estimators.classification import PyTorchClassifier  # noqa: F401
check("art", art)
def deeprobust():
    # same loader as bench/peers.py: skip deeprobust's package __init__ (it imports torchvision)
    import importlib.util, types
    spec = importlib.util.find_spec("deeprobust")
    root = os.path.dirname(spec.origin)
    for name, sub in [("deeprobust", ""), ("deeprobust.image", "image"), ("deeprobust.image.attack", "image/attack")]:
        if name not in sys.modules:
            m = types.ModuleType(name); m.__path__ = [os.path.join(root, sub)]; sys.modules[name] = m
    from deeprobust.image.attack.deepfool import deepfool  # noqa: F401
check("deeprobust", deeprobust)
def adv_lib():
    sys.path.insert(0, here)  # ddfast from the checkout the script runs in (CI: the repository root)
    from ddfast.robustness import load_adv_lib
    load_adv_lib()
check("adv-lib", adv_lib)
sys.path.insert(0, os.environ["BENCH"])
check("adv-lib df", lambda: __import__("peers")._load_advlib_df())  # bench/peers.py's loader
sys.exit(0 if ok else 1)
EOF
echo "install-peers: torch still $after"
exit "$status"
