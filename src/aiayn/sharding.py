"""Fully sharded data parallel training (FSDP): parameters, gradients and optimiser state split
over the processes, for models that do not fit one card.

With `train.fsdp: true` under `torchrun`, the Trainer shards the model with PyTorch's FSDP2
(`fully_shard`) instead of replicating it with DistributedDataParallel. Each encoder and decoder
layer is its own unit: its parameters are gathered from all processes just before the layer
runs and freed after, so a process holds one layer in full at a time and 1/N of the rest.
Everything outside the layers (embeddings and the tied output layer, final norms, task heads)
forms the root unit. The training step, the data order and the loss are those of DDP: the
gradients are averaged over the processes in both (reduce-scatter here, all-reduce there).

Checkpoints stay the project's format, unsharded: saving gathers the full state on rank 0
(`full_state`, a collective: every process calls it), and resuming loads full tensors on every
process and keeps its own shard (`load_full_state`). So a checkpoint of a sharded run loads
into an unsharded model for inference, averaging and fine-tuning, like any other.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

__all__ = ["FullState", "full_state", "is_sharded", "load_full_state", "shard"]


def shard(model: nn.Module, device: torch.device, world_size: int) -> None:
    """Shard `model` in place over `world_size` processes: one unit per Transformer layer,
    the root unit for the rest. Call before the optimiser is built (it must see the shards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from aiayn.model import DecoderLayer, EncoderLayer

    mesh = init_device_mesh(device.type, (world_size,))
    for module in model.modules():
        if isinstance(module, (EncoderLayer, DecoderLayer)):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # Validation calls the model's encode/decode methods as well as forward: gather for those
    # too (the root unit's parameters are gathered around each of its registered methods).
    for name in ("encode", "decode"):
        if callable(getattr(model, name, None)):
            register_fsdp_forward_method(model, name)


def is_sharded(model: nn.Module) -> bool:
    # Importing FSDP takes over a second; a model cannot be sharded if it was never imported.
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


class FullState:
    """A model or optimiser as the checkpoint functions see it: ``state_dict()`` gives a full
    (unsharded) state, ``load_state_dict()`` keeps what a checkpoint holds in ``loaded``."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:  # noqa: ARG002
        self.loaded = state


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[FullState, FullState]:
    """The full model and optimiser state on rank 0, on the CPU (other ranks get empty ones).

    A collective: every process must call it. The optimiser's state is keyed by parameter
    name, not by position.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    # The gathered state holds a tied weight (§3.4: the shared embeddings and the output
    # layer) once per name, as separate copies; one tensor under every name lets the
    # checkpoint store it once with aliases, as an unsharded model's checkpoint does.
    first_name: dict[int, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        first = first_name.setdefault(id(parameter), name)
        if first != name and first in model_state and name in model_state:
            model_state[name] = model_state[first]
    return FullState(model_state), FullState(optimizer_state)


def load_full_state(
    model: nn.Module,
    model_state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> None:
    """Load full states (as `full_state` gave them) into a sharded model and, if given, its
    optimiser: each process keeps its own shard. A collective: every process calls it with the
    same states."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_state_dict,
    )

    # A tied weight is one parameter under several names (the shared embeddings and the output
    # layer, §3.4); it is loaded once, under the name the model lists it by. Hence strict=False:
    # the other names are missing on purpose, and the checkpoint was already checked name by
    # name against the model (checkpoint.load_checkpoint) before it got here.
    names = {name for name, _ in model.named_parameters()}
    names |= {name for name, _ in model.named_buffers()}
    model_state = {name: value for name, value in model_state.items() if name in names}
    options = StateDictOptions(full_state_dict=True, strict=False)
    if optimizer is None:
        set_model_state_dict(model, model_state, options=options)
        return
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optimizer_state,
        options=options,
    )
