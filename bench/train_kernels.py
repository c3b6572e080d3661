"""Timings of the pieces behind aiayn's CPU training fast paths (a guide, not a benchmark).

    python -m bench.train_kernels --device cpu --size small

At the size's training batch, forward + backward of:
  * the label-smoothed loss over (B*T, V) logits: PyTorch's ``F.cross_entropy(logits.float())``
    against `aiayn.loss.LabelSmoothedNLL` (blocks of rows), in fp32 and bf16;
  * one attention call (B, h, T, d_k) with a key mask: PyTorch's fused
    ``F.scaled_dot_product_attention`` against eq. (1) written out
    (`aiayn.model.scaled_dot_product_attention`), in fp32 and bf16; and the forward alone;
  * dropout (P_drop 0.1) of one sub-layer output (B, T, d_model): PyTorch's ``F.dropout``
    against `aiayn.dropout.dropout` (16 random bits per element), in fp32 and bf16;
  * an n x n x n matrix product in fp32 and bf16 (this CPU's AMX units: bf16 rate);
  * with ``--compile-loss``, the loss that ``train.compile: true`` compiles: PyTorch's
    ``F.cross_entropy`` compiled (its loss before session 11) against the row sums of
    `aiayn.train._label_smoothed_nll_by_rows` compiled, in fp32 and bf16 (compiling takes
    seconds, and on a CPU a C compiler).
Each pair alternates `--turns` times, the median of `--repeats` calls each turn, so that both
sides of a pair see the same state of a machine whose speed drifts. Output:
bench/results/train_kernels-<device>-<date>.json and a table of milliseconds per turn.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

import aiayn.train
from aiayn.dropout import dropout
from aiayn.loss import label_smoothed_nll_blockwise
from aiayn.model import scaled_dot_product_attention
from bench import common

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def loss_pair(n: int, vocab: int, dtype: torch.dtype, device: torch.device) -> dict[str, Callable]:
    logits = torch.randn(n, vocab, dtype=dtype, device=device, requires_grad=True)
    target = torch.randint(1, vocab, (n,), device=device)

    def pytorch() -> None:
        loss = F.cross_entropy(
            logits.float(), target, ignore_index=0, reduction="sum", label_smoothing=0.1
        )
        loss.backward()

    def blockwise() -> None:
        label_smoothed_nll_blockwise(logits, target, 0, 0.1).backward()

    return {"F.cross_entropy": pytorch, "blockwise": blockwise}


def compiled_loss_pair(
    n: int, vocab: int, dtype: torch.dtype, device: torch.device
) -> dict[str, Callable]:
    logits = torch.randn(n, 1, vocab, dtype=dtype, device=device, requires_grad=True)
    target = torch.randint(1, vocab, (n, 1), device=device)
    aiayn.train.any_batch_shape(logits, target)  # as `label_smoothed_nll` compiles it
    sides = {
        "compiled F.cross_entropy": aiayn.train._label_smoothed_nll,
        "compiled row sums": aiayn.train._label_smoothed_nll_by_rows,
    }

    def run(loss: Callable) -> Callable:
        compiled = torch.compile(loss)
        return lambda: compiled(logits, target, 0, 0.1).backward()

    return {side: run(loss) for side, loss in sides.items()}


def attention_pair(
    shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device, backward: bool
) -> dict[str, Callable]:
    q, k, v = (
        torch.randn(shape, dtype=dtype, device=device, requires_grad=backward) for _ in range(3)
    )
    keep = torch.ones(shape[0], 1, 1, shape[2], dtype=torch.bool, device=device)
    keep[..., -5:] = False  # a key mask, as padding gives
    grad = torch.randn(shape, dtype=dtype, device=device)

    def run(fn: Callable) -> Callable:
        def call() -> None:
            out = fn()
            if backward:
                out.backward(grad)

        return call

    return {
        "fused (sdpa)": run(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep)),
        "written out": run(lambda: scaled_dot_product_attention(q, k, v, keep)),
    }


def dropout_pair(
    shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device
) -> dict[str, Callable]:
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn(shape, dtype=dtype, device=device)
    return {
        "F.dropout": lambda: F.dropout(x, 0.1, training=True).backward(grad),
        "aiayn.dropout": lambda: dropout(x, 0.1).backward(grad),
    }


def matmul_pair(n: int, device: torch.device) -> dict[str, Callable]:
    pairs = {
        name: [torch.randn(n, n, dtype=t, device=device) for _ in "ab"]
        for name, t in DTYPES.items()
    }
    return {name: (lambda a=a, b=b: a @ b) for name, (a, b) in pairs.items()}


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m bench.train_kernels", description=__doc__)
    common.add_run_options(parser)
    parser.add_argument("--turns", type=int, default=3, help="alternations of each pair")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per turn")
    parser.add_argument("--matmul-size", type=int, default=1024)
    parser.add_argument(
        "--compile-loss", action="store_true", help="also the compiled losses (compiles)"
    )
    args = parser.parse_args(argv)
    device, _, size, cfg = common.setup(args)
    n = size.train_batch * size.train_tgt_len
    shape = (size.train_batch, cfg.n_heads, size.train_tgt_len, cfg.d_model // cfg.n_heads)
    cases: dict[str, dict[str, Callable]] = {}
    for name, dtype in DTYPES.items():
        cases[f"loss fwd+bwd {n}x{cfg.tgt_vocab_size} {name}"] = loss_pair(
            n, cfg.tgt_vocab_size, dtype, device
        )
        cases[f"attention fwd+bwd {'x'.join(map(str, shape))} {name}"] = attention_pair(
            shape, dtype, device, backward=True
        )
        cases[f"attention fwd {'x'.join(map(str, shape))} {name}"] = attention_pair(
            shape, dtype, device, backward=False
        )
        activations = (size.train_batch, size.train_tgt_len, cfg.d_model)
        cases[f"dropout fwd+bwd {'x'.join(map(str, activations))} {name}"] = dropout_pair(
            activations, dtype, device
        )
    cases[f"matmul {args.matmul_size}^3"] = matmul_pair(args.matmul_size, device)
    if args.compile_loss:
        for name, dtype in DTYPES.items():
            cases[f"compiled loss fwd+bwd {n}x{cfg.tgt_vocab_size} {name}"] = compiled_loss_pair(
                n, cfg.tgt_vocab_size, dtype, device
            )
    results: dict[str, dict[str, list[float]]] = {}
    rows = []
    for case, pair in cases.items():
        results[case] = {side: [] for side in pair}
        for _ in range(args.turns):
            for side, fn in pair.items():
                times = common.time_fn(fn, device, warmup=3, repeats=args.repeats)
                results[case][side].append(common.median(times))
        for side, medians in results[case].items():
            rows.append([case, side, ", ".join(f"{t * 1e3:.2f}" for t in medians)])
    path = common.results_path(args.out, "train_kernels", device)
    common.write_json(
        path,
        {
            **common.header("train_kernels", common.machine_info(device)),
            "settings": {
                "size": size.name,
                "turns": args.turns,
                "repeats": args.repeats,
                "compile_loss": args.compile_loss,
            },
            "seconds_median_per_turn": results,
        },
    )
    print(common.markdown_table(["case", "side", "ms per turn (medians)"], rows))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
