"""Checkpoints: save, load, list, prune and average training state, safely and atomically.

A checkpoint is a directory, conventionally ``<run>/checkpoints/step_{step:08d}/``::

    model.safetensors      model weights; tied tensors are stored once (see below)
    config.json            the model config, exactly the dict the caller passed
    trainer_state.json     the trainer's dict: step, epoch, sampler state, best metric,
                           ``rng`` (from `capture_rng_state`), ...
    optimizer.safetensors  optimizer tensors under flattened keys such as ``state.3.exp_avg``
    optimizer.json         the rest of the optimizer state dict (param_groups, numbers)
    scheduler.json         the learning-rate scheduler's state dict
    <extra files>          copied in by the caller, e.g. ``tokenizer.json``

The first three files are required; the optimizer pair and ``scheduler.json`` are optional
(inference and averaged checkpoints have neither).

Safety. Nothing here pickles or unpickles: checkpoints hold only safetensors and JSON, so
loading a checkpoint from an untrusted source cannot run code. Foreign PyTorch ``.pt``/``.bin``
files are read only through `load_torch_state_dict`, which uses ``weights_only=True``.

Atomicity. A save fills a hidden sibling directory ``.<name>.tmp-<pid>``, fsyncs every file and
the directory, then renames it into place (a directory rename is atomic on POSIX). Replacing an
existing checkpoint renames the old one aside to ``.<name>.old-<pid>`` first and deletes it only
after the new one is in place. So a crash or a full disk leaves either the previous checkpoint
or the new one at that name, never a mixture; hidden directories, and directories missing a
required file, are never treated as checkpoints.

Tied weights. The Transformer ties its output projection to the embedding, so its state dict
names one tensor twice; safetensors refuses shared tensors. The first name is stored and the
others are recorded as aliases in the file's metadata (``aiayn.aliases``); on load every alias
gets the same tensor again, and loading into a model copies in place, so the model's own
``Parameter`` sharing is untouched.

The best checkpoint. `write_best_pointer` records the best checkpoint in ``best.json`` in the
checkpoints directory (a small file naming the step directory, the metric and its value; a
file rather than a symlink so that it works on every filesystem and survives copying a run).
`prune_checkpoints` never deletes the checkpoint that ``best.json`` names.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from aiayn import atomic
from aiayn.errors import CheckpointError, CheckpointMismatchError, ConfigError
from aiayn.faults import maybe_fail

__all__ = [
    "BEST_POINTER_FILE",
    "CONFIG_FILE",
    "MODEL_FILE",
    "OPTIMIZER_STATE_FILE",
    "OPTIMIZER_TENSORS_FILE",
    "REQUIRED_FILES",
    "SCHEDULER_FILE",
    "TRAINER_STATE_FILE",
    "Checkpoint",
    "average_checkpoints",
    "capture_rng_state",
    "checkpoint_path",
    "checkpoint_step",
    "is_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_state_dict",
    "load_torch_state_dict",
    "model_section",
    "os_error_message",
    "prune_checkpoints",
    "read_best_pointer",
    "remove_leftovers",
    "restore_rng_state",
    "save_checkpoint",
    "write_best_pointer",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_TENSORS_FILE = "optimizer.safetensors"
OPTIMIZER_STATE_FILE = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
BEST_POINTER_FILE = "best.json"

#: Files every complete checkpoint has; a directory lacking one is not a checkpoint.
REQUIRED_FILES = (MODEL_FILE, CONFIG_FILE, TRAINER_STATE_FILE)
#: Files that describe one training moment; averaging does not carry them over.
_TRAINING_STATE_FILES = frozenset(
    {MODEL_FILE, TRAINER_STATE_FILE, OPTIMIZER_TENSORS_FILE, OPTIMIZER_STATE_FILE, SCHEDULER_FILE}
)
_RESERVED_FILES = _TRAINING_STATE_FILES | {CONFIG_FILE}

FORMAT_VERSION = 1
_FORMAT_KEY = "aiayn.format"
_ALIASES_KEY = "aiayn.aliases"
_STEP_DIR_RE = re.compile(r"^step_(\d+)$")
# Longest list of tensor names an error message spells out before summarising the rest.
_MAX_LISTED = 20
# What to do when checkpoints cannot be averaged.
_AVERAGE_HINT = "; average checkpoints of one model, e.g. the last ones of one run"


@dataclass(frozen=True)
class Checkpoint:
    """What `load_checkpoint` read besides the weights it copied into the model."""

    path: Path
    config: dict[str, Any]
    trainer_state: dict[str, Any]
    scheduler_state: dict[str, Any] | None
    has_optimizer: bool

    @property
    def step(self) -> int | None:
        """The training step recorded in ``trainer_state`` (``None`` if it records none)."""
        step = self.trainer_state.get("step")
        return step if isinstance(step, int) else None


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def save_checkpoint(
    directory: Path,
    *,
    model: nn.Module,
    config: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler_state: dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
    files: dict[str, Path] | None = None,
) -> Path:
    """Save a checkpoint directory atomically and return its path.

    Args:
        directory: The checkpoint directory to create or replace, e.g. ``checkpoint_path(root, 500)``.
            An existing checkpoint there is replaced only once the new one is complete; an
            existing directory that is not a checkpoint is never overwritten.
        model: Its ``state_dict()`` goes to ``model.safetensors``.
        config: The model config, written to ``config.json``; must be JSON-serialisable.
        optimizer: If given, its state goes to ``optimizer.safetensors`` + ``optimizer.json``.
        scheduler_state: A scheduler's ``state_dict()``, written to ``scheduler.json``.
        trainer_state: The trainer's JSON-serialisable state (include ``rng=capture_rng_state()``
            so that a resumed run draws the same random numbers); tuples come back as lists.
        files: Extra files to copy in, as ``{name in checkpoint: source path}``.

    Raises:
        CheckpointError: If something cannot be stored without pickle, a source file is
            missing, or the disk is full or not writable. The previous checkpoint at
            ``directory``, if any, is then unchanged.
    """
    directory = Path(directory)
    # Everything that can fail without touching the disk happens first, so that a bad input
    # costs no I/O and leaves no temporary directory behind.
    extra_files = _check_extra_files(files or {})
    model_tensors, model_aliases = _prepare_tensors(model.state_dict(), what="model state")
    optimizer_payload: tuple[dict[str, torch.Tensor], dict[str, str], bytes] | None = None
    if optimizer is not None:
        opt_tensors: dict[str, torch.Tensor] = {}
        structure = _encode(optimizer.state_dict(), (), opt_tensors)
        tensors, aliases = _prepare_tensors(opt_tensors, what="optimizer state")
        optimizer_payload = (
            tensors,
            aliases,
            _json_bytes({"format_version": FORMAT_VERSION, "state_dict": structure}, "optimizer"),
        )
    scheduler_json = (
        _json_bytes(scheduler_state, "scheduler_state") if scheduler_state is not None else None
    )
    config_json = _json_bytes(config, "config")
    trainer_json = _json_bytes(trainer_state or {}, "trainer_state")

    with _atomic_directory(directory) as tmp:
        _write_safetensors(tmp / MODEL_FILE, model_tensors, model_aliases)
        if optimizer_payload is not None:
            tensors, aliases, structure_json = optimizer_payload
            _write_safetensors(tmp / OPTIMIZER_TENSORS_FILE, tensors, aliases)
            _write_file(tmp / OPTIMIZER_STATE_FILE, structure_json)
        if scheduler_json is not None:
            _write_file(tmp / SCHEDULER_FILE, scheduler_json)
        # Tests: a kill (or a full disk) with half the checkpoint written, before the rename.
        maybe_fail("checkpoint-write")
        for name, source in extra_files.items():
            _copy_file(source, tmp / name)
        _write_file(tmp / CONFIG_FILE, config_json)
        _write_file(tmp / TRAINER_STATE_FILE, trainer_json)
    logger.debug("saved checkpoint %s", directory)
    return directory


def _check_extra_files(files: Mapping[str, Path]) -> dict[str, Path]:
    """Validate the caller's extra files: plain names, no clash with ours, sources exist."""
    checked: dict[str, Path] = {}
    for name, source in files.items():
        if not name or name != Path(name).name or name.startswith("."):
            raise CheckpointError(
                f"extra checkpoint file name {name!r} must be a plain file name "
                "(no directories, not hidden)"
            )
        if name in _RESERVED_FILES:
            raise CheckpointError(
                f"extra checkpoint file name {name!r} clashes with a file the checkpoint "
                "writes itself; rename it"
            )
        source = Path(source)
        if not source.is_file():
            raise CheckpointError(
                f"cannot copy {source} into the checkpoint as {name!r}: no such file"
            )
        checked[name] = source
    return checked


