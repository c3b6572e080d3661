"""Where the time of one training step goes, model by model: the profiler's kernel table.

    python -m bench.profile_train --device cuda --size base --dtype bf16 --mode compile \
        --models aiayn,nn.Transformer

Each model takes the steps of `bench/train_throughput.py` (its `TrainingStep`: the same
batches, loss and optimiser), warmed up (compiled, for ``--mode compile``), then `--steps`
steps under `torch.profiler`. Printed per model: the operations that took the most device
time per step, the device's busy time per step (the sum of its kernels' times) against the
step's wall time (a gap means the GPU waited for the host), and a coarse split of the busy
time into matrix products, attention, the Triton kernels of a compiled graph and the rest.
Not a benchmark: no JSON, no ratio to quote; a guide to what to speed up.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench import common
from bench.train_throughput import MODELS, MODES, TrainingStep, make_batches

# Kernel-name fragments of each coarse class (lower case), checked in this order.
CLASSES = (
    ("attention", ("flash", "fmha", "attention", "cudnn", "sdpa", "efficient")),
    ("matrix products", ("gemm", "xmma", "cutlass", "nvjet", "aten::mm", "aten::addmm", "bmm")),
    ("compiled (triton)", ("triton",)),
)


def kernel_class(name: str) -> str:
    lowered = name.lower()
    for label, fragments in CLASSES:
        if any(fragment in lowered for fragment in fragments):
            return label
    return "other"


def split(prof: profile, steps: int, on_gpu: bool) -> dict[str, float]:
    """Device (or, on a CPU, self CPU) microseconds per step of each coarse class. On a GPU
    only the device's own events count (kernels and copies; not the operators that launched
    them, nor user annotations, which repeat their times), as in the table's "Self CUDA time
    total": their sum is the time the device was busy."""
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if on_gpu:
            if event.device_type != DeviceType.CUDA or event.is_user_annotation:
                continue
            us = event.self_device_time_total
        else:
            us = event.self_cpu_time_total
        if us > 0:
            label = kernel_class(event.key)
            totals[label] = totals.get(label, 0.0) + us / steps
    return totals


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_train")
    common.add_run_options(parser)
    parser.add_argument("--models", default="aiayn,nn.Transformer", help="comma-separated")
    parser.add_argument("--mode", choices=MODES, default="compile")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation)")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--rows", type=int, default=20, help="operations to list per model")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    device, dtype, size, cfg = common.setup(args)
    batches = make_batches(
        cfg,
        batch=size.train_batch,
        src_len=size.train_src_len,
        tgt_len=size.train_tgt_len,
        count=4,
        seed=args.seed,
        device=device,
    )
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    for name in names:
        step = TrainingStep(
            name,
            args.mode,
            cfg,
            batches,
            device=device,
            dtype=dtype,
            label_smoothing=0.1,
            seed=args.seed,
        )
        common.time_fn(step, device, warmup=args.warmup, repeats=0)
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        common.synchronize(device)
        wall_ms = (time.perf_counter() - started) * 1e3 / args.steps
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
            common.synchronize(device)
        print(f"\n=== {name} ({args.mode}, {args.dtype}, size {size.name}) ===")
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=70))
        classes = split(prof, args.steps, on_gpu)
        busy_ms = sum(classes.values()) / 1e3
        print(
            f"{name}: wall {wall_ms:.1f} ms per step (unprofiled); "
            f"{'device busy' if on_gpu else 'self CPU'} {busy_ms:.1f} ms per step: "
            + ", ".join(f"{label} {us / 1e3:.1f}" for label, us in sorted(classes.items()))
        )
        del step
        if on_gpu:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
