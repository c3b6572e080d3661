"""Where the time of one fixed-shape beam (or greedy) batch goes: the profiler's kernel table.

    python -m bench.profile_static --device cuda --size base --dtype bf16 [--search greedy]

Decodes the decode benchmark's batch (random weights, forced length, as
`bench.decode_throughput`) with `aiayn.static_decoding.StaticDecoding`, once to capture its
graphs, then once under `torch.profiler`, and prints the operations that took the most device
time and the batch's wall time. Not a benchmark: no peer, no JSON; a guide to what to speed up.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from aiayn.model import Transformer
from aiayn.static_decoding import StaticDecoding
from bench import common
from bench.decode_throughput import aiayn_decode, make_sources


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_static")
    common.add_run_options(parser)
    parser.add_argument("--search", choices=("greedy", "beam"), default="beam")
    parser.add_argument("--rows", type=int, default=25, help="operations to list")
    args = parser.parse_args(argv)
    device, dtype, size, cfg = common.setup(args)
    torch.manual_seed(args.seed)
    model = Transformer(cfg).to(device=device, dtype=dtype).eval()
    src = make_sources(
        cfg, batch=size.decode_batch, src_len=size.decode_src_len, seed=args.seed + 1
    ).to(device)
    search = StaticDecoding(model)

    def run() -> None:
        aiayn_decode(model, src, args.search, size.decode_steps, 4, search)
        common.synchronize(device)

    run()  # captures the graphs
    started = time.perf_counter()
    run()
    wall = time.perf_counter() - started
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    print(
        f"{args.search}: {wall * 1e3:.1f} ms per batch of {size.decode_batch} sentences, "
        f"{size.decode_steps} steps (graphs: {search.cuda_graphs})"
    )


if __name__ == "__main__":
    main()
