"""Training throughput: aiayn vs torch.nn.Transformer vs Hugging Face Marian, one step at a time.

    python -m bench.train_throughput --device cpu --size small
    python -m bench.train_throughput --device cuda --size base --dtype bf16 --compile

Every model gets the same configuration (bench/common.py `SIZES`), the same batches (token ids
drawn once from a seed, used in turn by every model), the same dtype and the same step:

    logits = model(src_ids, tgt_in)                      # under bf16 autocast for --dtype bf16
    loss = cross_entropy(logits, tgt_out, label_smoothing=0.1, sum) / tokens
    loss.backward(); AdamW.step(); zero_grad()

The loss is the same function for all: cross-entropy with label smoothing 0.1 over float32
log-probabilities. The peers compute it the way their users write it,
``F.cross_entropy(logits.float(), ...)`` (PyTorch's own; autocast would run it in float32
anyway), eager. aiayn computes it with `aiayn.train.label_smoothed_nll`, as its Trainer does:
in eager mode on a CPU its own loss computed by blocks of rows (`aiayn.loss.LabelSmoothedNLL`;
on a GPU, since session 11, its compiled loss, the default there); in compile mode with
``fused=True``, the compiled loss that ``train.compile: true`` gives aiayn's training (both
among aiayn's fast paths). The row ``aiayn-unfused-loss`` is aiayn with the peers' eager loss:
the before of those fast paths. The row
``aiayn-fused-qkv`` is aiayn with its attention projections as one product
(``MultiHeadAttention.fused_projections = True``, an option; measured, not faster compiled).
The row ``aiayn-sdpa-only`` is aiayn calling F.scaled_dot_product_attention for every call,
also where aiayn writes eq. (1) out because the fused kernel is slow there (CPU half-precision
training, `aiayn.model._slow_fused_backward`): the before of that choice. The row
``aiayn-torch-dropout`` is aiayn with every dropout mask drawn by PyTorch's ``F.dropout``, as
the peers draw theirs: the before of `aiayn.dropout`'s CPU mask (skipped off a CPU and when
compiled, where aiayn calls ``F.dropout`` itself). The row ``aiayn-new-grad-memory`` is aiayn
with its eager CPU loss writing the gradient into new memory instead of over the logits
(``inplace_backward``, what the Trainer's loss does): the before of that (skipped where the loss
is not aiayn's eager CPU one). The row ``aiayn-cuda-graphs`` (GPU, compiled
only) is aiayn compiled with ``mode="reduce-overhead"``: its forward and backward replayed as
CUDA graphs, one launch each instead of a launch per kernel from the host, a candidate for the
2.5-4.7 ms a step in which the GPU waited for the host (H200, session 9; not measured yet).
Marian's own loss (``labels=``) would be a plain cross-entropy without smoothing, in the
logits' dtype: different work. ``--compile`` compiles the model (as ``train.compile: true``
does); the optimiser runs eagerly for all.

Output: bench/results/train_throughput-<device>-<date>.json (rewritten after each case, so a
run stopped by a time limit keeps what it measured) and a markdown table on stdout.
``--rounds N`` measures every case N times in turn and reports the median over rounds (the
JSON's ``results`` has a row per round, ``cases`` the combined rows): on a shared machine whose
speed wanders, the per-round speed-ups in the summary show how far one round can be trusted.
"""

from __future__ import annotations

import argparse
import contextlib
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import aiayn.dropout
import aiayn.model
from aiayn.config import TransformerConfig
from aiayn.model import MultiHeadAttention, Transformer
from aiayn.train import label_smoothed_nll
from bench import common
from bench.peers import TorchTransformerMT, build_marian

