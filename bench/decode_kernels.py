"""Timings of the candidate kernels for one fixed-shape decoding step (a guide, not a benchmark).

    python -m bench.decode_kernels      (CUDA; base size, beam 4 x 64 sentences, 48 positions, bf16)

Two things dominate a graphed beam step at the base size (`bench.profile_static`): attention of
one query over the cache, and reordering the cache rows. This times the ways to do each (also
a window of the cache, and cross-attention with the memory shared by a source's beams), with
CUDA events, in two columns: "alone", the median of 50 calls each launched from the host after
10 warm-up calls (launch overhead included), and "graph", the mean of 50 replays of a CUDA
graph of one call (the kernels' own time, as in `aiayn.static_decoding`'s graphed steps; "-"
where the call cannot be captured). A graphed step pays only the second: in session 9's
profile (H200) cuDNN's attention kernel took 29 µs a call in the graphed beam step, against
65 µs timed alone here, and the written-out attention (three kernels) 115 µs alone.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def graphed(fn, repeats: int = 50) -> float | None:
    """Microseconds per replay of a CUDA graph of one call of `fn`, or None where capturing
    it fails (a kernel that synchronises or allocates in a way graphs do not allow)."""
    try:
        for _ in range(3):  # lazy initialisation (cuBLAS handles, attention plans) before capture
            fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        torch.cuda.synchronize()
        return None
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / repeats


def show(label: str, fn) -> None:
    """One row: `label`, then the time alone and in a graph (µs per call)."""
    in_graph = graphed(fn)
    graph_text = "-" if in_graph is None else f"{in_graph:.1f}"
    print(f"  {label:42s}{timed(fn):9.1f}{graph_text:>9}")


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

    print(f"  {'(us per call)':42s}{'alone':>9}{'graph':>9}")
    print("attention, one query over the cache:")
    show("sdpa default", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    for name, backend in (
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("math", SDPBackend.MATH),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
    ):

        def sdpa(backend: SDPBackend = backend) -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        try:
            sdpa()
        except RuntimeError as exc:
            print(f"  sdpa {name:37s} not available: {str(exc).splitlines()[0][:80]}")
            continue
        show(f"sdpa {name}", sdpa)
    show("written out (matmuls)", manual)

    print("reordering the self-attention cache of all layers:")
    cache = torch.randn(layers, 2, n, h, length, d_k, device=dev, dtype=dt)
    rows = torch.randint(0, n, (n,), device=dev)
    spare = torch.empty_like(cache)
    show("index_select(2) + copy_", lambda: cache.copy_(cache.index_select(2, rows)))
    show("index_select(2, out=)", lambda: torch.index_select(cache, 2, rows, out=spare))
    first = torch.randn(n, layers, 2, h, length, d_k, device=dev, dtype=dt)
    spare_first = torch.empty_like(first)
    show("rows first: index_select(0) + copy_", lambda: first.copy_(first.index_select(0, rows)))
    show(
        "rows first: index_select(0, out=)",
        lambda: torch.index_select(first, 0, rows, out=spare_first),
    )
    flat = cache.view(layers * 2, n, -1)
    show("view (12, N, -1) index_select(1) + copy_", lambda: flat.copy_(flat.index_select(1, rows)))
    show(
        "per layer index_select(0) x12 + copy_",
        lambda: [
            c.copy_(c.index_select(0, rows)) for c in cache.view(layers * 2, n, h, length, d_k)
        ],
    )
    # A window of the first W positions (session 8): whole rows of the window are C pieces of
    # memory each (the gather was element by element in a profile), or one row per piece
    # (session 9, StaticKVCache._window_rows), each contiguous.
    pieces = torch.arange(layers * 2 * h, device=dev)
    for window in (16, 32):
        source, target = first[..., :window, :], spare_first[..., :window, :]

        def whole(source: torch.Tensor = source, target: torch.Tensor = target) -> None:
            torch.index_select(source, 0, rows, out=target)

        show(f"rows first, window {window}: rows whole", whole)

        def by_pieces(window: int = window) -> None:
            index = (rows.view(-1, 1) * pieces.numel() + pieces).view(-1)
            src = first.view(-1, length * d_k)[:, : window * d_k]
            torch.index_select(
                src, 0, index, out=spare_first.view(-1, length * d_k)[:, : window * d_k]
            )

        show(f"rows first, window {window}: one row per piece", by_pieces)

    print("cross-attention over 48 source positions:")
    beams = 4
    memory_k = torch.randn(n // beams, h, length, d_k, device=dev, dtype=dt)
    memory_v = torch.randn_like(memory_k)
    repeated_k = memory_k.repeat_interleave(beams, dim=0)
    repeated_v = memory_v.repeat_interleave(beams, dim=0)
    shared_q = q.view(n // beams, beams, h, d_k).transpose(1, 2)  # (B, h, K, d_k)
    show(
        "a copy per beam (N, h, 1, d_k)",
        lambda: F.scaled_dot_product_attention(q, repeated_k, repeated_v),
    )
    show(
        "shared by beams (B, h, K, d_k)",
        lambda: F.scaled_dot_product_attention(shared_q, memory_k, memory_v),
    )


if __name__ == "__main__":
    main()
