#!/usr/bin/env bash
# Time to quality on one GPU: Multi30k de->en and en->de trained with `aiayn train` (bf16),
# every checkpoint scored on test_2016_flickr (beam 4), results in $OUT (or bench/results).
#
#   bench/gpu_ttq.sh DATA_ROOT                 both directions at once on the one GPU
#   SEQUENTIAL=1 bench/gpu_ttq.sh DATA_ROOT    one after the other (each alone on the card)
#   MAX_STEPS=4000 bench/gpu_ttq.sh DATA_ROOT  steps per run (default 4000)
#   MIN_STEP=1500 bench/gpu_ttq.sh DATA_ROOT   score only checkpoints from this step on
#
# Run at once, the two trainings share the card, so each one's time is an upper bound on its
# time alone. DATA_ROOT is a local copy of the Multi30k files (../shared/data/multi30k).
set -uo pipefail
cd "$(dirname "$0")/.."
root=${1:?usage: bench/gpu_ttq.sh DATA_ROOT}
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-bench/results}
RUNS=${RUNS_DIR:-/tmp/aiayn-ttq}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT_DIR" "$RUNS"
run() {  # $1 = de_en or en_de
    "$PY" -m bench.time_to_quality --config "configs/multi30k_$1.yaml" --data-root "$root" \
        --run-dir "$RUNS/$1" --out "$OUT_DIR" --min-step "${MIN_STEP:-0}" -- --train.max_steps "${MAX_STEPS:-4000}" \
        --train.precision bf16 >"$OUT_DIR/ttq-$1.log" 2>&1
    echo "$1 finished with exit $?"
}
start=$(date +%s)
if [[ "${SEQUENTIAL:-0}" == 1 ]]; then
    run de_en
    run en_de
else
    run de_en &
    run en_de &
    wait
fi
echo "time to quality: both directions done in $(($(date +%s) - start)) s"
tail -n 14 "$OUT_DIR"/ttq-*.log