MODELS: dict[str, str] = {
    "aiayn": "aiayn.model.Transformer, with aiayn's loss (fused when compiled)",
    "aiayn-unfused-loss": "aiayn.model.Transformer with the peers' eager loss",
    "aiayn-torch-dropout": "aiayn.model.Transformer with PyTorch's F.dropout for every mask",
    "aiayn-new-grad-memory": "aiayn.model.Transformer, its loss's gradient in new memory, not "
    "over the logits (CPU eager)",
    "aiayn-fused-qkv": "aiayn.model.Transformer with Q, K, V projected by one product",
    "aiayn-sdpa-only": "aiayn.model.Transformer with PyTorch's fused attention for every call",
    "aiayn-cuda-graphs": "aiayn.model.Transformer compiled with mode='reduce-overhead' (GPU)",
    "nn.Transformer": "torch.nn.Transformer + shared embeddings + tied output layer",
    "hf-marian": "transformers.MarianMTModel, random init, same shape",
}
MODES = ("eager", "compile")

Batch = tuple[Tensor, Tensor, Tensor]  # src_ids (B, S), tgt_in (B, T), tgt_out (B, T)


def build_model(name: str, cfg: TransformerConfig) -> nn.Module:
    """One of `MODELS`, taking ``(src_ids, tgt_in)`` and returning logits (B, T, V)."""
    if name.startswith("aiayn"):
        model = Transformer(cfg)
        if name == "aiayn-fused-qkv":
            for module in model.modules():
                if isinstance(module, MultiHeadAttention):
                    module.fused_projections = True
        return model
    if name == "nn.Transformer":
        return TorchTransformerMT(cfg)
    if name == "hf-marian":
        return build_marian(cfg, bos_id=common.BOS_ID, eos_id=common.EOS_ID)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def make_batches(
    cfg: TransformerConfig,
    *,
    batch: int,
    src_len: int,
    tgt_len: int,
    count: int,
    seed: int,
    device: torch.device,
) -> list[Batch]:
    """`count` random batches, on the device before any timing.

    Full-length sentences (no padding): every model still builds its padding masks, as it
    does in training, but no model can skip work that another does. Several batches are used
    in turn so that no step reuses the previous step's inputs from a cache.
    """
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        src = common.random_ids(batch, src_len, cfg.src_vocab_size, generator)
        tgt = common.random_ids(batch, tgt_len, cfg.tgt_vocab_size, generator)
        # Teacher forcing: the decoder reads <bos> y_1 .. y_{T-1} and predicts y_1 .. y_T.
        tgt_in = torch.cat([torch.full((batch, 1), common.BOS_ID), tgt[:, :-1]], dim=1)
        batches.append((src.to(device), tgt_in.to(device), tgt.to(device)))
    return batches


def plain_loss(logits: Tensor, target: Tensor, pad_id: int, smoothing: float) -> Tensor:
    """The peers' loss: PyTorch's label-smoothed cross-entropy on float32 logits, summed."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(),
        target.flatten(),
        ignore_index=pad_id,
        reduction="sum",
        label_smoothing=smoothing,
    )


def make_optimizer(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the paper's betas and eps (§5.3), the same for every model.

    Fused (one kernel for all parameters), as aiayn's Trainer uses on a GPU and on a CPU. The
    learning rate is a constant: the schedule costs nothing and does not change the work.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params,
        lr=1e-4,
        betas=(0.9, 0.98),
        eps=1e-9,
        weight_decay=0.0,
        fused=True if device.type in ("cuda", "cpu") else None,
    )


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16: autocast with float32 parameters and optimiser state (aiayn's Trainer's bf16)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def differs_from_aiayn(name: str, mode: str, device: torch.device) -> bool:
    """False for a before row that would repeat the `aiayn` row here: off a CPU, aiayn never
    writes attention out where sdpa-only would not, and every dropout is F.dropout; compiled,
    too (and the loss is the compiled one, never in place)."""
    if name in ("aiayn-torch-dropout", "aiayn-new-grad-memory"):
        return device.type == "cpu" and mode == "eager"
    if name == "aiayn-cuda-graphs":  # no graphs but CUDA's: elsewhere, aiayn compiled again
        return device.type == "cuda" and mode == "compile"
    return device.type == "cpu" or name != "aiayn-sdpa-only"


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Unique parameters (tied matrices once), all and trainable."""
    params = list(model.parameters())  # nn.Module.parameters() yields a shared tensor once
    return {
        "params": sum(p.numel() for p in params),
        "params_trainable": sum(p.numel() for p in params if p.requires_grad),
    }


