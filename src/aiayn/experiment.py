"""An experiment: one YAML file with the sections task, run_dir, model, data, train, decode
(and, for classification, head and finetune).

    task: translation
    run_dir: runs/multi30k_de_en
    model: {preset: base, d_model: 256, ...}   # a preset and/or TransformerConfig fields
    data: {...}                                # the task's data section
    train: {...}                               # TrainConfig
    decode: {...}                              # the task's decoding section

The command line overrides any value with `--section.key value` or `--section.key=value`
(`--train.max_steps 100`, `--run_dir=runs/x`); values are read as YAML. Unknown sections and
keys are errors. `--resume` continues the run in run_dir only with the experiment its
config.yaml records (`Experiment.check_resumes`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist
import yaml

from aiayn import atomic, run_lock
from aiayn import checkpoint as ckpt
from aiayn.config import ConfigSection, TransformerConfig, load_yaml_mapping
from aiayn.errors import CheckpointError, ConfigError, DataError
from aiayn.train import Distributed, TrainConfig, Trainer, resolve_device, start_process_group

logger = logging.getLogger(__name__)
T = TypeVar("T")

TASKS = ("translation", "classification", "summarization", "pretrain")
# What --resume may change: where the same data now lives (data), how attention is computed
# rather than what (model), and when training stops, logs, validates and saves, and on what
# hardware (train). Any other change to these sections is another experiment.
RESUME_MAY_CHANGE = {
    "data": frozenset({"root", "path", "embeddings_file"}),
    "model": frozenset({"attention"}),
    # A fine-tuning run resumes from its own folder: its source may have moved since.
    "finetune": frozenset({"source"}),
    "train": frozenset(
        {
            "max_steps",
            "max_epochs",
            "max_time_s",
            "log_every",
            "eval_every",
            "save_every",
            "keep_last",
            "max_bad_steps",
            "device",
            "precision",
            "compile",
            "fsdp",
            "grad_accum",  # with the number of processes: N x 1 batches a step is 1 x N
        }
    ),
}
SECTIONS = ("task", "run_dir", "model", "data", "train", "decode", "head", "finetune")
# Tasks that can start from pre-trained weights (`aiayn finetune --from`, `finetune.source`).
FINETUNE_TASKS = ("classification", "translation", "summarization")


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
        if path.is_dir():
            raise ConfigError(
                f"{path} is a folder; give a config file, e.g. configs/multi30k_de_en.yaml"
            )
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason})") from None
        values = load_yaml_mapping(text, what=f"config file {path}")
        if not values:
            raise ConfigError(f"config file {path} is empty; see configs/ for examples")
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
        model_cfg = exp.model_before_tokenizer()
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
        given = dict(src_vocab_size=vocab_size, tgt_vocab_size=vocab_size, pad_id=pad_id)
        for key, value in given.items():
            # A run's own config.yaml spells them out: the same values are no change.
            if key in values and values[key] != value:
                raise ConfigError(
                    f"model.{key} is {values[key]!r} here but the tokenizer gives {value}: it is "
                    "set by the tokenizer; remove it from the config"
                )
        values.update(given)
        if preset is not None:
            return TransformerConfig.from_preset(preset, **values)
        return TransformerConfig.from_dict(values)

    def model_before_tokenizer(self) -> TransformerConfig:
        """The model section resolved before the tokenizer exists, to check it early: the
        vocabulary's size and pad id are the section's own where it spells them out (a run's
        config.yaml does), else stand-ins."""
        vocab_size = self.model.get("src_vocab_size", 16)
        return self.model_config(vocab_size=vocab_size, pad_id=self.model.get("pad_id", 0))

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
    def check_run_dir(
        self,
        resume: bool,
        sections: dict[str, ConfigSection] | None = None,
        derived: tuple[str, ...] = (),
    ) -> None:
        """Refuse to overwrite a finished or running run; refuse to resume nothing, or to resume
        a run with the settings of another experiment (`check_resumes`: `sections` are the
        task's own sections as read, such as {"data": ...}, `derived` the fields of these that
        the run resolved from null).

        Also refuse a run_dir that cannot be created, before any data is read, so that a
        refused run writes nothing.

        Under torchrun every process checks its own run_dir (on several machines, each its own
        copy), and all refuse if one does: one that stopped alone would leave the others
        waiting for it until the collectives time out.
        """
        refusal: ConfigError | CheckpointError | None = None
        try:
            self._check_run_dir(resume, sections, derived)
        except (ConfigError, CheckpointError) as exc:
            refusal = exc
        info = Distributed.from_env()
        if info.world_size > 1:
            start_process_group(info, resolve_device(self.train.device, info))
            refusals: list[Exception | None] = [None] * info.world_size
            dist.all_gather_object(refusals, refusal)
            if refusal is None:
                rank, other = next(((r, e) for r, e in enumerate(refusals) if e), (0, None))
                if other is not None:
                    raise type(other)(f"process {rank} refused to start: {other}")
        if refusal is not None:
            raise refusal

    def _check_run_dir(
        self, resume: bool, sections: dict[str, ConfigSection] | None, derived: tuple[str, ...]
    ) -> None:
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
        if self.run_dir.is_dir():
            self._hold_run_dir()  # before the checks below: a running run has no end yet
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
        if resume:
            self.check_resumes(sections or {}, derived)

    def check_resumes(
        self, sections: dict[str, ConfigSection], derived: tuple[str, ...] = ()
    ) -> None:
        """Refuse to resume the run in run_dir with another task, another model, other training
        settings or other settings in `sections` (data; a classifier's head) than its
        config.yaml records: its checkpoints would train on, silently, with them."""
        path = self.run_dir / "config.yaml"
        try:
            run = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            return  # no record to compare with: the checkpoint's own checks still apply
        if not isinstance(run, dict):
            return
        if run.get("task") != self.task:
            raise ConfigError(
                f"--resume: {self.run_dir} holds a {run.get('task')} run but the config is for "
                f"{self.task}; resume with the run's own config ({path}), or pass another "
                "--run_dir"
            )
        tuned = run.get("finetune")
        tuned_from = tuned.get("source") if isinstance(tuned, dict) else None
        if tuned_from and not self.finetune.get("source"):
            raise ConfigError(
                f"--resume: {self.run_dir} was fine-tuned from {tuned_from}: resume it with "
                f"`aiayn train {path} --resume` or `aiayn finetune --from {tuned_from} CONFIG "
                "--resume` (the source may have moved: the run resumes from its own folder)"
            )
        now: dict[str, dict[str, Any]] = {}
        then: dict[str, dict[str, Any]] = {}
        for name, section in {**sections, "train": self.train}.items():
            if not isinstance(run.get(name), dict):
                continue
            known = {f.name for f in dataclasses.fields(section)}
            try:
                stored = {k: v for k, v in run[name].items() if k in known}
                then[name] = type(section).from_dict(stored).to_dict()
            except ConfigError:
                continue  # written by another version: nothing to compare with
            now[name] = {
                k: v for k, v in section.to_dict().items() if not (k in derived and v is None)
            }
        model = run.get("model")
        if self.finetune.get("source") and isinstance(model, dict):
            # The architecture is the source's; the config may set only dropouts.
            now["model"], then["model"] = dict(self.model), model
        elif isinstance(model, dict):
            try:
                vocab, pad_id = model["src_vocab_size"], model["pad_id"]
                now["model"] = self.model_config(vocab_size=vocab, pad_id=pad_id).to_dict()
                then["model"] = model
            except (ConfigError, KeyError, TypeError):
                pass
        for section in then.keys() & now.keys():
            for key, value in now[section].items():
                # A field the run's version of aiayn did not have yet keeps its default there.
                if key not in then[section] or key in RESUME_MAY_CHANGE.get(section, ()):
                    continue
                was = then[section][key]
                if _located(value) == _located(was):
                    continue
                raise ConfigError(
                    f"--resume: {section}.{key} is {value!r} here but {was!r} in {path}; "
                    "resume with the run's settings, or start a new run with another --run_dir"
                )

    def claim_run_dir(self) -> None:
        """Create run_dir if it is new, and hold it until this process ends or the command
        releases it (`aiayn.run_lock`): call before the first file is written into it.

        Raises:
            ConfigError: another process is training in it (two runs started together, the
                other one first past `check_run_dir`).
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._hold_run_dir()

    def _hold_run_dir(self) -> None:
        """Hold the existing run_dir (`aiayn.run_lock`) in the main process: the processes of
        one torchrun job share the folder, and each would refuse the others."""
        if Distributed.from_env().is_main:
            run_lock.hold(self.run_dir)

    def write_config(self, run_config: dict[str, Any]) -> Path:
        self.claim_run_dir()
        path = self.run_dir / "config.yaml"
        atomic.write_text(path, yaml.safe_dump(run_config, sort_keys=False))
        return path

    def fit(self, trainer: Trainer, run_config: dict[str, Any], *, resume: bool, progress: bool):
        """Start (writing config.yaml) or resume `trainer`, train to the end, plot the curves.

        Every task ends its training function with this; returns the Trainer's `TrainResult`.
        """
        if trainer.dist.is_main:
            for path in ckpt.remove_leftovers(self.run_dir / "checkpoints"):
                logger.info("deleted %s, left by an interrupted save", path.name)
        if resume:
            trainer.resume()
        # Written again on resume: what may change (RESUME_MAY_CHANGE) is recorded.
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
        except (DataError, OSError) as exc:  # a full disk here loses a picture, not the run
            logger.warning("no training curves: %s", exc)
            return None


def releases_run_dir(train: Callable[..., T]) -> Callable[..., T]:
    """A task's training function that lets go of its run directory when it returns or
    raises (`aiayn.run_lock`): a Python session may train again, or leave `aiayn train` its
    folder, once a run is over. Its first argument is the `Experiment`."""

    @functools.wraps(train)
    def wrapper(exp: Experiment, *args: Any, **kwargs: Any) -> T:
        try:
            return train(exp, *args, **kwargs)
        finally:
            run_lock.release(exp.run_dir)

    return wrapper


def _located(value: Any) -> Any:
    """A data setting without the paths in it: a list of sources compares without theirs."""
    if isinstance(value, list):
        return [
            {k: v for k, v in item.items() if k != "path"} if isinstance(item, dict) else item
            for item in value
        ]
    return value


def _override_pairs(overrides: list[str]) -> list[tuple[str, str]]:
    """(flag, value) pairs of `--section.key value` or `--section.key=value` words."""
    words: list[str] = []
    for word in overrides:
        if word.startswith("--") and "=" in word:
            flag, _, value = word.partition("=")
            words += [flag, value]
        else:
            words.append(word)
    pairs = []
    for i in range(0, len(words), 2):
        flag = words[i]
        if not flag.startswith("--") or len(flag) < 3:
            raise ConfigError(f"expected an override like --train.max_steps 100, got {flag!r}")
        if i + 1 == len(words) or _is_override_flag(words[i + 1]):
            raise ConfigError(f"override {flag} has no value; write {flag} VALUE")
        pairs.append((flag, words[i + 1]))
    return pairs


def _is_override_flag(word: str) -> bool:
    """Whether a word is an override's flag (--run_dir, --train.max_steps), not a value."""
    return word.startswith("--") and word[2:].replace("-", "_").split(".")[0] in SECTIONS


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> None:
    """Apply `--section.key value` (or `--section.key=value`) overrides, as the CLI received
    them, to a config mapping."""
    for flag, raw in _override_pairs(overrides):
        path = flag[2:].replace("-", "_").split(".")
        if path[0] not in SECTIONS:
            raise ConfigError(
                f"unknown config section {path[0]!r} in {flag}; allowed: {', '.join(SECTIONS)}"
            )
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            if raw.lstrip().startswith(("[", "{")):  # meant as a YAML list or mapping
                detail = " ".join(str(exc).split())
                raise ConfigError(f"{flag}: {raw!r} is not valid YAML: {detail}") from None
            value = raw  # any other text is taken as it is: a path, a name
        target = values
        for key in path[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{flag}: {key} is not a section")
        target[path[-1]] = value
