"""An experiment: one YAML file with the sections task, run_dir, model, data, train, decode
(and, for classification, head and finetune).

    task: translation
    run_dir: runs/multi30k_de_en
    model: {preset: base, d_model: 256, ...}   # a preset and/or TransformerConfig fields
    data: {...}                                # the task's data section
    train: {...}                               # TrainConfig
    decode: {...}                              # the task's decoding section

The command line overrides any value with `--section.key value` (`--train.max_steps 100`,
`--run_dir runs/x`); values are read as YAML scalars. Unknown sections and keys are errors.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aiayn import checkpoint as ckpt
from aiayn.config import TransformerConfig, load_yaml_mapping
from aiayn.errors import CheckpointError, ConfigError, DataError
from aiayn.train import TrainConfig, Trainer

logger = logging.getLogger(__name__)

TASKS = ("translation", "classification", "summarization", "pretrain")
SECTIONS = ("task", "run_dir", "model", "data", "train", "decode", "head", "finetune")
# Tasks that can start from pre-trained weights (`aiayn finetune --from`, `finetune.source`).
FINETUNE_TASKS = ("classification",)


@dataclass
class Experiment:
    task: str
    run_dir: Path
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: dict[str, Any] = field(default_factory=dict)
    head: dict[str, Any] = field(default_factory=dict)  # the task head (classification)
    finetune: dict[str, Any] = field(default_factory=dict)  # see aiayn.finetune

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> Experiment:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason})") from None
        values = load_yaml_mapping(text, what=f"config file {path}")
        apply_overrides(values, overrides or [])
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Experiment:
        unknown = sorted(set(values) - set(SECTIONS))
        if unknown:
            raise ConfigError(
                f"unknown config section {unknown[0]!r}; allowed: {', '.join(SECTIONS)}"
            )
        task = values.get("task")
        if task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        if not isinstance(values.get("run_dir"), str):
            raise ConfigError(
                "run_dir must be given: the folder for checkpoints and logs, e.g. runs/my_run"
            )
        for name in ("model", "data", "train", "decode", "head", "finetune"):
            section = values.get(name) or {}
            if not isinstance(section, dict):
                raise ConfigError(
                    f"{name} must be a mapping of key: value, got {type(section).__name__}"
                )
            values[name] = section
        exp = cls(
            task=task,
            run_dir=Path(values["run_dir"]),
            model=values["model"],
            data=values["data"],
            train=TrainConfig.from_dict(values["train"]),
            decode=values["decode"],
            head=values["head"],
            finetune=values["finetune"],
        )
        if task == "translation" and exp.head:
            raise ConfigError("task translation has no head section; remove it")
        from aiayn.finetune import FinetuneConfig, check_model_section

        if FinetuneConfig.from_dict(exp.finetune).source is not None:
            if task not in FINETUNE_TASKS:
                raise ConfigError(
                    f"fine-tuning is available for {', '.join(FINETUNE_TASKS)}, not {task}"
                )
            check_model_section(exp.model)  # the architecture comes from the source
            return exp
        # Validate the model section now, not after data preparation.
        model_cfg = exp.model_config(vocab_size=16, pad_id=0)
        if task == "classification":
            if model_cfg.n_encoder_layers < 1 or model_cfg.n_decoder_layers != 0:
                raise ConfigError(
                    f"task classification needs an encoder-only model, but "
                    f"model.n_encoder_layers is {model_cfg.n_encoder_layers} and "
                    f"model.n_decoder_layers is {model_cfg.n_decoder_layers}: set "
                    "n_encoder_layers to 1 or more and n_decoder_layers to 0"
                )
        # (pretrain checks the model against its objective: tasks.pretrain.check_experiment)
        elif task in ("translation", "summarization") and (
            model_cfg.n_encoder_layers < 1 or model_cfg.n_decoder_layers < 1
        ):
            # The config allows encoder-only and decoder-only models; translation needs both.
            raise ConfigError(
                f"task {task} needs an encoder and a decoder, but model.n_encoder_layers is "
                f"{model_cfg.n_encoder_layers} and model.n_decoder_layers is "
                f"{model_cfg.n_decoder_layers}: set both to 1 or more"
            )
        return exp

    def model_config(self, *, vocab_size: int, pad_id: int) -> TransformerConfig:
        """The model section resolved: preset + fields, with the tokenizer's vocabulary size."""
        values = dict(self.model)
        preset = values.pop("preset", None)
        for key in ("src_vocab_size", "tgt_vocab_size", "pad_id"):
            if key in values:
                raise ConfigError(f"model.{key} is set by the tokenizer; remove it from the config")
        values.update(src_vocab_size=vocab_size, tgt_vocab_size=vocab_size, pad_id=pad_id)
        if preset is not None:
            return TransformerConfig.from_preset(preset, **values)
        return TransformerConfig.from_dict(values)

    def resolved(self, model_cfg: TransformerConfig) -> dict[str, Any]:
        """The whole experiment with every model field spelled out: what checkpoints store."""
        return {
            "task": self.task,
            "run_dir": str(self.run_dir),
            "model": model_cfg.to_dict(),
            "data": self.data,
            "train": self.train.to_dict(),
            "decode": self.decode,
            "head": self.head,
            "finetune": self.finetune,
        }

    # ------------------------------------------------------------------ the run directory
    def check_run_dir(self, resume: bool) -> None:
        """Refuse to overwrite a finished or running run; refuse to resume nothing.

        Also refuse a run_dir that cannot be created, before any data is read, so that a
        refused run writes nothing.
        """
        existing = next(p for p in (self.run_dir, *self.run_dir.parents) if p.exists())
        if not existing.is_dir():
            raise ConfigError(
                f"run_dir {self.run_dir} cannot be created: {existing} is a file; "
                "pass --run_dir with another folder"
            )
        if not os.access(existing, os.W_OK):
            raise ConfigError(
                f"run_dir {self.run_dir} cannot be written: {existing} is read-only; "
                "pass --run_dir with a folder you can write"
            )
        has_checkpoints = ckpt.latest_checkpoint(self.run_dir / "checkpoints") is not None
        if resume and not has_checkpoints:
            raise CheckpointError(
                f"--resume: {self.run_dir} has no checkpoint to resume; start without --resume"
            )
        if not resume and has_checkpoints:
            raise ConfigError(
                f"{self.run_dir} already holds a run: continue it with --resume, or pass "
                "--run_dir with a new folder"
            )

    def write_config(self, run_config: dict[str, Any]) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "config.yaml"
        path.write_text(yaml.safe_dump(run_config, sort_keys=False), encoding="utf-8")
        return path

    def fit(self, trainer: Trainer, run_config: dict[str, Any], *, resume: bool, progress: bool):
        """Start (writing config.yaml) or resume `trainer`, train to the end, plot the curves.

        Every task ends its training function with this; returns the Trainer's `TrainResult`.
        """
        if resume:
            trainer.resume()
        else:
            self.write_config(run_config)
        result = trainer.fit(progress=progress)
        if trainer.dist.is_main:  # the process that wrote train.jsonl draws it, once
            self.plot_curves()
        return result

    def plot_curves(self) -> Path | None:
        from aiayn.plots import training_curves  # matplotlib only when a run ends

        log = self.run_dir / "train.jsonl"
        try:
            return training_curves(log, self.run_dir / "curves.png", title=str(self.run_dir))
        except DataError as exc:
            logger.warning("no training curves: %s", exc)
            return None


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> None:
    """Apply `--section.key value` pairs (as the CLI received them) to a config mapping."""
    if len(overrides) % 2:
        raise ConfigError(f"override {overrides[-1]!r} has no value; write --section.key value")
    for flag, raw in zip(overrides[::2], overrides[1::2], strict=True):
        if not flag.startswith("--") or len(flag) < 3:
            raise ConfigError(f"expected an override like --train.max_steps 100, got {flag!r}")
        path = flag[2:].replace("-", "_").split(".")
        if path[0] not in SECTIONS:
            raise ConfigError(
                f"unknown config section {path[0]!r} in {flag}; allowed: {', '.join(SECTIONS)}"
            )
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        target = values
        for key in path[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{flag}: {key} is not a section")
        target[path[-1]] = value
