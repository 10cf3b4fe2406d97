#!/usr/bin/env bash
# One short visit to a machine with a CUDA GPU: build ddfast for its card, run the GPU tests and
# the GPU benchmarks, writing logs and results into OUTDIR. Stages run in the order given.
#
#   bench/gpu_session.sh OUTDIR STAGE [STAGE ...]
#
#   env         nvidia-smi, python, torch, triton versions            -> OUTDIR/session.log
#   peers       pip install --no-index --no-deps the wheels in $WHEELS (default .whl/) into
#               /tmp/site (foolbox, torchattacks, ART, adv-lib and the small packages they import;
#               bench/install-peers.sh --download .whl fetches them, see bench/README.md), then
#               checks that every peer imports
#   build       pip install -e . (compiled modules in place, as bench/ imports the checkout) for this card only (DDFAST_CUDA_ARCHS = its SM version)
#   tests       the GPU tests (tests/test_gpu.py, test_cuda.py, test_triton.py, test_ops_backends.py)
#   ops         bench/ops.py --device cuda                            -> OUTDIR/ops_cuda.json
#   throughput  bench/deepfool_throughput.py --quick --device cuda    -> OUTDIR/deepfool_throughput_cuda.*
#               (parameters frozen), and with --keep-param-grad       -> OUTDIR/deepfool_throughput_cuda_param_grad.*
#   step        bench/deepdefense_step.py --device cuda (MLP and LeNet) -> OUTDIR/deepdefense_step_cuda.json
#   sdf         bench/superdeepfool.py --device cuda: SuperDeepFool against adv-lib's sdf, df, ddn, alma
#               -> OUTDIR/superdeepfool_cuda.{json,png}
#   matrix      bench/matrix.py --device cuda: DeepFool img/s at batch 100 / 1000 / 10000 on the MLP,
#               LeNet and ResNet-18 for ddfast, foolbox, adv-lib, torchattacks, ART; the training
#               step (CE, PGD-10, TRADES, DeepDefense; eager and CUDA graph) -> OUTDIR/matrix_cuda.{json,png}
#               Its own limit $MATRIX_TIMEOUT (default 420 s); the script skips the DeepFool cells
#               that would start after MATRIX_TIMEOUT - 60 s, so its JSON is always written.
#
# Each stage's output is appended to OUTDIR/session.log; a failing stage is reported and the
# next one still runs. Stage time limits: $STAGE_TIMEOUT seconds (default 240).
set -uo pipefail

OUTDIR="$1"; shift
cd "$(dirname "$0")/.."
REPO="$PWD"
PY="${PYTHON:-python3}"
LOG="$OUTDIR/session.log"
LIMIT="${STAGE_TIMEOUT:-240}"
MATRIX_LIMIT="${MATRIX_TIMEOUT:-420}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"

stage() {  # [STAGE_LIMIT=seconds] stage NAME COMMAND...
    local name="$1"; shift
    echo "=== $name ($(date +%T))" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "${STAGE_LIMIT:-$LIMIT}" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

for s in "$@"; do
    case "$s" in
        env)
            stage env bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nvcc --version | tail -1;
                $PY -c 'import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name())'" ;;
        peers)
            stage peers bash -c "$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHEELS:-.whl}/*.whl"
            export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
            stage peers_import $PY -c 'import sys; sys.path.insert(0, "bench"); import peers; print(peers.available())' ;;
        build)
            arch=$($PY -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")')
            stage "build (sm_$arch)" env DDFAST_CUDA_ARCHS="$arch" $PY -m pip install --no-build-isolation --no-deps -q -e "$REPO"
            stage "import" bash -c "cd /tmp && $PY -c 'import ddfast, ddfast._C_cuda; print(ddfast.__file__, ddfast.available_backends(\"cuda\"))'" ;;
        tests)
            # from tests/: the installed ddfast (with its compiled modules), not the source tree
            stage tests bash -c "cd '$REPO/tests' && $PY -m pytest -q -p no:cacheprovider -rs test_gpu.py test_cuda.py test_triton.py test_ops_backends.py" ;;
        ops)
            stage ops $PY bench/ops.py --device cuda --json "$OUTDIR/ops_cuda.json" ;;
        throughput)
            stage throughput $PY bench/deepfool_throughput.py --quick --device cuda --json "$OUTDIR/deepfool_throughput_cuda.json"
            # the earlier GPU numbers kept the parameters requiring grad: the same run that way
            stage throughput_param_grad $PY bench/deepfool_throughput.py --quick --no-candidates --keep-param-grad \
                --device cuda --json "$OUTDIR/deepfool_throughput_cuda_param_grad.json" ;;
        step)
            stage step $PY bench/deepdefense_step.py --device cuda --out "$OUTDIR/deepdefense_step_cuda.json" ;;
        sdf)
            stage sdf $PY bench/superdeepfool.py --device cuda --repeat 5 --candidates all \
                --json "$OUTDIR/superdeepfool_cuda.json" ;;
        matrix)
            STAGE_LIMIT="$MATRIX_LIMIT" stage matrix $PY bench/matrix.py --device cuda --budget-s $((MATRIX_LIMIT - 60)) \
                --json "$OUTDIR/matrix_cuda.json" ;;
        *)
            echo "gpu_session.sh: unknown stage $s" | tee -a "$LOG" ;;
    esac
done
