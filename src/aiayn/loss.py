"""§5.4 label smoothing: the training loss, computed a block of rows at a time.

Cross-entropy against the smoothed target distribution, (1 - eps) on the reference token and
eps spread uniformly over the V classes (PyTorch's convention), is for one position with
logits x (V,) and reference token t:

    loss = (1 - eps) (lse - x_t) + eps (lse - sum(x) / V) = lse - (1 - eps) x_t - eps sum(x) / V
    d loss / d x = softmax(x) - (1 - eps) onehot(t) - eps / V

where lse = log sum_c exp(x_c). So the forward pass needs three numbers per row (lse, x_t and
sum(x)) and the backward pass one softmax per row. `LabelSmoothedNLL` computes them a block of
rows at a time, in at least float32, and keeps only the lse per row between the passes; the
gradient is written in the logits' dtype, and with ``inplace_backward`` over the logits
themselves (a training loss, whose logits nobody reads after the backward pass): writing
1,024 x 8,000 float32 gradients into freshly allocated memory took 8 ms of a 255 ms training
step on this project's CPU, the operating system handing out and zeroing every new page,
against about 0.5 ms for the same writes into memory already in use.

Why not `F.cross_entropy(logits.float(), ..., label_smoothing=eps)`: that casts all (N, V)
logits to float32, keeps a float32 log-softmax for the backward pass, and builds the gradients
of the smoothing term and of the reference term as two more (N, V) float32 tensors before
adding them (32 MB each at V = 8,000 and N = 1,024). Here every block is small enough to stay
in a CPU core's cache while it is read several times. `aiayn.train.label_smoothed_nll` uses it
on a CPU, where it was measured faster (docs/performance.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Elements of a block of logits. On a CPU, 2^18 float32 values (1 MiB) stay in a core's
# cache while the block is read several times, the point of working by blocks there (2^16 to
# 2^26 tried at V = 8,000 with a first version of this code: 2^18 was fastest). On a GPU a block is one kernel launch per
# operation, so blocks are larger: 2^26 elements is 128 MiB of bf16 logits.
BLOCK_ELEMENTS = {"cpu": 1 << 18}
DEFAULT_BLOCK_ELEMENTS = 1 << 26


def _blocks(n_rows: int, vocab: int, device: torch.device) -> tuple[range, int]:
    """The start rows of the blocks that cover n_rows rows of `vocab` logits, and their size."""
    rows = max(1, BLOCK_ELEMENTS.get(device.type, DEFAULT_BLOCK_ELEMENTS) // max(vocab, 1))
    return range(0, n_rows, rows), rows


class LabelSmoothedNLL(torch.autograd.Function):
    """Summed label-smoothed cross-entropy of logits (N, V) against targets (N,), ignoring rows
    whose target is `ignore_index`; the same value and gradient as
    ``F.cross_entropy(logits.float(), target, ignore_index=..., reduction="sum",
    label_smoothing=smoothing)`` (tests/test_train.py). With ``inplace_backward`` the gradient
    is written over the logits (the same tensor is returned as their gradient)."""

    @staticmethod
    def forward(
        ctx,
        logits: Tensor,
        target: Tensor,
        ignore_index: int,
        smoothing: float,
        inplace_backward: bool = False,
    ) -> Tensor:
        ctx.inplace_backward = inplace_backward
        with torch.autocast(logits.device.type, enabled=False):  # dtypes are chosen here
            return LabelSmoothedNLL._forward(ctx, logits, target, ignore_index, smoothing)

    @staticmethod
    def _forward(
        ctx, logits: Tensor, target: Tensor, ignore_index: int, smoothing: float
    ) -> Tensor:
        n, vocab = logits.shape
        compute = torch.promote_types(logits.dtype, torch.float32)
        keep = target.ne(ignore_index)
        safe_target = target.masked_fill(~keep, 0)  # any valid index; the row is masked out
        lse = torch.empty(n, dtype=compute, device=logits.device)
        total = torch.zeros((), dtype=compute, device=logits.device)
        starts, rows = _blocks(n, vocab, logits.device)
        for start in starts:
            stop = start + rows
            block = logits[start:stop].to(compute)  # (r, V)
            block_lse = torch.logsumexp(block, dim=-1)
            lse[start:stop] = block_lse
            x_t = block.gather(1, safe_target[start:stop, None]).squeeze(1)
            per_row = block_lse - (1.0 - smoothing) * x_t
            if smoothing:
                per_row = per_row - (smoothing / vocab) * block.sum(dim=-1)
            total += per_row.masked_fill(~keep[start:stop], 0.0).sum()
        ctx.save_for_backward(logits, safe_target, keep, lse)
        ctx.smoothing = smoothing
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor, None, None, None, None]:
        logits, safe_target, keep, lse = ctx.saved_tensors
        with torch.autocast(logits.device.type, enabled=False):
            grad = LabelSmoothedNLL._backward(ctx, grad_total, logits, safe_target, keep, lse)
        return grad, None, None, None, None

    @staticmethod
    def _backward(
        ctx, grad_total: Tensor, logits: Tensor, safe_target: Tensor, keep: Tensor, lse: Tensor
    ) -> Tensor:
        n, vocab = logits.shape
        smoothing = ctx.smoothing
        grad = logits if ctx.inplace_backward else torch.empty_like(logits)
        # d loss / d x of a kept row, times the upstream gradient; zero for an ignored row.
        scale = keep.to(lse.dtype) * grad_total.to(lse.dtype)  # (N,)
        # Computed in place in the gradient when it has the compute dtype, else cast below.
        same_dtype = grad.dtype == lse.dtype
        starts, rows = _blocks(n, vocab, logits.device)
        for start in starts:
            stop = start + rows
            block = logits[start:stop].to(lse.dtype)
            probs = torch.sub(
                block, lse[start:stop, None], out=grad[start:stop] if same_dtype else None
            )
            probs.exp_()  # softmax(x), (r, V)
            if smoothing:
                probs -= smoothing / vocab
            probs.scatter_add_(
                1,
                safe_target[start:stop, None],
                torch.full_like(probs[:, :1], -(1.0 - smoothing)),
            )
            probs *= scale[start:stop, None]
            if not same_dtype:
                grad[start:stop] = probs  # cast to the logits' dtype
        return grad


def label_smoothed_nll_blockwise(
    logits: Tensor,
    target: Tensor,
    ignore_index: int,
    smoothing: float,
    *,
    inplace_backward: bool = False,
) -> Tensor:
    """`LabelSmoothedNLL` on logits (N, V) and targets (N,): a scalar in at least float32.

    ``inplace_backward``: the backward pass overwrites the logits with their gradient. Only
    for logits that nothing reads after it (nor saves for its own backward pass: PyTorch would
    then refuse that backward pass, as for any tensor changed in place).
    """
    return LabelSmoothedNLL.apply(logits, target, ignore_index, smoothing, inplace_backward)
