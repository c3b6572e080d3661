"""What every sequence-to-sequence task shares: batches of id pairs, the loss, validation loss.

Translation, summarization and the number-words demo differ in their data and tokenizers; from
token ids on they train and validate the same way. `train_seq2seq` is the whole training run of
a task with a joint BPE vocabulary (translation, summarization): the task gives it its string
pairs, how to fit over-long examples, and its validation metric.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from aiayn.config import ConfigSection, TransformerConfig
from aiayn.data.batching import DeviceBatch, TokenBatchSampler, collate, example_lengths
from aiayn.data.packed import PackedPairs
from aiayn.data.tokenizer import Tokenizer
from aiayn.decoding import release_static_decoding
from aiayn.errors import CheckpointError, DataError
from aiayn.experiment import Experiment
from aiayn.finetune import (
    FinetuneConfig,
    Source,
    check_seq2seq,
    freeze,
    load_source,
    resumed_run,
    seq2seq_config,
    seq2seq_model,
)
from aiayn.model import Transformer
from aiayn.train import (
    Distributed,
    Trainer,
    label_smoothed_nll,
    resolve_device,
    resolve_precision,
)

logger = logging.getLogger(__name__)

IdPair = tuple[Sequence[int], Sequence[int]]


@dataclass
class Seq2SeqBatch(DeviceBatch):
    """A padded batch: src (B, S) = ids + EOS, tgt_in (B, T) = BOS + ids, tgt_out (B, T) = ids + EOS."""

    src: Tensor
    tgt_in: Tensor
    tgt_out: Tensor
    n_tokens: int  # non-padding target tokens: what the loss is summed over


def batch_maker(
    examples: Sequence[IdPair], pad_id: int, bos_id: int, eos_id: int, pin: bool = False
) -> Callable[[list[int]], Seq2SeqBatch]:
    """A function from example indices to a `Seq2SeqBatch` on the CPU."""

    def make(indices: list[int]) -> Seq2SeqBatch:
        src, tgt_in, tgt_out = collate([examples[i] for i in indices], pad_id, bos_id, eos_id)
        batch = Seq2SeqBatch(src, tgt_in, tgt_out, int(tgt_out.ne(pad_id).sum()))
        return batch.pin_memory() if pin else batch

    return make


def seq2seq_loss(
    pad_id: int, smoothing: float, *, fused: bool | None = None
) -> Callable[[nn.Module, Seq2SeqBatch], Tensor]:
    """The training loss: label-smoothed cross-entropy summed over the target tokens (§5.4).

    `fused`: as in `label_smoothed_nll`: True (`train.compile: true`) always compiles the
    loss; None compiles it on a GPU only.
    """

    def loss(model: nn.Module, batch: Seq2SeqBatch) -> Tensor:
        logits = model(batch.src, batch.tgt_in)
        # Nothing reads the logits after the backward pass: their memory takes the gradient.
        return label_smoothed_nll(
            logits, batch.tgt_out, pad_id, smoothing, fused=fused, inplace_backward=True
        )

    return loss


def validation_loss(
    model: nn.Module,
    examples: Sequence[IdPair],
    pad_id: int,
    bos_id: int,
    eos_id: int,
    max_tokens: int,
) -> float:
    """Mean cross-entropy per target token (no smoothing; exp() of it is the perplexity)."""
    sampler = TokenBatchSampler(example_lengths(examples), max_tokens, shuffle=False)
    make = batch_maker(examples, pad_id, bos_id, eos_id)
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with torch.no_grad():
        for indices in sampler.batches(0):
            batch = make(indices).to(device)
            total += float(
                label_smoothed_nll(
                    model(batch.src, batch.tgt_in), batch.tgt_out, pad_id, 0.0, fused=False
                )
            )
            tokens += batch.n_tokens
    return total / max(tokens, 1)


# --------------------------------------------------------------------------- training a task

FitIds = Callable[[PackedPairs, TransformerConfig, str], PackedPairs]
Score = Callable[[Transformer, Tokenizer], dict[str, float]]

TOKENIZER_FILE = "tokenizer.json"


def check_run(exp: Experiment, resume: bool, data: ConfigSection) -> None:
    """Refuse a bad run_dir, device or precision before any data is read or written; `data`
    is the task's data section, which a resumed run must share with the run."""
    exp.check_run_dir(resume, {"data": data, "finetune": FinetuneConfig.from_dict(exp.finetune)})
    resolve_precision(exp.train.precision, resolve_device(exp.train.device, Distributed.from_env()))