def _prepare_tensors(
    state: Mapping[str, Any], *, what: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Make a state dict storable by safetensors: one copy per shared tensor, all contiguous.

    Returns the tensors to store and ``{alias: stored name}`` for names that refer to exactly
    the same tensor as an earlier name (tied weights).
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple[Any, ...], str] = {}  # identity of a tensor view -> name it is stored as
    storages: set[tuple[str, int]] = set()  # storages some stored tensor already uses
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{what} entry {name!r} is a {type(value).__name__}, not a tensor; "
                "checkpoints store tensors only (no pickle)"
            )
        tensor = value.detach()
        shares_storage = False
        if tensor.numel() > 0:
            storage = (str(tensor.device), tensor.untyped_storage().data_ptr())
            offset, shape, stride = tensor.storage_offset(), tuple(tensor.shape), tensor.stride()
            view = (*storage, offset, shape, stride, tensor.dtype)
            if view in views:
                aliases[name] = views[view]
                continue
            views[view] = name
            shares_storage = storage in storages
            storages.add(storage)
        # Two different views of one storage (not a tie) must be stored as separate copies,
        # since safetensors refuses overlapping tensors; the same goes for strided views.
        if shares_storage or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()
        tensors[name] = tensor.cpu()
    return tensors, aliases


def _encode(value: Any, path: tuple[str, ...], tensors: dict[str, torch.Tensor]) -> Any:
    """Turn a nested state dict into JSON, moving its tensors into ``tensors``.

    A tensor becomes ``{"__tensor__": "state.3.exp_avg"}`` (its path joined by dots); tuples
    and dicts with non-string keys (the optimizer's ``state`` is keyed by int) are tagged so
    that `_decode` restores exactly the original types.
    """
    where = ".".join(path) or "<root>"
    if isinstance(value, torch.Tensor):
        key = ".".join(path)
        if key in tensors:
            raise CheckpointError(f"optimizer state has two tensors named {key!r}")
        tensors[key] = value
        return {"__tensor__": key}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, (*path, str(i)), tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, (*path, str(i)), tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, (*path, k), tensors) for k, v in value.items()}
        items = []
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, int | str):
                raise CheckpointError(
                    f"optimizer state at {where} has a key of type {type(k).__name__}; "
                    "only str and int keys can be stored without pickle"
                )
            items.append([k, _encode(v, (*path, str(k)), tensors)])
        return {"__items__": items}
    raise CheckpointError(
        f"optimizer state at {where} is a {type(value).__name__}, which cannot be stored "
        "without pickle"
    )


