"""Tests of aiayn.checkpoint: round trips, ties, RNG, atomicity, damage, averaging, safety."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from aiayn import atomic
from aiayn import checkpoint as ckpt
from aiayn.checkpoint import (
    Checkpoint,
    average_checkpoints,
    capture_rng_state,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_state_dict,
    load_torch_state_dict,
    prune_checkpoints,
    read_best_pointer,
    restore_rng_state,
    save_checkpoint,
    write_best_pointer,
)
from aiayn.errors import CheckpointError, ConfigError

CONFIG = {"d_model": 4, "vocab_size": 10}


class TinyModel(nn.Module):
    """Two linear layers and an integer buffer: enough to exercise optimizer state."""

    def __init__(self, hidden: int = 3) -> None:
        super().__init__()
        self.first = nn.Linear(4, hidden)
        self.second = nn.Linear(hidden, 2)
        self.register_buffer("counter", torch.tensor([7], dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


class TiedModel(nn.Module):
    """An embedding whose weight is also the output projection, as in the Transformer."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.projection = nn.Linear(4, 10, bias=False)
        self.projection.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.projection(self.embedding(tokens))


def _train_step(model: TinyModel, optimizer: torch.optim.Optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 4, generator=generator)
    y = torch.randn(5, 2, generator=generator)
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def _save_tiny(directory: Path, seed: int = 0, **kwargs) -> TinyModel:
    torch.manual_seed(seed)
    model = TinyModel()
    save_checkpoint(directory, model=model, config=CONFIG, **kwargs)
    return model


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index, per_param in a["state"].items():
        other = b["state"][index]
        assert per_param.keys() == other.keys()
        for key, value in per_param.items():
            assert type(value) is type(other[key])
            if isinstance(value, torch.Tensor):
                assert value.dtype == other[key].dtype
                assert torch.equal(value, other[key]), (index, key)
            else:
                assert value == other[key]


# --- round trips ----------------------------------------------------------------------------


def test_round_trip_model_and_adam_then_training_continues_identically(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.98), eps=1e-9)
    for seed in range(3):
        _train_step(model, optimizer, seed)
    scheduler_state = {"last_epoch": 3, "base_lrs": [1e-2], "_last_lr": [1e-2]}
    trainer_state = {"step": 3, "epoch": 0, "sampler": {"offset": 15}, "best_bleu": None}
    path = save_checkpoint(
        checkpoint_path(tmp_path, 3),
        model=model,
        config=CONFIG,
        optimizer=optimizer,
        scheduler_state=scheduler_state,
        trainer_state=trainer_state,
    )
    assert path == tmp_path / "step_00000003"

    torch.manual_seed(123)  # different initial weights, so the load has to overwrite them
    restored = TinyModel()
    restored_optimizer = torch.optim.Adam(restored.parameters(), lr=1e-2, betas=(0.9, 0.98))
    loaded = load_checkpoint(path, model=restored, optimizer=restored_optimizer)

    assert isinstance(loaded, Checkpoint)
    assert loaded.config == CONFIG
    assert loaded.trainer_state == trainer_state
    assert loaded.scheduler_state == scheduler_state
    assert loaded.has_optimizer and loaded.step == 3 and loaded.path == path
    _assert_same_state(model.state_dict(), restored.state_dict())
    _assert_same_optimizer_state(optimizer.state_dict(), restored_optimizer.state_dict())

    _train_step(model, optimizer, seed=99)
    _train_step(restored, restored_optimizer, seed=99)
    _assert_same_state(model.state_dict(), restored.state_dict())
    _assert_same_optimizer_state(optimizer.state_dict(), restored_optimizer.state_dict())


def test_no_pickle_in_checkpoint_files(tmp_path: Path) -> None:
    model = TinyModel()
    optimizer = torch.optim.Adam(model.parameters())
    _train_step(model, optimizer, seed=0)
    path = save_checkpoint(tmp_path / "c", model=model, config=CONFIG, optimizer=optimizer)
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ]
    with safe_open(str(path / "optimizer.safetensors"), framework="pt") as f:
        assert "state.0.exp_avg" in f.keys()
    structure = json.loads((path / "optimizer.json").read_text())
    assert structure["state_dict"]["param_groups"][0]["lr"] == 1e-3


