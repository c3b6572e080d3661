"""Timings of the candidate kernels for one fixed-shape decoding step (a guide, not a benchmark).

    python -m bench.decode_kernels      (CUDA; base size, beam 4 x 64 sentences, 48 positions, bf16)

Two things dominate a graphed beam step at the base size (`bench.profile_static`): attention of
one query over the cache, and reordering the cache rows. This times the ways to do each (also
a window of the cache, and cross-attention with the memory shared by a source's beams), with
CUDA events, median of 50 calls after 10 warm-up calls.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(fn, repeats: int = 50) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)  # microseconds
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_kernels")
    parser.add_argument("--out", help="ignored: the timings are printed (bench/gpu.sh logs them)")
    parser.parse_args(argv)
    dev, dt = "cuda", torch.bfloat16
    n, h, length, d_k, layers = 256, 8, 48, 64, 6
    q = torch.randn(n, h, 1, d_k, device=dev, dtype=dt)
    k = torch.randn(n, h, length, d_k, device=dev, dtype=dt)
    v = torch.randn_like(k)
    mask = (torch.arange(length, device=dev) <= 20).view(1, 1, 1, -1)

    def manual() -> torch.Tensor:
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d_k)
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(dt) @ v

    print("attention, one query over the cache (us per call):")
    print(
        f"  sdpa default             {timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)):8.1f}"
    )
    for name, backend in (
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("math", SDPBackend.MATH),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
    ):
        try:
            with sdpa_kernel(backend):
                t = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
            print(f"  sdpa {name:20s}{t:8.1f}")
        except RuntimeError as exc:
            print(f"  sdpa {name:20s} not available: {str(exc).splitlines()[0][:80]}")
    print(f"  written out (matmuls)    {timed(manual):8.1f}")

    print("reordering the self-attention cache of all layers (us per call):")
    cache = torch.randn(layers, 2, n, h, length, d_k, device=dev, dtype=dt)
    rows = torch.randint(0, n, (n,), device=dev)
    spare = torch.empty_like(cache)
    print(
        f"  index_select(2) + copy_  {timed(lambda: cache.copy_(cache.index_select(2, rows))):8.1f}"
    )
    print(
        f"  index_select(2, out=)    {timed(lambda: torch.index_select(cache, 2, rows, out=spare)):8.1f}"
    )
    first = torch.randn(n, layers, 2, h, length, d_k, device=dev, dtype=dt)
    spare_first = torch.empty_like(first)
    print(
        f"  rows first: index_select(0) + copy_ {timed(lambda: first.copy_(first.index_select(0, rows))):8.1f}"
    )
    print(
        f"  rows first: index_select(0, out=)   {timed(lambda: torch.index_select(first, 0, rows, out=spare_first)):8.1f}"
    )
    flat = cache.view(layers * 2, n, -1)
    print(
        f"  view (12, N, -1) index_select(1) + copy_ {timed(lambda: flat.copy_(flat.index_select(1, rows))):8.1f}"
    )
    print(
        f"  per layer index_select(0) x12 + copy_    {timed(lambda: [c.copy_(c.index_select(0, rows)) for c in cache.view(layers * 2, n, h, length, d_k)]):8.1f}"
    )
    # A window of the first W positions (session 8): whole rows of the window are C pieces of
    # memory each (the gather was element by element in a profile), or one row per piece
    # (session 9, StaticKVCache._window_rows), each contiguous.
    pieces = torch.arange(layers * 2 * h, device=dev)
    for window in (16, 32):
        source, target = first[..., :window, :], spare_first[..., :window, :]

        def whole(source: torch.Tensor = source, target: torch.Tensor = target) -> None:
            torch.index_select(source, 0, rows, out=target)

        print(f"  rows first, window {window}: rows whole      {timed(whole):8.1f}")

        def by_pieces(window: int = window) -> None:
            index = (rows.view(-1, 1) * pieces.numel() + pieces).view(-1)
            src = first.view(-1, length * d_k)[:, : window * d_k]
            torch.index_select(
                src, 0, index, out=spare_first.view(-1, length * d_k)[:, : window * d_k]
            )

        print(f"  rows first, window {window}: one row per piece {timed(by_pieces):8.1f}")

    print("cross-attention over 48 source positions (us per call):")
    beams = 4
    memory_k = torch.randn(n // beams, h, length, d_k, device=dev, dtype=dt)
    memory_v = torch.randn_like(memory_k)
    repeated_k = memory_k.repeat_interleave(beams, dim=0)
    repeated_v = memory_v.repeat_interleave(beams, dim=0)
    shared_q = q.view(n // beams, beams, h, d_k).transpose(1, 2)  # (B, h, K, d_k)
    print(
        f"  a copy per beam (N, h, 1, d_k)   {timed(lambda: F.scaled_dot_product_attention(q, repeated_k, repeated_v)):8.1f}"
    )
    print(
        f"  shared by beams (B, h, K, d_k)   {timed(lambda: F.scaled_dot_product_attention(shared_q, memory_k, memory_v)):8.1f}"
    )


if __name__ == "__main__":
    main()
