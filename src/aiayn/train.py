"""The training loop (§5): token batches, Adam with warm-up, label smoothing, checkpoints, resume.

One loop serves every task. A task hands the `Trainer` a `TokenBatchSampler`, a function that
turns a list of example indices into a `Batch`, a loss, and optionally an evaluation; the
trainer owns the optimiser, the learning-rate schedule, precision, gradient accumulation,
distributed data parallelism, logging and checkpoints.

An interrupted run resumes exactly: the model, the optimiser, the step, the position in the
data (epoch and batches consumed) and every random number generator are checkpointed, so
`--resume` continues as if the run had never stopped.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from aiayn import atomic, sharding
from aiayn import checkpoint as ckpt
from aiayn.config import ConfigSection
from aiayn.data.batching import TokenBatchSampler
from aiayn.errors import AiaynError, CheckpointError, CheckpointMismatchError, ConfigError
from aiayn.faults import maybe_fail
from aiayn.loss import label_smoothed_nll_blockwise

logger = logging.getLogger(__name__)


class TrainingError(AiaynError):
    """Training cannot go on (for example the loss or gradients stay non-finite)."""


class TrainingStopped(TrainingError):
    """A signal (Ctrl-C, SIGTERM) stopped training after `step`; `checkpoint` holds it."""

    def __init__(self, message: str, *, signal: int, step: int, checkpoint: Path) -> None:
        super().__init__(message)
        self.signal, self.step, self.checkpoint = signal, step, checkpoint


@dataclass
class TrainConfig(ConfigSection):
    """How to train. Defaults follow §5 of the paper (base model, 100K steps)."""

    SECTION: ClassVar[str] = "train"
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "precision": ("auto", "fp32", "bf16", "fp16"),
        "device": ("auto", "cpu", "cuda", "mps"),
    }

    max_steps: int = 100_000  # §5.2: base models trained for 100,000 steps
    max_epochs: int | None = None  # stop after this many passes over the data, if reached first
    max_time_s: float | None = None  # stop (validate, save) after this many seconds of training
    max_tokens: int = 4096  # padded tokens per batch and side (§5.1 used ~25000 per step)
    grad_accum: int = (
        1  # batches per optimiser step: effective batch = max_tokens * grad_accum * GPUs
    )
    warmup_steps: int = 4000  # §5.3: warmup_steps = 4000
    lr_scale: float = 1.0  # multiplies the §5.3 learning rate (1.0 is the paper's)
    adam_beta1: float = 0.9  # §5.3
    adam_beta2: float = 0.98  # §5.3
    adam_eps: float = 1e-9  # §5.3
    weight_decay: float = 0.0  # not in the paper; decoupled (AdamW) and on matrices only
    label_smoothing: float = 0.1  # §5.4: eps_ls = 0.1
    clip_norm: float = 0.0  # gradient-norm clipping; 0 turns it off (the paper does not clip)
    precision: str = (
        "auto"  # bf16 autocast on a GPU that has it, else fp32; fp16 uses a grad scaler
    )
    compile: bool = False  # torch.compile the model for training
    # Under torchrun: shard parameters, gradients and optimiser state over the processes
    # (FSDP) instead of replicating them (DDP); for models that do not fit one card.
    fsdp: bool = False
    device: str = "auto"  # cuda if available, else cpu
    seed: int = 1  # the batch order; tasks also seed the initialisation (and so dropout) with it
    log_every: int = 100  # steps between metrics lines in train.jsonl
    eval_every: int = 1000  # steps between validations (0: only at the end)
    save_every: int = 1000  # steps between checkpoints (0: only at the end)
    keep_last: int = 5  # checkpoints kept besides the best (§6.1 averages the last 5)
    max_bad_steps: int = 10  # non-finite steps in a row before training stops

    def check(self) -> None:
        for name in (
            "max_steps",
            "max_tokens",
            "grad_accum",
            "log_every",
            "keep_last",
            "max_bad_steps",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_time_s is not None and self.max_time_s <= 0:
            raise ConfigError(f"train.max_time_s must be > 0 or null, got {self.max_time_s}")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ConfigError(f"train.max_epochs must be >= 1 or null, got {self.max_epochs}")
        if self.lr_scale <= 0:
            raise ConfigError(f"train.lr_scale must be > 0, got {self.lr_scale}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ConfigError("train.adam_beta1 and train.adam_beta2 must be in [0, 1)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(
                f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )
        if self.clip_norm < 0 or self.weight_decay < 0 or self.adam_eps <= 0:
            raise ConfigError(
                "train.clip_norm and train.weight_decay must be >= 0, train.adam_eps > 0"
            )


def learning_rate(step: int, d_model: int, warmup_steps: int, scale: float = 1.0) -> float:
    """Eq. (3), §5.3: lrate = d_model^-0.5 * min(step_num^-0.5, step_num * warmup_steps^-1.5).

    "This corresponds to increasing the learning rate linearly for the first warmup_steps
    training steps, and decreasing it thereafter proportionally to the inverse square root of
    the step number." `step` counts from 1; warmup_steps 0 means no warm-up.
    """
    step = max(step, 1)
    rising = step * warmup_steps**-1.5 if warmup_steps > 0 else math.inf  # eq. (3)'s 2nd term
    return scale * d_model**-0.5 * min(step**-0.5, rising)


def label_smoothed_nll(
    logits: Tensor,
    target: Tensor,
    pad_id: int,
    smoothing: float,
    *,
    fused: bool | None = None,
    inplace_backward: bool = False,
) -> Tensor:
    """Summed cross-entropy with label smoothing over the non-padding positions (§5.4).

    "During training, we employed label smoothing of value eps_ls = 0.1. This hurts
    perplexity, as the model learns to be more unsure, but improves accuracy and BLEU score."
    The target distribution is (1 - eps) on the reference token and eps spread uniformly over
    the vocabulary (PyTorch's convention).

    Args:
        logits: (B, T, V).  target: (B, T) token ids; pad_id positions are ignored.
        fused: compute it with a `torch.compile`d kernel, written as two sums per row
            (`_label_smoothed_nll_by_rows`), that never holds the (B*T, V) logits in float32
            as PyTorch's loss does: True always (what `train.compile: true` uses), False
            never, None (the default) on a CUDA GPU where torch.compile can make its kernels
            (`compiles_kernels_on`; not where it is switched off). Not compiled, a CPU uses
            `aiayn.loss.LabelSmoothedNLL`, the same by blocks of rows; elsewhere the loss is
            PyTorch's. Why and by how much: docs/performance.md, "Fast paths: state",
            "cross-entropy with label smoothing without float32 logits".
        inplace_backward: on a CPU in eager mode the backward pass writes the gradient over
            the logits instead of into new memory (`aiayn.loss`); for a training loss whose
            logits nothing reads afterwards. Ignored elsewhere.
    Returns:
        a scalar: the loss summed over tokens (divide by the token count for the mean).
    """
    if fused is None:
        fused = compiles_kernels_on(logits.device)
    if fused:
        any_batch_shape(logits, target)
        return _compiled_label_smoothed_nll()(logits, target, pad_id, smoothing)
    if logits.device.type == "cpu":
        return label_smoothed_nll_blockwise(
            logits.reshape(-1, logits.size(-1)),
            target.reshape(-1),
            pad_id,
            smoothing,
            inplace_backward=inplace_backward,
        )
    return _label_smoothed_nll(logits, target, pad_id, smoothing)


def _label_smoothed_nll(logits: Tensor, target: Tensor, pad_id: int, smoothing: float) -> Tensor:
    """PyTorch's loss: the eager loss off a CPU."""
    return F.cross_entropy(
        # In at least float32: a bfloat16 log-softmax over a large vocabulary loses too much.
        logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)),
        target.flatten(),
        ignore_index=pad_id,
        reduction="sum",
        label_smoothing=smoothing,
    )