def drop_empty(
    pairs: list[tuple[str, str]], split: str, sides: str = "source or target"
) -> list[tuple[str, str]]:
    """The pairs with text on both sides; says how many were dropped (an empty target would
    teach the model to stop at once; an empty source, to write from nothing)."""
    kept = [(s, t) for s, t in pairs if s.strip() and t.strip()]
    if len(kept) < len(pairs):
        logger.warning(
            "%s: dropped %d of %d pairs with an empty %s",
            split,
            len(pairs) - len(kept),
            len(pairs),
            sides,
        )
    return kept


def train_seq2seq(
    exp: Experiment,
    train_pairs: Sequence[tuple[str, str]],
    valid_pairs: Sequence[tuple[str, str]],
    *,
    vocab_size: int,
    min_frequency: int,
    fit: FitIds,
    score: Score,
    best_metric: str,
    higher_is_better: bool,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train an encoder-decoder on (source, target) string pairs; returns the final metrics.

    What the tasks share: a joint BPE vocabulary trained on the training pairs (and saved with
    every checkpoint), the model of the `model` section, token-bucketed batches, the
    label-smoothed loss, and one `Trainer`. Each task brings its own `fit` (how too-long id
    sequences are cut or refused; called with the split name "train" or "valid") and `score`
    (its metrics of a model on the validation pairs, added to `val_loss`).

    Fine-tuning (`finetune.source`, `aiayn finetune --from`): the vocabulary, the architecture
    and every weight come from an encoder-decoder source instead, such as a span-corruption
    pre-training run (`aiayn.finetune.seq2seq_config`).
    """
    if not train_pairs or not valid_pairs:
        raise DataError(
            "the training or validation data is empty; check the data section of the config"
        )
    run_dir = exp.run_dir
    tune = FinetuneConfig.from_dict(exp.finetune)
    start = _start(exp, tune, resume, train_pairs, vocab_size, min_frequency)
    tokenizer, model_cfg = start.tokenizer, start.model_cfg
    train_ids = fit(encode_pairs(tokenizer, train_pairs), model_cfg, "train")
    valid_ids = fit(encode_pairs(tokenizer, valid_pairs), model_cfg, "valid")

    torch.manual_seed(exp.train.seed)
    if start.source is not None:
        model = seq2seq_model(start.source, model_cfg)
    else:
        model = Transformer(model_cfg)  # new, or resumed: its weights are in its checkpoint
    if tune.source is not None:
        frozen = freeze(model, tune)
        if frozen:
            logger.info("frozen: %d tensors", len(frozen))
    tokenizer_path = run_dir / TOKENIZER_FILE
    if start.save_tokenizer:
        # Saved only now, once the data fit and the model is built (fine-tuning settings and
        # weights checked): a refused run writes nothing.
        exp.claim_run_dir()
        tokenizer.save(tokenizer_path)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "model: %s parameters (%s trainable)", f"{model.num_parameters():,}", f"{trainable:,}"
    )
    ids = dict(pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    sampler = TokenBatchSampler(
        example_lengths(train_ids), exp.train.max_tokens, shuffle=True, seed=exp.train.seed
    )

    def evaluate(m: Transformer) -> dict[str, float]:
        metrics = {
            "val_loss": validation_loss(m, valid_ids, max_tokens=exp.train.max_tokens, **ids)
        }
        try:
            return {**metrics, **score(m, tokenizer)}
        finally:
            # On a GPU the search keeps caches and CUDA graphs per batch shape on the model;
            # training needs that memory back until the next validation.
            release_static_decoding(m)

    run_config = exp.resolved(model_cfg)
    if tune.source is not None:
        run_config["finetune"] = tune.to_dict()
    trainer = Trainer(
        model,
        exp.train,
        sampler=sampler,
        make_batch=batch_maker(train_ids, **ids, pin=torch.cuda.is_available()),
        loss_fn=seq2seq_loss(
            tokenizer.pad_id, exp.train.label_smoothing, fused=exp.train.compile or None
        ),
        run_dir=run_dir,
        run_config=run_config,
        d_model=model_cfg.d_model,
        evaluate=evaluate,
        best_metric=best_metric,
        higher_is_better=higher_is_better,
        extra_files={TOKENIZER_FILE: tokenizer_path},
    )
    return exp.fit(trainer, run_config, resume=resume, progress=progress).metrics


@dataclass
class _Start:
    """Where a run's vocabulary and architecture come from: trained and configured, read back
    from the run folder (--resume), or a fine-tuning source's (`source`, with its weights)."""

    tokenizer: Tokenizer
    model_cfg: TransformerConfig
    source: Source | None  # a fine-tuning source read now (not when resuming from the folder)
    save_tokenizer: bool  # into the run folder, once nothing can refuse the run any more


def _start(
    exp: Experiment,
    tune: FinetuneConfig,
    resume: bool,
    train_pairs: Sequence[tuple[str, str]],
    vocab_size: int,
    min_frequency: int,
) -> _Start:
    tokenizer_path = exp.run_dir / TOKENIZER_FILE
    if tune.source is not None:
        check_seq2seq(tune)
        # A fine-tuning run resumed takes its architecture and tokenizer from its own folder
        # (or its latest checkpoint), its weights from its checkpoint: the source may have
        # moved since. Where the folder has neither, the source gives them again.
        resumed = resumed_run(exp.run_dir, exp.model) if resume else None
        if resumed is not None:
            model_cfg, path = resumed
            return _Start(Tokenizer.load(path), model_cfg, None, path != tokenizer_path)
        source = load_source(tune.source)
        model_cfg = seq2seq_config(source, exp.model)  # refuses an encoder- or decoder-only one
        tokenizer = Tokenizer.load(source.tokenizer_path)
        if tokenizer.vocab_size != model_cfg.src_vocab_size:
            raise CheckpointError(
                f"{source.tokenizer_path} has {tokenizer.vocab_size} tokens but the source "
                f"model has {model_cfg.src_vocab_size}: the tokenizer belongs to another run"
            )
        unused = [f"data.{k}" for k in ("vocab_size", "min_frequency") if k in exp.data]
        if unused:
            logger.warning(
                "%s not used: a fine-tuned model keeps its source's %d-token vocabulary",
                " and ".join(unused),
                tokenizer.vocab_size,
            )
        return _Start(tokenizer, model_cfg, source, True)
    if resume and tokenizer_path.is_file():
        tokenizer = Tokenizer.load(tokenizer_path)
        new = False
    else:
        t0 = time.perf_counter()
        # One joint vocabulary for both sides (§5.1: "a shared source-target vocabulary").
        texts = [s for s, _ in train_pairs] + [t for _, t in train_pairs]
        tokenizer = Tokenizer.train(texts, vocab_size, min_frequency)
        logger.info(
            "trained a %d-token BPE vocabulary in %.1fs",
            tokenizer.vocab_size,
            time.perf_counter() - t0,
        )
        new = True
    model_cfg = exp.model_config(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    return _Start(tokenizer, model_cfg, None, new)


def encode_pairs(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]) -> PackedPairs:
    """Token ids of both sides of each pair (no BOS/EOS: `collate` adds them), packed: 4 bytes
    a token where lists took about 50 (`aiayn.data.packed`)."""
    return PackedPairs.encode(tokenizer.encode_batch, pairs)
