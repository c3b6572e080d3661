"""The searches on a trained model, with the lengths it chooses: the number-words demo's test set.

    make demo                                    # trains one (runs/demo), a few minutes on a CPU
    python -m bench.demo_decode --run runs/demo/run

`bench/decode_throughput.py` forces every output to the same length so that aiayn and Hugging
Face do equal work. A user's search stops where the model ends each sentence; the fixed-shape
search (`static=True`: on a CPU, the frozen decoder) keeps a finished sentence in its batch
until the whole batch is done, where the reference search drops it. This benchmark measures
that case: the demo's held-out numbers, regenerated from the checkpoint's own demo config,
sorted by length and translated in batches by `translate_ids`, greedy and beam 4, with
``static=False`` and ``static=True`` in turn (one pass over the test set each, `--turns`
times). Outputs must be identical. Reported: median seconds per pass and the median per-turn
ratio reference / static (> 1: the fixed-shape search is faster).

Output: bench/results/demo_decode-<device>-<date>.json and a line per search on stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from aiayn.checkpoint import load_checkpoint
from aiayn.config import TransformerConfig
from aiayn.decoding import translate_ids
from aiayn.model import Transformer
from aiayn.tasks import demo, numbers
from bench import common


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.demo_decode", description=__doc__)
    parser.add_argument("--run", default="runs/demo/run", help="the demo's run folder")
    parser.add_argument("--batch", type=int, default=64, help="sentences per batch")
    parser.add_argument("--turns", type=int, default=5, help="timed passes of each search")
    parser.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--out", default=None, help="results folder (default: bench/results)")
    return parser.parse_args(argv)


def load_demo(run: Path) -> tuple[Transformer, list[str], demo.DemoConfig, Path]:
    """The run's last checkpoint as an eval-mode model, with its vocabulary and demo config."""
    checkpoints = sorted((run / "checkpoints").glob("step_*"))
    if not checkpoints:
        raise SystemExit(f"no checkpoint under {run / 'checkpoints'}: run `make demo` first")
    folder = checkpoints[-1]
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model = Transformer(TransformerConfig.from_dict(config["model"]))
    load_checkpoint(folder, model=model)
    return model.eval(), config["vocab"], demo.DemoConfig.from_dict(config["demo"]), folder


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, vocab, cfg, folder = load_demo(Path(args.run))
    test = numbers.make_splits(cfg.n_train, cfg.n_valid, cfg.n_test, seed=cfg.seed)["test"]
    index = {token: i for i, token in enumerate(vocab)}
    sources = [demo._encode(numbers.english_words(n), index) for n in test]
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    batches = [
        demo._source_batch([sources[i] for i in order[start : start + args.batch]])
        for start in range(0, len(order), args.batch)
    ]
    ids = dict(bos_id=demo.BOS_ID, eos_id=demo.EOS_ID, pad_id=demo.PAD_ID)

    def translate(beam: int, static: bool) -> list[list[int]]:
        outputs = []
        for src in batches:  # the demo's own length limits: 2 per source token, plus 3
            outputs += translate_ids(
                model, src, beam_size=beam, max_len_a=2, max_len_b=3, static=static, **ids
            )
        return outputs

    machine = common.machine_info(torch.device("cpu"))
    results = {}
    for beam in (1, 4):
        reference, fixed = translate(beam, False), translate(beam, True)  # also the warm-up
        if reference != fixed:
            raise SystemExit(f"beam {beam}: the two searches' outputs differ; nothing timed")
        times: dict[str, list[float]] = {"reference": [], "static": []}
        for _ in range(args.turns):
            for name, static in (("reference", False), ("static", True)):
                started = time.perf_counter()
                translate(beam, static)
                times[name].append(time.perf_counter() - started)
        ratio = common.median(
            [r / s for r, s in zip(times["reference"], times["static"], strict=True)]
        )
        search = "greedy" if beam == 1 else f"beam {beam}"
        results[search] = {
            "reference_s_median": common.median(times["reference"]),
            "static_s_median": common.median(times["static"]),
            "seconds": times,
            "reference_over_static_median": ratio,
            "output_tokens": sum(len(o) for o in fixed),
        }
        print(
            f"{search}: {len(test)} numbers in {len(batches)} batches, reference "
            f"{results[search]['reference_s_median']:.2f} s, static "
            f"{results[search]['static_s_median']:.2f} s per pass; static {ratio:.2f}x faster "
            "(median per turn; outputs identical)",
            flush=True,
        )
    path = common.results_path(args.out, "demo_decode", torch.device("cpu"))
    common.write_json(
        path,
        {
            **common.header("demo_decode", machine, status="complete"),
            "settings": {
                "checkpoint": str(folder),
                "numbers": len(test),
                "batch": args.batch,
                "turns": args.turns,
                "model_config": model.cfg.to_dict(),
            },
            "results": results,
        },
    )
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
