"""Hugging Face interop: load BERT-family and Marian (opus-mt) checkpoints into aiayn's Transformer.

A Hugging Face model folder holds ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). This module reads both with ``json`` and ``safetensors``
directly, so **transformers is not needed at runtime**; the tests use it only as an oracle.

    from_hf_bert(folder or model)   -> (encoder-only Transformer, metadata)
    load_bert_tokenizer(folder)     -> tokenizers.Tokenizer from tokenizer.json
    from_hf_marian(folder)          -> (encoder-decoder Transformer, metadata with decoding ids)
    to_hf_marian(model, folder)     -> a folder that ``MarianMTModel.from_pretrained`` loads

The heart of the module is the name maps below (``BERT_*``, ``MARIAN_*``): one line per tensor,
aiayn's name on the left, Hugging Face's on the right. Everything that is not a plain copy (a
folded token-type embedding, a position table, a logits bias) is spelled out next to its use.

How the two architectures fit the paper's model (see `aiayn.config.TransformerConfig`):

============================  ======================================  ===========================
                              BERT / RoBERTa                          Marian (opus-mt)
============================  ======================================  ===========================
LayerNorm placement           post (as the paper)                     post (as the paper)
activation                    GELU, exact erf ("gelu")                SiLU ("swish")
embeddings x sqrt(d_model)    no                                      yes (``scale_embedding``)
LayerNorm on the embeddings   yes                                     no
positions                     learned table                           sinusoids, *not* interleaved
token types                   folded into the position table          none
output bias                   (no decoder)                            ``final_logits_bias``
LayerNorm eps                 ``layer_norm_eps`` (1e-12)              1e-5 (PyTorch's default)
pad / decoder start / eos     ``pad_token_id``                        pad = decoder start (!), eos
============================  ======================================  ===========================

Attention needs no conversion: Hugging Face scales q by d_k^-0.5 before Q K^T, the paper divides
Q K^T by sqrt(d_k); both are softmax(Q K^T / sqrt(d_k)) V. Neither post-LN model has a final
LayerNorm after its stacks (each layer already ends in one), and neither has one in aiayn.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import Tensor

from aiayn.config import TransformerConfig
from aiayn.errors import CheckpointError, ConfigError
from aiayn.model import LearnedPositionalEmbedding, Transformer

__all__ = [
    "BERT_EMBEDDINGS",
    "HFModelLike",
    "BERT_LAYER",
    "BERT_MODEL_TYPES",
    "MARIAN_DECODER_LAYER",
    "MARIAN_ENCODER_LAYER",
    "from_hf_bert",
    "from_hf_marian",
    "load_bert_tokenizer",
    "marian_sinusoids",
    "to_hf_marian",
]

HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
HF_WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
HF_GENERATION_CONFIG_FILE = "generation_config.json"
HF_TOKENIZER_FILE = "tokenizer.json"

# --------------------------------------------------------------------------- name maps
# aiayn module name -> Hugging Face module name. Every entry maps both `.weight` and `.bias`
# unless it names a tensor itself (ends in `.weight`). Layer maps are relative to one layer:
# aiayn `encoder.layers.{i}.` <- HF `encoder.layer.{i}.` (BERT) / `model.encoder.layers.{i}.`.

# BERT's embeddings. `positions.embedding.weight` is not a plain copy: see `from_hf_bert`.
BERT_EMBEDDINGS: dict[str, str] = {
    "src_embed.lut.weight": "embeddings.word_embeddings.weight",
    "embed_norm": "embeddings.LayerNorm",
}

# One BERT layer: attention, its output projection + LayerNorm, then the FFN + LayerNorm.
BERT_LAYER: dict[str, str] = {
    "self_attn.w_q": "attention.self.query",
    "self_attn.w_k": "attention.self.key",
    "self_attn.w_v": "attention.self.value",
    "self_attn.w_o": "attention.output.dense",
    "sublayer.0.norm": "attention.output.LayerNorm",  # LayerNorm(x + SelfAttention(x))
    "feed_forward.w_1": "intermediate.dense",  # followed by the activation ("gelu")
    "feed_forward.w_2": "output.dense",
    "sublayer.1.norm": "output.LayerNorm",  # LayerNorm(x + FFN(x))
}

# One Marian encoder layer (HF `MarianEncoderLayer`).
MARIAN_ENCODER_LAYER: dict[str, str] = {
    "self_attn.w_q": "self_attn.q_proj",
    "self_attn.w_k": "self_attn.k_proj",
    "self_attn.w_v": "self_attn.v_proj",
    "self_attn.w_o": "self_attn.out_proj",
    "sublayer.0.norm": "self_attn_layer_norm",
    "feed_forward.w_1": "fc1",
    "feed_forward.w_2": "fc2",
    "sublayer.1.norm": "final_layer_norm",  # the FFN's LayerNorm, not a stack-final one
}

# One Marian decoder layer (HF `MarianDecoderLayer`): the encoder layer plus cross-attention.
MARIAN_DECODER_LAYER: dict[str, str] = {
    "self_attn.w_q": "self_attn.q_proj",
    "self_attn.w_k": "self_attn.k_proj",
    "self_attn.w_v": "self_attn.v_proj",
    "self_attn.w_o": "self_attn.out_proj",
    "sublayer.0.norm": "self_attn_layer_norm",
    "cross_attn.w_q": "encoder_attn.q_proj",
    "cross_attn.w_k": "encoder_attn.k_proj",
    "cross_attn.w_v": "encoder_attn.v_proj",
    "cross_attn.w_o": "encoder_attn.out_proj",
    "sublayer.1.norm": "encoder_attn_layer_norm",
    "feed_forward.w_1": "fc1",
    "feed_forward.w_2": "fc2",
    "sublayer.2.norm": "final_layer_norm",
}

# model_type -> how positions are numbered. RoBERTa numbers real tokens from pad_token_id + 1
# (fairseq's convention), BERT from 0.
BERT_MODEL_TYPES: dict[str, str] = {
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "camembert": "roberta",
}

# HF `hidden_act` / `activation_function` -> aiayn activation. HF's "gelu" is the exact erf
# GELU, as `nn.GELU()`; the tanh approximations ("gelu_new", ...) are not supported.
_ACTIVATIONS: dict[str, str] = {"gelu": "gelu", "relu": "relu", "swish": "silu", "silu": "silu"}
_MARIAN_ACTIVATION_NAMES: dict[str, str] = {"gelu": "gelu", "relu": "relu", "silu": "swish"}

# Tensors in BERT checkpoints that are not weights (buffers saved by old versions).
_BERT_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")

# Generation settings that a Marian config.json (old checkpoints) or generation_config.json
# may hold; reported in the metadata so a caller can decode as Hugging Face would.
_GENERATION_KEYS = (
    "num_beams",
    "max_length",
    "max_new_tokens",
    "min_length",
    "length_penalty",
    "early_stopping",
    "bad_words_ids",
    "forced_eos_token_id",
    "no_repeat_ngram_size",
    "repetition_penalty",
)

_MARIAN_LAYER_NORM_EPS = 1e-5  # HF Marian builds `nn.LayerNorm(d_model)`: PyTorch's default


def _expand(module_map: Mapping[str, str], ours: str, theirs: str) -> dict[str, str]:
    """Module names -> tensor names: `a -> b` becomes `a.weight -> b.weight`, `a.bias -> b.bias`."""
    names: dict[str, str] = {}
    for our_name, their_name in module_map.items():
        if our_name.endswith(".weight"):
            names[ours + our_name] = theirs + their_name
        else:
            for suffix in ("weight", "bias"):
                names[f"{ours}{our_name}.{suffix}"] = f"{theirs}{their_name}.{suffix}"
    return names


# --------------------------------------------------------------------------- reading folders


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}".replace("\n", " ")) from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}".replace("\n", " ")) from exc


def _read_hf_folder(model_dir: str | Path) -> tuple[dict[str, Any], dict[str, Tensor], Path]:
    """config.json and every tensor of a Hugging Face model folder (one file or shards)."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder: expected a Hugging Face model folder")
    if not (folder / HF_CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{folder} has no {HF_CONFIG_FILE}: expected a Hugging Face model folder "
            f"({HF_CONFIG_FILE} + {HF_WEIGHTS_FILE})"
        )
    config = _read_json(folder / HF_CONFIG_FILE)
    if (folder / HF_WEIGHTS_FILE).is_file():
        return config, _read_safetensors(folder / HF_WEIGHTS_FILE), folder
    if (folder / HF_WEIGHTS_INDEX_FILE).is_file():
        weight_map = _read_json(folder / HF_WEIGHTS_INDEX_FILE).get("weight_map", {})
        if not isinstance(weight_map, dict):
            raise CheckpointError(
                f"{folder / HF_WEIGHTS_INDEX_FILE}: weight_map must map tensor names to files, "
                f"got a {type(weight_map).__name__}"
            )
        tensors: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_read_safetensors(folder / shard))
        return config, tensors, folder
    # Only safetensors: a pickled pytorch_model.bin can run code when it is loaded.
    raise CheckpointError(
        f"{folder} has no {HF_WEIGHTS_FILE}: only safetensors weights are read "
        "(re-save the model with `save_pretrained(..., safe_serialization=True)`)"
    )