def test_inference_checkpoint_has_no_optimizer(tmp_path: Path) -> None:
    path = tmp_path / "final"
    _save_tiny(path)
    loaded = load_checkpoint(path, model=TinyModel())
    assert not loaded.has_optimizer and loaded.scheduler_state is None and loaded.step is None
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(
            path, model=TinyModel(), optimizer=torch.optim.Adam(TinyModel().parameters())
        )


def test_extra_files_are_copied(tmp_path: Path) -> None:
    tokenizer = tmp_path / "tok.json"
    tokenizer.write_text('{"vocab": {}}')
    path = tmp_path / "c"
    _save_tiny(path, files={"tokenizer.json": tokenizer})
    assert (path / "tokenizer.json").read_text() == '{"vocab": {}}'
    with pytest.raises(CheckpointError, match="clashes"):
        _save_tiny(tmp_path / "d", files={"config.json": tokenizer})
    with pytest.raises(CheckpointError, match="no such file"):
        _save_tiny(tmp_path / "d", files={"vocab.txt": tmp_path / "missing.txt"})
    assert not (tmp_path / "d").exists()


def test_unserialisable_trainer_state_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="trainer_state contains a object"):
        _save_tiny(tmp_path / "c", trainer_state={"sampler": object()})
    assert list(tmp_path.iterdir()) == []


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TiedModel()
    path = save_checkpoint(tmp_path / "c", model=model, config=CONFIG)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert list(f.keys()) == ["embedding.weight"]

    torch.manual_seed(1)
    restored = TiedModel()
    load_checkpoint(path, model=restored)
    assert restored.projection.weight is restored.embedding.weight
    assert torch.equal(restored.embedding.weight, model.embedding.weight)
    state = load_model_state_dict(path)
    assert state["projection.weight"] is state["embedding.weight"]


def test_overlapping_views_that_are_not_ties_are_stored_separately(tmp_path: Path) -> None:
    class Views(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            base = torch.arange(6.0)
            self.register_buffer("head", base[:3])
            self.register_buffer("tail", base[3:])

    path = save_checkpoint(tmp_path / "c", model=Views(), config={})
    state = load_model_state_dict(path)
    assert state["head"].tolist() == [0, 1, 2] and state["tail"].tolist() == [3, 4, 5]


# --- RNG --------------------------------------------------------------------------------------


def _draw() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_rng_capture_and_restore_reproduces_random_numbers() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draw()
    state = json.loads(json.dumps(capture_rng_state()))  # must survive JSON
    expected = _draw()
    _draw()
    restore_rng_state(state)
    assert _draw() == expected


def test_malformed_rng_state_is_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="RNG state"):
        restore_rng_state({"python": {"version": 3}})


# --- atomicity and failures ------------------------------------------------------------------


