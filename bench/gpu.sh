#!/usr/bin/env bash
# The GPU suite at the paper's base size, bf16, on one GPU, in about 8 minutes (H100):
#   0. the tests that need a GPU (tests/test_gpu.py: CUDA-graph decoding = the reference search);
#   1. decoding throughput: aiayn greedy and beam 4 (reference and fixed-shape searches; for
#      beam also the fixed-shape search before its double-buffered cache) vs Hugging Face
#      generate, same weights; then 5 turns of every row in turn (--interleave);
#   2. training throughput at 256 x 64 source + 256 x 64 target tokens: aiayn vs
#      torch.nn.Transformer vs Hugging Face Marian, eager and torch.compile'd, in one run;
#   3. the training kernels in pairs (bench/train_kernels.py): among them aiayn's blockwise
#      loss against F.cross_entropy, never measured on a GPU yet.
# Decoding runs first because it is short and bounded; compilation is the long, uncertain part.
# Each step runs under what is left of a total time limit (BUDGET_S, default 470 s); the JSON
# files are rewritten after every case, so a step stopped by the limit keeps what it measured.
#
#   bench/gpu.sh                      results in $OUT if set (the device tool), else bench/results
#   BUDGET_S=900 bench/gpu.sh         a longer total limit
#   DRY_RUN=1 bench/gpu.sh            print what would run, run nothing
#   TRAIN_ARGS="--modes compile --models aiayn,aiayn-unfused-loss,nn.Transformer" bench/gpu.sh
#                                     extra options for the training (or DECODE_ARGS: decoding) step
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT_DIR=${OUT:-bench/results}
BUDGET_S=${BUDGET_S:-470}
steps=(
    "bench.decode_throughput --device cuda --size base --dtype bf16 --repeats 5 --interleave 5 ${DECODE_ARGS:-}"
    "bench.train_throughput --device cuda --size base --dtype bf16 --compile --repeats 20 ${TRAIN_ARGS:-}"
    "bench.train_kernels --device cuda --size base --matmul-size 8192"
)
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

echo "GPU benchmark suite, base size, bf16; total time limit ${BUDGET_S}s; results in $OUT_DIR"
echo "runs, in order:"
echo "  $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py"
for step in "${steps[@]}"; do
    echo "  $PY -m $step --out $OUT_DIR"
done
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    exit 0
fi
mkdir -p "$OUT_DIR"
{
    # The card as found (clocks, temperature, other processes): read it, never change it.
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv ||
        echo "nvidia-smi not available"
    start=$(date +%s)
    status=0
    echo "+ $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py"
    timeout -k 10 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py || {
        echo "failed (exit $?): tests/test_gpu.py"
        status=1
    }
    for step in "${steps[@]}"; do
        left=$((BUDGET_S - ($(date +%s) - start)))
        if ((left < 30)); then
            echo "skipped (time limit spent): $step"
            status=1
            continue
        fi
        echo "+ $PY -m $step --out $OUT_DIR    (time left: ${left}s)"
        # shellcheck disable=SC2086  # $step is a list of words on purpose
        timeout -k 10 "$left" "$PY" -m $step --out "$OUT_DIR" || {
            echo "failed or stopped (exit $?): $step"
            status=1
        }
    done
    echo "suite finished in $(($(date +%s) - start))s, status $status"
    exit "$status"
} 2>&1 | tee "$OUT_DIR/gpu-suite.log"
