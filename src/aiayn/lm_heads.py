"""Language-model heads for pre-training, on top of the paper's `Transformer` (model.py untouched).

    MaskedLMHead          BERT's output layer: dense + activation + LayerNorm, then the
                          embedding matrix transposed (tied, §3.4) plus a bias
    MaskedLanguageModel   an encoder-only Transformer with a MaskedLMHead (objective "mlm")
    CausalLanguageModel   a decoder-only Transformer whose forward() is decode() without
                          memory (objective "causal"); no parameters of its own

Both are subclasses of `Transformer`, so their state dicts hold the Transformer's own names
(`src_embed.lut.weight`, `encoder.layers.0.self_attn.w_q.weight`, ...); the only extra
tensors are the masked-LM head's, all under `mlm_head.`. A plain `Transformer` with the same
config therefore loads a pre-trained checkpoint by name, leaving out `mlm_head.*`.

Shapes: B batch, S length, d = d_model, V vocabulary, N selected positions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aiayn.config import TransformerConfig
from aiayn.model import Transformer

MLM_HEAD_PREFIX = "mlm_head."


class MaskedLMHead(nn.Module):
    """Hidden states (..., d) -> vocabulary logits (..., V), the output matrix tied to `embedding`.

    As BERT's: logits = LayerNorm(act(h W + b)) E^T + bias, E the (V, d) token embeddings.
    The transform gives the head its own capacity, so the encoder's last layer need not double
    as the output space of the tied embeddings.
    """

    def __init__(self, cfg: TransformerConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.activation = nn.GELU()
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.src_vocab_size))
        # A plain attribute would make `embedding` a second sub-module (and its weight a second
        # state-dict entry); keep the tie without registering it.
        self._embedding = [embedding]
        nn.init.xavier_uniform_(self.dense.weight)
        nn.init.zeros_(self.dense.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        x = self.norm(self.activation(self.dense(hidden)))
        return x @ self._embedding[0].weight.t() + self.bias


class MaskedLanguageModel(Transformer):
    """An encoder-only Transformer (n_decoder_layers=0) with BERT's masked-LM head."""

    def __init__(self, cfg: TransformerConfig) -> None:
        if cfg.n_encoder_layers < 1 or cfg.n_decoder_layers != 0:
            raise ValueError("a masked language model is encoder-only: n_decoder_layers must be 0")
        super().__init__(cfg)
        self.mlm_head = MaskedLMHead(cfg, self.src_embed.lut)

    def forward(self, src_ids: Tensor, positions: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Logits at every position (B, S, V), or at the selected positions only: (N, V).

        Selecting first saves the V-wide output layer at the ~85% of positions without a loss.
        `positions` is a (B, S) bool mask, or the (N,) indices of its True values among the
        B S positions in row-major order, which a training batch carries
        (`tasks.pretrain.MaskedLMBatch.chosen`): with indices, N is known before the step, so
        the selection has no shape that depends on values. A mask's has, which on a GPU
        makes the host wait for the device, and breaks the graph under `torch.compile`.
        """
        hidden = self.encode(src_ids)  # (B, S, d)
        if positions is not None:
            if positions.dtype == torch.bool:
                positions = positions.flatten().nonzero().squeeze(1)
            hidden = hidden.flatten(0, 1).index_select(0, positions)  # (N, d)
        return self.mlm_head(hidden)


class CausalLanguageModel(Transformer):
    """A decoder-only Transformer (n_encoder_layers=0): forward(ids) = decode(ids), no memory."""

    def __init__(self, cfg: TransformerConfig) -> None:
        if cfg.n_encoder_layers != 0 or cfg.n_decoder_layers < 1:
            raise ValueError("a causal language model is decoder-only: n_encoder_layers must be 0")
        super().__init__(cfg)

    def forward(self, tgt_ids: Tensor) -> Tensor:  # type: ignore[override]
        """Next-token logits (B, T, V): position t sees tokens 0..t only."""
        return self.decode(tgt_ids)