def _label_smoothed_nll_by_rows(
    logits: Tensor, target: Tensor, pad_id: int, smoothing: float
) -> Tensor:
    """`_label_smoothed_nll` as two sums per row, for `torch.compile`: lse - sum_v w_v x_v,
    where w_v = eps / V + (1 - eps) [v = t] (`aiayn.loss`'s docstring derives
    lse - (1 - eps) x_t - eps sum(x) / V; here its last two terms are one weighted sum).

    Why this form: in the code the compiler writes, the forward pass is two passes over each
    row of logits (the row's maximum; then the sum of exponentials and the weighted sum), one
    fewer than compiled `F.cross_entropy`'s, and the backward pass is one: it reads the
    logits and writes the gradient, the weights recomputed from the column index. Taking
    x_t with `gather` instead (session 11's form) made its backward pass fill a float32
    (rows, V) tensor with zeros and scatter into it, another write and read of the logits'
    size in float32: 2.4 GB at the base size's 16k tokens x 37,000 words. The column index
    is compared in 32 bits, which the compiler's CPU code vectorises as wide as the floats.
    On this project's CPU, forward + backward over 1,024 x 8,000 logits, 25 alternated turns:
    1.06x the `gather` form in float32 and 1.21x from bfloat16 logits (docs/performance.md,
    session 12)."""
    x = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))  # (N, V)
    t = target.flatten()  # (N,)
    vocab = x.size(1)
    hit = torch.arange(vocab, device=x.device, dtype=torch.int32) == t.int().unsqueeze(1)
    w = hit.to(x.dtype) * (1 - smoothing) + smoothing / vocab  # (N, V), in x's precision
    rows = torch.logsumexp(x, dim=1) - (x * w).sum(1)
    return torch.where(t != pad_id, rows, 0.0).sum()


def any_batch_shape(*tensors: Tensor) -> None:
    """Mark the first two dimensions (batch and length) of `tensors` dynamic for the compiled
    loss: batches differ in size (bucketing), and a compiler that specialised on the first
    shape would compile again at the second; this compiles once for any number of rows."""
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(t, 1)


# The compiled loss. Made on first use: compiling costs seconds, and a CPU trains with it
# only under `train.compile: true`.
@functools.cache
def _compiled_label_smoothed_nll() -> Callable[[Tensor, Tensor, int, float], Tensor]:
    return torch.compile(_label_smoothed_nll_by_rows)


