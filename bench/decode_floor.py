"""How fast could greedy search be on a CPU at equal work? A floor: the encoder and the matrix
products of every decoder step, and nothing else.

    python -m bench.decode_floor --device cpu --size small [--batch 16] [--turns 9]

Any implementation of the benchmark's greedy search (`bench.decode_throughput`: forced output
length, same weights) encodes the batch, projects the encoder output into each decoder layer's
cross-attention keys and values, and at every step multiplies the step's N rows by every
decoder weight matrix (the self-attention's Q/K/V and output, the cross-attention's query and
output, the two feed-forward matrices, in each layer) and by the output layer's. This times,
in interleaved turns (the machine's speed drifts):

* ``aiayn-static``: aiayn's fixed-shape greedy search (what `translate_ids` uses);
* ``hf-generate``: Hugging Face ``generate`` on the same weights;
* ``load``: the encoder over the batch's real tokens and the cross-attention keys and values
  (`aiayn.packed_encoder.packed_encode`, `FrozenCache.load`);
* ``products``: the steps' matrix products alone, ``torch.addmm`` on W^T as the frozen decoder
  stores it (on this project's CPU the fastest layout measured), on inputs of the steps' shapes.

``hf-generate`` / (``load`` + ``products``) is the largest ratio any search could reach against
``generate`` with these products: the rest of a step (attention over the cache, norms, the
embedding, choosing the token, the host's bookkeeping) would have to cost nothing. Writes
``decode_floor-<device>-<time>.json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from aiayn.frozen_decoder import FrozenDecoder
from aiayn.model import padding_mask
from aiayn.packed_encoder import packed_encode
from aiayn.static_decoding import StaticDecoding
from bench import common
from bench.decode_throughput import (
    aiayn_decode,
    build_pair,
    hf_generate,
    interleave,
    make_sources,
)


def step_products(frozen: FrozenDecoder, rows: int, steps: int) -> Callable[[], None]:
    """The matrix products of `steps` decoder steps on `rows` rows: each layer's six (Q/K/V
    together, as the frozen decoder computes them) and the output layer's, with a bias as
    greedy search's (banned ids at -inf)."""
    weights = [
        getattr(layer, name)
        for layer in frozen.layers
        for name in ("qkv", "self_out", "cross_q", "cross_out", "ffn_in", "ffn_out")
    ]
    inputs = {w.size(0): torch.randn(rows, w.size(0)) for w, _ in weights}  # by d_in
    out_weight = frozen.out_weight  # (d, V)
    last = torch.randn(rows, out_weight.size(0))
    bias = torch.zeros(out_weight.size(1))
    logits = torch.empty(rows, out_weight.size(1))

    def run() -> None:
        for _ in range(steps):
            for weight, layer_bias in weights:
                torch.addmm(layer_bias, inputs[weight.size(0)], weight)
            torch.addmm(bias, last, out_weight, out=logits)

    return run


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_floor", description=__doc__)
    common.add_run_options(parser)
    parser.add_argument("--batch", type=int, help="sentences (default: the size's)")
    parser.add_argument("--turns", type=int, default=9, help="interleaved turns (median)")
    args = parser.parse_args(argv)
    device, dtype, size, cfg = common.setup(args)
    if device.type != "cpu" or dtype != torch.float32:
        parser.error("the floor is measured on a CPU in fp32 (--device cpu --dtype fp32)")
    batch, src_len, steps = args.batch or size.decode_batch, size.decode_src_len, size.decode_steps
    ours, theirs = build_pair(cfg, seed=args.seed, device=device)
    src = make_sources(cfg, batch=batch, src_len=src_len, seed=args.seed + 1)
    mask = padding_mask(src, common.PAD_ID)  # (B, 1, 1, S)
    static = StaticDecoding(ours)
    frozen = FrozenDecoder(ours)
    cache = frozen.new_cache(batch, steps + 1, src_len)

    @torch.inference_mode()
    def load() -> None:
        cache.load(ours, packed_encode(ours, src, mask), mask, 1)

    runs: dict[str, Callable[[], object]] = {
        "aiayn-static": lambda: aiayn_decode(ours, src, "greedy", steps, 1, static),
        "hf-generate": lambda: hf_generate(theirs, src, "greedy", steps, 1),
        "load": load,
        "products": torch.inference_mode()(step_products(frozen, batch, steps)),
    }
    for run in runs.values():  # warm-up: plans, allocations, the libraries' first calls
        run()
        run()
    turns = interleave(runs, device, args.turns)
    times = {name: [s * 1e3 for s in turn["batch_s_turns"]] for name, turn in turns.items()}
    ms = {name: turn["batch_s_median"] * 1e3 for name, turn in turns.items()}
    floor = ms["load"] + ms["products"]
    result = {
        "ms_per_batch": ms,
        "ms_per_batch_all_turns": times,
        "floor_ms": floor,
        "aiayn_static_x_generate": ms["hf-generate"] / ms["aiayn-static"],
        "floor_x_generate": ms["hf-generate"] / floor,
        "rest_of_aiayn_static_ms": ms["aiayn-static"] - floor,
    }
    machine = common.machine_info(device)
    payload = common.header("decode_floor", machine) | {
        "config": {
            "size": args.size,
            "dtype": args.dtype,
            "batch": batch,
            "src_len": src_len,
            "steps": steps,
            "turns": args.turns,
        },
        "result": result,
    }
    path = common.results_path(args.out, "decode_floor", device)
    common.write_json(path, payload)
    print(common.describe_machine(machine))
    print(
        f"greedy, {batch} sentences of <= {src_len} tokens, {steps} steps, fp32, "
        f"medians of {args.turns} interleaved turns (ms per batch):"
    )
    print(
        common.markdown_table(
            ["aiayn-static", "hf-generate", "load", "products", "floor = load + products"],
            [
                [
                    f"{ms['aiayn-static']:.1f}",
                    f"{ms['hf-generate']:.1f}",
                    f"{ms['load']:.1f}",
                    f"{ms['products']:.1f}",
                    f"{floor:.1f}",
                ]
            ],
        )
    )
    print(
        f"aiayn-static is {result['aiayn_static_x_generate']:.2f}x generate; a search that "
        f"cost only its products and encoder would be {result['floor_x_generate']:.2f}x "
        f"(aiayn-static spends {result['rest_of_aiayn_static_ms']:.1f} ms beyond that)"
    )
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
