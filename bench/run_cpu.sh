#!/usr/bin/env bash
# The CPU suite at the small size (d_model 256, 3+3 layers, shared vocabulary of 8k), fp32
# unless DTYPE says otherwise:
#   1. training throughput: aiayn vs torch.nn.Transformer vs Hugging Face Marian (eager);
#   2. the same training steps taken in turn, one step per model (bench/interleaved.py): the
#      ratios that this machine's drifting speed cannot skew;
#   3. decoding throughput: aiayn greedy and beam 4 vs Hugging Face generate, same weights,
#      then the same batches decoded in turn (--interleave), for the ratios.
# Run it on an idle machine: on a busy one the numbers are wrong (the JSON records the load).
#
#   bench/run_cpu.sh                  results in bench/results/
#   OUT=/some/dir bench/run_cpu.sh    results in /some/dir
#   THREADS=4 bench/run_cpu.sh        a fixed number of threads (default: PyTorch's, one per core)
#   COMPILE=1 bench/run_cpu.sh        training also torch.compile'd (needs a C++ compiler; minutes)
#   DTYPE=bf16 bench/run_cpu.sh       bf16 autocast for every model (fast on CPUs with AMX)
#   ROUNDS=1 bench/run_cpu.sh         training measured in 1 round instead of 3 (see --rounds)
#   TURNS=15 bench/run_cpu.sh         decoding: 15 interleaved turns instead of 9 (--interleave)
#   DRY_RUN=1 bench/run_cpu.sh        print what would run, run nothing
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi
OUT_DIR=${OUT:-bench/results}
common=(--device cpu --size small --dtype "${DTYPE:-fp32}" --out "$OUT_DIR")
[[ -n "${THREADS:-}" ]] && common+=(--threads "$THREADS")
# Several rounds: this machine's speed wanders, and a round measures every model once.
train=(-m bench.train_throughput "${common[@]}" --rounds "${ROUNDS:-3}")
[[ "${COMPILE:-0}" == 1 ]] && train+=(--compile)
interleaved=(-m bench.interleaved "${common[@]}")
decode=(-m bench.decode_throughput "${common[@]}" --interleave "${TURNS:-9}")
# aiayn from the checkout even where it is not installed.
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

echo "CPU benchmark suite, small size; load average now: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)"
echo "runs, in order:"
echo "  $PY ${train[*]}"
echo "  $PY ${interleaved[*]}"
echo "  $PY ${decode[*]}"
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    exit 0
fi
"$PY" "${train[@]}"
"$PY" "${interleaved[@]}"
"$PY" "${decode[@]}"
