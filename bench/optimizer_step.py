"""The AdamW step alone: fused (one kernel for all parameters) against PyTorch's multi-tensor default.

    python -m bench.optimizer_step --device cpu --size small

aiayn's Trainer uses the fused AdamW on GPUs and CPUs. This measures the choice on the size's
model with random gradients: the two optimisers take turns (`--turns`), each turn 3 warm-up
steps and the median of `--repeats` timed ones, so that both see the same state of a machine
whose speed drifts. Output: bench/results/optimizer_step-<device>-<date>.json and one line.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from aiayn.model import Transformer
from bench import common

KINDS = {"fused": {"fused": True}, "multi-tensor": {"foreach": True}}


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m bench.optimizer_step", description=__doc__)
    common.add_run_options(parser)
    parser.add_argument("--turns", type=int, default=5, help="alternations of the two")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per turn")
    args = parser.parse_args(argv)
    device, _, size, cfg = common.setup(args)
    torch.manual_seed(args.seed)
    model = Transformer(cfg).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    medians: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(args.turns):
        for kind, options in KINDS.items():
            optimizer = torch.optim.AdamW(
                model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, **options
            )
            times = common.time_fn(optimizer.step, device, warmup=3, repeats=args.repeats)
            medians[kind].append(common.median(times))
    path = common.results_path(args.out, "optimizer_step", device)
    common.write_json(
        path,
        {
            **common.header("optimizer_step", common.machine_info(device)),
            "settings": {"size": size.name, "turns": args.turns, "repeats": args.repeats},
            "params": sum(p.numel() for p in model.parameters()),
            "step_s_median_per_turn": medians,
        },
    )
    ms = {kind: ", ".join(f"{t * 1e3:.1f}" for t in v) for kind, v in medians.items()}
    print(f"AdamW step, ms per turn: fused {ms['fused']}; multi-tensor {ms['multi-tensor']}")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
