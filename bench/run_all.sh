#!/usr/bin/env bash
# Run every benchmark of bench/ and refresh bench/results/ (JSON + PNG) and the tables of
# bench/README.md.
#
#   bench/run_all.sh [--quick] [--device cpu|cuda] [--python PYTHON] [--install-peers]
#
#   --quick          smaller runs (minutes); results go to bench/results/quick/, README untouched
#   --device cuda    the GPU suite: ops on the CUDA/Triton backends, DeepFool throughput against
#                    the peers and the matrix on the GPU (files get the suffix _cuda; the card's name
#                    is in the JSON)
#   --install-peers  run bench/install-peers.sh first (foolbox, torchattacks, ART, deeprobust, adv-lib)
#
# The matrix (bench/matrix.py) runs in both: on the CPU its CPU-sized profile (MLP at batch 100 and
# 1000, LeNet at 100 and 500, ResNet-18 at 2 on 2 images; ~25 min on 2 busy shared cores)
# -> results/matrix_cpu.{json,png}.
#
# The benchmarks run one after another (never two at once: they time each other otherwise).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=python
DEVICE=cpu
QUICK=0
INSTALL=0
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --device) DEVICE="$2"; shift ;;
        --python) PY="$2"; shift ;;
        --install-peers) INSTALL=1 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "run_all.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

if [ "$INSTALL" = 1 ]; then
    bench/install-peers.sh "$PY"
fi

OUT=bench/results
[ "$QUICK" = 1 ] && OUT=bench/results/quick
mkdir -p "$OUT"
SUF=""
[ "$DEVICE" != cpu ] && SUF="_$DEVICE"

step() { echo; echo "=== $*"; }
failed=()
run() {  # run a benchmark; a failure is reported at the end, the others still run
    if ! "$@"; then failed+=("$*"); fi
}

start=$(date +%s)
if [ "$DEVICE" = cpu ]; then
    step "deepfool_floor (ddfast against the Jacobian floor)"
    if [ "$QUICK" = 1 ]; then
        run "$PY" bench/deepfool_floor.py --n 500 --repeat 2 --json "$OUT/deepfool_floor.json"
    else
        run "$PY" bench/deepfool_floor.py --json "$OUT/deepfool_floor.json"
        run "$PY" bench/deepfool_floor.py --clip --batch-size 100 --json "$OUT/deepfool_floor_clip.json"
    fi

    step "deepdefense_step (a DeepDefense training step against a cross-entropy step)"
    if [ "$QUICK" = 1 ]; then
        run "$PY" bench/deepdefense_step.py --rounds 5 --naive-rounds 2 --out "$OUT/deepdefense_step.json"
    else
        run "$PY" bench/deepdefense_step.py --out "$OUT/deepdefense_step.json"
    fi
fi

step "ops ($DEVICE backends against the torch composition)"
if [ "$QUICK" = 1 ]; then
    run "$PY" bench/ops.py --device "$DEVICE" --repeat 3 --json "$OUT/ops_$DEVICE.json"
else
    run "$PY" bench/ops.py --device "$DEVICE" --json "$OUT/ops_$DEVICE.json"
fi

step "deepfool_throughput (ddfast against foolbox, torchattacks, ART, deeprobust, naive)"
if [ "$QUICK" = 1 ]; then
    run "$PY" bench/deepfool_throughput.py --quick --device "$DEVICE" --json "$OUT/deepfool_throughput$SUF.json"
else
    run "$PY" bench/deepfool_throughput.py --device "$DEVICE" --json "$OUT/deepfool_throughput$SUF.json"
    # the same comparison with the parameters requiring grad, as a model comes (MLP, 1000 images)
    run "$PY" bench/deepfool_throughput.py --quick --no-candidates --keep-param-grad --device "$DEVICE" \
        --json "$OUT/deepfool_throughput${SUF}_param_grad.json"
    # and the full MLP run that way (the setting of the issue's targets before freezing was added)
    run "$PY" bench/deepfool_throughput.py --models mlp --no-candidates --keep-param-grad --device "$DEVICE" \
        --json "$OUT/deepfool_throughput${SUF}_param_grad_full.json"
fi

step "matrix (DeepFool img/s x batch size x implementation; training step per method)"
if [ "$QUICK" = 1 ]; then
    run "$PY" bench/matrix.py --device "$DEVICE" --models mlp,lenet --max-images 200 --train-rounds 2 \
        --json "$OUT/matrix_$DEVICE.json"
else
    run "$PY" bench/matrix.py --device "$DEVICE" --json "$OUT/matrix_$DEVICE.json"
fi

if [ "$QUICK" = 0 ]; then
    step "README tables"
    run "$PY" bench/tables.py
fi

echo
echo "run_all.sh: done in $(( $(date +%s) - start )) s; results in $OUT/"
if [ "${#failed[@]}" -gt 0 ]; then
    printf 'run_all.sh: FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
