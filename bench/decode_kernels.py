"""Timings of the candidate kernels for one fixed-shape decoding step (a guide, not a benchmark).

    python -m bench.decode_kernels      (CUDA; base size, beam 4 x 64 sentences, 48 positions, bf16)

Two things dominate a graphed beam step at the base size (`bench.profile_static`): attention of
one query over the cache, and reordering the cache rows. This times the ways to do each, with
CUDA events, median of 50 calls after 10 warm-up calls.
"""

from __future__ import annotations

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


def main() -> None:
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


if __name__ == "__main__":
    main()