def _decode(value: Any, tensors: Mapping[str, torch.Tensor], source: Path) -> Any:
    """Invert `_encode`."""
    if isinstance(value, list):
        return [_decode(v, tensors, source) for v in value]
    if isinstance(value, dict):
        if value.keys() == {"__tensor__"}:
            key = value["__tensor__"]
            if key not in tensors:
                raise CheckpointError(_damaged(source, f"tensor {key!r} is missing"))
            return tensors[key]
        if value.keys() == {"__tuple__"}:
            return tuple(_decode(v, tensors, source) for v in value["__tuple__"])
        if value.keys() == {"__items__"}:
            return {k: _decode(v, tensors, source) for k, v in value["__items__"]}
        return {k: _decode(v, tensors, source) for k, v in value.items()}
    return value


def _json_bytes(obj: Any, what: str) -> bytes:
    """Serialise ``obj`` as indented JSON, or say which part cannot be stored."""

    def default(o: Any) -> Any:
        # Scalars that trainers commonly hold (a loss tensor, a numpy float) become numbers.
        if isinstance(o, torch.Tensor) and o.numel() == 1:
            return o.item()
        if getattr(o, "shape", None) == () and hasattr(o, "item"):
            return o.item()
        if isinstance(o, Path):
            return str(o)
        raise CheckpointError(
            f"{what} contains a {type(o).__name__}, which cannot be stored in JSON; "
            "convert it to numbers, strings, lists or dicts"
        )

    try:
        text = json.dumps(obj, indent=2, default=default)
    except (TypeError, ValueError) as e:  # e.g. dict keys of an unsupported type
        raise CheckpointError(f"{what} cannot be stored in JSON: {e}") from e
    return (text + "\n").encode("utf-8")


# --------------------------------------------------------------------------------------------
# Low-level writing: every byte goes through these, so tests can inject failures here.
# --------------------------------------------------------------------------------------------


def _write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_file(path: Path, data: bytes) -> None:
    with atomic.naming_file(path):
        _write_bytes(path, data)


def _write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], aliases: Mapping[str, str]
) -> None:
    metadata = {"format": "pt", _FORMAT_KEY: str(FORMAT_VERSION), _ALIASES_KEY: json.dumps(aliases)}
    with atomic.naming_file(path):
        try:
            save_file(tensors, str(path), metadata=metadata)
        except SafetensorError as exc:
            # safetensors reports a failed write (a full disk) as its own error, "... (os
            # error 28)": an OSError again, so that the save fails as every other write does.
            found = re.search(r"os error (\d+)", str(exc))
            code = int(found.group(1)) if found else errno.EIO
            raise OSError(code, os.strerror(code), str(path)) from exc
        atomic.fsync_file(path)


def _copy_file(source: Path, destination: Path) -> None:
    with atomic.naming_file(destination):
        shutil.copyfile(source, destination)
        atomic.fsync_file(destination)


def _remove_tree(path: Path) -> None:
    """Delete a directory tree if it exists, ignoring errors (used for cleanup only)."""
    shutil.rmtree(path, ignore_errors=True)


def os_error_message(error: OSError) -> str:
    """A failed write in words, with what to do about a full disk or a missing permission."""
    place = f" while writing {error.filename}" if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left on device{place}; free disk space (for example delete old "
            "checkpoints or use a smaller keep_last) and try again"
        )
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{place}; choose a writable output directory"
    return f"{error.strerror or error}{place}"


