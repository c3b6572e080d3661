"""Memory that a translation run's encoded training pairs hold: id lists against `PackedPairs`.

    python -m bench.data_memory --src ../shared/data/multi30k/train.de.gz \\
        --tgt ../shared/data/multi30k/train.en.gz --pairs 500000

The pairs are the files' lines repeated up to --pairs (Multi30k has 29,000: a stand-in for a
corpus of WMT's size, whose sentences are longer). A joint BPE vocabulary is trained on the
files; then each layout runs in a process of its own (a fresh heap): encode both sides and
cut them to --max-len as a run does (`aiayn.tasks.seq2seq.encode_pairs`, `fit_to_max_len`),
then build the batch sampler. "lists" is the layout before `aiayn.data.packed` (a list of
(source ids, target ids) lists). Written to bench/results/data_memory-cpu-<date>.json:
resident memory held once the text is encoded (its growth over the process with the text
loaded), the peak during encoding, and bytes a token. Memory is counted, not timed; the
seconds are for orientation only.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from aiayn.data.batching import TokenBatchSampler, example_lengths, fit_to_max_len
from aiayn.data.corpus import read_lines
from aiayn.data.tokenizer import Tokenizer
from aiayn.tasks.seq2seq import encode_pairs
from bench import common

LAYOUTS = ("lists", "packed")


def resident_mib() -> float:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def measure(layout: str, src: str, tgt: str, n_pairs: int, tokenizer: str, max_len: int):
    """One layout, in this process: what encoding and batching hold, and their peak."""
    source, target = read_lines(src), read_lines(tgt)
    pairs = [(s, t) for s, t in zip(source, target, strict=True)]
    pairs = (pairs * (n_pairs // len(pairs) + 1))[:n_pairs]
    tok = Tokenizer.load(tokenizer)
    gc.collect()
    peak = common.PeakMemory(torch.device("cpu"))
    peak.start()
    before = resident_mib()
    start = time.perf_counter()
    if layout == "lists":  # what encode_pairs returned before aiayn.data.packed
        ids = list(
            zip(
                tok.encode_batch([s for s, _ in pairs]),
                tok.encode_batch([t for _, t in pairs]),
                strict=True,
            )
        )
    else:
        ids = encode_pairs(tok, pairs)
    ids, n_cut = fit_to_max_len(ids, max_len, "truncate")
    sampler = TokenBatchSampler(example_lengths(ids), 25000, shuffle=True, seed=1)
    seconds = time.perf_counter() - start
    common.free_memory(torch.device("cpu"))  # collect, and give freed heap pages back (trim)
    held = resident_mib() - before
    tokens = int(sum(len(s) + len(t) for s, t in ids)) if layout == "lists" else None
    if tokens is None:
        tokens = int(ids.lengths().sum())
    return {
        "layout": layout,
        "pairs": len(ids),
        "tokens": tokens,
        "cut_to_max_len": n_cut,
        "batches": len(sampler),
        "held_mib": round(held, 1),
        "peak_mib": peak.peak_mib(),
        "bytes_per_token": round(held * 2**20 / tokens, 1),
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True)
    parser.add_argument("--tgt", required=True)
    parser.add_argument("--pairs", type=int, default=500_000)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--case", choices=LAYOUTS, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        result = measure(args.case, args.src, args.tgt, args.pairs, args.tokenizer, args.max_len)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = Path(tmp) / "tokenizer.json"
        texts = read_lines(args.src) + read_lines(args.tgt)
        Tokenizer.train(texts, args.vocab_size, 2).save(tok_path)
        rows = []
        for layout in LAYOUTS:
            child = [sys.executable, "-m", "bench.data_memory", "--src", args.src, "--tgt",
                     args.tgt, "--pairs", str(args.pairs), "--max-len", str(args.max_len),
                     "--case", layout, "--tokenizer", str(tok_path)]  # fmt: skip
            done = subprocess.run(child, check=True, capture_output=True, text=True)
            rows.append(json.loads(done.stdout.splitlines()[-1]))
    machine = common.machine_info(torch.device("cpu"))
    path = common.results_path(args.out_dir, "data_memory", torch.device("cpu"))
    common.write_json(path, {**common.header("data_memory", machine), "results": rows})
    keys = ("layout", "pairs", "tokens", "held_mib", "peak_mib", "bytes_per_token", "seconds")
    print(common.markdown_table(keys, [[r[k] for k in keys] for r in rows]))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
