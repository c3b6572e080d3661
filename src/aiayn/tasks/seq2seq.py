"""What every sequence-to-sequence task shares: batches of id pairs, the loss, validation loss.

Translation, summarization and the number-words demo differ in their data and tokenizers; from
token ids on they train and validate the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from aiayn.data.batching import TokenBatchSampler, collate, example_lengths
from aiayn.train import label_smoothed_nll

IdPair = tuple[Sequence[int], Sequence[int]]


@dataclass
class Seq2SeqBatch:
    """A padded batch: src (B, S) = ids + EOS, tgt_in (B, T) = BOS + ids, tgt_out (B, T) = ids + EOS."""

    src: Tensor
    tgt_in: Tensor
    tgt_out: Tensor
    n_tokens: int  # non-padding target tokens: what the loss is summed over

    def to(self, device: torch.device) -> Seq2SeqBatch:
        # non_blocking: with pinned memory the copy overlaps the previous step's work on a GPU.
        return Seq2SeqBatch(
            self.src.to(device, non_blocking=True),
            self.tgt_in.to(device, non_blocking=True),
            self.tgt_out.to(device, non_blocking=True),
            self.n_tokens,
        )

    def pin_memory(self) -> Seq2SeqBatch:
        return Seq2SeqBatch(
            self.src.pin_memory(),
            self.tgt_in.pin_memory(),
            self.tgt_out.pin_memory(),
            self.n_tokens,
        )


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
    pad_id: int, smoothing: float, *, fused: bool = False
) -> Callable[[nn.Module, Seq2SeqBatch], Tensor]:
    """The training loss: label-smoothed cross-entropy summed over the target tokens (§5.4).

    `fused`: the compiled loss of `label_smoothed_nll` (pass `train.compile`).
    """

    def loss(model: nn.Module, batch: Seq2SeqBatch) -> Tensor:
        logits = model(batch.src, batch.tgt_in)
        return label_smoothed_nll(logits, batch.tgt_out, pad_id, smoothing, fused=fused)

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
                label_smoothed_nll(model(batch.src, batch.tgt_in), batch.tgt_out, pad_id, 0.0)
            )
            tokens += batch.n_tokens
    return total / max(tokens, 1)
