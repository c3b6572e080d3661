"""Time to quality: train Multi30k with `aiayn train`, then score every checkpoint on the test set.

    python -m bench.time_to_quality --config configs/multi30k_de_en.yaml \
        --data-root ../shared/data/multi30k --run-dir runs/ttq_de_en --target 38 \
        -- --train.max_steps 4000

What it does, in order:

1. runs ``aiayn train CONFIG --data.root R --run_dir D`` (plus the overrides after ``--``) as a
   subprocess, keeping every checkpoint (``--train.keep_last 100``); the wall time of the whole
   command is recorded;
2. scores each checkpoint on ``test_2016_flickr`` with sacreBLEU (beam 4, alpha 0.6, as §6.1),
   and the last one also greedily, and the average of the last 5 (§6.1) with beam 4;
3. the time to quality is the training time (``elapsed_s`` of the checkpoint's trainer state:
   wall seconds of ``aiayn train``'s loop, validations and checkpoint writes included, the
   tokenizer and data preparation not) of the first checkpoint whose beam-4 BLEU reaches
   ``--target``.

Output: bench/results/time_to_quality-<src>_<tgt>-<device>-<date>.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from aiayn import checkpoint as ckpt
from aiayn.data import corpus
from aiayn.metrics import corpus_bleu
from aiayn.tasks.translation import Translator
from bench import common

TEST_SET = "test_2016_flickr"
AVERAGE_LAST = 5  # §6.1: "averaging the last 5 checkpoints"


def train(
    config: Path, data_root: Path, run_dir: Path, overrides: Sequence[str]
) -> tuple[float, int]:
    """Run `aiayn train` to the end; returns (wall seconds, exit code)."""
    cmd = [
        sys.executable,
        "-m",
        "aiayn.cli",
        "train",
        str(config),
        "--data.root",
        str(data_root),
        "--run_dir",
        str(run_dir),
        "--train.keep_last",
        "100",
        "--quiet",
        *overrides,
    ]
    print("+ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    code = subprocess.call(cmd)
    return time.perf_counter() - start, code


def score(
    path: Path, pairs: list[tuple[str, str]], beam_size: int, device: str
) -> dict[str, float]:
    """sacreBLEU and chrF of one checkpoint on (source, reference) pairs, and the decoding time."""
    translator = Translator.from_checkpoint(path, device=device)
    common.synchronize(torch.device(device))
    start = time.perf_counter()
    hyps = translator.translate([s for s, _ in pairs], beam_size=beam_size)
    seconds = time.perf_counter() - start
    result = corpus_bleu(hyps, [t for _, t in pairs])
    return {
        "bleu": result.bleu,
        "chrf": result.chrf,
        "signature": result.signature,
        "decode_s": seconds,
    }


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m bench.time_to_quality",
        description="Wall time of aiayn train to reach a test BLEU on Multi30k.",
    )
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--data-root", type=Path, required=True, help="local Multi30k folder")
    parser.add_argument("--run-dir", type=Path, required=True, help="a new folder for the run")
    parser.add_argument("--target", type=float, default=38.0, help="sacreBLEU to reach")
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--max-test-examples", type=int, help="score only the first N test pairs (smoke tests)"
    )
    parser.add_argument(
        "--min-step", type=int, default=0, help="score only checkpoints from this step on"
    )
    parser.add_argument("--skip-train", action="store_true", help="score an existing run")
    parser.add_argument("--out", type=Path, help="results folder (default: bench/results)")
    return parser.parse_args(argv), overrides


def main(argv: Sequence[str] | None = None) -> Path:
    args, overrides = parse_args(argv)
    device = common.resolve_device(args.device)
    exp_cfg = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    src, tgt = exp_cfg["data"]["src_lang"], exp_cfg["data"]["tgt_lang"]
    pairs = corpus.read_parallel(
        args.data_root / f"{TEST_SET}.{src}.gz", args.data_root / f"{TEST_SET}.{tgt}.gz"
    )
    pairs = pairs[: args.max_test_examples] if args.max_test_examples else pairs
    payload: dict[str, Any] = {
        **common.header("time_to_quality", common.machine_info(device)),
        "settings": {
            "config": str(args.config),
            "overrides": overrides,
            "pair": f"{src}-{tgt}",
            "test_set": TEST_SET,
            "target_bleu": args.target,
            "beam_size": args.beam_size,
            "test_examples": len(pairs),
            "min_step": args.min_step,
        },
    }
    path = common.results_path(args.out, f"time_to_quality-{src}_{tgt}", device)
    if not args.skip_train:
        wall, code = train(args.config, args.data_root, args.run_dir, overrides)
        payload["train_command_wall_s"], payload["train_exit_code"] = wall, code
        common.write_json(path, payload)
        if code != 0:
            print(f"aiayn train failed (exit {code})", flush=True)
    checkpoints = [
        c
        for c in ckpt.list_checkpoints(args.run_dir)
        if (ckpt.checkpoint_step(c) or 0) >= args.min_step
    ]
    rows = []
    for ck in checkpoints:
        state = ckpt.load_checkpoint(ck).trainer_state
        row = {
            "checkpoint": ck.name,
            "step": state.get("step"),
            "elapsed_s": state.get("elapsed_s"),
        }
        row.update(score(ck, pairs, args.beam_size, device.type))
        rows.append(row)
        print(
            f"  {ck.name}: BLEU {row['bleu']:.2f} (beam {args.beam_size}) "
            f"after {row['elapsed_s'] or 0:.0f} s of training",
            flush=True,
        )
        payload["checkpoints"] = rows
        common.write_json(path, payload)
    if checkpoints:
        last = checkpoints[-1]
        payload["last_greedy"] = {"checkpoint": last.name, **score(last, pairs, 1, device.type)}
        averaged = ckpt.average_checkpoints(
            checkpoints[-AVERAGE_LAST:], args.run_dir / f"averaged_last{AVERAGE_LAST}"
        )
        payload["averaged"] = {
            "checkpoints": [c.name for c in checkpoints[-AVERAGE_LAST:]],
            **score(averaged, pairs, args.beam_size, device.type),
        }
    reached = [r for r in rows if r["bleu"] >= args.target]
    payload["time_to_target_s"] = reached[0]["elapsed_s"] if reached else None
    payload["first_checkpoint_at_target"] = reached[0]["checkpoint"] if reached else None
    common.write_json(path, payload)
    table = common.markdown_table(
        ["checkpoint", "train s", f"BLEU beam {args.beam_size}", "chrF"],
        [
            [r["checkpoint"], common.fmt(r["elapsed_s"], 0), f"{r['bleu']:.2f}", f"{r['chrf']:.2f}"]
            for r in rows
        ],
    )
    print(f"\n{src}->{tgt} on {common.describe_machine(payload['machine'])}\n{table}")
    if checkpoints:
        print(
            f"last checkpoint greedy: {payload['last_greedy']['bleu']:.2f}; "
            f"average of last {AVERAGE_LAST}, beam {args.beam_size}: "
            f"{payload['averaged']['bleu']:.2f}"
        )
    target = payload["time_to_target_s"]
    print(
        f"time to BLEU {args.target}: "
        + (f"{target:.0f} s ({payload['first_checkpoint_at_target']})" if target else "not reached")
    )
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
