#!/usr/bin/env bash
# The GPU suite at the paper's base size, bf16, on one GPU, in about 9 minutes (H200), most
# telling first (a step that the time limit reaches is skipped; the tail is what can wait):
#   0. the tests that need a GPU (tests/test_gpu.py: CUDA-graph decoding = the reference search;
#      a training step of three tasks that never makes the host wait for the GPU; the compiled
#      default loss = PyTorch's);
#   1. compiled training steps of aiayn, torch.nn.Transformer and Hugging Face Marian taken in
#      turn (bench/interleaved.py --mode compile), 30 turns: the ratio the 1.5x target is read
#      from, which a GPU's wandering step times made uncertain in one-after-another runs. Each
#      turn times one step alone (on an idle GPU: the host's start-up is in it, as in session
#      9) and 5 steps in a row (--in-a-row 5: a training loop's step, the host queuing ahead);
#   2. aiayn against itself with CUDA graphs (mode="reduce-overhead") and with Q, K and V as
#      one product (within the noise in one-after-another runs: sessions 3 and 9), in turn the
#      same way, apart, so that a failure of a candidate cannot cost the first ratio;
#   3. decoding throughput: aiayn greedy and beam 4 (reference and fixed-shape searches, and the
#      fixed-shape search before each of its changes since session 8: window, double buffer,
#      two-stage top-k, memory shared by beams; and a candidate: one-query attention written
#      out) vs Hugging Face generate, same weights; then 5 turns of every row in turn
#      (--interleave);
#   4. training throughput at 256 x 64 source + 256 x 64 target tokens (tokens/s, peak memory,
#      MFU): aiayn (and its before rows: eager aiayn-unfused-loss is the before of the loss
#      compiled by default on a GPU) vs torch.nn.Transformer vs Hugging Face Marian, eager and
#      torch.compile'd, in one run;
#   5. the training kernels in pairs (bench/train_kernels.py), the compiled losses too;
#   6. the candidate kernels of a decoding step timed alone and replayed in a CUDA graph
#      (bench/decode_kernels.py: attention, reordering the cache), printed;
#   7. decoding against Hugging Face's static cache, which transformers compiles on a GPU
#      (hf-generate-static; measured in session 9): apart because transformers compiles it
#      (the whole step took 49 s on an H200, session 9);
#   8. where a graphed beam batch's time goes (bench/profile_static.py, printed: the log keeps it).
# Each step runs under what is left of a total time limit (BUDGET_S, default 530 s); the JSON
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
BUDGET_S=${BUDGET_S:-530}
common="--device cuda --size base --dtype bf16"
steps=(
    "bench.interleaved $common --mode compile --models aiayn,nn.Transformer,hf-marian --steps 30 --in-a-row 5"
    "bench.interleaved $common --mode compile --models aiayn,aiayn-cuda-graphs,aiayn-fused-qkv --steps 30 --in-a-row 5"
    "bench.decode_throughput $common --repeats 5 --interleave 5 --impls aiayn,aiayn-static,aiayn-static-one-window,aiayn-static-one-buffer,aiayn-static-one-topk,aiayn-static-repeated-memory,aiayn-static-written-attention ${DECODE_ARGS:-}"
    "bench.train_throughput $common --compile --repeats 20 --models aiayn,aiayn-cuda-graphs,aiayn-unfused-loss,aiayn-fused-qkv,nn.Transformer,hf-marian ${TRAIN_ARGS:-}"
    "bench.train_kernels $common --matmul-size 8192 --compile-loss"
    "bench.decode_kernels"
    "bench.decode_throughput $common --repeats 5 --interleave 5 --impls aiayn-static,hf-generate-static"
    "bench.profile_static $common --search beam --rows 30"
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
    timeout -k 10 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py || {
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