@contextmanager
def _atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to fill; on success, move it to ``target``.

    On any failure the temporary directory is removed and ``target`` is left as it was.
    OSErrors become `CheckpointError`; anything else (a bug, KeyboardInterrupt) propagates.
    """
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {target}: it exists and is a file")
    if target.is_dir() and not is_checkpoint(target) and any(target.iterdir()):
        raise CheckpointError(
            f"refusing to overwrite {target}: it exists and is not a checkpoint; "
            "choose another directory or remove it"
        )
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_tree(tmp)  # left by an earlier crashed save from a process with our pid
        tmp.mkdir()
        yield tmp
        atomic.fsync_dir(tmp)
        _move_into_place(tmp, target)
    except OSError as e:
        _remove_tree(tmp)
        raise CheckpointError(
            f"checkpoint {target} was not saved: {os_error_message(e)}; "
            "the previous checkpoint at that path, if any, is unchanged"
        ) from e
    except BaseException:
        _remove_tree(tmp)
        raise


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` to ``target``, replacing an existing checkpoint there."""
    if not target.exists():
        os.rename(tmp, target)
        atomic.fsync_dir(target.parent)
        return
    # POSIX cannot atomically swap two directories, so the old one steps aside first. If we
    # crash between the two renames, the previous checkpoint survives as `.<name>.old-<pid>`
    # (and `load_checkpoint` points the user at it).
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    _remove_tree(old)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        os.rename(old, target)
        raise
    atomic.fsync_dir(target.parent)
    _remove_tree(old)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_checkpoint(
    directory: Path,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    map_location: str | torch.device = "cpu",
) -> Checkpoint:
    """Read a checkpoint, copying its weights into ``model`` and state into ``optimizer``.

    Weights load strictly: every tensor of the model must be in the checkpoint with the same
    shape, and the checkpoint must have no others. RNG states are not restored here; pass
    ``checkpoint.trainer_state["rng"]`` to `restore_rng_state` when resuming.

    Raises:
        CheckpointError: If the directory is missing or incomplete, a file is damaged, the
            weights do not match the model (the message lists each differing tensor), or an
            optimizer is given but the checkpoint has no optimizer state.
    """
    directory = Path(directory)
    _require_checkpoint(directory)
    device = str(torch.device(map_location))
    config = _read_json(directory / CONFIG_FILE)
    trainer_state = _read_json(directory / TRAINER_STATE_FILE)
    for name, value in ((CONFIG_FILE, config), (TRAINER_STATE_FILE, trainer_state)):
        if not isinstance(value, dict):  # every reader of these takes keys from them
            raise CheckpointError(
                _damaged(directory / name, f"a JSON {type(value).__name__}, not an object")
            )
    scheduler_file = directory / SCHEDULER_FILE
    scheduler_state = _read_json(scheduler_file) if scheduler_file.is_file() else None
    has_tensors = (directory / OPTIMIZER_TENSORS_FILE).is_file()
    has_structure = (directory / OPTIMIZER_STATE_FILE).is_file()
    if has_tensors != has_structure:
        present, absent = (
            (OPTIMIZER_TENSORS_FILE, OPTIMIZER_STATE_FILE)
            if has_tensors
            else (OPTIMIZER_STATE_FILE, OPTIMIZER_TENSORS_FILE)
        )
        raise CheckpointError(
            f"checkpoint {directory} is damaged: it has {present} but not {absent}; "
            "choose another checkpoint or an earlier one"
        )

    if model is not None:
        _load_into_model(model, load_model_state_dict(directory, map_location=device), directory)
    if optimizer is not None:
        if not has_tensors:
            raise CheckpointError(
                f"checkpoint {directory} has no optimizer state (an inference or averaged "
                "checkpoint); start a fresh optimizer or resume from a training checkpoint"
            )
        _load_into_optimizer(optimizer, directory, device)
    logger.debug("loaded checkpoint %s", directory)
    return Checkpoint(
        path=directory,
        config=config,
        trainer_state=trainer_state,
        scheduler_state=scheduler_state,
        has_optimizer=has_tensors,
    )


def load_model_state_dict(
    directory: Path, *, map_location: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Return a checkpoint's model state dict; tied names map to one and the same tensor."""
    directory = Path(directory)
    _require_checkpoint(directory)
    tensors, aliases = _read_safetensors(directory / MODEL_FILE, str(torch.device(map_location)))
    return _with_aliases(tensors, aliases, directory / MODEL_FILE)


def _require_checkpoint(directory: Path) -> None:
    """Raise a helpful CheckpointError unless ``directory`` is a complete checkpoint."""
    if directory.name.startswith(".") and directory.name not in (".", ".."):
        raise CheckpointError(
            f"{directory} is the temporary or discarded directory of a save, not a checkpoint; "
            "choose one from list_checkpoints()"
        )
    if directory.is_file():
        raise CheckpointError(
            f"{directory} is a file; a checkpoint is the folder that holds "
            f"{', '.join(REQUIRED_FILES)}: pass {directory.parent}"
            if directory.name in REQUIRED_FILES
            else f"{directory} is a file, not a checkpoint folder"
        )
    if not directory.is_dir():
        message = f"checkpoint {directory} does not exist"
        stranded = sorted(directory.parent.glob(f".{directory.name}.old-*"))
        if stranded:
            # An overwrite was interrupted between its two renames; the previous version is intact.
            message += (
                f"; a save that replaced it was interrupted, and the previous version "
                f"is intact at {stranded[-1]} (rename it back to use it)"
            )
        raise CheckpointError(message)
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{directory} is not a complete checkpoint (missing {', '.join(missing)}); "
            "choose another checkpoint or an earlier one"
        )