class HFModelLike(Protocol):
    """What `from_hf_bert` needs of an in-memory transformers model (no import of transformers)."""

    config: Any  # a PretrainedConfig: `to_dict()` and `_name_or_path`

    def state_dict(self) -> Mapping[str, Tensor]: ...


def _as_checkpoint(
    source: str | Path | HFModelLike,
) -> tuple[dict[str, Any], dict[str, Tensor], Path | None]:
    """A folder, or an in-memory Hugging Face model (duck-typed: `.config` and `.state_dict()`)."""
    if hasattr(source, "state_dict") and hasattr(source, "config"):
        if not hasattr(source.config, "to_dict"):
            raise ConfigError(
                f"a {type(source).__name__} is not a Hugging Face model (its config has no "
                "to_dict); pass a transformers model or the folder it was saved to"
            )
        config = source.config.to_dict()
        tensors = {name: t.detach() for name, t in source.state_dict().items()}
        folder = getattr(source.config, "_name_or_path", "") or None
        path = Path(folder) if folder and Path(folder).is_dir() else None
        return config, tensors, path
    if not isinstance(source, str | os.PathLike):
        raise ConfigError(
            f"expected a Hugging Face model folder (a path) or a transformers model, got a "
            f"{type(source).__name__}"
        )
    return _read_hf_folder(source)


