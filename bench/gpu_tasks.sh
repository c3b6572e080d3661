#!/usr/bin/env bash
# Issue-4 results on one GPU, in one go (all runs share the card; each is time-limited):
#   SST-2 from scratch (configs/sst2.yaml); the same with 4 layers on all of SST-2 and on 1% of it
#   (the from-scratch side of the pre-training comparison); all-MiniLM-L6-v2 fine-tuned on SST-2;
#   IMDB from scratch; BBC headline and summary generation (then ROUGE on the test split);
#   masked-LM pre-training on IMDB + BBC, then fine-tuning on all of SST-2 and on 1% of it.
#
#   bench/gpu_tasks.sh DATA_ROOT MINILM_DIR
#
# DATA_ROOT holds sst2/, imdb/, bbc_news_summary/ as ../shared/data does; MINILM_DIR the
# all-MiniLM-L6-v2 folder. Results in $OUT (or bench/results/tasks-<date>): each run's
# train.jsonl, config.yaml, test scores, and the logs. T_SHORT / T_LONG: seconds of training
# for the short runs, and for IMDB and the pre-training. The pre-training comparison gives both
# sides the same budget in steps: STEPS_FULL on all of SST-2, STEPS_1PCT on 1% of it (606
# sentences), with a safety time limit of T_LONG. CMD_TIMEOUT: the limit of any one command.
set -uo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: bench/gpu_tasks.sh DATA_ROOT MINILM_DIR}
minilm=${2:?usage: bench/gpu_tasks.sh DATA_ROOT MINILM_DIR}
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-bench/results/tasks-$(date +%Y-%m-%dT%H%M)}
RUNS=${RUNS_DIR:-/tmp/aiayn-tasks}
T_SHORT=${T_SHORT:-120}
T_LONG=${T_LONG:-150}
STEPS_FULL=${STEPS_FULL:-1500}
STEPS_1PCT=${STEPS_1PCT:-500}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=2
mkdir -p "$OUT_DIR" "$RUNS"
start=$(date +%s)

aiayn() {  # aiayn NAME ARGS...: run `aiayn ARGS` with its output in $OUT_DIR/NAME.log
    local name=$1
    shift
    echo "+ [$(($(date +%s) - start)) s] aiayn $*" | tee -a "$OUT_DIR/commands.txt"
    timeout -k 10 "${CMD_TIMEOUT:-300}" "$PY" -m aiayn.cli "$@" >"$OUT_DIR/$name.log" 2>&1
    echo "  [$(($(date +%s) - start)) s] $name: exit $?" | tee -a "$OUT_DIR/commands.txt"
}
summaries() {  # summaries NAME CONFIG: train, then score the test split and the lead baselines
    aiayn "$1" train "$2" --data.path "$data/bbc_news_summary/bbc_news_summary.jsonl.gz" \
        --run_dir "$RUNS/$1" --train.max_time_s "$T_SHORT" --quiet
    aiayn "$1-test" summarize --checkpoint "$RUNS/$1" --split test --device cuda --json \
        --output "$OUT_DIR/$1-test.txt"
}
# SST-2's three files, plain or gzip'd (smaller to carry).
sst2_data=(--data.root "$data/sst2")
if [[ -f "$data/sst2/train.tsv.gz" ]]; then
    sst2_data+=(--data.train_file train.tsv.gz --data.valid_file dev.tsv.gz
        --data.test_file test.tsv.gz)
fi
# The fine-tuning budget, the same from scratch and from the pre-trained model.
full=(--train.max_steps "$STEPS_FULL" --train.max_time_s "$T_LONG")
onepct=(--data.max_train_examples 606 --train.max_steps "$STEPS_1PCT" --train.warmup_steps 100
    --train.eval_every 100 --train.save_every 100 --train.max_time_s "$T_LONG")
pretrain_then_finetune() {
    aiayn mlm train configs/pretrain_mlm.yaml --data.root "$data" --run_dir "$RUNS/mlm" \
        --train.warmup_steps 500 --train.max_time_s "$T_LONG" --quiet
    aiayn sst2_pretrained finetune --from "$RUNS/mlm" configs/sst2_pretrained.yaml \
        "${sst2_data[@]}" --run_dir "$RUNS/sst2_pretrained" "${full[@]}" --quiet &
    aiayn sst2_pretrained_1pct finetune --from "$RUNS/mlm" configs/sst2_pretrained.yaml \
        "${sst2_data[@]}" --run_dir "$RUNS/sst2_pretrained_1pct" "${onepct[@]}" --quiet &
    wait
}

nvidia-smi --query-gpu=name,memory.used --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
sst2=(configs/sst2.yaml "${sst2_data[@]}" --quiet)
aiayn sst2 train "${sst2[@]}" --run_dir "$RUNS/sst2" --train.max_time_s "$T_SHORT" &
aiayn sst2_l4 train "${sst2[@]}" --run_dir "$RUNS/sst2_l4" --model.n_encoder_layers 4 \
    "${full[@]}" &
aiayn sst2_l4_1pct train "${sst2[@]}" --run_dir "$RUNS/sst2_l4_1pct" \
    --model.n_encoder_layers 4 "${onepct[@]}" &
aiayn sst2_minilm finetune --from "$minilm" configs/sst2_minilm.yaml "${sst2_data[@]}" \
    --run_dir "$RUNS/sst2_minilm" --train.max_time_s "$T_SHORT" --quiet &
aiayn imdb train configs/imdb.yaml --data.root "$data/imdb" --run_dir "$RUNS/imdb" \
    --train.warmup_steps 500 --train.max_time_s "$T_LONG" --quiet &
summaries bbc_headline configs/bbc_headline.yaml &
summaries bbc_summary configs/bbc_summary.yaml &
pretrain_then_finetune &
wait
echo "all runs done in $(($(date +%s) - start)) s"
for run in "$RUNS"/*/; do
    name=$(basename "$run")
    for f in train.jsonl config.yaml test_scores.json; do
        [[ -f "$run/$f" ]] && cp "$run/$f" "$OUT_DIR/$name.$f"
    done
done
grep -h "test_accuracy\|finished" "$OUT_DIR"/*.log
grep -h "rouge" "$OUT_DIR"/*-test.log
