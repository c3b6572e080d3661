"""Training steps of several models taken in turn: speed ratios a wandering machine cannot skew.

    python -m bench.interleaved --device cpu --size small --dtype bf16
    python -m bench.interleaved --device cpu --size small --models aiayn,aiayn-unfused-loss,nn.Transformer
    python -m bench.interleaved --device cuda --size base --dtype bf16 --mode compile \
        --models aiayn,nn.Transformer,hf-marian [--in-a-row 5]

On a shared machine whose speed drifts by tens of percent within a minute (this project's CPU
machine), measuring one model after another (`bench/train_throughput.py`, even in rounds)
lets the drift decide differences of 10-20%. Here every model is built and warmed up first;
then the models take one training step each, in turn (in a new seeded order each turn;
`--order fixed` keeps the `--models` order), `--steps` times, so that the steps compared run
next to each other in the same state of the machine. Reported per model: the median step
time, and the median over the turns of its step time divided by aiayn's in the same turn
("x aiayn", > 1: aiayn is faster). Peak memory is not measured (every model is alive
at once; `bench/train_throughput.py` measures it). Models, batches, loss and optimiser are
those of `bench/train_throughput.py` (its `TrainingStep`), eager or (`--mode compile`) every
model `torch.compile`d: a GPU's step times wandered by 10-25% within one run of
`bench/train_throughput.py` (H200, 2026-11-26), too much to read a 1.5x target from.

A step timed alone starts on an idle device: the timing waits for the device before it
starts, so on a GPU the step also pays the time its host takes to queue its first kernels,
and every place where the host falls behind the device. A training loop (the Trainer) never
waits between steps, and the host queues one step while the device runs the last.
`--in-a-row K` therefore also times, in every turn, K steps of each model run one after
another without waiting between them. That time / K is the step of a running loop, and its
ratios are reported apart ("in a row"). On a CPU, where every operation runs as it is
called, the two measures agree.

Output: bench/results/interleaved-<device>-<date>.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import common
from bench.train_throughput import MODELS, MODES, TrainingStep, differs_from_aiayn, make_batches


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.interleaved",
        description="Training steps of aiayn and its peers taken in turn, one step each.",
    )
    common.add_run_options(parser)
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated, aiayn first (the reference), from: {', '.join(MODELS)}",
    )
    parser.add_argument("--steps", type=int, default=30, help="timed turns (one step each)")
    parser.add_argument(
        "--in-a-row",
        type=int,
        default=0,
        metavar="K",
        help="also time K steps of each model in a row in every turn, without waiting for the "
        "device between them (a training loop's step; default 0: off)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each model")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches used in turn")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="eager",
        help="every model eager, or every model torch.compile'd (compiled during its warm-up)",
    )
    parser.add_argument(
        "--order",
        choices=("shuffled", "fixed"),
        default="shuffled",
        help="the models' order within a turn: a new permutation each turn (seeded), so that "
        "no model always runs right after another (default); or the --models order every turn",
    )
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    if args.models[:1] != ["aiayn"]:
        parser.error("--models must start with aiayn: the ratios are against it")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.in_a_row < 0:
        parser.error(f"--in-a-row must be 0 (off) or more, got {args.in_a_row}")
    return args


def turn_orders(models: Sequence[str], turns: int, *, shuffled: bool, seed: int) -> list[list[str]]:
    """The order the models step in, turn by turn. In a fixed order a model always runs right
    after the same other one and inherits the state it leaves (caches, allocator, clock
    speed); shuffled, that is spread over every model, each turn a permutation drawn from a
    generator seeded by `seed` (a run can be repeated). Even so, two rows running the same
    code differed by 4% in one 30-turn run on this project's CPU (2026-11-27): read smaller
    differences as noise."""
    generator = random.Random(seed)
    orders = []
    for _ in range(turns):
        order = list(models)
        if shuffled:
            generator.shuffle(order)
        orders.append(order)
    return orders


def steps_in_a_row(step: TrainingStep, k: int) -> None:
    """k training steps queued one after another, as a training loop takes them: nothing here
    waits for the device between them."""
    for _ in range(k):
        step()


def summarise(times: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Per model: median step time, quartiles, and the median ratio to aiayn's step in the
    same turn."""
    ours = times["aiayn"]
    rows = []
    for name, values in times.items():
        ratios = [t / ref for t, ref in zip(values, ours, strict=True)]
        q1, _, q3 = common.quartiles(values)
        rows.append(
            {
                "model": name,
                "step_s_median": common.median(values),
                "step_s_q1": q1,
                "step_s_q3": q3,
                "step_s_turns": values,
                "vs_aiayn_median_ratio": common.median(ratios),
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    body = [
        [
            r["model"],
            common.fmt(r["step_s_median"] * 1e3, 1),
            f"{common.fmt(r['step_s_q1'] * 1e3, 0)}-{common.fmt(r['step_s_q3'] * 1e3, 0)}",
            common.fmt(r["vs_aiayn_median_ratio"], 2),
        ]
        for r in rows
    ]
    return common.markdown_table(["model", "ms/step", "quartiles", "aiayn x"], body)


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the benchmark; returns the path of the JSON written."""
    args = parse_args(argv)
    device, dtype, size, cfg = common.setup(args)
    # A row that would repeat aiayn's here (e.g. a CPU-only before row on a GPU) is left out.
    skipped = [m for m in args.models[1:] if not differs_from_aiayn(m, args.mode, device)]
    args.models = [m for m in args.models if m not in skipped]
    machine = common.machine_info(device)
    batches = make_batches(
        cfg,
        batch=size.train_batch,
        src_len=size.train_src_len,
        tgt_len=size.train_tgt_len,
        count=args.batches,
        seed=args.seed,
        device=device,
    )
    print(
        f"interleaved: {', '.join(args.models)} on {device.type} "
        f"({common.describe_machine(machine)}), size {size.name}, {args.dtype}, {args.mode}; "
        f"{args.warmup} warm-up steps each, then {args.steps} turns of one step each"
        + (f" and of {args.in_a_row} steps in a row" if args.in_a_row else "")
        + (f" (left out, the same as aiayn here: {', '.join(skipped)})" if skipped else ""),
        flush=True,
    )
    steps = {}
    for name in args.models:
        print(f"  {name}: building and warming up ({args.mode}) ...", flush=True)
        steps[name] = TrainingStep(
            name,
            args.mode,
            cfg,
            batches,
            device=device,
            dtype=dtype,
            label_smoothing=args.label_smoothing,
            seed=args.seed,
        )
        common.time_fn(steps[name], device, warmup=args.warmup, repeats=0)
    times: dict[str, list[float]] = {name: [] for name in args.models}
    in_a_row: dict[str, list[float]] = {name: [] for name in args.models}
    orders = turn_orders(args.models, args.steps, shuffled=args.order == "shuffled", seed=args.seed)
    for order in orders:
        for name in order:
            times[name] += common.time_fn(steps[name], device, warmup=0, repeats=1)
            if args.in_a_row:
                (run_s,) = common.time_fn(
                    lambda step=steps[name]: steps_in_a_row(step, args.in_a_row),
                    device,
                    warmup=0,
                    repeats=1,
                )
                in_a_row[name].append(run_s / args.in_a_row)
    rows = summarise(times)
    rows_in_a_row = summarise(in_a_row) if args.in_a_row else None
    path = common.results_path(args.out, "interleaved", device)
    common.write_json(
        path,
        {
            **common.header("interleaved", machine, status="complete"),
            "settings": {
                "device": device.type,
                "size": size.name,
                "dtype": args.dtype,
                "mode": args.mode,
                "batch": size.train_batch,
                "src_len": size.train_src_len,
                "tgt_len": size.train_tgt_len,
                "models": {name: MODELS[name] for name in args.models},
                "warmup": args.warmup,
                "steps": args.steps,
                "batches": args.batches,
                "label_smoothing": args.label_smoothing,
                "seed": args.seed,
                "order": args.order,
                "in_a_row": args.in_a_row,
            },
            "turn_orders": orders,
            "model_config": cfg.to_dict(),
            "results": rows,
            # Per model as in `results`: each turn's K steps in a row, their time / K.
            **({"results_in_a_row": rows_in_a_row} if rows_in_a_row else {}),
        },
    )
    print(f"\n{common.describe_machine(machine)}\none step at a time:\n{table(rows)}")
    if rows_in_a_row:
        print(f"{args.in_a_row} steps in a row, per step:\n{table(rows_in_a_row)}")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
