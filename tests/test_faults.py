"""Fault injection: kill real `aiayn train` processes and prove that `--resume` loses nothing.

Each test trains the toy run of conftest.py (8 steps, a checkpoint every 2, validation every 4)
in a subprocess, kills it with SIGKILL (no handler, no cleanup: what a power cut or the OOM
killer does) at a chosen or random point, checks that only complete checkpoints are listed
and loadable, resumes it in a new process, and compares the final weights bit for bit (every
byte of every tensor) with an uninterrupted run's. The points that are hard to hit by timing alone (inside a checkpoint
write, inside a validation) are reached with the `AIAYN_FAULT` hook of `aiayn.faults`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from aiayn import checkpoint as ckpt
from aiayn import faults
from aiayn.errors import CheckpointError, ConfigError
from aiayn.tasks.translation import resolve_checkpoint
from aiayn.train import Distributed, Trainer

pytestmark = pytest.mark.skipif(
    not hasattr(signal, "SIGKILL"), reason="needs POSIX signals (SIGKILL)"
)

FINAL = "step_00000008"  # the toy run's last checkpoint


@dataclass
class Run:
    """One toy training run: its config file and run directory."""

    config: Path
    run_dir: Path


def aiayn_env(fault: str | None = None) -> dict[str, str]:
    """The environment of a child `aiayn`: one thread (bitwise-reproducible and polite), a fault."""
    env = {k: v for k, v in os.environ.items() if k != faults.ENV_VAR}
    env["OMP_NUM_THREADS"] = "1"
    if fault is not None:
        env[faults.ENV_VAR] = fault
    return env


def command(run: Run, *extra: str) -> list[str]:
    return [sys.executable, "-m", "aiayn.cli", "train", str(run.config), "--quiet", *extra]


def train(run: Run, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(run, *extra), env=aiayn_env(fault), capture_output=True, text=True, timeout=300
    )


def records(run_dir: Path) -> list[dict[str, Any]]:
    """train.jsonl without the one field that depends on the clock."""
    lines = (run_dir / "train.jsonl").read_text(encoding="utf-8").splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "elapsed_s")}
        for line in lines
    ]


def assert_only_complete_checkpoints_are_listed(run_dir: Path) -> list[Path]:
    """Every listed checkpoint loads; a half-written one is hidden, never listed, refused."""
    listed = ckpt.list_checkpoints(run_dir)
    for path in listed:
        ckpt.load_checkpoint(path)
        ckpt.load_model_state_dict(path)
    root = run_dir / "checkpoints"
    leftovers = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".")]
    for partial in leftovers:
        assert partial not in listed
        with pytest.raises(CheckpointError):
            ckpt.load_checkpoint(partial)
    if listed:  # what `aiayn translate --checkpoint RUN` would load
        assert resolve_checkpoint(run_dir) in listed
    return listed


def tensor_file_contents(path: Path) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's header (as a dict) and its raw tensor bytes.

    The file bytes themselves are not reproducible across processes: safetensors writes the
    metadata map in hash order, which Rust randomises per process. Names, dtypes, shapes,
    offsets, metadata and every byte of tensor data are.
    """
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def assert_same_final_weights(run_dir: Path, reference: Path) -> None:
    """The final checkpoints hold bitwise the same tensors (and say which differ if not)."""
    ours = ckpt.latest_checkpoint(run_dir)
    theirs = ckpt.latest_checkpoint(reference)
    assert ours is not None and ours.name == theirs.name == FINAL
    header, data = tensor_file_contents(ours / ckpt.MODEL_FILE)
    ref_header, ref_data = tensor_file_contents(theirs / ckpt.MODEL_FILE)
    assert header == ref_header
    if data != ref_data:
        a, b = ckpt.load_model_state_dict(ours), ckpt.load_model_state_dict(theirs)
        differ = [name for name in b if not a[name].equal(b[name])]
        pytest.fail(f"final weights differ from the uninterrupted run's: {differ}")


def resume_and_compare(run: Run, reference: Path) -> None:
    """Continue a killed run as a user would, then compare it with the uninterrupted run."""
    listed = assert_only_complete_checkpoints_are_listed(run.run_dir)
    # With no checkpoint yet there is nothing to resume: the user starts again, as the
    # `--resume` error message says.
    proc = train(run, "--resume") if listed else train(run)
    assert proc.returncode == 0, proc.stderr
    assert_same_final_weights(run.run_dir, reference)
    assert records(run.run_dir) == records(reference)
    assert_only_complete_checkpoints_are_listed(run.run_dir)