class TrainingStep:
    """One model's training step on the shared batches; each call runs one step.

    The step: forward (under bf16 autocast for bf16), the loss, backward, AdamW, zero_grad.
    `last_loss` holds the latest loss as a tensor (reading it would synchronise a GPU).
    """

    def __init__(
        self,
        name: str,
        mode: str,
        cfg: TransformerConfig,
        batches: Sequence[Batch],
        *,
        device: torch.device,
        dtype: torch.dtype,
        label_smoothing: float,
        seed: int,
    ) -> None:
        torch.manual_seed(seed)
        self.name, self.mode, self.cfg, self.batches = name, mode, cfg, batches
        self.device, self.dtype, self.label_smoothing = device, dtype, label_smoothing
        self.model = build_model(name, cfg).to(device).train()
        # Every aiayn row computes aiayn's own loss, except the one whose point is not to.
        self.own_loss = name.startswith("aiayn") and name != "aiayn-unfused-loss"
        self.optimizer = make_optimizer(self.model, device)
        graphs = "reduce-overhead" if name == "aiayn-cuda-graphs" else None
        self.forward = torch.compile(self.model, mode=graphs) if mode == "compile" else self.model
        # Target tokens (no padding): what the loss is averaged over.
        self.n_tokens = batches[0][1].numel()
        self.calls = 0
        self.last_loss = torch.zeros(())

    def _case(self) -> contextlib.AbstractContextManager:
        """What the row changes in aiayn for the duration of a step."""
        if self.name == "aiayn-sdpa-only":
            return mock.patch.object(aiayn.model, "_slow_fused_backward", lambda q: False)
        if self.name == "aiayn-torch-dropout":
            return mock.patch.object(aiayn.dropout, "_draws_own_mask", lambda x: False)
        return contextlib.nullcontext()

    def __call__(self) -> None:
        src, tgt_in, tgt_out = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        with self._case():
            with autocast(self.device, self.dtype):
                logits = self.forward(src, tgt_in)
                if self.own_loss:
                    summed = label_smoothed_nll(
                        logits,
                        tgt_out,
                        self.cfg.pad_id,
                        self.label_smoothing,
                        # Compiled when the model is; else aiayn's default (compiled on a GPU).
                        fused=True if self.mode == "compile" else None,
                        # As the Trainer's loss (tasks/seq2seq.py), except in the before row.
                        inplace_backward=self.name != "aiayn-new-grad-memory",
                    )
                else:
                    summed = plain_loss(logits, tgt_out, self.cfg.pad_id, self.label_smoothing)
                loss = summed / self.n_tokens
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = loss.detach()  # read after the timing: .item() here would synchronise


def run_case(
    name: str,
    mode: str,
    cfg: TransformerConfig,
    batches: Sequence[Batch],
    *,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    repeats: int,
    label_smoothing: float,
    seed: int,
    flops_per_step: float,
    matmul_flops_per_s: float,
) -> dict[str, Any]:
    """Build one model, train it for 1 + warmup + repeats steps, and return its measurements."""
    memory = common.PeakMemory(device)
    memory.start()  # before the model exists: its parameters and optimiser state count
    step = TrainingStep(
        name,
        mode,
        cfg,
        batches,
        device=device,
        dtype=dtype,
        label_smoothing=label_smoothing,
        seed=seed,
    )
    batch, src_len = batches[0][0].shape
    tgt_len = batches[0][1].size(1)
    n_tokens = step.n_tokens
    # The first step alone: it allocates the optimiser state and, compiled, compiles.
    common.synchronize(device)
    first = common.time_fn(step, device, warmup=0, repeats=1)[0]
    first_loss = float(step.last_loss)
    times = common.time_fn(step, device, warmup=warmup, repeats=repeats)
    step_s = common.median(times)
    result = {
        "model": name,
        "mode": mode,
        **count_parameters(step.model),
        "step_s_median": step_s,
        "step_s_repeats": times,
        "step_s_spread": common.spread(times),
        "first_step_s": first,
        "tgt_tokens_per_s": n_tokens / step_s,
        "tokens_per_s": batch * (src_len + tgt_len) / step_s,
        "model_flops_per_s": flops_per_step / step_s,
        "mfu": flops_per_step / step_s / matmul_flops_per_s,
        "peak_mem_mib": memory.peak_mib(),
        "loss_first": first_loss,
        "loss_last": float(step.last_loss),
    }
    # The model and optimiser are freed when this function returns; the caller cleans up.
    return result