def compiles_kernels_on(device: torch.device) -> bool:
    """Whether the loss is compiled by default on `device`: a CUDA GPU that Triton, which
    torch.compile writes GPU kernels in, supports (compute capability 7.0 or newer), with
    Triton installed, and torch.compile not switched off. Elsewhere (a CPU, where the
    blockwise loss is as fast without a compiler; an older GPU) the loss runs eagerly."""
    if device.type != "cuda" or _compile_switched_off():
        return False
    return _triton_installed() and torch.cuda.get_device_capability(device) >= (7, 0)


def _compile_switched_off() -> bool:
    """PyTorch's two switches that make every torch.compile run its function eagerly."""
    return os.environ.get("TORCHDYNAMO_DISABLE") == "1" or bool(torch._dynamo.config.disable)


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


class Batch(Protocol):
    """What a task's batches offer the trainer."""

    n_tokens: int  # target tokens that count in the loss (for normalisation and tokens/s)

    def to(self, device: torch.device) -> Batch: ...


# A task's loss: (model, batch on device) -> summed loss over the batch's n_tokens tokens.
LossFn = Callable[[nn.Module, Any], Tensor]
# A task's evaluation: model -> metrics such as {"val_loss": 2.1, "bleu": 35.2}.
EvalFn = Callable[[nn.Module], dict[str, float]]


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]
    run_dir: Path


# --------------------------------------------------------------------------- distributed helpers


@dataclass(frozen=True)
class Distributed:
    """This process's place in a `torchrun` job (world 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, dist_info: Distributed) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "train.device is 'cuda' but no CUDA GPU is visible; use device: cpu or auto"
            )
        return torch.device("cuda", dist_info.local_rank)
    return torch.device(name)


def start_process_group(dist_info: Distributed, device: torch.device) -> None:
    """Join the torchrun job's process group, once (nothing to join in a world of one)."""
    if dist_info.world_size == 1 or dist.is_initialized():
        return
    # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; NCCL for GPUs, gloo for CPUs.
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL uses the current device of each process
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def _cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles, which multiply bf16 several times as fast as fp32."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a private PyTorch function: absent in some builds
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision fp16 needs a CUDA GPU; use fp32 or bf16 on this device")
    return name


def precision_advice(name: str, device: torch.device) -> str | None:
    """A line for the log when `precision: auto` leaves speed behind: auto stays fp32 on every
    CPU (the same numbers on every machine), but on one with AMX bf16 trains about 1.5x as
    fast (docs/performance.md)."""
    if name == "auto" and device.type == "cpu" and _cpu_has_amx():
        return (
            "this CPU has AMX: train.precision bf16 trains about 1.5x as fast as fp32 here "
            "(auto keeps fp32 on a CPU)"
        )
    return None


# --------------------------------------------------------------------------- the data stream