@pytest.fixture
def new_run(tmp_path: Path, toy_config: Callable[..., Path]) -> Run:
    run_dir = tmp_path / "run"
    return Run(toy_config(tmp_path / "toy.yaml", run_dir), run_dir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, toy_config: Callable[..., Path]) -> Path:
    """The run directory of an uninterrupted toy run."""
    folder = tmp_path_factory.mktemp("reference")
    run = Run(toy_config(folder / "toy.yaml", folder / "run"), folder / "run")
    proc = train(run)
    assert proc.returncode == 0, proc.stderr
    return run.run_dir


# --------------------------------------------------------------------------- kills at chosen points


@pytest.mark.parametrize(
    "fault, partial",
    [
        ("step:3", None),  # in step 3, after the backward pass, before the update
        ("eval:1", None),  # in the validation at step 4, before its checkpoint
        # In the second checkpoint write (step 4), with the weights and optimiser state written.
        ("checkpoint-write:2", ".step_00000004.tmp-"),
    ],
    ids=["step", "eval", "checkpoint-write"],
)
def test_sigkill_at_a_fault_point_then_resume_gives_the_same_weights(
    new_run: Run, reference: Path, fault: str, partial: str | None
) -> None:
    proc = train(new_run, fault=fault)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    listed = assert_only_complete_checkpoints_are_listed(new_run.run_dir)
    assert [p.name for p in listed] == ["step_00000002"]
    hidden = sorted(p.name for p in (new_run.run_dir / "checkpoints").glob(".*"))
    if partial is None:
        assert hidden == []
    else:  # the killed write left its temporary directory: half a checkpoint, never listed
        assert len(hidden) == 1 and hidden[0].startswith(partial), hidden
        assert (new_run.run_dir / "checkpoints" / hidden[0] / ckpt.MODEL_FILE).is_file()
        assert not (new_run.run_dir / "checkpoints" / hidden[0] / ckpt.CONFIG_FILE).exists()
    resume_and_compare(new_run, reference)
    # The resumed run deleted what the killed save left.
    assert sorted((new_run.run_dir / "checkpoints").glob(".*")) == []


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_sigkill_at_a_random_moment_then_resume_gives_the_same_weights(
    new_run: Run, reference: Path, seed: int
) -> None:
    """SIGKILL a seeded random time after training starts: wherever it lands, nothing is lost.

    The toy run trains for about 0.2-0.3 s after its first step (then spends about two
    seconds plotting); the delay is drawn over that span. Where the kill lands still depends
    on the machine's speed, so every outcome is handled, from "before the first checkpoint"
    to "after the last".
    """
    delay = random.Random(seed).uniform(0.0, 0.2)
    child = subprocess.Popen(
        command(new_run), env=aiayn_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    log = new_run.run_dir / "train.jsonl"
    deadline = time.monotonic() + 120
    while child.poll() is None and not log.exists() and time.monotonic() < deadline:
        time.sleep(0.01)  # wait for the first step, so the kill lands in training, not imports
    time.sleep(delay)
    child.kill()
    _, stderr = child.communicate(timeout=60)
    assert child.returncode in (0, -signal.SIGKILL), stderr
    latest = ckpt.latest_checkpoint(new_run.run_dir)
    if latest is not None and latest.name == FINAL:
        # The kill (if any) hit the wrap-up after the last checkpoint: training is complete.
        # (Resuming it would only repeat the final validation, and log it a second time.)
        assert_only_complete_checkpoints_are_listed(new_run.run_dir)
        assert_same_final_weights(new_run.run_dir, reference)
        return
    resume_and_compare(new_run, reference)


def test_sigterm_stops_after_the_step_with_a_checkpoint_then_resume_gives_the_same_weights(
    new_run: Run, reference: Path
) -> None:
    child = subprocess.Popen(
        command(new_run),
        env=aiayn_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = new_run.run_dir / "train.jsonl"
    while child.poll() is None and not log.exists():
        time.sleep(0.01)  # the handler is in place once training has started
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=60)
    if child.returncode == 0:  # finished before the signal arrived
        assert_same_final_weights(new_run.run_dir, reference)
        return
    if child.returncode == -signal.SIGTERM:  # it arrived after training, while plotting
        resume_and_compare(new_run, reference)
        return
    last = stderr.strip().splitlines()[-1]
    assert child.returncode == 1 and "Traceback" not in stderr, stderr
    assert last.startswith(f"error: stopped by signal {int(signal.SIGTERM)} at step "), last
    assert last.endswith("saved: continue with --resume"), last
    step = int(last.split(" at step ")[1].split(";")[0])
    assert ckpt.latest_checkpoint(new_run.run_dir) == ckpt.checkpoint_path(
        new_run.run_dir / "checkpoints", step
    )
    assert_only_complete_checkpoints_are_listed(new_run.run_dir)
    proc = train(new_run, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert_same_final_weights(new_run.run_dir, reference)
    # A stop at a validation step validates first (it may be the best), so the records match.
    assert records(new_run.run_dir) == records(reference)


def test_a_kill_between_the_best_checkpoint_and_best_json_is_repaired_by_resume(
    new_run: Run, reference: Path
) -> None:
    """The checkpoint of step 4, the best so far, is saved; the kill comes before best.json
    names it. With keep_last 1, step 6's pruning would then delete it as an old checkpoint."""
    proc = train(new_run, "--train.keep_last", "1", fault="best-pointer:1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    root = new_run.run_dir / "checkpoints"
    assert ckpt.read_best_pointer(root) is None and ckpt.latest_checkpoint(root).name.endswith("4")
    proc = train(new_run, "--train.keep_last", "1", "--resume")
    assert proc.returncode == 0, proc.stderr
    best = ckpt.read_best_pointer(root)
    assert best is not None and best.is_dir()
    assert best.name == ckpt.read_best_pointer(reference / "checkpoints").name
    assert json.loads((root / ckpt.BEST_POINTER_FILE).read_text()) == json.loads(
        (reference / "checkpoints" / ckpt.BEST_POINTER_FILE).read_text()
    )
    assert records(new_run.run_dir) == records(reference)


# --------------------------------------------------------------------------- a full disk


def test_disk_full_during_a_checkpoint_stops_training_and_keeps_the_previous_one(
    new_run: Run, reference: Path
) -> None:
    proc = train(new_run, fault="checkpoint-write:2:enospc")  # the save at step 4 fails
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: training stopped at step 4: ")
    assert "no space left on device" in lines[0]
    assert lines[0].endswith("step_00000002 is intact: continue from it with --resume")
    # The previous checkpoint is intact and loadable; the failed one left nothing behind.
    assert sorted(p.name for p in (new_run.run_dir / "checkpoints").iterdir()) == ["step_00000002"]
    assert_only_complete_checkpoints_are_listed(new_run.run_dir)
    # Space freed, the run continues and loses nothing.
    resume_and_compare(new_run, reference)


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_the_same_losses_through_the_cli(new_run: Run, reference: Path) -> None:
    proc = train(new_run)
    assert proc.returncode == 0, proc.stderr
    losses = [r["loss"] for r in records(new_run.run_dir) if "loss" in r]
    assert len(losses) == 8
    assert losses == [r["loss"] for r in records(reference) if "loss" in r]


# --------------------------------------------------------------------------- the hook and the log


def test_fault_hook_is_off_without_the_variable_and_strict_with_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(faults.ENV_VAR, raising=False)
    for point in faults.POINTS:
        faults.maybe_fail(point)  # no variable: nothing happens
    assert faults.parse("eval:2") == ("eval", 2, "kill")
    assert faults.parse("checkpoint-write:1:enospc") == ("checkpoint-write", 1, "enospc")
    for bad in ("eval", "evaluation:1", "step:0", "step:x", "step:1:explode", "step:1:kill:2"):
        with pytest.raises(ConfigError, match="is not <point>:<n>"):
            faults.parse(bad)
    monkeypatch.setenv(faults.ENV_VAR, "checkpoint-write:2:enospc")
    monkeypatch.setattr(faults, "_reached", {})
    faults.maybe_fail("step")  # another point: not counted
    faults.maybe_fail("checkpoint-write")  # the first time: not yet
    with pytest.raises(OSError, match="No space left on device"):
        faults.maybe_fail("checkpoint-write")


def test_a_failure_while_resume_rewrites_the_log_keeps_the_old_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--resume` drops log records past its checkpoint by rewriting train.jsonl beside it."""
    log = tmp_path / "train.jsonl"
    original = '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo'
    log.write_text(original, encoding="utf-8")
    trainer = SimpleNamespace(dist=Distributed(), log_path=log)

    def interrupted(src: Any, dst: Any) -> None:
        raise KeyboardInterrupt  # stands in for a kill between writing and renaming

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Trainer._truncate_log(trainer, 1)  # type: ignore[arg-type]
    assert log.read_text(encoding="utf-8") == original
    monkeypatch.undo()
    Trainer._truncate_log(trainer, 1)  # type: ignore[arg-type]
    assert log.read_text(encoding="utf-8") == '{"step": 1, "loss": 2.0}\n'