def prewarm(names: Sequence[str], device: torch.device, dtype: torch.dtype) -> None:
    """One step of each model at the tiny size before anything is measured.

    Imports (transformers) and one-time initialisations (the autograd engine's threads, BLAS
    handles and workspaces, thread pools) then happen here, not inside whichever case runs
    first, whose time and memory they would inflate.
    """
    cfg = common.SIZES["tiny"].config()
    batches = make_batches(cfg, batch=2, src_len=8, tgt_len=8, count=1, seed=0, device=device)
    for name in names:
        run_case(
            name,
            "eager",
            cfg,
            batches,
            device=device,
            dtype=dtype,
            warmup=0,
            repeats=1,
            label_smoothing=0.1,
            seed=0,
            flops_per_step=1.0,
            matmul_flops_per_s=1.0,
        )
    common.free_memory(device)


def combine_rounds(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, mode) from the rows of every round, in first-measured order.

    With one round a row is its round's row. With several, the step time is the median of the
    rounds' medians (`step_s_rounds`), the rates are recomputed from it, the repeats of all
    rounds are pooled for the spread, and the peak memory is the largest. A case that failed in
    every round keeps its first error.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["model"], r["mode"]), []).append(r)
    rows = []
    for group in groups.values():
        done = [r for r in group if "step_s_median" in r]
        if not done:
            rows.append(group[0])
            continue
        if len(done) == 1:
            rows.append(done[0])
            continue
        first = done[0]
        per_round = [r["step_s_median"] for r in done]
        step_s = common.median(per_round)
        pooled = [t for r in done for t in r["step_s_repeats"]]
        scale = first["step_s_median"] / step_s  # rates are inversely proportional to time
        row = {key: value for key, value in first.items() if key != "round"}
        row.update(
            rounds=len(done),
            step_s_median=step_s,
            step_s_rounds=per_round,
            step_s_repeats=pooled,
            step_s_spread=common.spread(pooled),
            peak_mem_mib=max(r["peak_mem_mib"] for r in done),
            loss_last=done[-1]["loss_last"],
        )
        for key in ("tgt_tokens_per_s", "tokens_per_s", "model_flops_per_s", "mfu"):
            row[key] = first[key] * scale
        rows.append(row)
    return rows


def _speedup(rows: list[dict[str, Any]], aiayn_mode: str, peer_mode: str) -> dict | None:
    """aiayn's speed-up over the fastest peer among `rows`, or None if either is missing."""
    done = [r for r in rows if "step_s_median" in r]
    ours = [r for r in done if r["model"] == "aiayn" and r["mode"] == aiayn_mode]
    peers = [r for r in done if not r["model"].startswith("aiayn") and r["mode"] == peer_mode]
    if not (ours and peers):
        return None
    best = min(peers, key=lambda r: r["step_s_median"])
    return {
        "fastest_peer": best["model"],
        "aiayn_speedup": best["step_s_median"] / ours[0]["step_s_median"],
    }


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """aiayn's speed-up over the fastest peer (>1: aiayn is faster), for every pair of modes
    measured: "aiayn eager vs peers compile" compares eager aiayn with the compiled peers.

    From the combined rows (:func:`combine_rounds`); with several rounds, also each round's own
    speed-up (`per_round`): their range says how much one round can be trusted.
    """
    rounds = sorted({r.get("round", 1) for r in results})
    combined = combine_rounds(results)
    summary: dict[str, Any] = {}
    for aiayn_mode in MODES:
        for peer_mode in MODES:
            overall = _speedup(combined, aiayn_mode, peer_mode)
            if overall is None:
                continue
            if len(rounds) > 1:
                each = [
                    _speedup([r for r in results if r.get("round", 1) == k], aiayn_mode, peer_mode)
                    for k in rounds
                ]
                overall["per_round"] = [e["aiayn_speedup"] if e else None for e in each]
            summary[f"aiayn {aiayn_mode} vs peers {peer_mode}"] = overall
    return summary


