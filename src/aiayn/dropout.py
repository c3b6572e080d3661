"""Dropout (§5.4, P_drop) with a cheaper mask on a CPU.

"We apply dropout to the output of each sub-layer, before it is added to the sub-layer input
and normalized. In addition, we apply dropout to the sums of the embeddings and the positional
encodings." A training step of the small model drops 17 activations of 32 x 32 x 256, and on a
CPU PyTorch's `F.dropout` draws a float Bernoulli variable per element from one Mersenne
Twister, on one thread: about 2.5 ms for the forward and backward pass of each.

Here each element's draw is 16 random bits instead: one 64-bit draw from the same generator
(`torch.manual_seed` and the Trainer's saved RNG state still decide every mask) gives four
elements, and an element is dropped when its 16 bits, read as a signed integer, fall below a
threshold: about 0.9 ms for the same forward and backward pass, and the whole training step
1.10x faster in fp32, 1.13x in bf16 (docs/performance.md). In float32 the mask also holds the
scale, so that the forward and the backward pass are one product each (0.5 ms). The price is
that P_drop is rounded to a multiple of 2^-16 (0.1 -> 6,554 / 65,536 = 0.100006); the kept
activations are scaled by 1 / (1 - rounded P_drop), so the expectation is unchanged, as in
`F.dropout`.

On a GPU `F.dropout` is one fused kernel with a counter-based generator and stays; so it does
under `torch.compile`, which fuses its own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RESOLUTION = 1 << 16  # the draw's levels: P_drop is rounded to a multiple of 1 / RESOLUTION
# Dtypes whose mask can hold the scale exactly as a product with a Python float applies it.
_EXACT_SCALE = (torch.float32, torch.float64)


def rounded_p(p: float) -> float:
    """The probability `dropout` drops an element with on a CPU: p rounded to 1/65,536."""
    return round(p * RESOLUTION) / RESOLUTION


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> Tensor:
    """(shape) of dtype: 0 where an element is dropped (probability `rounded_p(p)`), 1 where kept.

    Draws 16 bits per element from PyTorch's default CPU generator.
    """
    n = math.prod(shape)
    # random_(-2**63, None) fills every bit of an int64 (the default range leaves the sign
    # bit 0); read as int16, each quarter is uniform on [-32768, 32767].
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    level = bits.view(torch.int16)[:n].view(shape)
    # Dropped: the round(p * 65536) lowest levels.
    threshold = round(p * RESOLUTION) - RESOLUTION // 2
    keep = torch.empty(shape, dtype=dtype)
    return torch.ge(level, threshold, out=keep)  # 1 or 0, written straight in dtype


def _draws_own_mask(x: Tensor) -> bool:
    """Whether `dropout` draws x's mask itself: on a CPU in eager mode."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """`F.dropout(x, p, training)`, with the 16-bit mask of `keep_mask` on a CPU in eager mode.

    x: any shape; returns the same shape and dtype. Differentiable in x (the gradient is the
    mask times the upstream gradient).
    """
    if not training or p == 0.0:
        return x
    levels = round(p * RESOLUTION)
    if not _draws_own_mask(x) or levels >= RESOLUTION:
        return F.dropout(x, p, training=True)
    if levels == 0:  # p < 2^-17: nothing to drop at this resolution
        return x
    # The product saves the mask (not x) for the backward pass.
    scale = 1.0 / (1.0 - rounded_p(p))
    keep = keep_mask(x.shape, p, x.dtype)
    if x.dtype in _EXACT_SCALE:
        # The scale folded into the mask (0 or 1 / (1 - p)): one product forward and one
        # backward instead of two. The same bits: PyTorch multiplies by a Python float in x's
        # own precision for these dtypes, so x * s = (x * 1) * s.
        return x * keep.mul_(scale)
    # Half precision: PyTorch multiplies by the Python float in float32, while a bfloat16 mask
    # holding 1 / (1 - p) would round it (1.111 -> 1.109) and shrink every kept activation.
    return x * keep * scale


class Dropout(nn.Dropout):
    """`nn.Dropout` that draws its mask with `dropout` (same arguments, same state)."""

    def forward(self, x: Tensor) -> Tensor:
        """x (any shape) -> the same shape: in training, each element zeroed with probability
        p and the rest scaled by 1 / (1 - p); x itself in eval mode."""
        if self.inplace:  # not used by aiayn; kept for nn.Dropout's contract
            return super().forward(x)
        return dropout(x, self.p, self.training)
