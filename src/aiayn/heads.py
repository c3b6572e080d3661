"""Task heads on top of the Transformer's encoder.

The paper's model is an encoder-decoder for translation; its encoder alone (BERT's recipe,
Devlin et al. 2019) is a text encoder. A head turns the encoder output into a task's output:

    SequenceClassifier   ids (B, S) -> encoder (B, S, d) -> pool (B, d) -> linear -> logits (B, C)

The body keeps the Transformer's own parameter names under `body.` (`body.src_embed...`,
`body.encoder...`), so a translation checkpoint's encoder, or an imported BERT, maps onto it
by stripping that prefix (see `aiayn.finetune`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aiayn.dropout import Dropout
from aiayn.errors import ConfigError
from aiayn.model import Transformer

POOLINGS = ("mean", "cls", "max")


class SequenceClassifier(nn.Module):
    """An encoder-only Transformer, a pooling of its output, dropout, and a linear layer to C classes.

    Args:
        body: an encoder-only `Transformer` (n_decoder_layers=0).
        n_classes: C, the number of classes (>= 2).
        pooling: "mean" averages the encoder output over the non-padding positions (the
            sentence-transformers recipe); "cls" takes the first position (BERT's [CLS]);
            "max" takes each feature's maximum over the non-padding positions (Kim 2014's
            max-over-time pooling): one strong phrase counts as much in a long sentence as
            alone, where a mean dilutes it.
        dropout: on the pooled vector, before the linear layer.
    """

    def __init__(
        self, body: Transformer, *, n_classes: int, pooling: str = "mean", dropout: float = 0.1
    ) -> None:
        super().__init__()
        if body.encoder is None or body.decoder is not None:
            raise ConfigError(
                "a sequence classifier needs an encoder-only Transformer "
                "(n_encoder_layers >= 1, n_decoder_layers = 0)"
            )
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if n_classes < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, got {n_classes}")
        self.body, self.pooling, self.n_classes = body, pooling, n_classes
        self.dropout = Dropout(dropout)
        self.head = nn.Linear(body.cfg.d_model, n_classes)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def pad_id(self) -> int:
        return self.body.cfg.pad_id

    def pool(self, memory: Tensor, ids: Tensor) -> Tensor:
        """One vector per sequence: memory (B, S, d), ids (B, S) -> (B, d)."""
        if self.pooling == "cls":
            return memory[:, 0]
        if self.pooling == "max":
            pad = ids.eq(self.pad_id).unsqueeze(-1)  # (B, S, 1): True at padding
            return memory.masked_fill(pad, torch.finfo(memory.dtype).min).amax(dim=1)
        keep = ids.ne(self.pad_id).unsqueeze(-1).to(memory.dtype)  # (B, S, 1): 1 at real tokens
        # Padding positions are excluded, so appending padding leaves the mean unchanged.
        return (memory * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)

    def forward(self, ids: Tensor) -> Tensor:
        """Class logits (B, C) for token ids (B, S), right-padded with the body's pad_id."""
        memory = self.body.encode(ids)  # (B, S, d); padding is masked as a key
        return self.head(self.dropout(self.pool(memory, ids)))

    @torch.no_grad()
    def probabilities(self, ids: Tensor) -> Tensor:
        """softmax of the logits, (B, C), in float32."""
        return torch.softmax(self(ids).float(), dim=-1)