def table(results: list[dict[str, Any]]) -> str:
    """The markdown table: one row per (model, mode); 'aiayn x' = this row's time / aiayn's."""
    results = combine_rounds(results)
    aiayn = {r["mode"]: r for r in results if r["model"] == "aiayn" and "step_s_median" in r}
    rows = []
    for r in results:
        if "error" in r:
            rows.append(
                [r["model"], r["mode"], "failed: " + r["error"].splitlines()[-1]] + ["-"] * 6
            )
            continue
        ref = aiayn.get(r["mode"])
        ratio = r["step_s_median"] / ref["step_s_median"] if ref else None
        mfu = r["mfu"] * 100
        rows.append(
            [
                r["model"],
                r["mode"],
                common.fmt(r["step_s_median"] * 1e3, 1),
                common.fmt(r["tgt_tokens_per_s"], 0),
                common.fmt(r["tokens_per_s"], 0),
                common.fmt(r["peak_mem_mib"], 0),
                f"{mfu:.1f}%",
                f"±{r['step_s_spread'] * 50:.0f}%",
                common.fmt(ratio, 2),
            ]
        )
    headers = [
        "model",
        "mode",
        "ms/step",
        "tgt tok/s",
        "src+tgt tok/s",
        "peak MiB",
        "MFU",
        "spread",
        "aiayn x",
    ]
    return common.markdown_table(headers, rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_throughput",
        description="Training throughput of aiayn vs torch.nn.Transformer vs HF Marian.",
    )
    common.add_run_options(parser)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also measure torch.compile'd models (same as --modes eager,compile)",
    )
    parser.add_argument(
        "--modes", default=None, help="comma-separated: eager, compile (default: eager)"
    )
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated, from: {', '.join(MODELS)}"
    )
    parser.add_argument("--batch", type=int, help="sentences per batch (default: the size's)")
    parser.add_argument("--src-len", type=int, help="source tokens per sentence")
    parser.add_argument("--tgt-len", type=int, help="target tokens per sentence")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    parser.add_argument(
        "--repeats", type=int, default=10, help="timed steps (the median is reported)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every case this many times, in turn (round 1 of every case, then round "
        "2, ...): a slow spell of a shared machine then slows one round of every model, not "
        "all of one model's steps; reported: the median over rounds",
    )
    parser.add_argument("--batches", type=int, default=4, help="distinct batches used in turn")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument(
        "--matmul-size", type=int, help="n of the n^3 product for MFU (default 8192 GPU, 1024 CPU)"
    )
    args = parser.parse_args(argv)
    modes = args.modes or ("eager,compile" if args.compile else "eager")
    args.modes = [m.strip() for m in modes.split(",") if m.strip()]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    for value, allowed, what in ((args.modes, MODES, "mode"), (args.models, MODELS, "model")):
        unknown = [v for v in value if v not in allowed]
        if unknown:
            parser.error(f"unknown {what} {unknown[0]!r}; choose from {', '.join(allowed)}")
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the benchmark; returns the path of the JSON written."""
    args = parse_args(argv)
    device, dtype, size, cfg = common.setup(args)
    batch = args.batch or size.train_batch
    src_len, tgt_len = args.src_len or size.train_src_len, args.tgt_len or size.train_tgt_len
    flops = common.train_step_flops(cfg, batch, src_len, tgt_len)
    machine = common.machine_info(device)
    print(
        f"train_throughput: {', '.join(args.models)} x {', '.join(args.modes)} on {device.type} "
        f"({common.describe_machine(machine)})\n"
        f"  size {size.name}: d_model {cfg.d_model}, {cfg.n_encoder_layers}+{cfg.n_decoder_layers} "
        f"layers, {cfg.n_heads} heads, d_ff {cfg.d_ff}, vocab {cfg.src_vocab_size} shared; "
        f"batch {batch} x {src_len} src + {batch} x {tgt_len} tgt tokens, {args.dtype}; "
        f"1 + {args.warmup} warm-up steps, median of {args.repeats}",
        flush=True,
    )
    matmul_n = args.matmul_size or (8192 if device.type == "cuda" else 1024)
    rate = common.matmul_rate(device, dtype, n=matmul_n)
    print(
        f"  matmul rate ({rate['dtype']}, n={matmul_n}): {rate['flops_per_s'] / 1e12:.3f} TFLOP/s; "
        f"model FLOPs per step: {flops['total'] / 1e9:.2f} GFLOP",
        flush=True,
    )
    batches = make_batches(
        cfg,
        batch=batch,
        src_len=src_len,
        tgt_len=tgt_len,
        count=args.batches,
        seed=args.seed,
        device=device,
    )
    prewarm(args.models, device, dtype)
    path = common.results_path(args.out, "train_throughput", device)
    payload: dict[str, Any] = {
        **common.header("train_throughput", machine, status="running"),
        "settings": {
            "device": device.type,
            "size": size.name,
            "dtype": args.dtype,
            "batch": batch,
            "src_len": src_len,
            "tgt_len": tgt_len,
            "modes": args.modes,
            "models": {name: MODELS[name] for name in args.models},
            "warmup": args.warmup,
            "repeats": args.repeats,
            "batches": args.batches,
            "rounds": args.rounds,
            "label_smoothing": args.label_smoothing,
            "loss": (
                "label-smoothed cross-entropy over float32 log-probabilities, summed / target "
                "tokens: peers and aiayn-unfused-loss F.cross_entropy(logits.float()) eager; "
                "aiayn aiayn.train.label_smoothed_nll: eager, by blocks of rows (aiayn.loss) "
                "on a CPU and the peers' loss on a GPU; fused=True (compiled) in compile mode"
            ),
            "optimizer": "AdamW(lr=1e-4, betas=(0.9, 0.98), eps=1e-9), fused on CUDA and CPU",
            "seed": args.seed,
        },
        "model_config": cfg.to_dict(),
        "flops_per_step": flops,
        "matmul_rate": rate,
        "results": [],
    }
    common.write_json(path, payload)
    cases = [
        (round_, mode, name)
        for round_ in range(1, args.rounds + 1)
        for mode in args.modes
        for name in args.models
        if differs_from_aiayn(name, mode, device)
    ]
    for round_, mode, name in cases:
        of_rounds = f", round {round_} of {args.rounds}" if args.rounds > 1 else ""
        print(f"  {name} ({mode}{of_rounds}) ...", flush=True)
        try:
            result = run_case(
                name,
                mode,
                cfg,
                batches,
                device=device,
                dtype=dtype,
                warmup=args.warmup,
                repeats=args.repeats,
                label_smoothing=args.label_smoothing,
                seed=args.seed,
                flops_per_step=flops["total"],
                matmul_flops_per_s=rate["flops_per_s"],
            )
        except Exception as exc:  # one peer failing (say, to compile) must not lose the rest
            traceback.print_exc()
            result = {"model": name, "mode": mode, "error": f"{type(exc).__name__}: {exc}"}
        result["round"] = round_
        if mode == "compile":
            torch._dynamo.reset()  # the next model compiles from a clean slate
        common.free_memory(device)
        payload["results"].append(result)
        payload["summary"] = summarise(payload["results"])
        if args.rounds > 1:
            payload["cases"] = combine_rounds(payload["results"])
        common.write_json(path, payload)
    payload["status"] = "complete"
    common.write_json(path, payload)
    print(f"\n{common.describe_machine(machine)}\n{table(payload['results'])}")
    for pair, s in payload["summary"].items():
        rounds = ""
        if "per_round" in s:
            each = ", ".join("-" if x is None else f"{x:.2f}" for x in s["per_round"])
            rounds = f"; per round: {each}"
        print(f"{pair}: aiayn {s['aiayn_speedup']:.2f}x the fastest ({s['fastest_peer']}){rounds}")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