class BatchStream:
    """An endless stream of training batches (lists of example indices), epoch after epoch.

    Epoch e's order is `sampler.batches(e)`, a pure function of the data, the seed and e, so
    the stream's state is just (epoch, consumed) and resuming it is exact.
    """

    def __init__(self, sampler: TokenBatchSampler, epoch: int = 0, consumed: int = 0) -> None:
        self.sampler, self.epoch, self.consumed = sampler, epoch, consumed
        self._order = sampler.batches(epoch)

    def next(self) -> list[int]:
        if self.consumed == len(self._order):
            self.epoch, self.consumed = self.epoch + 1, 0
            self._order = self.sampler.batches(self.epoch)
        self.consumed += 1
        return self._order[self.consumed - 1]

    @property
    def epochs_done(self) -> int:
        """Whole passes over the data so far (the last batch of an epoch completes it)."""
        return self.epoch + (self.consumed == len(self._order))

    def state_dict(self) -> dict[str, int]:
        """The position (and the batches an epoch, which `Trainer.resume` checks)."""
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "batches_per_epoch": len(self.sampler),
            "data_digest": self.sampler.digest(),
        }


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Trains `model` on a task; see the module docstring.

    Args:
        model: the model to train (its parameters are updated in place).
        cfg: the `TrainConfig`.
        sampler: batches of example indices by token budget (the training split).
        make_batch: example indices -> a `Batch` on the CPU.
        loss_fn: (model, batch) -> summed loss (label-smoothed for translation).
        run_dir: where checkpoints, `train.jsonl` and plots go.
        run_config: the whole experiment config, stored in every checkpoint.
        d_model: for the learning-rate schedule (eq. 3).
        evaluate: model -> validation metrics, run every `eval_every` steps and at the end.
        best_metric: the metric that picks the best checkpoint, e.g. "bleu" or "val_loss".
        higher_is_better: whether a larger `best_metric` is better.
        extra_files: files copied into every checkpoint (the tokenizer).
        lr_scales: learning-rate multipliers by parameter-name prefix, e.g. {"body.": 0.1} to
            fine-tune a pre-trained body ten times slower than a new head; the longest
            matching prefix wins, and other parameters get 1.0. Each optimiser param group
            carries its multiplier as "lr_scale", applied to eq. (3)'s rate every step.
        stale_best_without_digest: `evaluate` measured otherwise before checkpoints recorded
            the data's digest (pre-training, whose validation masks then came from train.seed
            and the batching): `resume` drops the best value of such an older checkpoint,
            which new validations cannot be compared with, and the next one sets it afresh.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        *,
        sampler: TokenBatchSampler,
        make_batch: Callable[[list[int]], Any],
        loss_fn: LossFn,
        run_dir: Path,
        run_config: dict[str, Any],
        d_model: int,
        evaluate: EvalFn | None = None,
        best_metric: str = "val_loss",
        higher_is_better: bool = False,
        extra_files: dict[str, Path] | None = None,
        lr_scales: dict[str, float] | None = None,
        stale_best_without_digest: bool = False,
    ) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.dist = Distributed.from_env()
        self.device = resolve_device(cfg.device, self.dist)
        start_process_group(self.dist, self.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        advice = precision_advice(cfg.precision, self.device)
        if advice and self.dist.is_main:
            logger.info(advice)
        self.model = model.to(self.device)
        self.fsdp = cfg.fsdp and self.dist.world_size > 1
        if self.fsdp:
            sharding.shard(self.model, self.device, self.dist.world_size)  # before the optimiser
        self.sampler, self.make_batch, self.loss_fn = sampler, make_batch, loss_fn
        self.run_config, self.d_model = run_config, d_model
        self.evaluate_fn, self.best_metric, self.higher_is_better = (
            evaluate,
            best_metric,
            higher_is_better,
        )
        self.extra_files = extra_files or {}
        self.lr_scales = dict(lr_scales or {})
        self.stale_best_without_digest = stale_best_without_digest
        self.optimizer = self._make_optimizer()
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.step, self.stream = 0, BatchStream(sampler)
        self.lr = 0.0  # the rate of the latest step (eq. 3 times train.lr_scale)
        self.best_value: float | None = None
        # (loss summed, target tokens) of the steps since the last log record.
        self._log_window: tuple[float, int] = (0.0, 0)
        self.train_model = self._wrap(model)
        self._stop_signal: int | None = None
        # Wall seconds spent in fit() (validation included), carried across --resume: the
        # time-to-quality figure (train.jsonl's elapsed_s at the first good checkpoint).
        self.elapsed_before = 0.0
        self._fit_start: float | None = None

    # ------------------------------------------------------------------ setup
    def _lr_scale_of(self, name: str) -> float:
        """The multiplier of the longest `lr_scales` prefix of a parameter name (1.0 if none)."""
        matches = [prefix for prefix in self.lr_scales if name.startswith(prefix)]
        return self.lr_scales[max(matches, key=len)] if matches else 1.0

    def _make_optimizer(self) -> torch.optim.Optimizer:
        # Weight decay (if any) only on matrices, not on biases and LayerNorm gains (nanoGPT);
        # one group per (decay, lr_scale). Frozen parameters (requires_grad False) are left out.
        groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                groups.setdefault((p.dim() >= 2, self._lr_scale_of(name)), []).append(p)
        param_groups = [
            {
                "params": params,
                "weight_decay": self.cfg.weight_decay if decay else 0.0,
                "lr_scale": scale,
            }
            for (decay, scale), params in sorted(
                groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])
            )
        ]
        if not param_groups:
            raise ConfigError("every parameter of the model is frozen: there is nothing to train")
        # One fused kernel for all parameters where PyTorch has one: on a GPU, and on a CPU,
        # where it also beat the default multi-tensor AdamW 4-5x (docs/performance.md).
        fused = self.device.type in ("cuda", "cpu")
        return torch.optim.AdamW(
            param_groups,
            lr=learning_rate(1, self.d_model, self.cfg.warmup_steps, self.cfg.lr_scale),
            betas=(self.cfg.adam_beta1, self.cfg.adam_beta2),
            eps=self.cfg.adam_eps,
            fused=fused or None,
        )

    def _wrap(self, model: nn.Module) -> nn.Module:
        wrapped = model
        if self.dist.world_size > 1 and not self.fsdp:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if self.cfg.compile:
            wrapped = torch.compile(wrapped)
        return wrapped

    def _autocast(self):
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return nullcontext()

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self, best: bool = False) -> Path | None:
        """Checkpoint the current step (main process only); returns its directory.

        `best`: this step has the best validation so far; `best.json` names it before older
        checkpoints are pruned, so that no moment exists where the best is neither recorded
        nor kept (and `resume` repairs a kill between the two writes: `is_best`).
        """
        model, optimizer = self.model, self.optimizer
        if self.fsdp:  # gathered on rank 0: every process takes part
            model, optimizer = sharding.full_state(self.model, self.optimizer)
        # Every process's random number generators: each draws its own dropout masks, so an
        # exact resume restores each its own state, not rank 0's.
        rng = [ckpt.capture_rng_state()]
        if self.dist.world_size > 1:
            rng = [None] * self.dist.world_size
            dist.all_gather_object(rng, ckpt.capture_rng_state())
        if not self.dist.is_main:
            return None
        state = {
            "step": self.step,
            "data": self.stream.state_dict(),
            "sampler_seed": self.sampler.seed,
            "best_value": self.best_value,
            "is_best": best,
            # The training loss summed since the last log record: the next record of a resumed
            # run is then the uninterrupted run's.
            "log_window": list(self._log_window),
            "rng": rng[0],
            "rng_by_rank": rng,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "world_size": self.dist.world_size,
            "grad_accum": self.cfg.grad_accum,
            "elapsed_s": self.elapsed_s,
        }
        try:
            path = ckpt.save_checkpoint(
                ckpt.checkpoint_path(self.checkpoint_root, self.step),
                model=model,
                config=self.run_config,
                optimizer=optimizer,
                trainer_state=state,
                files=self.extra_files,
            )
        except CheckpointError as exc:
            # Stop rather than train on without a way back: say what survived and how to go on.
            raise TrainingError(self._stopped_because(str(exc))) from exc
        if best:
            maybe_fail("best-pointer")  # tests: a kill between the two writes
            try:
                ckpt.write_best_pointer(path, metric=self.best_metric, value=self.best_value)
            except CheckpointError as exc:
                raise TrainingError(self._stopped_because(str(exc))) from exc
        ckpt.prune_checkpoints(self.checkpoint_root, self.cfg.keep_last)  # keeps best.json's
        return path

    def resume(self, path: Path | None = None) -> int:
        """Restore everything from `path` (default: the latest checkpoint of the run)."""
        path = path or ckpt.latest_checkpoint(self.checkpoint_root)
        if self.dist.world_size > 1:
            self._check_every_process_resumes(path)
        if path is None:
            raise CheckpointError(
                f"--resume: no checkpoint under {self.checkpoint_root}; start without --resume"
            )
        model, optimizer = self.model, self.optimizer
        if self.fsdp:
            # Read full tensors (the checkpoint is unsharded), checked against the model's
            # global shapes, then each process keeps its shard.
            model = sharding.FullState(self.model.state_dict())
            optimizer = sharding.FullState({})
        try:
            loaded = ckpt.load_checkpoint(path, model=model, optimizer=optimizer)
        except CheckpointMismatchError as exc:
            raise CheckpointMismatchError(
                f"{exc}; --resume needs the model settings and tokenizer the run was started "
                "with: undo the change, or start a new run in another run_dir"
            ) from exc
        except CheckpointError as exc:
            # --resume always takes the latest checkpoint, so "choose another" means moving it.
            raise CheckpointError(
                f"{exc}; --resume takes the latest checkpoint: move {path} out of "
                f"{path.parent} to resume from the one before it"
            ) from exc
        if self.fsdp:
            sharding.load_full_state(self.model, model.loaded, self.optimizer, optimizer.loaded)
        state = loaded.trainer_state
        then = (state.get("world_size", 1), self._saved_grad_accum(loaded))
        if then != (self.dist.world_size, self.cfg.grad_accum):
            # N processes x grad_accum batches make a step: N x 1 is 1 x N, to rounding.
            logger.warning(
                "resuming a run saved with %s processes x grad_accum %s on %s x %s: the data "
                "order continues, but the result will not be bit-identical%s",
                *then,
                self.dist.world_size,
                self.cfg.grad_accum,
                ""
                if then[0] * then[1] == self.dist.world_size * self.cfg.grad_accum
                else ", and each step takes another number of batches",
            )
        if state.get("sampler_seed") != self.sampler.seed:
            raise CheckpointError(
                f"{path} was trained with seed {state.get('sampler_seed')} but this run uses "
                f"{self.sampler.seed}; resume with the same train.seed"
            )
        self.step = int(state["step"])
        position = dict(state["data"])
        per_epoch = position.pop("batches_per_epoch", None)
        digest = position.pop("data_digest", None)  # both absent from older checkpoints
        self._check_same_data(path, per_epoch, digest, int(position["consumed"]))
        self.stream = BatchStream(self.sampler, **position)
        self.best_value = state.get("best_value")
        if state.get("is_best") and self.dist.is_main:
            # Killed between saving this best checkpoint and recording it as the best.
            if ckpt.read_best_pointer(self.checkpoint_root) != path:
                ckpt.write_best_pointer(path, metric=self.best_metric, value=self.best_value)
        if self.stale_best_without_digest and digest is None and self.best_value is not None:
            # Kept, a value measured the old way could outrank every new validation (or
            # none), and best.json would name the wrong checkpoint.
            if self.dist.is_main:
                logger.warning(
                    "%s was saved by an older aiayn, whose validation measured %s otherwise: "
                    "its best %s (%.4g) is dropped, and the next validation sets the best afresh",
                    path.name,
                    self.best_metric,
                    self.best_metric,
                    self.best_value,
                )
            self.best_value = None
        self._log_window = tuple(state.get("log_window", (0.0, 0)))
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        reached = self._limit_reached()
        if reached is not None:
            # Nothing left to train: fit() would only validate the last step again.
            raise ConfigError(
                f"--resume: {path.name} has already reached {reached}; "
                "raise that limit to train further"
            )
        by_rank = state.get("rng_by_rank") or []
        same_world = len(by_rank) == self.dist.world_size
        ckpt.restore_rng_state(by_rank[self.dist.rank] if same_world else state["rng"])
        self._truncate_log(self.step)
        logger.info("resumed from %s at step %d", path, self.step)
        return self.step

    def _saved_grad_accum(self, loaded: ckpt.Checkpoint) -> int:
        """The grad_accum `loaded` was saved with. Its trainer state records it since
        2026-11-28; an older checkpoint has it in the run config saved with it (the train
        section a task's config gives); failing both, this run's is assumed."""
        if "grad_accum" in loaded.trainer_state:
            return loaded.trainer_state["grad_accum"]
        train = loaded.config.get("train")
        saved = train.get("grad_accum") if isinstance(train, dict) else None
        return saved if isinstance(saved, int) else self.cfg.grad_accum

    def _check_same_data(
        self, path: Path, per_epoch: int | None, digest: str | None, consumed: int
    ) -> None:
        """Refuse to resume on other training data: the stream's position (batch `consumed`
        of an epoch) would name other batches, or none. Older checkpoints record neither the
        batches an epoch nor the data's digest: then only a position past the end is caught."""
        batches = len(self.sampler)
        if per_epoch is not None and per_epoch != batches:
            found = f"{per_epoch}"
        elif per_epoch is None and consumed > batches:  # an older checkpoint
            found = f"at least {consumed}"
        else:
            found = None
        if found is not None:
            raise CheckpointError(
                f"--resume: {path.name} was trained on data cut into {found} batches an "
                f"epoch, but this run's training data gives {batches}: the data, its settings "
                "or train.max_tokens changed; resume with the run's own, or start a new run"
            )
        if digest is not None and digest != self.sampler.digest():
            raise CheckpointError(
                f"--resume: {path.name} was trained on other training data (its examples' "
                "lengths differ from this run's): the data or its settings changed; resume "
                "with the run's own, or start a new run"
            )

    def _check_every_process_resumes(self, path: Path | None) -> None:
        """Refuse, in every process, to resume from checkpoints of different steps: each
        machine reads its own copy of run_dir, and a stale copy would train on from another
        step (other weights, optimiser moments and data position) until the job hangs."""
        step = -1 if path is None else ckpt.checkpoint_step(path)
        steps: list[int | None] = [None] * self.dist.world_size
        dist.all_gather_object(steps, step)
        if len(set(steps)) > 1:
            found = ", ".join(
                f"rank {rank} {'none' if s == -1 else f'step {s}'}" for rank, s in enumerate(steps)
            )
            raise CheckpointError(
                f"--resume: the processes found different latest checkpoints in their run_dir "
                f"({found}); give every machine a copy of rank 0's {self.run_dir}"
            )

    def load_weights(self, path: Path) -> None:
        """Copy a checkpoint's weights into the model (e.g. the best one, to score a test set).

        Under FSDP every process must call it, and then run the model together.
        """
        if not self.fsdp:
            ckpt.load_checkpoint(path, model=self.model)
            return
        receiver = sharding.FullState(self.model.state_dict())
        ckpt.load_checkpoint(path, model=receiver)
        sharding.load_full_state(self.model, receiver.loaded)

    # ------------------------------------------------------------------ logging
    @property
    def log_path(self) -> Path:
        return self.run_dir / "train.jsonl"

    def _truncate_log(self, step: int) -> None:
        """Drop log records after `step`: a resumed run logs those steps again."""
        if not (self.dist.is_main and self.log_path.is_file()):
            return
        kept = []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        # Rewritten atomically: a kill here must not lose the history.
        atomic.write_text(self.log_path, "".join(line + "\n" for line in kept))

    @property
    def elapsed_s(self) -> float:
        """Wall seconds of training so far, over all runs of this run directory."""
        running = time.perf_counter() - self._fit_start if self._fit_start is not None else 0.0
        return self.elapsed_before + running

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        try:
            with atomic.naming_file(self.log_path):
                self.run_dir.mkdir(parents=True, exist_ok=True)
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
        except OSError as exc:
            reason = ckpt.os_error_message(exc)
            raise TrainingError(self._stopped_because(f"cannot write the log: {reason}")) from exc

    def _stopped_because(self, reason: str) -> str:
        """The message of a training stopped by a failed write: what failed, and how to go on
        from what survived."""
        latest = ckpt.latest_checkpoint(self.checkpoint_root)
        then = (
            f"{latest.name} is intact: continue from it with --resume"
            if latest is not None
            else "no checkpoint was saved yet: start the run again"
        )
        return f"training stopped at step {self.step}: {reason}; {then}"

    # ------------------------------------------------------------------ one step
    def _next_batches(self) -> list[Any]:
        """This process's share of the next optimiser step's batches (CPU tensors).

        A step consumes grad_accum x world_size batches of the stream; process r takes every
        world_size-th, so N processes see exactly the batches one process would with
        grad_accum x N, and the parameters after a step are the same.
        """
        n = self.cfg.grad_accum * self.dist.world_size
        indices = [self.stream.next() for _ in range(n)]
        return [self.make_batch(ix) for ix in indices[self.dist.rank :: self.dist.world_size]]

    def train_step(self) -> tuple[Tensor, int, Tensor]:
        """One optimiser step: (summed loss, target tokens, whether the update was applied).

        The loss and the flag are 0-d tensors on the device. Reading them waits for the device
        to finish the step, so the loop reads them only when it logs, validates or saves
        (`fit`'s `settle`): meanwhile the host prepares the next batches while the device computes.
        With a fused AdamW (the default on a GPU and a CPU) a non-finite step is also skipped
        on the device (`found_inf`, as under GradScaler); otherwise the flag is read here.
        """
        self.train_model.train()
        batches = self._next_batches()
        n_tokens = sum(b.n_tokens for b in batches)
        total_tokens = n_tokens
        if self.dist.world_size > 1:
            count = torch.tensor([n_tokens], dtype=torch.long, device=self.device)
            dist.all_reduce(count)
            total_tokens = int(count.item())
        # The loss of a step is the mean over all its target tokens, on every process: each
        # micro-batch contributes its sum / total tokens. DDP averages gradients over
        # processes, so multiply by world_size to get the sum back.
        scale = self.dist.world_size / max(total_tokens, 1)
        lr = learning_rate(self.step + 1, self.d_model, self.cfg.warmup_steps, self.cfg.lr_scale)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.lr = lr
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            batch = batch.to(self.device)
            last = i == len(batches) - 1
            sync = nullcontext()
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)  # reduce-scatter after the last
            elif self.dist.world_size > 1 and not last:
                sync = self.train_model.no_sync()  # all-reduce gradients once, after the last
            with sync, self._autocast():
                loss = self.loss_fn(self.train_model, batch)
            scaled = loss * scale
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach().float()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.clip_norm > 0:
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_norm)
        else:
            # The norm only (for the finiteness check): clipping to an infinite norm would also
            # multiply every gradient by 1, a second pass (1.2 ms of a CPU step at the small size).
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            grad_norm = nn.utils.get_total_norm(grads)
        if hasattr(grad_norm, "full_tensor"):  # sharded gradients give a sharded (DTensor) norm
            grad_norm = grad_norm.full_tensor()
        finite = torch.isfinite(grad_norm) & torch.isfinite(loss_sum)
        maybe_fail("step")  # tests: a kill between the backward pass and the update
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update itself when gradients overflowed
            self.scaler.update()
        elif self.optimizer.defaults.get("fused"):
            # The fused kernel skips the update (and its step count) where found_inf is 1.
            self.optimizer.found_inf = (~finite).float()
            try:
                self.optimizer.step()
            finally:
                self.optimizer.found_inf = None
        elif bool(finite):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_sum, n_tokens, finite

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        if self.evaluate_fn is None or not (self.dist.is_main or self.fsdp):
            return {}
        self.model.eval()
        if self.fsdp:
            # A sharded model runs only if every process runs it: all of them validate (the
            # same batches, the same results), with the root unit gathered for the whole
            # validation, since decoding also calls its embeddings and output layer directly.
            self.model.unshard()
        try:
            with torch.no_grad():
                metrics = self.evaluate_fn(self.model)
        finally:
            if self.fsdp:
                self.model.reshard()
        maybe_fail("eval")  # tests: a kill after validating, before anything is saved
        self.model.train()
        return metrics if self.dist.is_main else {}

    def _is_better(self, value: float) -> bool:
        if self.best_value is None:
            return True
        return value > self.best_value if self.higher_is_better else value < self.best_value

    def _evaluate_and_save(self) -> dict[str, float]:
        """Validate, checkpoint, and point `best.json` at this checkpoint if it is the best."""
        metrics = self.evaluate()
        value = metrics.get(self.best_metric)
        improved = value is not None and self._is_better(value)
        if improved:
            self.best_value = value  # before saving, so a resumed run compares against it
        if metrics:
            # Logged before the checkpoint: a kill before it is saved resumes from the one
            # before, which drops this record and validates this step again.
            self._log({"step": self.step, **metrics, "elapsed_s": self.elapsed_s})
            logger.info(
                "step %d: %s", self.step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            )
        self.save(best=improved)
        if self.dist.world_size > 1:
            dist.barrier()
        return metrics

    # ------------------------------------------------------------------ the loop
    @contextmanager
    def _graceful_stop(self) -> Iterator[None]:
        """SIGINT/SIGTERM finish the current step, save a checkpoint and stop (then `--resume`)."""

        def handler(signum, frame):  # noqa: ARG001
            if self._stop_signal is not None:
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            self._stop_signal = signum
            logger.warning(
                "stopping after this step (signal %d); a checkpoint will be saved", signum
            )

        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for s in previous:
                signal.signal(s, handler)
        except ValueError:  # not the main thread: leave signals alone
            previous = {}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _limit_reached(self) -> str | None:
        """The limit (max_steps, max_time_s, max_epochs) this run has reached, in words, or
        None while training goes on."""
        cfg = self.cfg
        if self.step >= cfg.max_steps:
            return f"step {self.step}, train.max_steps {cfg.max_steps}"
        if cfg.max_time_s is not None and self.elapsed_s >= cfg.max_time_s:
            return f"{self.elapsed_s:.0f} s of training, train.max_time_s {cfg.max_time_s:g}"
        if cfg.max_epochs is not None and self.stream.epochs_done >= cfg.max_epochs:
            return f"epoch {self.stream.epochs_done}, train.max_epochs {cfg.max_epochs}"
        return None

    def _done(self) -> bool:
        return self._limit_reached() is not None

    def fit(self, progress: bool = True) -> TrainResult:
        """Train until a limit is reached (`_limit_reached`: max_steps, max_epochs or
        max_time_s), saving a checkpoint there; returns the last validation metrics.

        Raises:
            TrainingStopped: SIGINT or SIGTERM arrived; the step under way was finished and
                saved as a checkpoint, from which --resume continues.
        """
        from tqdm.auto import tqdm  # local: only the loop needs it

        cfg = self.cfg
        metrics: dict[str, float] = {}
        if self.step == 0:
            self._truncate_log(0)  # a fresh run starts a fresh log
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            disable=not (progress and self.dist.is_main) or None,
            dynamic_ncols=True,
            desc="train",
        )
        self._fit_start = time.perf_counter()
        # The log window's loss and tokens are self._log_window (saved in checkpoints); the
        # tokens and seconds that give its speed are this process's own.
        window_start, timed_tokens, bad_in_a_row = time.perf_counter(), 0, 0
        validate = False  # whether the latest step was validated (and so saved)
        pending: list[tuple[int, Tensor, int, Tensor]] = []  # steps whose results are unread

        def settle() -> bool:
            """Read the pending steps' results (one wait for the device); whether the last
            step's update was applied. Stops training after max_bad_steps skipped in a row."""
            nonlocal timed_tokens, bad_in_a_row
            values = torch.stack([torch.stack([loss, ok.float()]) for _, loss, _, ok in pending])
            applied = True
            for (step, _, n_tokens, _), (loss, ok) in zip(pending, values.tolist(), strict=True):
                applied = bool(ok)
                if not applied:
                    bad_in_a_row += 1
                    self._log({"step": step, "skipped_non_finite": True})
                    if bad_in_a_row >= cfg.max_bad_steps:
                        raise TrainingError(
                            f"loss or gradients were not finite for {bad_in_a_row} steps in a row "
                            f"(last at step {step}): lower train.lr_scale, use bf16 instead of "
                            "fp16, or check the data for empty or broken examples"
                        )
                    continue
                bad_in_a_row = 0
                summed, tokens = self._log_window
                self._log_window = (summed + loss, tokens + n_tokens)
                timed_tokens += n_tokens
            pending.clear()
            return applied

        with self._graceful_stop():
            while not self._done():
                validate = False
                pending.append((self.step + 1, *self.train_step()))
                bar.update(1)
                boundary = (
                    self.step % cfg.log_every == 0
                    or self.step == cfg.max_steps
                    or self._stop_signal is not None
                    or (cfg.eval_every and self.step % cfg.eval_every == 0)
                    or (cfg.save_every and self.step % cfg.save_every == 0)
                    or self._done()
                )
                # Read the results at a boundary, and at least every max_bad_steps steps so
                # that a run of non-finite steps stops training when it reaches that length.
                if not boundary and len(pending) < cfg.max_bad_steps:
                    continue
                if not settle():
                    continue  # the last step was skipped: no log, validation or save for it
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    elapsed = time.perf_counter() - window_start
                    summed, tokens = self._log_window
                    record = {
                        "step": self.step,
                        "epoch": self.stream.epoch,
                        "loss": summed / max(tokens, 1),
                        "lr": self.lr,  # eq. (3) times train.lr_scale, before group multipliers
                        "tokens_per_s": timed_tokens * self.dist.world_size / max(elapsed, 1e-9),
                        "elapsed_s": self.elapsed_s,
                    }
                    self._log(record)
                    bar.set_postfix(
                        loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}"
                    )
                    self._log_window, timed_tokens, window_start = (0.0, 0), 0, time.perf_counter()
                validate = cfg.eval_every and self.step % cfg.eval_every == 0 and not self._done()
                if validate:
                    # Also when a stop signal came: a run resumed after this step would never
                    # validate it (and it may be the best).
                    metrics = self._evaluate_and_save() or metrics
                if self._stop_signal is not None:
                    break
                if not validate and cfg.save_every and self.step % cfg.save_every == 0:
                    if not self._done():
                        self.save()
            if self._stop_signal is not None:
                bar.close()
                # Saved already if this step was validated.
                path = ckpt.checkpoint_path(self.checkpoint_root, self.step) if validate else None
                path = path or self.save()
                raise TrainingStopped(
                    f"stopped by signal {self._stop_signal} at step {self.step}; checkpoint "
                    f"{path} saved: continue with --resume",
                    signal=self._stop_signal,
                    step=self.step,
                    checkpoint=path,
                )
            metrics = self._evaluate_and_save() or metrics
        bar.close()
        return TrainResult(step=self.step, metrics=metrics, run_dir=self.run_dir)
