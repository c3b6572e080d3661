"""Model configuration: one flat dataclass with the paper's names, its presets, and YAML I/O.

The presets `base` and `big` are the two rows of Table 3 of the paper:

    N  d_model  d_ff  h   d_k  d_v  P_drop  eps_ls  train steps  params
    6  512      2048  8   64   64   0.1     0.1     100K         65M    (base)
    6  1024     4096  16  64   64   0.3     0.1     300K         213M   (big)

(eps_ls, label smoothing, is a property of training, not of the model: see `train.py`.)
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from aiayn import atomic
from aiayn.errors import ConfigError

NormPlacement = Literal["post", "pre"]
Positions = Literal["sinusoidal", "learned"]
Activation = Literal["relu", "gelu", "silu"]
AttentionImpl = Literal["sdpa", "reference"]


# A number in exponent notation without a dot, which YAML 1.1 leaves a string: 1e-9, -2E+4.
_EXPONENT_NUMBER = re.compile(r"^[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+$")


class ConfigSection:
    """Shared behaviour of the config dataclasses: typed fields, dict and YAML round trips.

    Subclasses are dataclasses whose fields are annotated `int`, `float`, `bool`, `str`, a
    `Literal` alias listed in `CHOICES`, or `X | None`; `check()` adds their own range rules.
    """

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}
    SECTION: ClassVar[str] = "config"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the first field whose value is not allowed."""
        for f in fields(self):
            value = getattr(self, f.name)
            annotation = str(f.type)
            if annotation.endswith(" | None"):
                if value is None:
                    continue
                annotation = annotation.removesuffix(" | None")
            where = f"{self.SECTION}.{f.name}"
            if annotation == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{where} must be an integer, got {value!r}")
            if annotation == "float":
                if isinstance(value, str) and _EXPONENT_NUMBER.match(value.replace("_", "")):
                    # PyYAML reads YAML 1.1, where a float needs a dot: `lr_scale: 1e-9` (and
                    # the override --train.lr_scale 1e-9) arrive as the string "1e-9".
                    value = float(value.replace("_", ""))  # YAML 1.1 ignores underscores
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ConfigError(f"{where} must be a number, got {value!r}")
                # YAML reads .nan and .inf as floats; no setting means anything by them, and
                # a NaN passes every range check below (each comparison is False).
                if not math.isfinite(value):
                    raise ConfigError(f"{where} must be a finite number, got {value!r}")
                setattr(self, f.name, float(value))
            if annotation == "bool" and not isinstance(value, bool):
                raise ConfigError(f"{where} must be true or false, got {value!r}")
            if annotation == "str" and not isinstance(value, str):
                raise ConfigError(f"{where} must be a string, got {value!r}")
            if f.name in self.CHOICES and value not in self.CHOICES[f.name]:
                allowed = ", ".join(repr(c) for c in self.CHOICES[f.name])
                raise ConfigError(f"{where} must be one of {allowed}, got {value!r}")
        self.check()

    def check(self) -> None:
        """Rules between fields and value ranges; overridden by each section."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """Build from a mapping; an unknown key is a `ConfigError` naming it and the allowed keys."""
        if not isinstance(values, dict):
            raise ConfigError(
                f"{cls.SECTION} must be a mapping of key: value, got {type(values).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown {cls.SECTION} key {unknown[0]!r}; allowed keys: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any):
        """A copy with some fields changed (validated like a new config)."""
        return self.from_dict({**self.to_dict(), **changes})

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML text; also written to `path` when one is given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            atomic.write_text(path, text)
        return text

    @classmethod
    def from_yaml(cls, source: str | Path):
        """Read a config from a YAML file path, or from YAML text when `source` is not a file."""
        text = str(source)
        if "\n" not in text and Path(text).is_file():
            text = Path(text).read_text(encoding="utf-8")
        return cls.from_dict(load_yaml_mapping(text, what=cls.SECTION))


def load_yaml_mapping(text: str, what: str) -> dict[str, Any]:
    """Parse YAML text that must hold a mapping (an empty document is an empty mapping)."""
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"{what} is not valid YAML: {detail}") from exc
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(
            f"{what} must be a YAML mapping of key: value, got {type(values).__name__}"
        )
    return values


@dataclass
class TransformerConfig(ConfigSection):
    """Hyper-parameters of the Transformer. Defaults are the paper's base model (Table 3).

    Every field is used by the model and validated on construction; `n_encoder_layers=0`
    gives a decoder-only language model and `n_decoder_layers=0` an encoder-only model.
    """

    src_vocab_size: int = 37000  # §5.1: a shared source-target BPE vocabulary of ~37000 tokens
    tgt_vocab_size: int = 37000
    d_model: int = 512  # width of every sub-layer output and of the embeddings (§3.1)
    n_heads: int = 8  # h, parallel attention heads; d_k = d_v = d_model / h (§3.2.2)
    d_ff: int = 2048  # inner width of the position-wise feed-forward network (§3.3)
    n_encoder_layers: int = 6  # N (§3.1)
    n_decoder_layers: int = 6  # N (§3.1)
    dropout: float = 0.1  # P_drop: on every sub-layer output and on embeddings + positions (§5.4)
    attention_dropout: float = 0.0  # on attention weights; not in the paper (0 follows it)
    activation_dropout: float = 0.0  # inside the FFN after the activation; not in the paper
    max_len: int = 512  # longest sequence the positional encoding covers
    pad_id: int = 0  # padding token id: masked as a key, excluded from the loss
    shared_vocab: bool = True  # one embedding matrix for source and target (§3.4)
    tie_embeddings: bool = True  # output projection = target embedding matrix transposed (§3.4)
    # "post": LayerNorm(x + Sublayer(x)) as the paper; "pre": x + Sublayer(LayerNorm(x)).
    norm: NormPlacement = "post"
    positions: Positions = "sinusoidal"  # §3.5; "learned" is the variant of Table 3 row (E)
    # "relu": FFN(x) = max(0, xW1 + b1)W2 + b2 (eq. 2); "gelu" for BERT, "silu" (swish) for Marian.
    activation: Activation = "relu"
    layer_norm_eps: float = 1e-5  # not given in the paper; PyTorch's default
    # "sdpa": PyTorch's fused kernels (eq. 1 written out where they are slow: CPU half-precision
    # training); "reference": softmax(QK^T/sqrt(d_k))V written out always (eq. 1).
    attention: AttentionImpl = "sdpa"
    # Options for imported weights; the defaults follow the paper.
    scale_embeddings: bool = True  # §3.4: embeddings times sqrt(d_model); BERT does not scale
    embedding_norm: bool = False  # a LayerNorm on embeddings + positions, as in BERT
    output_bias: bool = False  # a bias on the output logits (Marian's final_logits_bias)

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "norm": ("post", "pre"),
        "positions": ("sinusoidal", "learned"),
        "activation": ("relu", "gelu", "silu"),
        "attention": ("sdpa", "reference"),
    }
    SECTION: ClassVar[str] = "model"

    # ------------------------------------------------------------------ derived values
    @property
    def d_k(self) -> int:
        """Width of one head's queries, keys and values: d_k = d_v = d_model / h."""
        return self.d_model // self.n_heads

    # ------------------------------------------------------------------ validation
    def check(self) -> None:
        for name in ("src_vocab_size", "tgt_vocab_size", "d_model", "n_heads", "d_ff", "max_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("n_encoder_layers", "n_decoder_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.n_encoder_layers == 0 and self.n_decoder_layers == 0:
            raise ConfigError(
                "n_encoder_layers and n_decoder_layers are both 0: set at least one to a positive integer"
            )
        if self.d_model % self.n_heads != 0:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}); "
                f"allowed n_heads for this d_model: {_divisors(self.d_model)}"
            )
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not (math.isfinite(self.layer_norm_eps) and self.layer_norm_eps > 0):
            raise ConfigError(
                f"layer_norm_eps must be a positive number, got {self.layer_norm_eps}"
            )
        if not 0 <= self.pad_id < min(self.src_vocab_size, self.tgt_vocab_size):
            raise ConfigError(
                f"pad_id must be a token id in [0, {min(self.src_vocab_size, self.tgt_vocab_size)}), "
                f"got {self.pad_id}"
            )
        has_both = self.n_encoder_layers > 0 and self.n_decoder_layers > 0
        if self.shared_vocab and has_both and self.src_vocab_size != self.tgt_vocab_size:
            raise ConfigError(
                f"shared_vocab needs src_vocab_size == tgt_vocab_size, got {self.src_vocab_size} "
                f"and {self.tgt_vocab_size}: make them equal or set shared_vocab: false"
            )

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TransformerConfig:
        """A named configuration: `base` and `big` (Table 3 of the paper) or `tiny` (tests).

        `vocab_size=V` is accepted as a shorthand for `src_vocab_size=tgt_vocab_size=V`.
        """
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        values = dict(PRESETS[name])
        if "vocab_size" in overrides:
            vocab_size = overrides.pop("vocab_size")
            values["src_vocab_size"] = values["tgt_vocab_size"] = vocab_size
        values.update(overrides)
        return cls.from_dict(values)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 64)


PRESETS: dict[str, dict[str, Any]] = {
    # Table 3, row "base".
    "base": dict(
        d_model=512, n_heads=8, d_ff=2048, n_encoder_layers=6, n_decoder_layers=6, dropout=0.1
    ),
    # Table 3, row "big".
    "big": dict(
        d_model=1024, n_heads=16, d_ff=4096, n_encoder_layers=6, n_decoder_layers=6, dropout=0.3
    ),
    # Small enough for unit tests on a CPU in milliseconds.
    "tiny": dict(
        src_vocab_size=64,
        tgt_vocab_size=64,
        d_model=32,
        n_heads=4,
        d_ff=64,
        n_encoder_layers=2,
        n_decoder_layers=2,
        dropout=0.0,
        max_len=64,
    ),
}