def _damaged(path: Path, detail: str) -> str:
    return (
        f"checkpoint file {path} is damaged ({detail}); the checkpoint {path.parent} cannot be "
        f"used: choose another checkpoint, such as an earlier one in {path.parent.parent}"
    )


def model_section(run: Mapping[str, Any], checkpoint: Path) -> dict[str, Any]:
    """The ``model`` section of a checkpoint's config.json (as `aiayn train` writes it)."""
    model = run.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(
            f"{Path(checkpoint) / CONFIG_FILE} has no model section: it was not written by "
            "`aiayn train`; pass the checkpoint of a training run"
        )
    return model


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint file {path} is missing") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(_damaged(path, str(e))) from e


def _read_safetensors(path: Path, device: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read all tensors and the alias table of a safetensors file."""
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint file {path} is missing") from e
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(_damaged(path, str(e))) from e
    return tensors, _parse_aliases(metadata, path)


def _parse_aliases(metadata: Mapping[str, str], path: Path) -> dict[str, str]:
    try:
        aliases = json.loads(metadata.get(_ALIASES_KEY, "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(_damaged(path, f"unreadable {_ALIASES_KEY} metadata: {e}")) from e
    if not isinstance(aliases, dict):
        raise CheckpointError(_damaged(path, f"{_ALIASES_KEY} metadata is not a mapping"))
    return aliases


def _with_aliases(
    tensors: dict[str, torch.Tensor], aliases: Mapping[str, str], path: Path
) -> dict[str, torch.Tensor]:
    for alias, name in aliases.items():
        if name not in tensors:
            raise CheckpointError(_damaged(path, f"{alias!r} is tied to missing tensor {name!r}"))
        tensors[alias] = tensors[name]
    return tensors


def _summarise(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f", ... and {len(items) - _MAX_LISTED} more"
    return shown


def _load_into_model(model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    """Copy ``state`` into ``model`` strictly, explaining every mismatch at once."""
    expected = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    mismatched = [
        f"{name}: checkpoint {tuple(state[name].shape)} vs model {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in state and state[name].shape != tensor.shape
    ]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch: {_summarise(mismatched)}")
    if missing:
        problems.append(f"missing from checkpoint: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected in checkpoint: {_summarise(unexpected)}")
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {directory} does not match the model; {'; '.join(problems)}; "
            "build the model from the checkpoint's config.json"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"cannot load checkpoint {directory} into the model: {e}") from e


def _load_into_optimizer(optimizer: torch.optim.Optimizer, directory: Path, device: str) -> None:
    tensors_path = directory / OPTIMIZER_TENSORS_FILE
    tensors, aliases = _read_safetensors(tensors_path, device)
    tensors = _with_aliases(tensors, aliases, tensors_path)
    structure_path = directory / OPTIMIZER_STATE_FILE
    structure = _read_json(structure_path)
    if not isinstance(structure, dict) or "state_dict" not in structure:
        raise CheckpointError(_damaged(structure_path, "no 'state_dict' entry"))
    state_dict = _decode(structure["state_dict"], tensors, structure_path)
    try:
        optimizer.load_state_dict(state_dict)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(
            f"optimizer state in {directory} does not fit the optimizer ({e}); build the "
            "optimizer of the same type over the same parameters, in the same order"
        ) from e


def load_torch_state_dict(path: Path) -> dict[str, Any]:
    """Read a foreign PyTorch ``.pt``/``.bin`` state dict without running code from it.

    Uses ``torch.load(weights_only=True)``, which accepts only tensors and plain containers;
    a file that needs anything else (possibly a malicious pickle) is refused. A
    ``.safetensors`` file is read with safetensors instead.

    Raises:
        CheckpointError: If the file is missing, damaged, refused as unsafe, or not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"cannot load {path}: no such file")
    if path.suffix == ".safetensors":
        tensors, aliases = _read_safetensors(path, "cpu")
        return dict(_with_aliases(tensors, aliases, path))
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refused to load {path}: it contains Python objects other than tensors, which "
            f"could run arbitrary code when unpickled ({reason}); convert it to safetensors "
            "in a trusted environment, or use a file from a source you trust"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot load {path}: it is damaged or not a PyTorch file ({e})"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


# --------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------


