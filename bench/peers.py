"""The peers aiayn is measured against, built from the same `TransformerConfig`.

* :class:`TorchTransformerMT`: ``torch.nn.Transformer`` made into the paper's translation
  model: one embedding matrix shared by source, target and the output layer, scaled by
  sqrt(d_model), the paper's sinusoids, dropout on the embedding sums, no final LayerNorm
  (the paper's post-LN stacks have none), and aiayn's initialisation scale.
* :func:`marian_config` / :func:`build_marian`: a randomly initialised Hugging Face
  ``MarianMTModel`` of the same shape: ReLU, post-LN, ``scale_embedding``, shared and tied
  embeddings, the same dropout.

Each peer is wrapped to take what aiayn's `Transformer.forward` takes, ``(src_ids, tgt_ids)``,
and to return logits (B, T, V), so that one training step serves all three.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aiayn.config import TransformerConfig

# Everything is local: transformers must never try the network (no Hub access on the GPU box).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def paper_sinusoids(max_len: int, d_model: int) -> Tensor:
    """§3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...), float32."""
    position = torch.arange(max_len, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(1e4) / d_model)
    )
    pe = torch.zeros(max_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(position * inv_freq)
    pe[:, 1::2] = torch.cos(position * inv_freq[: d_model // 2])
    return pe.float()


class TorchTransformerMT(nn.Module):
    """``torch.nn.Transformer`` with embeddings and a tied output layer: the paper's model.

    Differences from a bare ``nn.Transformer`` that make it the same model as aiayn's, so
    that the two do the same work:

    * ``nn.Transformer`` always appends a LayerNorm to each stack; the paper's post-LN stack
      ends in one already, so the extra ones are removed (as in tests/test_model.py).
    * ``nn.Transformer`` applies its one dropout rate also to the attention weights and
      after the FFN activation; the paper (and aiayn's and Marian's configs here) use it only
      on sub-layer outputs and embedding sums, so those two are set to 0. (Dropout with
      p = 0 returns its input without work.)
    * The decoder's self-attention gets ``tgt_is_causal=True``, which lets
      ``nn.MultiheadAttention`` use the fused causal kernel instead of a materialised mask,
      as aiayn does; source padding is masked with key-padding masks, as aiayn masks it.
    * Initialisation: Xavier-uniform matrices (``nn.Transformer``'s own), embeddings
      N(0, d_model^-0.5) with a zero padding row (aiayn's).
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        if cfg.src_vocab_size != cfg.tgt_vocab_size:
            raise ValueError("TorchTransformerMT shares one vocabulary: sizes must be equal")
        self.pad_id, self.scale = cfg.pad_id, math.sqrt(cfg.d_model)
        self.embed = nn.Embedding(cfg.src_vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.register_buffer("pe", paper_sinusoids(cfg.max_len, cfg.d_model), persistent=False)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        with warnings.catch_warnings():
            # "enable_nested_tensor is True, but ...": the nested-tensor fast path is for
            # inference only; irrelevant to training.
            warnings.simplefilter("ignore", UserWarning)
            self.transformer = nn.Transformer(
                d_model=cfg.d_model,
                nhead=cfg.n_heads,
                num_encoder_layers=cfg.n_encoder_layers,
                num_decoder_layers=cfg.n_decoder_layers,
                dim_feedforward=cfg.d_ff,
                dropout=cfg.dropout,
                activation=cfg.activation,
                batch_first=True,
                norm_first=cfg.norm == "pre",
                layer_norm_eps=cfg.layer_norm_eps,
            )
        if cfg.norm == "post":
            self.transformer.encoder.norm = None
            self.transformer.decoder.norm = None
        for layer in [*self.transformer.encoder.layers, *self.transformer.decoder.layers]:
            layer.self_attn.dropout = cfg.attention_dropout
            layer.dropout.p = cfg.activation_dropout  # the dropout after the FFN activation
            if hasattr(layer, "multihead_attn"):
                layer.multihead_attn.dropout = cfg.attention_dropout
        nn.init.normal_(self.embed.weight, mean=0.0, std=cfg.d_model**-0.5)
        with torch.no_grad():
            self.embed.weight[cfg.pad_id].zero_()

    def _embed(self, ids: Tensor) -> Tensor:
        x = self.embed(ids) * self.scale
        return self.embed_dropout(x + self.pe[: ids.size(1)].to(x.dtype))

    def forward(self, src_ids: Tensor, tgt_ids: Tensor) -> Tensor:
        """Logits (B, T, V) for source ids (B, S) and shifted-right target ids (B, T)."""
        src_pad = src_ids.eq(self.pad_id)  # True = padding, nn.Transformer's convention
        causal = nn.Transformer.generate_square_subsequent_mask(
            tgt_ids.size(1), device=tgt_ids.device
        )
        out = self.transformer(
            self._embed(src_ids),
            self._embed(tgt_ids),
            tgt_mask=causal,
            src_key_padding_mask=src_pad,
            memory_key_padding_mask=src_pad,
            tgt_is_causal=True,
        )
        return F.linear(out, self.embed.weight)  # the output layer tied to the embedding


def marian_config(cfg: TransformerConfig, *, bos_id: int, eos_id: int) -> Any:
    """A ``transformers.MarianConfig`` of the same shape as `cfg` (shared, tied vocabulary).

    Marian is post-LN and has no final LayerNorm, as the paper; ``scale_embedding`` multiplies
    embeddings by sqrt(d_model); ``activation_function`` follows `cfg` (ReLU for the paper).
    Its positions are sinusoids with sin and cos in halves rather than interleaved: the same
    work. Its initialisation (N(0, 0.02)) is its own; it does not change the work either.
    """
    import transformers

    if cfg.norm != "post" or cfg.embedding_norm or not cfg.shared_vocab:
        raise ValueError("Marian is post-LN, with no embedding LayerNorm; use a shared vocabulary")
    activation = {"relu": "relu", "gelu": "gelu", "silu": "swish"}[cfg.activation]
    config = transformers.MarianConfig(
        vocab_size=cfg.src_vocab_size,
        decoder_vocab_size=cfg.tgt_vocab_size,
        d_model=cfg.d_model,
        encoder_layers=cfg.n_encoder_layers,
        decoder_layers=cfg.n_decoder_layers,
        encoder_attention_heads=cfg.n_heads,
        decoder_attention_heads=cfg.n_heads,
        encoder_ffn_dim=cfg.d_ff,
        decoder_ffn_dim=cfg.d_ff,
        activation_function=activation,
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        activation_dropout=cfg.activation_dropout,
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
        max_position_embeddings=cfg.max_len,
        scale_embedding=cfg.scale_embeddings,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=cfg.pad_id,
        eos_token_id=eos_id,
        decoder_start_token_id=bos_id,
    )
    # PyTorch's fused attention, as aiayn and nn.Transformer use (HF's default where available;
    # set explicitly so that the result file can say so).
    config._attn_implementation = "sdpa"
    return config


class MarianLogits(nn.Module):
    """A ``MarianMTModel`` behind aiayn's ``forward(src_ids, tgt_ids) -> logits``.

    ``use_cache=False``: a training forward pass must not build a key/value cache (HF turns
    it off itself when ``labels`` are passed; here the loss is computed outside).
    """

    def __init__(self, model: nn.Module, pad_id: int) -> None:
        super().__init__()
        self.model, self.pad_id = model, pad_id

    def forward(self, src_ids: Tensor, tgt_ids: Tensor) -> Tensor:
        return self.model(
            input_ids=src_ids,
            attention_mask=src_ids.ne(self.pad_id),
            decoder_input_ids=tgt_ids,
            use_cache=False,
        ).logits


def quiet_transformers() -> None:
    """No info messages or progress bars from transformers: the benchmark's output is its table."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def build_marian(cfg: TransformerConfig, *, bos_id: int, eos_id: int) -> MarianLogits:
    """A randomly initialised ``MarianMTModel`` of `cfg`'s shape, wrapped as :class:`MarianLogits`."""
    import transformers

    quiet_transformers()
    model = transformers.MarianMTModel(marian_config(cfg, bos_id=bos_id, eos_id=eos_id))
    return MarianLogits(model, cfg.pad_id)