def _rename_legacy(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Old TF-converted BERT checkpoints call LayerNorm parameters gamma/beta (as HF renames)."""
    renamed = {}
    for name, tensor in tensors.items():
        if name.endswith(".gamma"):
            name = name[: -len("gamma")] + "weight"
        elif name.endswith(".beta"):
            name = name[: -len("beta")] + "bias"
        renamed[name] = tensor
    return renamed


def _whole(value: Any) -> int:
    """An integer setting of config.json, which JSON may write as 512.0 but not as 32.7."""
    if isinstance(value, bool) or not float(value).is_integer():
        raise ValueError(f"{value!r} is not a whole number")
    return int(value)


def _require(config: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in config:
        raise CheckpointError(f"{source}: config.json has no {key!r}")
    return config[key]


def _summarise(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --------------------------------------------------------------------------- loading weights


def _check_shapes(
    tensors: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], source: str
) -> None:
    """Every tensor the config implies must be present, with the shape it implies."""
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise CheckpointError(
            f"{source} lacks {len(missing)} tensor(s) that its config.json implies: "
            f"{_summarise(missing)}"
        )
    wrong = [
        f"{name} is {tuple(tensors[name].shape)}, expected {shape}"
        for name, shape in expected.items()
        if tuple(tensors[name].shape) != tuple(shape)
    ]
    if wrong:
        raise CheckpointError(
            f"{source}: {len(wrong)} tensor(s) do not match the shapes its config.json implies: "
            + "; ".join(wrong)
        )


def _load_state(model: Transformer, state: dict[str, Tensor]) -> None:
    """Copy `state` (aiayn names) into the model; it must cover every parameter (a bug otherwise)."""
    expected = set(model.state_dict())
    assert set(state) == expected, (
        f"interop name map is incomplete: missing {sorted(expected - set(state))}, "
        f"extra {sorted(set(state) - expected)}"
    )
    with torch.no_grad():
        # load_state_dict copies in place (casting the dtype), so tied parameters stay tied.
        model.load_state_dict(state, strict=True)


def _direct_copies(
    model: Transformer, names: Mapping[str, str], tensors: Mapping[str, Tensor]
) -> tuple[dict[str, tuple[int, ...]], dict[str, Tensor]]:
    """Expected HF shapes (those of aiayn's parameters) and the aiayn state of plain copies."""
    params = model.state_dict()
    expected = {theirs: tuple(params[ours].shape) for ours, theirs in names.items()}
    state = {ours: tensors[theirs] for ours, theirs in names.items() if theirs in tensors}
    return expected, state


# --------------------------------------------------------------------------- BERT


def from_hf_bert(
    model_dir_or_hf_model: str | Path | HFModelLike,
) -> tuple[Transformer, dict[str, Any]]:
    """Load a Hugging Face BERT-family encoder (BERT, RoBERTa, XLM-R) as an encoder-only Transformer.

    Args:
        model_dir_or_hf_model: a folder with config.json + model.safetensors (a plain `BertModel`
            or one with a task head, e.g. `BertForMaskedLM`; the head is ignored), or an
            in-memory transformers model.

    Returns:
        ``(model, metadata)``: the model in eval mode (as `from_pretrained` returns it), whose
        ``encode(ids)`` equals HF's ``last_hidden_state`` at non-pad positions, and a dict with
        ``model_type``, ``pad_id``, ``max_len``, ``pooler`` (``{"weight", "bias"}`` of the
        ``tanh(W h_[CLS] + b)`` pooler, or None), ``vocab_file`` and ``tokenizer_file`` (paths or
        None), ``unused`` (checkpoint tensors not loaded, e.g. an MLM head) and ``config``
        (config.json as read).

    The mapping:

    * Post-LN layers, GELU (exact erf), learned positions, LayerNorm on the embedding sum, no
      sqrt(d_model) scaling, ``layer_norm_eps`` and ``pad_token_id`` from config.json.
    * **Token types.** BERT adds ``token_type_embeddings[token_type_ids]`` to every position.
      For single-segment input (all token_type_ids 0, HF's default when none are passed) that is
      the constant row ``token_type_embeddings[0]``, folded here into the position table.
      **Two-segment input (sentence pairs with token_type_ids 1) is not supported**: aiayn's
      model has no token-type input, so the second segment would be embedded as segment 0.
    * **Padding.** aiayn masks keys where ``ids == pad_id``: the same as BERT's attention_mask
      when batches are padded with the pad token ([PAD] = 0), as the tokenizer does. Outputs at
      pad positions differ (HF computes them too) and must be ignored, as in HF.
    * **RoBERTa positions** start at ``pad_token_id + 1`` for real tokens, so the table is loaded
      from that row on (and ``max_len`` shrinks by as much); exact for right-padded batches.
    """
    config, tensors, folder = _as_checkpoint(model_dir_or_hf_model)
    source = str(folder) if folder is not None else type(model_dir_or_hf_model).__name__
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in BERT_MODEL_TYPES:
        raise CheckpointError(
            f"{source}: config.json has model_type {model_type!r}; from_hf_bert reads "
            f"{', '.join(BERT_MODEL_TYPES)} (use from_hf_marian for marian)"
        )
    position_type = config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise CheckpointError(
            f"{source}: position_embedding_type {position_type!r} is not supported, only 'absolute'"
        )
    act = config.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise CheckpointError(
            f"{source}: hidden_act {act!r} is not supported; use one of {', '.join(_ACTIVATIONS)}"
        )
    tensors = _rename_legacy(tensors)

    # Task-head checkpoints (BertForMaskedLM, ...) nest the encoder under `bert.`/`roberta.`.
    suffix = "embeddings.word_embeddings.weight"
    prefix = next((n[: -len(suffix)] for n in sorted(tensors, key=len) if n.endswith(suffix)), "")

    try:
        pad_id = config.get("pad_token_id")
        pad_id = 0 if pad_id is None else _whole(pad_id)  # BERT's [PAD] is 0
        n_positions = _whole(_require(config, "max_position_embeddings", source))
        offset = pad_id + 1 if BERT_MODEL_TYPES[model_type] == "roberta" else 0
        d_model = _whole(_require(config, "hidden_size", source))
        vocab_size = _whole(_require(config, "vocab_size", source))
        type_vocab_size = _whole(config.get("type_vocab_size", 2))
        cfg = TransformerConfig(
            src_vocab_size=vocab_size,
            tgt_vocab_size=vocab_size,
            d_model=d_model,
            n_heads=_whole(_require(config, "num_attention_heads", source)),
            d_ff=_whole(_require(config, "intermediate_size", source)),
            n_encoder_layers=_whole(_require(config, "num_hidden_layers", source)),
            n_decoder_layers=0,  # encoder-only
            dropout=float(config.get("hidden_dropout_prob", 0.1)),
            attention_dropout=float(config.get("attention_probs_dropout_prob", 0.1)),
            max_len=n_positions - offset,
            pad_id=pad_id,
            norm="post",
            positions="learned",
            activation=_ACTIVATIONS[act],
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
            scale_embeddings=False,
            embedding_norm=True,
            output_bias=False,
        )
    except (ConfigError, TypeError, ValueError) as exc:  # ConfigError: a value aiayn refuses
        raise CheckpointError(f"{source}: config.json does not fit aiayn's model: {exc}") from exc
    model = Transformer(cfg)

    names = _expand(BERT_EMBEDDINGS, "", prefix)
    for i in range(cfg.n_encoder_layers):
        names |= _expand(BERT_LAYER, f"encoder.layers.{i}.", f"{prefix}encoder.layer.{i}.")
    expected, state = _direct_copies(model, names, tensors)
    positions_name = f"{prefix}embeddings.position_embeddings.weight"
    token_types_name = f"{prefix}embeddings.token_type_embeddings.weight"
    expected[positions_name] = (n_positions, d_model)
    if token_types_name in tensors:  # absent when a model has no token types
        expected[token_types_name] = (type_vocab_size, d_model)
    pooler_weight, pooler_bias = f"{prefix}pooler.dense.weight", f"{prefix}pooler.dense.bias"
    has_pooler = pooler_weight in tensors  # not loaded: returned in the metadata
    if has_pooler:
        expected |= {pooler_weight: (d_model, d_model), pooler_bias: (d_model,)}
    _check_shapes(tensors, expected, source)

    # The position table: rows for the positions aiayn numbers 0.., plus the segment-0 embedding.
    table = tensors[positions_name][offset:].float()
    if token_types_name in tensors:
        table = table + tensors[token_types_name][0].float()
    state["positions.embedding.weight"] = table
    _load_state(model, state)

    pooler = (
        {"weight": tensors[pooler_weight], "bias": tensors[pooler_bias]} if has_pooler else None
    )
    unused = sorted(
        n for n in tensors if n not in expected and n.removeprefix(prefix) not in _BERT_BUFFERS
    )
    metadata = {
        "model_type": model_type,
        "pad_id": pad_id,
        "max_len": cfg.max_len,
        "pooler": pooler,
        "vocab_file": _existing(folder, "vocab.txt"),
        "tokenizer_file": _existing(folder, HF_TOKENIZER_FILE),
        "unused": unused,
        "config": config,
    }
    return model.eval(), metadata


def _existing(folder: Path | None, name: str) -> Path | None:
    return folder / name if folder is not None and (folder / name).is_file() else None


def load_bert_tokenizer(model_dir: str | Path, *, pad_to_longest: bool = True) -> Tokenizer:
    """The `tokenizers.Tokenizer` of a Hugging Face model folder, from its tokenizer.json.

    Args:
        model_dir: the model folder.
        pad_to_longest: pad each `encode_batch` to its longest sequence with the file's pad
            token (sentence-transformers files often pad every input to a fixed 128, which only
            costs compute: the model masks padding). False keeps the file's padding setting.
            Truncation is kept as the file sets it.
    """
    path = Path(model_dir) / HF_TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{model_dir} has no {HF_TOKENIZER_FILE}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise CheckpointError(f"cannot read {path}: {exc}".replace("\n", " ")) from exc
    padding = tokenizer.padding
    if pad_to_longest and padding is not None:
        tokenizer.enable_padding(
            direction=padding["direction"],
            pad_id=padding["pad_id"],
            pad_type_id=padding["pad_type_id"],
            pad_token=padding["pad_token"],
            length=None,  # longest in the batch
            pad_to_multiple_of=padding["pad_to_multiple_of"],
        )
    return tokenizer


# --------------------------------------------------------------------------- Marian


def marian_sinusoids(n_positions: int, dim: int) -> Tensor:
    """Marian's sinusoidal position table (n_positions, dim), float32, as HF computes it.

    The frequencies are the paper's, 1 / 10000^(2i/dim), but the layout is not interleaved:
    sin(pos * f_i) fills the first half of the dimensions and cos(pos * f_i) the second half
    (the paper puts sin on even and cos on odd dimensions). aiayn's `SinusoidalPositionalEncoding`
    has the paper's layout, so Marian models use this table as a learned (frozen) one.
    """
    position = torch.arange(n_positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)
    angles = position / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    half = (dim + 1) // 2
    table = torch.empty(n_positions, dim, dtype=torch.float64)
    table[:, :half] = torch.sin(angles[:, 0::2])
    table[:, half:] = torch.cos(angles[:, 1::2])
    return table.float()


def _marian_names(cfg: TransformerConfig, shared: bool, tied: bool) -> dict[str, str]:
    """aiayn tensor name -> Marian tensor name, for every plain copy (both directions)."""
    if shared:
        # One matrix for encoder input, decoder input and (tied) output: three-way tying.
        names = {
            "src_embed.lut.weight": "model.shared.weight",
            "tgt_embed.lut.weight": "model.shared.weight",
        }
    else:
        names = {
            "src_embed.lut.weight": "model.encoder.embed_tokens.weight",
            "tgt_embed.lut.weight": "model.decoder.embed_tokens.weight",
        }
    # Tied: generator.weight IS the target embedding; otherwise HF's separate lm_head.
    names["generator.weight"] = names["tgt_embed.lut.weight"] if tied else "lm_head.weight"
    for i in range(cfg.n_encoder_layers):
        names |= _expand(MARIAN_ENCODER_LAYER, f"encoder.layers.{i}.", f"model.encoder.layers.{i}.")
    for i in range(cfg.n_decoder_layers):
        names |= _expand(MARIAN_DECODER_LAYER, f"decoder.layers.{i}.", f"model.decoder.layers.{i}.")
    return names


def _token_id(config: Mapping[str, Any], key: str, source: str) -> int:
    value = _require(config, key, source)
    if isinstance(value, list):  # HF allows several eos ids; aiayn's search takes one
        if not value:
            raise CheckpointError(f"{source}: config.json has an empty {key!r}")
        value = value[0]
    if not isinstance(value, int):
        raise CheckpointError(f"{source}: config.json {key!r} must be a token id, got {value!r}")
    return value


def from_hf_marian(model_dir: str | Path) -> tuple[Transformer, dict[str, Any]]:
    """Load a Hugging Face Marian (opus-mt) translation model as an encoder-decoder Transformer.

    Args:
        model_dir: a folder with config.json + model.safetensors of a `MarianMTModel`.

    Returns:
        ``(model, metadata)``: the model in eval mode, whose ``forward(src, tgt)`` equals HF's
        logits (with ``attention_mask = src != pad``), and a dict with the ids to decode with:
        ``bos_id`` (the first decoder input, HF's ``decoder_start_token_id``; in Marian it is
        the pad id!), ``decoder_start_id`` (the same), ``eos_id``, ``pad_id``, plus ``max_len``,
        ``generation`` (HF generation settings found in config.json / generation_config.json,
        e.g. ``num_beams``, ``bad_words_ids``), ``unused`` tensors and ``config``.

    The mapping:

    * Post-LN (Marian's ``normalize_before`` is false; HF ignores the key), no final LayerNorm,
      activation ``swish`` = SiLU, embeddings times sqrt(d_model) (``scale_embedding``), no
      LayerNorm on the embeddings, LayerNorm eps 1e-5, ``final_logits_bias`` -> the generator's
      bias, shared source/target/output embeddings when HF shares and ties them.
    * **Positions**: Marian's sinusoids put sin in the first half of the dimensions and cos in
      the second (see `marian_sinusoids`), not the paper's interleaving, so the model is built
      with ``positions="learned"`` and the table is loaded into it, frozen
      (``requires_grad=False``) as HF freezes it. ``max_len = max_position_embeddings``.
      A table stored in the checkpoint (old exports) is used as stored.
    * **Decoding**: start every target with ``bos_id`` (= pad in Marian). Marian bans pad in
      its outputs (``bad_words_ids``), as `aiayn.decoding` bans pad and bos; the decoder never
      masks target tokens as padding, so a pad-valued start token is harmless.
    """
    config, tensors, folder = _read_hf_folder(model_dir)
    source = str(folder)
    if config.get("model_type") != "marian":
        raise CheckpointError(
            f"{source}: config.json has model_type {config.get('model_type')!r}; "
            "from_hf_marian reads 'marian' (use from_hf_bert for BERT-like encoders)"
        )
    act = config.get("activation_function", "gelu")
    if act not in _ACTIVATIONS:
        raise CheckpointError(
            f"{source}: activation_function {act!r} is not supported; "
            f"use one of {', '.join(_ACTIVATIONS)}"
        )
    for ours, theirs in (("n_heads", "attention_heads"), ("d_ff", "ffn_dim")):
        enc, dec = config.get(f"encoder_{theirs}"), config.get(f"decoder_{theirs}")
        if enc != dec:  # aiayn has one value for both stacks
            raise CheckpointError(
                f"{source}: encoder_{theirs} ({enc}) differs from decoder_{theirs} ({dec}); "
                f"aiayn's {ours} is one value for both stacks"
            )
    # A MarianModel (no LM head) checkpoint has no `model.` prefix: give it one.
    if not any(name.startswith("model.") for name in tensors):
        tensors = {f"model.{name}": t for name, t in tensors.items()}

    pad_id = _token_id(config, "pad_token_id", source)
    eos_id = _token_id(config, "eos_token_id", source)
    start_id = _token_id(config, "decoder_start_token_id", source)
    shared = bool(config.get("share_encoder_decoder_embeddings", True))
    tied = bool(config.get("tie_word_embeddings", True))
    try:
        vocab_size = int(_require(config, "vocab_size", source))
        d_model = int(_require(config, "d_model", source))
        n_positions = int(config.get("max_position_embeddings", 1024))  # HF's default
        cfg = TransformerConfig(
            src_vocab_size=vocab_size,
            tgt_vocab_size=vocab_size
            if shared
            else int(config.get("decoder_vocab_size") or vocab_size),
            d_model=d_model,
            n_heads=int(_require(config, "encoder_attention_heads", source)),
            d_ff=int(_require(config, "encoder_ffn_dim", source)),
            n_encoder_layers=int(_require(config, "encoder_layers", source)),
            n_decoder_layers=int(_require(config, "decoder_layers", source)),
            dropout=float(config.get("dropout", 0.1)),
            attention_dropout=float(config.get("attention_dropout", 0.0)),
            activation_dropout=float(config.get("activation_dropout", 0.0)),
            max_len=n_positions,
            pad_id=pad_id,
            shared_vocab=shared,
            tie_embeddings=tied,
            norm="post",
            positions="learned",
            activation=_ACTIVATIONS[act],
            layer_norm_eps=_MARIAN_LAYER_NORM_EPS,
            scale_embeddings=bool(config.get("scale_embedding", False)),
            embedding_norm=False,
            output_bias=True,
        )
    except (ConfigError, TypeError, ValueError) as exc:  # ConfigError: a value aiayn refuses
        raise CheckpointError(f"{source}: config.json does not fit aiayn's model: {exc}") from exc
    if cfg.n_encoder_layers == 0 or cfg.n_decoder_layers == 0:
        raise CheckpointError(f"{source}: a Marian model needs encoder and decoder layers")
    model = Transformer(cfg)

    names = _marian_names(cfg, shared, tied)
    expected, state = _direct_copies(model, names, tensors)
    expected["final_logits_bias"] = (1, cfg.tgt_vocab_size)
    stored_positions = [
        f"model.{stack}.embed_positions.weight"
        for stack in ("encoder", "decoder")
        if f"model.{stack}.embed_positions.weight" in tensors
    ]
    for name in stored_positions:
        expected[name] = (n_positions, d_model)
    if "final_logits_bias" not in tensors:  # HF zero-fills it when absent
        tensors = {**tensors, "final_logits_bias": torch.zeros(1, cfg.tgt_vocab_size)}
    _check_shapes(tensors, expected, source)

    state["generator.bias"] = tensors["final_logits_bias"][0]  # (1, V) buffer -> (V,) bias
    # HF recomputes the sinusoids unless the checkpoint stores them (then it loads them).
    # aiayn has one table for both stacks, so stored encoder and decoder tables must agree.
    tables = [tensors[name] for name in stored_positions]
    if len(tables) == 2 and not torch.equal(tables[0], tables[1]):
        raise CheckpointError(
            f"{source}: the encoder and decoder position tables differ; aiayn shares one table"
        )
    state["positions.embedding.weight"] = (
        tables[0] if tables else marian_sinusoids(n_positions, d_model)
    )
    _load_state(model, state)
    assert isinstance(model.positions, LearnedPositionalEmbedding)
    model.positions.embedding.weight.requires_grad_(False)  # sinusoids: fixed, as in Marian

    generation: dict[str, Any] = {k: config[k] for k in _GENERATION_KEYS if k in config}
    if (folder / HF_GENERATION_CONFIG_FILE).is_file():
        generation_config = _read_json(folder / HF_GENERATION_CONFIG_FILE)
        generation |= {k: generation_config[k] for k in _GENERATION_KEYS if k in generation_config}
    metadata = {
        "model_type": "marian",
        "bos_id": start_id,
        "decoder_start_id": start_id,
        "eos_id": eos_id,
        "pad_id": pad_id,
        "max_len": cfg.max_len,
        "generation": generation,
        "unused": sorted(
            name
            for name in set(tensors) - set(expected)
            # A shared, untied model's copies of the shared matrix (what to_hf_marian writes).
            if not (
                cfg.shared_vocab
                and name in _SHARED_COPIES
                and torch.equal(tensors[name], tensors["model.shared.weight"])
            )
        ),  # fmt: skip
        "config": config,
    }
    return model.eval(), metadata


_SHARED_COPIES = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")


def to_hf_marian(
    model: Transformer, out_dir: str | Path, *, eos_id: int, decoder_start_id: int
) -> Path:
    """Write `model` as a Hugging Face Marian folder that `MarianMTModel.from_pretrained` loads.

    Writes config.json, model.safetensors and generation_config.json; HF's logits then equal
    ``model(src, tgt)`` (eval mode). Meant for benchmarking HF's ``generate`` on the same weights.

    Args:
        model: an encoder-decoder aiayn Transformer with post-LN layers, no embedding LayerNorm
            and LayerNorm eps 1e-5 (what HF Marian hard-codes). Any positions and activation
            (relu/gelu/silu) work, so natively trained aiayn models export too.
        out_dir: the folder to write (created if needed; files in it are overwritten).
        eos_id: the end-of-sequence id.
        decoder_start_id: the first decoder input (aiayn's bos; Marian's pad). For a model from
            `from_hf_marian`, pass its metadata's ``eos_id`` and ``decoder_start_id``.

    The position table (learned, or aiayn's own interleaved sinusoids) is stored as
    ``model.{encoder,decoder}.embed_positions.weight``: HF loads stored tables instead of
    computing its own sinusoids. generation_config.json sets eos/pad/decoder-start ids,
    ``forced_eos_token_id = eos`` and ``bad_words_ids`` = pad and bos, which makes HF's
    ``generate`` ban the tokens that `aiayn.decoding` bans.

    Raises:
        ConfigError: the model has a feature Marian does not (pre-LN, embedding LayerNorm, ...).
    """
    cfg = model.cfg
    problems = []
    if model.encoder is None or model.decoder is None:
        problems.append("it needs an encoder and a decoder")
    if cfg.norm != "post":
        problems.append("Marian is post-LN, this model is pre-LN")
    if cfg.embedding_norm:
        problems.append("Marian has no LayerNorm on the embeddings")
    if cfg.layer_norm_eps != _MARIAN_LAYER_NORM_EPS:
        problems.append(f"Marian's LayerNorm eps is 1e-5, this model's {cfg.layer_norm_eps}")
    if cfg.shared_vocab and cfg.src_vocab_size != cfg.tgt_vocab_size:
        problems.append("a shared vocabulary needs equal source and target sizes")
    if problems:
        raise ConfigError(f"cannot export to Hugging Face Marian: {'; '.join(problems)}")
    # Marian ends sources and outputs with its one eos id, so it must be a token of both
    # vocabularies; the decoder start is a target token only.
    limits = (
        ("eos_id", eos_id, min(cfg.src_vocab_size, cfg.tgt_vocab_size)),
        ("decoder_start_id", decoder_start_id, cfg.tgt_vocab_size),
    )
    for name, value, vocab in limits:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
            raise ConfigError(f"{name} must be a token id in [0, {vocab}), got {value!r}")

    ours = model.state_dict()
    names = _marian_names(cfg, cfg.shared_vocab, cfg.tie_embeddings)
    tensors: dict[str, Tensor] = {}
    for our_name, their_name in names.items():
        # Tied names map to one HF tensor, written once; HF re-ties on load.
        tensors.setdefault(their_name, ours[our_name])
    if cfg.shared_vocab and not cfg.tie_embeddings:
        # HF ties its encoder's and decoder's input embeddings to `shared` only along with the
        # output: untied, it loads them as tensors of their own, which must be written.
        for name in _SHARED_COPIES:
            tensors[name] = ours["src_embed.lut.weight"]
    if cfg.output_bias:
        tensors["final_logits_bias"] = ours["generator.bias"][None, :]
    else:
        tensors["final_logits_bias"] = torch.zeros(
            1, cfg.tgt_vocab_size, dtype=ours["generator.weight"].dtype
        )
    # aiayn keeps its sinusoids in float64 and casts them to the activations' dtype: do the same.
    table = model.positions(0, cfg.max_len).detach().to(ours["generator.weight"].dtype)
    tensors["model.encoder.embed_positions.weight"] = table
    tensors["model.decoder.embed_positions.weight"] = table
    # safetensors refuses tensors that share memory: write independent contiguous copies.
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}

    dtype = str(tensors["final_logits_bias"].dtype).removeprefix("torch.")
    config = {
        "architectures": ["MarianMTModel"],
        "model_type": "marian",
        "vocab_size": cfg.src_vocab_size,
        "decoder_vocab_size": cfg.tgt_vocab_size,
        "d_model": cfg.d_model,
        "encoder_layers": cfg.n_encoder_layers,
        "decoder_layers": cfg.n_decoder_layers,
        "encoder_attention_heads": cfg.n_heads,
        "decoder_attention_heads": cfg.n_heads,
        "encoder_ffn_dim": cfg.d_ff,
        "decoder_ffn_dim": cfg.d_ff,
        "activation_function": _MARIAN_ACTIVATION_NAMES[cfg.activation],
        "dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout,
        "activation_dropout": cfg.activation_dropout,
        "max_position_embeddings": cfg.max_len,
        "scale_embedding": cfg.scale_embeddings,
        "share_encoder_decoder_embeddings": cfg.shared_vocab,
        "tie_word_embeddings": cfg.tie_embeddings,
        "pad_token_id": cfg.pad_id,
        "eos_token_id": eos_id,
        "forced_eos_token_id": eos_id,
        "decoder_start_token_id": decoder_start_id,
        "is_encoder_decoder": True,
        "dtype": dtype,
    }
    # aiayn.decoding never emits pad or bos (unless bos is eos); make HF ban the same ids.
    banned = sorted({cfg.pad_id, decoder_start_id} - {eos_id})
    generation = {
        "decoder_start_token_id": decoder_start_id,
        "eos_token_id": eos_id,
        "forced_eos_token_id": eos_id,
        "pad_token_id": cfg.pad_id,
        "bad_words_ids": [[i] for i in banned],
    }

    folder = Path(out_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (folder / HF_GENERATION_CONFIG_FILE).write_text(
            json.dumps(generation, indent=2) + "\n", encoding="utf-8"
        )
        save_file(tensors, str(folder / HF_WEIGHTS_FILE), metadata={"format": "pt"})
    except OSError as exc:
        raise CheckpointError(f"cannot write {folder}: {exc}") from exc
    return folder