def _crash_when_writing(name: str, monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """Make the writer fail when it reaches file ``name`` (earlier files are already written)."""
    real_write = ckpt._write_bytes

    def failing_write(path: Path, data: bytes) -> None:
        if Path(path).name == name:
            Path(path).write_bytes(data[: len(data) // 2])  # a partly written file
            raise error
        real_write(path, data)

    monkeypatch.setattr(ckpt, "_write_bytes", failing_write)


def test_crash_mid_save_leaves_previous_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = checkpoint_path(tmp_path, 500)
    old_model = _save_tiny(path, seed=0, trainer_state={"step": 500})
    # A hard crash runs no cleanup, so disable it too: the temp directory stays behind.
    monkeypatch.setattr(ckpt, "_remove_tree", lambda path: None)
    _crash_when_writing("trainer_state.json", monkeypatch, RuntimeError("simulated crash"))

    torch.manual_seed(1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint(path, model=TinyModel(), config=CONFIG, trainer_state={"step": 501})

    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == [f".step_00000500.tmp-{os.getpid()}"]
    assert (tmp_path / leftovers[0] / "model.safetensors").is_file()  # written before the crash
    assert list_checkpoints(tmp_path) == [path]
    restored = TinyModel()
    assert load_checkpoint(path, model=restored).trainer_state == {"step": 500}
    _assert_same_state(old_model.state_dict(), restored.state_dict())
    with pytest.raises(CheckpointError, match="temporary"):
        load_checkpoint(tmp_path / leftovers[0])


def test_failed_save_cleans_up_its_temporary_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _crash_when_writing("config.json", monkeypatch, RuntimeError("simulated crash"))
    with pytest.raises(RuntimeError):
        _save_tiny(tmp_path / "step_00000001")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_gives_clear_error_and_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = checkpoint_path(tmp_path, 7)
    old_model = _save_tiny(path, seed=0)
    _crash_when_writing(
        "config.json", monkeypatch, OSError(errno.ENOSPC, "No space left on device")
    )
    with pytest.raises(CheckpointError) as raised:
        _save_tiny(path, seed=1)
    message = str(raised.value)
    assert "no space left on device" in message
    assert "config.json" in message and "previous checkpoint" in message
    assert isinstance(raised.value.__cause__, OSError)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000007"]
    restored = TinyModel()
    load_checkpoint(path, model=restored)
    _assert_same_state(old_model.state_dict(), restored.state_dict())


def test_overwrite_replaces_checkpoint_without_leftovers(tmp_path: Path) -> None:
    path = tmp_path / "step_00000001"
    _save_tiny(path, seed=0)
    new_model = _save_tiny(path, seed=1)
    restored = TinyModel()
    load_checkpoint(path, model=restored)
    _assert_same_state(new_model.state_dict(), restored.state_dict())
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]


def test_refuses_to_overwrite_a_directory_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "corpus.txt").write_text("do not delete")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        _save_tiny(precious)
    assert (precious / "corpus.txt").read_text() == "do not delete"


def test_missing_and_incomplete_directories(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    path = tmp_path / "step_00000001"
    _save_tiny(path)
    # One of its files instead of the folder; the folder named through "..".
    with pytest.raises(CheckpointError, match=r"config.json is a file; a checkpoint is the folder"):
        load_checkpoint(path / "config.json")
    (path / "inner").mkdir()
    assert load_checkpoint(path / "inner" / "..").config == CONFIG  # not a "temporary" name
    (path / "inner").rmdir()
    (path / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match=r"not a complete checkpoint \(missing trainer_state"):
        load_checkpoint(path)


@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.safetensors"])
def test_truncated_safetensors_is_reported_as_damaged(tmp_path: Path, file: str) -> None:
    model = TinyModel()
    optimizer = torch.optim.Adam(model.parameters())
    _train_step(model, optimizer, seed=0)
    path = save_checkpoint(tmp_path / "c", model=model, config=CONFIG, optimizer=optimizer)
    damaged = path / file
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path, model=TinyModel(), optimizer=torch.optim.Adam(model.parameters()))
    message = str(raised.value)
    assert str(damaged) in message and "damaged" in message and "earlier one" in message


def test_corrupted_json_is_reported_as_damaged(tmp_path: Path) -> None:
    path = tmp_path / "c"
    _save_tiny(path)
    (path / "config.json").write_text('{"d_model": ')
    with pytest.raises(CheckpointError, match="config.json is damaged"):
        load_checkpoint(path)


def test_shape_mismatch_lists_every_differing_tensor(tmp_path: Path) -> None:
    path = tmp_path / "c"
    _save_tiny(path)  # hidden size 3

    class Other(TinyModel):
        def __init__(self) -> None:
            super().__init__(hidden=5)
            self.extra = nn.Linear(1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)

    model = Other()
    del model.counter  # so the checkpoint has a tensor the model lacks
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path, model=model)
    message = str(raised.value)
    assert "first.weight: checkpoint (3, 4) vs model (5, 4)" in message
    assert "first.bias: checkpoint (3,) vs model (5,)" in message
    assert "second.weight: checkpoint (2, 3) vs model (2, 5)" in message
    assert "missing from checkpoint: extra.weight, extra.bias" in message
    assert "unexpected in checkpoint: counter" in message
    _assert_same_state(before, model.state_dict())  # nothing was half-loaded


# --- listing, pruning, averaging ----------------------------------------------------------


def test_list_checkpoints_ignores_temporary_and_incomplete_dirs(tmp_path: Path) -> None:
    root = tmp_path / "run" / "checkpoints"
    for step in (1000, 20, 300):
        _save_tiny(checkpoint_path(root, step))
    # A temp dir with every file (crash just before the rename) and an incomplete step dir.
    _save_tiny(root / ".step_00000700.tmp-999")
    incomplete = checkpoint_path(root, 800)
    _save_tiny(incomplete)
    (incomplete / "model.safetensors").unlink()
    _save_tiny(root / "averaged")  # not a step directory
    (root / "step_00000900").write_text("a file, not a directory")

    expected = [checkpoint_path(root, s) for s in (20, 300, 1000)]
    assert list_checkpoints(root) == expected
    assert list_checkpoints(tmp_path / "run") == expected  # the run dir works too
    assert latest_checkpoint(root) == checkpoint_path(root, 1000)
    assert list_checkpoints(tmp_path / "empty") == []
    assert latest_checkpoint(tmp_path / "empty") is None


def test_prune_keeps_last_k_the_best_and_explicit_keeps(tmp_path: Path) -> None:
    steps = [100, 200, 300, 400, 500, 600]
    for step in steps:
        _save_tiny(checkpoint_path(tmp_path, step))
    best = checkpoint_path(tmp_path, 200)
    write_best_pointer(best, metric="bleu", value=27.3)
    assert read_best_pointer(tmp_path) == best
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 200
    pointer = (tmp_path / "best.json").read_text()
    for damaged in ('{"checkpoint": "../x"}', "[", '["step_00000200"]'):
        (tmp_path / "best.json").write_text(damaged)
        with pytest.raises(CheckpointError, match=r"best.json is damaged \(it does not name a"):
            read_best_pointer(tmp_path)
    (tmp_path / "best.json").write_text(pointer)

    removed = prune_checkpoints(tmp_path, keep_last=2, keep={checkpoint_path(tmp_path, 100)})
    assert removed == [checkpoint_path(tmp_path, s) for s in (300, 400)]
    kept = [checkpoint_path(tmp_path, s) for s in (100, 200, 500, 600)]
    assert list_checkpoints(tmp_path) == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json"] + [p.name for p in kept]

    assert prune_checkpoints(tmp_path, keep_last=1) == [
        checkpoint_path(tmp_path, s) for s in (100, 500)
    ]
    assert list_checkpoints(tmp_path) == [best, checkpoint_path(tmp_path, 600)]
    with pytest.raises(ConfigError):
        prune_checkpoints(tmp_path, keep_last=-1)


def test_average_of_three_checkpoints_is_the_mean(tmp_path: Path) -> None:
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text('{"model": "bpe"}')
    paths, models = [], []
    for step in (1, 2, 3):
        path = checkpoint_path(tmp_path / "ckpts", step)
        model = _save_tiny(
            path,
            seed=step,
            optimizer=None,
            trainer_state={"step": step},
            files={"tokenizer.json": tokenizer},
        )
        paths.append(path)
        models.append(model)

    output = average_checkpoints(paths, tmp_path / "averaged")
    assert sorted(p.name for p in output.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "trainer_state.json",
    ]
    averaged = TinyModel()
    loaded = load_checkpoint(output, model=averaged)
    assert loaded.config == CONFIG and loaded.step == 3 and not loaded.has_optimizer
    assert loaded.trainer_state["averaged_from"] == [str(p) for p in paths]
    states = [m.state_dict() for m in models]
    for name, tensor in averaged.state_dict().items():
        if tensor.is_floating_point():
            manual = torch.stack([s[name].double() for s in states]).mean(0).float()
            torch.testing.assert_close(tensor, manual, rtol=0, atol=1e-7)
        else:
            assert torch.equal(tensor, states[-1][name])


def test_average_keeps_ties(tmp_path: Path) -> None:
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(save_checkpoint(tmp_path / f"step_{seed:08d}", model=TiedModel(), config={}))
    state = load_model_state_dict(average_checkpoints(paths, tmp_path / "avg"))
    assert state["projection.weight"] is state["embedding.weight"]


def test_average_refuses_mismatched_checkpoints(tmp_path: Path) -> None:
    small = tmp_path / "step_00000001"
    _save_tiny(small)
    torch.manual_seed(0)
    big = save_checkpoint(tmp_path / "step_00000002", model=TinyModel(hidden=5), config=CONFIG)
    with pytest.raises(CheckpointError, match=r"tensor first\.bias is F32 \(3,\)"):
        average_checkpoints([small, big], tmp_path / "avg")
    tied = save_checkpoint(tmp_path / "step_00000003", model=TiedModel(), config={})
    with pytest.raises(CheckpointError, match="tensor counter is missing"):
        average_checkpoints([tied, small], tmp_path / "avg")
    with pytest.raises(CheckpointError, match="no checkpoints"):
        average_checkpoints([], tmp_path / "avg")
    assert not (tmp_path / "avg").exists()


def test_average_refuses_other_tokenizers_a_checkpoint_twice_and_a_training_checkpoints_place(
    tmp_path: Path,
) -> None:
    files = {}
    for name, text in (("a", '{"model": "bpe a"}'), ("b", '{"model": "bpe b"}')):
        files[name] = tmp_path / f"tokenizer-{name}.json"
        files[name].write_text(text)
    runs = tmp_path / "run" / "checkpoints"
    one, two = checkpoint_path(runs, 1), checkpoint_path(runs, 2)
    for seed, path in enumerate((one, two)):
        _save_tiny(path, seed=seed, files={"tokenizer.json": files["a"]})
    other = checkpoint_path(tmp_path / "other", 1)
    _save_tiny(other, files={"tokenizer.json": files["b"]})
    before = (two / "model.safetensors").read_bytes()
    refusals = [
        ([one, other], tmp_path / "avg", r"their tokenizer.json differ"),
        ([one, one, two], tmp_path / "avg", r"step_00000001 is given twice"),
        ([one, two], two, r"refusing to write the average over .*step_00000002: it is a training"),
        ([one, two], checkpoint_path(runs, 9), r"it would become its run's latest checkpoint"),
    ]
    for paths, output, message in refusals:
        with pytest.raises(CheckpointError, match=message):
            average_checkpoints(paths, output)
    assert (two / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in runs.iterdir()) == ["step_00000001", "step_00000002"]
    assert not (tmp_path / "avg").exists()
    average_checkpoints([one, two], tmp_path / "run" / "averaged")  # beside them: fine


# --- safe loading of foreign files -------------------------------------------------------------


class _MaliciousPayload:
    """Unpickling this would create ``marker``: a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.bin"
    torch.save({"weight": torch.zeros(2), "payload": _MaliciousPayload(marker)}, evil)

    with pytest.raises(CheckpointError, match="refused to load"):
        load_torch_state_dict(evil)
    assert not marker.exists()

    # Control: the payload is live, so the refusal above is what protected us.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_load_torch_state_dict_reads_plain_state_dicts(tmp_path: Path) -> None:
    model = TinyModel()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    _assert_same_state(model.state_dict(), load_torch_state_dict(path))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="damaged"):
        load_torch_state_dict(path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_torch_state_dict(tmp_path / "missing.pt")


def test_checkpoint_loading_never_calls_torch_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = TinyModel()
    optimizer = torch.optim.Adam(model.parameters())
    _train_step(model, optimizer, seed=0)
    path = save_checkpoint(tmp_path / "c", model=model, config=CONFIG, optimizer=optimizer)

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load must not be used on checkpoints")

    monkeypatch.setattr(torch, "load", forbidden)
    load_checkpoint(path, model=TinyModel(), optimizer=torch.optim.Adam(TinyModel().parameters()))


def test_remove_leftovers_keeps_the_only_copy_of_a_checkpoint(tmp_path):
    """What killed saves and prunes leave is deleted, but for a checkpoint set aside for its
    replacement when the replacement never arrived."""
    model = torch.nn.Linear(2, 2)
    for step in (2, 4):
        save_checkpoint(checkpoint_path(tmp_path, step), model=model, config={})
    leftovers = [".step_00000006.tmp-11", ".step_00000002.del-12", ".step_00000004.old-13"]
    for name in [*leftovers, ".step_00000008.old-14"]:
        (tmp_path / name).mkdir()
    (tmp_path / ".best.json.tmp-15").write_text("{")
    removed = ckpt.remove_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == sorted([*leftovers, ".best.json.tmp-15"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".step_00000008.old-14",  # step_00000008 is missing: this is its one copy
        "step_00000002",
        "step_00000004",
    ]


def test_remove_leftovers_deletes_the_temporary_file_of_a_killed_best_json_write(tmp_path):
    """best.json is written through `atomic.replacing`: a kill before its rename leaves that
    temporary file. Everything else (the pointer, checkpoints, a user's hidden files) stays."""
    model = torch.nn.Linear(2, 2)
    best = save_checkpoint(checkpoint_path(tmp_path, 2), model=model, config={})
    write_best_pointer(best, metric="val_loss", value=1.5)
    (tmp_path / ".notes.tmp").write_text("mine")
    (tmp_path / ".best.json.swp").write_text("an editor's")
    # A write entered and never finished, as a kill leaves it (the block is never left).
    write = atomic.replacing(tmp_path / "best.json")
    leftover = write.__enter__()
    leftover.write_text('{"checkpoint": "step_')
    assert leftover.name.startswith(".best.json.")
    assert ckpt.remove_leftovers(tmp_path) == [leftover]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".best.json.swp",
        ".notes.tmp",
        "best.json",
        "step_00000002",
    ]
    assert read_best_pointer(tmp_path) == best


def test_a_failed_best_json_write_names_it_and_keeps_the_previous_pointer(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    first, second = (
        save_checkpoint(checkpoint_path(tmp_path, s), model=model, config={}) for s in (2, 4)
    )
    write_best_pointer(first, metric="val_loss", value=1.5)

    def full(path):  # a full disk: write(2) errors name no file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic, "fsync_file", full)
    with pytest.raises(CheckpointError) as raised:
        write_best_pointer(second, metric="val_loss", value=1.2)
    assert str(raised.value).startswith(
        "cannot record the best checkpoint: no space left on device while writing "
        f"{tmp_path / 'best.json'}; free disk space"
    )
    assert read_best_pointer(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.json",
        "step_00000002",
        "step_00000004",
    ]


def test_a_full_disk_inside_the_safetensors_writer_is_a_checkpoint_error(tmp_path, monkeypatch):
    """safetensors raises its own error for a failed write; it reads as every other one."""
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError(
            "Error while serializing: IoError(Os { code: 28, ... }) (os error 28)"
        )

    monkeypatch.setattr(ckpt, "save_file", full)
    target = checkpoint_path(tmp_path, 2)
    with pytest.raises(CheckpointError, match="no space left on device while writing .*model"):
        save_checkpoint(target, model=torch.nn.Linear(2, 2), config={})
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone too


def test_a_checkpoint_pruned_while_it_is_read_is_looked_up_again(tmp_path):
    """`translate --checkpoint RUN` while RUN trains: the checkpoint it picked can be pruned
    before its files are read; the run's checkpoint is then picked again."""
    import shutil

    from aiayn.tasks.translation import load_resolved

    for step in (2, 4):
        save_checkpoint(
            checkpoint_path(tmp_path / "checkpoints", step), model=torch.nn.Linear(2, 2), config={}
        )
    picked = []

    def load(found):
        picked.append(found.name)
        if len(picked) == 1:
            shutil.rmtree(found)  # what the training's prune does meanwhile
            raise CheckpointError(f"{found} has no tokenizer.json")
        return found

    assert load_resolved(tmp_path, load).name == "step_00000002"
    assert picked == ["step_00000004", "step_00000002"]

    def damaged(found):
        raise CheckpointError(f"{found} is damaged")

    with pytest.raises(CheckpointError, match="step_00000002 is damaged"):  # still there
        load_resolved(tmp_path, damaged)