def _encode_bytes(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _decode_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def capture_rng_state() -> dict[str, Any]:
    """Capture the Python, numpy, torch CPU and CUDA RNG states as a JSON-serialisable dict."""
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "torch_cpu": _encode_bytes(torch.get_rng_state()),
    }
    try:
        import numpy as np
    except ImportError:  # numpy is optional at runtime; nothing to capture without it
        pass
    else:
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {
            "bit_generator": name,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available():
        state["torch_cuda"] = [_encode_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore RNG states captured by `capture_rng_state` (what is absent stays as it is).

    Raises:
        CheckpointError: If the state is malformed.
    """
    try:
        if "python" in state:
            py = state["python"]
            random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
        if "torch_cpu" in state:
            torch.set_rng_state(_decode_bytes(state["torch_cpu"]))
        if "numpy" in state:
            try:
                import numpy as np
            except ImportError:
                logger.warning("checkpoint has a numpy RNG state but numpy is not installed")
            else:
                npy = state["numpy"]
                np.random.set_state(
                    (
                        npy["bit_generator"],
                        np.asarray(npy["keys"], dtype=np.uint32),
                        npy["pos"],
                        npy["has_gauss"],
                        npy["cached_gaussian"],
                    )
                )
        cuda_states = state.get("torch_cuda") or []
        if cuda_states:
            _restore_cuda_rng(cuda_states)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"the saved RNG state is malformed ({e!r})") from e


def _restore_cuda_rng(states: Sequence[str]) -> None:
    if not torch.cuda.is_available():
        logger.warning("checkpoint has CUDA RNG states but CUDA is not available; not restored")
        return
    count = torch.cuda.device_count()
    if count != len(states):
        # Resuming on a different number of GPUs: restore what lines up, and say so, since
        # the random stream then differs from the original run.
        logger.warning(
            "checkpoint has RNG states for %d CUDA devices but %d are visible; "
            "restoring the first %d",
            len(states),
            count,
            min(count, len(states)),
        )
    for index, encoded in enumerate(states[:count]):
        torch.cuda.set_rng_state(_decode_bytes(encoded), device=index)


# --------------------------------------------------------------------------------------------
# Listing, the best pointer, pruning
# --------------------------------------------------------------------------------------------


def checkpoint_path(ckpt_root: Path, step: int) -> Path:
    """The conventional directory of the checkpoint at ``step``: ``ckpt_root/step_{step:08d}``."""
    return Path(ckpt_root) / f"step_{step:08d}"


def checkpoint_step(path: Path) -> int | None:
    """The step encoded in a ``step_<digits>`` directory name, else ``None``."""
    match = _STEP_DIR_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a complete checkpoint (not hidden, and has every required file)."""
    path = Path(path)
    return (
        path.is_dir()
        and not path.name.startswith(".")
        and all((path / name).is_file() for name in REQUIRED_FILES)
    )


def _checkpoints_root(run_dir: Path) -> Path:
    """Accept a run directory (holding ``checkpoints/``) or the checkpoints directory itself."""
    run_dir = Path(run_dir)
    nested = run_dir / "checkpoints"
    return nested if nested.is_dir() else run_dir


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The complete ``step_*`` checkpoints of a run, oldest step first.

    ``run_dir`` is a run directory with a ``checkpoints/`` subdirectory, or that subdirectory.
    Temporary directories of unfinished saves and incomplete directories are skipped.
    A missing directory has no checkpoints.
    """
    root = _checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [
        (step, child)
        for child in root.iterdir()
        if (step := checkpoint_step(child)) is not None and is_checkpoint(child)
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or ``None`` if there is none."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def write_best_pointer(
    checkpoint: Path, *, metric: str | None = None, value: float | None = None
) -> Path:
    """Record ``checkpoint`` as the best of its run in ``best.json`` next to it; return that file.

    The pointer is replaced atomically (`atomic.replacing`), so readers see the old or the new
    best, never half.
    """
    checkpoint = Path(checkpoint)
    if not is_checkpoint(checkpoint):
        raise CheckpointError(f"cannot mark {checkpoint} as best: it is not a checkpoint")
    pointer = checkpoint.parent / BEST_POINTER_FILE
    data = {
        "checkpoint": checkpoint.name,
        "step": checkpoint_step(checkpoint),
        "metric": metric,
        "value": value,
    }
    contents = _json_bytes(data, "best pointer")
    try:
        with atomic.naming_file(pointer), atomic.replacing(pointer) as tmp:
            tmp.write_bytes(contents)
    except OSError as e:
        raise CheckpointError(f"cannot record the best checkpoint: {os_error_message(e)}") from e
    return pointer


def read_best_pointer(run_dir: Path) -> Path | None:
    """The checkpoint ``best.json`` names, or ``None`` if there is no (valid) pointer."""
    root = _checkpoints_root(run_dir)
    pointer = root / BEST_POINTER_FILE
    if not pointer.is_file():
        return None
    try:
        data = _read_json(pointer)
    except CheckpointError:
        data = None
    name = data.get("checkpoint") if isinstance(data, dict) else None
    if not isinstance(name, str) or name != Path(name).name or name.startswith("."):
        # The pointer, not a checkpoint, is damaged: say which file and how to go on.
        raise CheckpointError(
            f"{pointer} is damaged (it does not name a checkpoint folder of {root}): delete "
            "it, and pass one of the checkpoints there (the latest is then used for a run)"
        )
    best = root / name
    if not is_checkpoint(best):
        logger.warning("%s names %s, which is not a complete checkpoint", pointer, best)
        return None
    return best


def prune_checkpoints(ckpt_root: Path, keep_last: int, keep: Iterable[Path] = ()) -> list[Path]:
    """Delete all checkpoints but the last ``keep_last``, those in ``keep`` and the best one.

    The best one is whatever ``best.json`` names (see `write_best_pointer`). Each deleted
    directory is first renamed to a hidden name, so an interrupted prune never leaves a
    half-deleted directory that looks like a checkpoint. Returns the deleted paths.
    """
    if keep_last < 0:
        raise ConfigError(f"keep_last must be >= 0, got {keep_last}")
    checkpoints = list_checkpoints(ckpt_root)
    protected = {Path(p).resolve() for p in keep}
    best = read_best_pointer(ckpt_root)
    if best is not None:
        protected.add(best.resolve())
    if keep_last:
        protected.update(p.resolve() for p in checkpoints[-keep_last:])
    removed = []
    for checkpoint in checkpoints:
        if checkpoint.resolve() in protected:
            continue
        doomed = checkpoint.parent / f".{checkpoint.name}.del-{os.getpid()}"
        try:
            os.rename(checkpoint, doomed)
        except OSError as e:
            raise CheckpointError(
                f"cannot delete old checkpoint {checkpoint}: {os_error_message(e)}"
            ) from e
        _remove_tree(doomed)
        removed.append(checkpoint)
        logger.debug("deleted old checkpoint %s", checkpoint)
    return removed


def remove_leftovers(ckpt_root: Path) -> list[Path]:
    """Delete what killed saves and prunes left in ``ckpt_root``; returns the deleted paths.

    A save killed before its rename leaves ``.<name>.tmp-<pid>`` (half a checkpoint), a prune
    killed mid-delete ``.<name>.del-<pid>``, a write of ``best.json`` the temporary file of
    `atomic.replacing` (``.best.json.tmp-<pid>`` in older versions): never listed or loaded,
    they only take disk space. ``.<name>.old-<pid>`` is deleted only when ``<name>`` is a
    complete checkpoint again: otherwise it is the one copy of that checkpoint (see
    `load_checkpoint`). Call it only where no other process is saving into ``ckpt_root``
    (the training that holds the run directory: `aiayn.run_lock`).
    """
    if not ckpt_root.is_dir():
        return []
    removed = []
    for path in sorted(ckpt_root.glob(".*")):
        name, _, kind = path.name[1:].rpartition(".")
        if (
            kind.startswith(("tmp-", "del-"))
            or atomic.is_temporary(path)
            or (kind.startswith("old-") and is_checkpoint(ckpt_root / name))
        ):
            if path.is_dir():
                _remove_tree(path)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# --------------------------------------------------------------------------------------------
# Averaging
# --------------------------------------------------------------------------------------------


def average_checkpoints(paths: Sequence[Path], output: Path) -> Path:
    """Write a checkpoint whose weights are the mean of those of ``paths`` (paper §6.1).

    "For the base models, we used a single model obtained by averaging the last 5
    checkpoints." Floating-point tensors are summed in float64 and cast back to their dtype;
    other tensors (integer buffers) are taken from the last checkpoint, as are
    ``config.json`` and the extra files (e.g. ``tokenizer.json``). The result has no optimizer
    or scheduler state; its ``trainer_state.json`` records what was averaged.

    Raises:
        CheckpointError: If ``paths`` is empty or names a checkpoint twice, a checkpoint is
            incomplete or damaged, the checkpoints differ in tensor names, shapes, dtypes or
            ties (the message names the tensor) or in their extra files (another tokenizer:
            the same embedding row means another token), or ``output`` would replace a
            training checkpoint or become a run's latest one.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise CheckpointError("no checkpoints to average")
    for path in paths:
        _require_checkpoint(path)
    _check_average_output(paths, Path(output))
    reference = paths[-1]
    averaged: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        handles = [
            (path / MODEL_FILE, _open_safetensors(stack, path / MODEL_FILE)) for path in paths
        ]
        ref_file, ref_handle = handles[-1]
        ref_aliases = _parse_aliases(ref_handle.metadata() or {}, ref_file)
        ref_specs = _tensor_specs(ref_handle, ref_file)
        # Check everything before reading any tensor data, so a mismatch fails fast.
        for file, handle in handles[:-1]:
            _check_same_tensors(file, _tensor_specs(handle, file), ref_file, ref_specs)
            if _parse_aliases(handle.metadata() or {}, file) != ref_aliases:
                raise CheckpointError(
                    f"cannot average {file.parent} with {reference}: their tied weights differ"
                    f"{_AVERAGE_HINT}"
                )
            _check_same_extra_files(file.parent, reference)
        for name in ref_specs:
            ref_tensor = _get_tensor(ref_handle, name, ref_file)
            if not ref_tensor.is_floating_point():
                averaged[name] = ref_tensor
                continue
            total = torch.zeros(ref_tensor.shape, dtype=torch.float64)
            for file, handle in handles:
                total += _get_tensor(handle, name, file).to(torch.float64)
            averaged[name] = (total / len(paths)).to(ref_tensor.dtype)

    reference_state = _read_json(reference / TRAINER_STATE_FILE)
    trainer_state = {
        "averaged_from": [str(p) for p in paths],
        "step": reference_state.get("step") if isinstance(reference_state, dict) else None,
    }
    trainer_json = _json_bytes(trainer_state, "trainer_state")
    carried = sorted(
        child
        for child in reference.iterdir()
        if child.is_file() and child.name not in _TRAINING_STATE_FILES
    )
    output = Path(output)
    with _atomic_directory(output) as tmp:
        _write_safetensors(tmp / MODEL_FILE, averaged, ref_aliases)
        for child in carried:
            _copy_file(child, tmp / child.name)
        _write_file(tmp / TRAINER_STATE_FILE, trainer_json)
    logger.info("averaged %d checkpoints into %s", len(paths), output)
    return output


def _check_average_output(paths: Sequence[Path], output: Path) -> None:
    """Refuse an average that counts a checkpoint twice or that would take a training
    checkpoint's place: replacing one loses the optimiser state `--resume` needs, and a new
    ``checkpoints/step_N`` folder would become the run's latest checkpoint."""
    seen: set[Path] = set()
    for path in paths:
        if path.resolve() in seen:
            raise CheckpointError(
                f"{path} is given twice; each checkpoint counts once in the average"
            )
        seen.add(path.resolve())
    where = output.resolve()
    if where in seen or (where / OPTIMIZER_STATE_FILE).is_file():
        raise CheckpointError(
            f"refusing to write the average over {output}: it is a training checkpoint; "
            "choose another --output, e.g. RUN_DIR/averaged"
        )
    if checkpoint_step(output) is not None and output.parent.name == "checkpoints":
        raise CheckpointError(
            f"refusing to write the average to {output}: it would become its run's latest "
            "checkpoint, which --resume reads; choose another --output, e.g. RUN_DIR/averaged"
        )


def _check_same_extra_files(path: Path, reference: Path) -> None:
    """The files saved beside the weights (such as tokenizer.json) must be the same."""
    names = {
        child.name
        for folder in (path, reference)
        for child in folder.iterdir()
        if child.is_file() and child.name not in _RESERVED_FILES
    }
    for name in sorted(names):
        mine, theirs = path / name, reference / name
        if not (mine.is_file() and theirs.is_file()) or mine.read_bytes() != theirs.read_bytes():
            raise CheckpointError(
                f"cannot average {path} with {reference}: their {name} differ (another "
                f"tokenizer gives the same embedding rows other tokens){_AVERAGE_HINT}"
            )


def _open_safetensors(stack: ExitStack, path: Path) -> Any:
    try:
        return stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint file {path} is missing") from e
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(_damaged(path, str(e))) from e


def _get_tensor(handle: Any, name: str, path: Path) -> torch.Tensor:
    try:
        return handle.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(_damaged(path, f"tensor {name!r}: {e}")) from e


def _tensor_specs(handle: Any, path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of a safetensors file, read from its header only."""
    specs = {}
    for name in handle.keys():  # safe_open handles are not iterable
        try:
            tensor_slice = handle.get_slice(name)
            specs[name] = (tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise CheckpointError(_damaged(path, f"tensor {name!r}: {e}")) from e
    return specs


def _check_same_tensors(
    file: Path,
    specs: Mapping[str, tuple[tuple[int, ...], str]],
    ref_file: Path,
    ref_specs: Mapping[str, tuple[tuple[int, ...], str]],
) -> None:
    prefix = f"cannot average {file.parent} with {ref_file.parent}"
    for name in sorted(set(specs) | set(ref_specs)):
        if name not in specs:
            raise CheckpointError(
                f"{prefix}: tensor {name} is missing from {file.parent}{_AVERAGE_HINT}"
            )
        if name not in ref_specs:
            raise CheckpointError(
                f"{prefix}: tensor {name} is missing from {ref_file.parent}{_AVERAGE_HINT}"
            )
        (shape, dtype), (ref_shape, ref_dtype) = specs[name], ref_specs[name]
        if shape != ref_shape or dtype != ref_dtype:
            raise CheckpointError(
                f"{prefix}: tensor {name} is {dtype} {shape} in {file.parent} but "
                f"{ref_dtype} {ref_shape} in {ref_file.parent}{_AVERAGE_HINT}"
            )
