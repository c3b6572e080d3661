#!/usr/bin/env bash
# BBC headlines from scratch against the same model fine-tuned from span-corruption
# pre-training (T5's recipe), the same architecture and fine-tuning budget; ROUGE of both on
# the test split. Every command, its log and the scores go to $OUT (default
# bench/results/headlines-<date>).
#
#   bench/headlines_pretrained.sh DATA_ROOT        DATA_ROOT laid out as ../shared/data
#
# The pre-training text is the 2,003 training articles of the summarization split (never the
# validation or test articles, never a headline) and IMDB_DOCS IMDB reviews. Sizes by
# environment: D_MODEL (128), LAYERS (2 + 2), PRETRAIN_STEPS (2000), TUNE_STEPS (1500),
# IMDB_DOCS (5000), MAX_SRC_LEN (128 tokens of each article); THREADS (1) CPU threads for each
# run. The two headline runs train side by side, each on THREADS threads, and take the recipe
# that trained the small model of docs/results.md ("BBC headlines, a small model"): 8,192
# tokens a batch (with 4,096, ~10 articles a batch, both stayed near the unigram loss).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(realpath "${1:?usage: bench/headlines_pretrained.sh DATA_ROOT}")
PY=${PYTHON:-.venv/bin/python}
OUT_DIR=${OUT:-bench/results/headlines-$(date -u +%Y-%m-%dT%H%M)}
RUNS=${RUNS_DIR:-/tmp/aiayn-headlines}
export OMP_NUM_THREADS=${THREADS:-1} PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
if [[ -e $RUNS ]]; then
    echo "$RUNS exists: remove it, or set RUNS_DIR to a new folder" >&2
    exit 2
fi
mkdir -p "$OUT_DIR" "$RUNS"
bbc="$root/bbc_news_summary/bbc_news_summary.jsonl.gz"
d=${D_MODEL:-128}
layers=${LAYERS:-2}
arch=(--model.d_model "$d" --model.n_heads 4 --model.d_ff $((4 * d))
      --model.n_encoder_layers "$layers" --model.n_decoder_layers "$layers" --model.max_len 256)
tune=(--train.max_steps "${TUNE_STEPS:-2000}" --train.max_tokens 8192 --train.warmup_steps 400
      --train.lr_scale 0.5 --model.dropout 0.1 --train.eval_every 250 --train.save_every 250
      --data.max_src_len "${MAX_SRC_LEN:-128}")

aiayn() {  # log the command, then run it with its output in the log
    echo "aiayn $(printf '%q ' "$@")" >>"$OUT_DIR/commands.txt"
    "$PY" -m aiayn.cli "$@"
}

# The training split's articles, as the summarization task splits them (seed 1).
"$PY" - "$bbc" "$RUNS/train_articles.jsonl" <<'EOF'
import json, sys
from aiayn.tasks.summarization import SummarizationData
data = SummarizationData.from_dict({"format": "bbc", "path": sys.argv[1], "target": "title"})
with open(sys.argv[2], "w", encoding="utf-8") as f:
    for document, _ in data.read("train"):
        f.write(json.dumps({"document": document}) + "\n")
EOF

sources="[{path: $RUNS/train_articles.jsonl, field: document}, {path: $root/imdb/train.jsonl.gz, field: text, max_docs: ${IMDB_DOCS:-5000}}]"
timed() {  # timed NAME COMMAND...: run it, its output to NAME.log, its seconds to times.txt
    local name=$1 start
    shift
    start=$(date +%s)
    "$@" >"$OUT_DIR/$name.log" 2>&1
    echo "$name: $(($(date +%s) - start)) s" | tee -a "$OUT_DIR/times.txt"
}
timed pretrain aiayn train configs/pretrain_denoise.yaml --run_dir "$RUNS/pretrain" \
    --data.sources "$sources" --data.vocab_size 8000 "${arch[@]}" \
    --train.max_steps "${PRETRAIN_STEPS:-2000}" --train.max_tokens 4096 \
    --train.warmup_steps 400 --train.eval_every 500 --train.save_every 500

trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # one run failing stops the other
timed pretrained aiayn finetune --from "$RUNS/pretrain" configs/bbc_headline_pretrained.yaml \
    --data.path "$bbc" --run_dir "$RUNS/pretrained" "${tune[@]}" &
timed scratch aiayn train configs/bbc_headline.yaml --data.path "$bbc" --run_dir "$RUNS/scratch" \
    "${arch[@]}" "${tune[@]}" &
wait -n
wait -n

for run in scratch pretrained; do
    aiayn summarize --checkpoint "$RUNS/$run" --split test --json --quiet \
        >"$OUT_DIR/test-$run.json"
    echo "$run: $(cat "$OUT_DIR/test-$run.json")"
    aiayn summarize --checkpoint "$RUNS/$run" --split test --quiet \
        --output "$OUT_DIR/test-outputs-$run.txt" >/dev/null
done
# How much each model's predictions rest on its input (bench/source_reliance.py).
"$PY" -m bench.source_reliance "$RUNS/pretrain" "$RUNS/scratch" "$RUNS/pretrained" \
    --out-dir "$OUT_DIR"
for run in pretrain pretrained scratch; do
    cp "$RUNS/$run/train.jsonl" "$OUT_DIR/train-$run.jsonl"
done
