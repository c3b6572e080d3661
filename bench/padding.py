"""How much of a training batch is padding, with aiayn's bucketing of a parallel corpus.

    python -m bench.padding --src ../shared/data/multi30k/train.de.gz \\
        --tgt ../shared/data/multi30k/train.en.gz --max-tokens 4096,25000

A joint BPE vocabulary is trained on the two files (or `--tokenizer` loads one, say a run's),
the pairs are encoded, and `TokenBatchSampler` cuts one training epoch into batches as the
Trainer gets them. Printed and written to
bench/results/padding-cpu-<date>.json: for each budget, the batches' share of padded source
and target positions. Padding is all a padding-free (packed) batch could save, so this bounds
what variable-length packing would gain over bucketing. No timing: counts only.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from aiayn.data.batching import TokenBatchSampler, example_lengths
from aiayn.data.corpus import read_lines
from aiayn.data.tokenizer import Tokenizer
from bench import common


def padding_shares(
    lengths: Sequence[tuple[int, int]], max_tokens: int, seed: int
) -> dict[str, float | int]:
    """One shuffled epoch's batches: their count and the padded share of each side."""
    sampler = TokenBatchSampler(lengths, max_tokens, shuffle=True, seed=seed)
    real, padded = [0, 0], [0, 0]
    for batch in sampler.batches(0):
        for side in (0, 1):
            sizes = [lengths[i][side] for i in batch]
            real[side] += sum(sizes)
            padded[side] += max(sizes) * len(batch)
    return {
        "max_tokens": max_tokens,
        "batches": len(sampler),
        "source_padding": 1 - real[0] / padded[0],
        "target_padding": 1 - real[1] / padded[1],
    }


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m bench.padding", description=__doc__)
    parser.add_argument("--src", required=True, help="source sentences, one a line")
    parser.add_argument("--tgt", required=True, help="target sentences, line-aligned")
    parser.add_argument("--tokenizer", help="a tokenizer.json (default: train a joint BPE)")
    parser.add_argument("--vocab-size", type=int, default=8000, help="of the trained BPE")
    parser.add_argument("--max-tokens", default="4096", help="comma-separated budgets")
    parser.add_argument("--seed", type=int, default=1, help="the epoch's shuffle")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    src, tgt = read_lines(args.src), read_lines(args.tgt)
    if args.tokenizer:
        tokenizer = Tokenizer.load(args.tokenizer)
    else:  # one vocabulary for both sides, as the translation task's (§5.1)
        tokenizer = Tokenizer.train(src + tgt, args.vocab_size)
    pairs = list(zip(tokenizer.encode_batch(src), tokenizer.encode_batch(tgt), strict=True))
    lengths = example_lengths(pairs)
    results = [
        padding_shares(lengths, int(budget), args.seed) for budget in args.max_tokens.split(",")
    ]
    for r in results:
        print(
            f"max_tokens {r['max_tokens']:,}: {r['batches']} batches, padding "
            f"{r['source_padding']:.1%} of the source and {r['target_padding']:.1%} of the target"
        )
    device = torch.device("cpu")
    path = common.results_path(args.out, "padding", device)
    payload = {
        **common.header("padding", common.machine_info(device)),
        "src": args.src,
        "tgt": args.tgt,
        "pairs": len(pairs),
        "vocab_size": tokenizer.vocab_size,
        "results": results,
    }
    common.write_json(path, payload)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
