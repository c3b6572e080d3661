"""Data parallel training: 2 processes (gloo, CPU) end with the parameters of 1 process on the same global batch."""

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from test_train import copy_examples, make_trainer  # noqa: E402

from aiayn import checkpoint as ckpt  # noqa: E402
from aiayn.errors import CheckpointError  # noqa: E402

STEPS = 4


def ckpt_aliases(checkpoint) -> dict[str, str]:
    """The names a checkpoint's model file stores as aliases of another tensor."""
    import json

    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["aiayn.aliases"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(
    rank: int, world: int, port: int, run_dir: str, fsdp: bool = False, dropout: float = 0.0
) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    options = dict(dropout=dropout, dtype=torch.float64, fsdp=fsdp)
    trainer = make_trainer(run_dir, STEPS, copy_examples(), **options)
    trainer.cfg.save_every = 2
    trainer.fit(progress=False)
    resumes = fsdp or dropout > 0
    if resumes:
        # Resume the run from its step-2 checkpoint in a second run directory.
        again = make_trainer(run_dir + "-resumed", STEPS, copy_examples(), **options)
        again.resume(ckpt.checkpoint_path(trainer.checkpoint_root, 2))
        again.fit(progress=False)
    if rank == 0:
        # The final checkpoint: gathered from the shards under FSDP.
        final = ckpt.load_model_state_dict(ckpt.latest_checkpoint(trainer.checkpoint_root))
        torch.save(final, os.path.join(run_dir, "final.pt"))
        if resumes:
            resumed = ckpt.latest_checkpoint(again.checkpoint_root)
            torch.save(ckpt.load_model_state_dict(resumed), os.path.join(run_dir, "resumed.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, fsdp):
    """DDP (replicated) and FSDP (sharded) alike; under FSDP also: the checkpoints gathered
    from the shards hold the parameters, and a resumed sharded run ends where it would have."""
    run_dir = str(tmp_path / "ddp")
    mp.start_processes(worker, args=(2, free_port(), run_dir, fsdp), nprocs=2, start_method="spawn")
    ddp = torch.load(tmp_path / "ddp" / "final.pt", weights_only=True)
    if fsdp:
        resumed = torch.load(tmp_path / "ddp" / "resumed.pt", weights_only=True)
        for name, value in ddp.items():
            assert torch.equal(resumed[name], value), f"{name}: the resumed run differs"

    torch.set_num_threads(1)
    single = make_trainer(
        tmp_path / "single", STEPS, copy_examples(), dropout=0.0, dtype=torch.float64, grad_accum=2
    )
    single.fit(progress=False)
    start = make_trainer(tmp_path / "start", 1, copy_examples(), dropout=0.0).model.state_dict()
    # The tied weights are stored once, with aliases, as one process stores them (FSDP gathers
    # a copy per name).
    aliases = [
        ckpt_aliases(ckpt.latest_checkpoint(root / "checkpoints"))
        for root in (tmp_path / "ddp", tmp_path / "single")
    ]
    assert aliases[0] == aliases[1] and len(aliases[1]) == 2, aliases

    for name, value in single.model.state_dict().items():
        # The key projection's bias has a zero gradient in exact arithmetic (the softmax does
        # not change when every score of a query moves by the same q.b_k); what it gets is
        # rounding noise, which Adam's normalisation turns into steps of its own. FSDP sums the
        # gradients in another order than one process, so these biases (~1e-12 after 4 steps)
        # differ at that level; every other tensor agrees to 1e-12.
        atol = 1e-10 if fsdp and name.endswith("w_k.bias") else 1e-12
        torch.testing.assert_close(ddp[name], value, rtol=1e-9, atol=atol, msg=f"{name} differs")
    moved = [name for name, value in start.items() if not torch.equal(value.double(), ddp[name])]
    assert len(moved) > 10, "training should have changed the parameters"


@pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_a_resumed_two_process_run_with_dropout_ends_where_it_would_have(tmp_path, fsdp):
    """Each process draws its own dropout masks, so each restores its own random state: the
    run resumed at step 2 ends with the uninterrupted run's parameters, bit for bit."""
    run_dir = str(tmp_path / "run")
    args = (2, free_port(), run_dir, fsdp, 0.1)
    mp.start_processes(worker, args=args, nprocs=2, start_method="spawn")
    final = torch.load(tmp_path / "run" / "final.pt", weights_only=True)
    resumed = torch.load(tmp_path / "run" / "resumed.pt", weights_only=True)
    for name, value in final.items():
        assert torch.equal(resumed[name], value), f"{name}: the resumed run differs"


def stale_copy_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    """Rank 1 resumes from a copy of the run that lacks its latest checkpoint."""
    import shutil

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    trainer = make_trainer(run_dir, STEPS, copy_examples(), dropout=0.0)
    trainer.cfg.save_every = 2
    trainer.fit(progress=False)
    torch.distributed.barrier()
    mine = f"{run_dir}-{rank}"
    shutil.copytree(run_dir, mine)
    if rank == 1:
        shutil.rmtree(ckpt.checkpoint_path(f"{mine}/checkpoints", STEPS))
    again = make_trainer(mine, STEPS + 2, copy_examples(), dropout=0.0)
    write_outcome(run_dir, rank, again.resume)


def write_outcome(run_dir: str, rank: int, attempt) -> None:
    """Write what became of `attempt()` to run_dir-outcome-RANK.txt, "done" or its
    CheckpointError, for the test to read; then leave the process group."""
    try:
        attempt()
        outcome = "done"
    except CheckpointError as exc:
        outcome = str(exc)
    with open(f"{run_dir}-outcome-{rank}.txt", "w", encoding="utf-8") as f:
        f.write(outcome)
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)
def test_processes_that_find_different_latest_checkpoints_all_refuse_to_resume(tmp_path):
    run_dir = str(tmp_path / "run")
    args = (2, free_port(), run_dir)
    mp.start_processes(stale_copy_worker, args=args, nprocs=2, start_method="spawn")
    for rank in (0, 1):
        outcome = (tmp_path / f"run-outcome-{rank}.txt").read_text(encoding="utf-8")
        assert outcome.startswith("--resume: the processes found different latest checkpoints")
        assert f"(rank 0 step {STEPS}, rank 1 step 2)" in outcome


def missing_run_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    """Rank 1's machine has no copy of the run: it refuses --resume before the Trainer, so
    rank 0, which has the run, must refuse with it instead of waiting for it to join."""
    from aiayn.experiment import Experiment

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    mine = run_dir if rank == 0 else f"{run_dir}-missing"
    exp = Experiment.from_dict({"task": "translation", "run_dir": mine, "train": {"device": "cpu"}})
    write_outcome(run_dir, rank, lambda: exp.check_run_dir(resume=True))


@pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)
def test_a_process_without_the_run_to_resume_stops_every_process(tmp_path):
    run_dir = tmp_path / "run"
    model = torch.nn.Linear(2, 2)
    ckpt.save_checkpoint(ckpt.checkpoint_path(run_dir / "checkpoints", 2), model=model, config={})
    mp.start_processes(
        missing_run_worker, args=(2, free_port(), str(run_dir)), nprocs=2, start_method="spawn"
    )
    mine = (tmp_path / "run-outcome-1.txt").read_text(encoding="utf-8")
    assert mine.startswith("--resume: ") and "has no checkpoint to resume" in mine
    other = (tmp_path / "run-outcome-0.txt").read_text(encoding="utf-8")
    assert other == f"process 1 refused to start: {mine}"


def poison_step(trainer, step: int) -> None:
    """Make the loss of optimiser step `step` (0-based) infinite, on this process."""
    loss_fn = trainer.loss_fn

    def loss(model, batch):
        value = loss_fn(model, batch)
        return value * float("inf") if trainer.step == step else value

    trainer.loss_fn = loss


def nonfinite_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    trainer = make_trainer(run_dir, STEPS, copy_examples(), dropout=0.0, dtype=torch.float64,
                           fsdp=True)  # fmt: skip
    if rank == 0:
        poison_step(trainer, 1)  # one process's loss only: the step must be skipped on both
    trainer.fit(progress=False)
    steps = {float(state["step"]) for state in trainer.optimizer.state.values()}
    torch.save(steps, os.path.join(run_dir, f"adam-steps-{rank}.pt"))
    if rank == 0:
        final = ckpt.load_model_state_dict(ckpt.latest_checkpoint(trainer.checkpoint_root))
        torch.save(final, os.path.join(run_dir, "final.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)
def test_a_non_finite_step_is_skipped_on_every_shard(tmp_path):
    """FSDP with the fused AdamW (the Trainer's choice on CPUs and GPUs): a step whose loss is
    infinite on one process only is skipped by the kernel (found_inf) on both, from the
    sharded gradient norm, and the run ends where one process skipping that step ends."""
    run_dir = str(tmp_path / "fsdp")
    mp.start_processes(
        nonfinite_worker, args=(2, free_port(), run_dir), nprocs=2, start_method="spawn"
    )
    for rank in (0, 1):
        steps = torch.load(os.path.join(run_dir, f"adam-steps-{rank}.pt"), weights_only=True)
        assert steps == {STEPS - 1.0}, f"rank {rank}: Adam steps {steps}"
    sharded = torch.load(os.path.join(run_dir, "final.pt"), weights_only=True)

    torch.set_num_threads(1)
    single = make_trainer(
        tmp_path / "single", STEPS, copy_examples(), dropout=0.0, dtype=torch.float64, grad_accum=2
    )
    assert single.optimizer.defaults["fused"]
    poison_step(single, 1)
    single.fit(progress=False)
    log = (tmp_path / "single" / "train.jsonl").read_text().splitlines()
    assert ['"skipped_non_finite": true' in line for line in log].count(True) == 1
    for name, value in single.model.state_dict().items():
        atol = 1e-10 if name.endswith("w_k.bias") else 1e-12  # see the test above
        torch.testing.assert_close(sharded[name], value, rtol=1e-9, atol=atol, msg=name)


MULTI30K = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "multi30k")


@pytest.mark.skipif(not os.path.isdir(MULTI30K), reason="needs ../shared/data/multi30k")
@pytest.mark.parametrize("sharding", [[], ["--train.fsdp", "true"]], ids=["ddp", "fsdp"])
def test_aiayn_train_under_torchrun(tmp_path, sharding):
    """The documented launch (docs/distributed.md): `torchrun --nproc_per_node 2 -m aiayn.cli
    train ...` runs the CLI in 2 gloo processes; one run directory, written by rank 0. With
    FSDP every process validates (a sharded model runs only on all of them at once)."""
    import subprocess

    run_dir = tmp_path / "run"
    tiny = ("--model.d_model 32 --model.d_ff 64 --model.n_heads 2 --model.n_encoder_layers 1 "
            "--model.n_decoder_layers 1 --data.vocab_size 300 --data.max_train_examples 300 "
            "--data.max_valid_examples 20 --train.max_steps 4 --train.save_every 2 "
            "--train.eval_every 2 --train.log_every 1 --train.max_tokens 512 --train.device cpu "
            "--quiet").split()  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "aiayn.cli", "train",
           os.path.join(os.path.dirname(__file__), "..", "configs", "multi30k_de_en.yaml"),
           "--data.root", MULTI30K, "--run_dir", str(run_dir), *tiny, *sharding]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [
        "step_00000002",
        "step_00000004",
    ]
    steps = [
        line for line in (run_dir / "train.jsonl").read_text().splitlines() if '"loss"' in line
    ]
    assert len(steps) == 4  # logged once (by rank 0), not once per process
    assert proc.stdout.count("finished") == 1, proc.stdout  # reported once too


def test_classification_under_torchrun_with_fsdp(tmp_path):
    """A task that scores its test set after training: with a sharded model both processes
    load the best checkpoint and score together; rank 0 writes test_scores.json."""
    import json
    import subprocess

    from test_classification import toy_config, toy_rows, write_tsv

    data = tmp_path / "data"
    data.mkdir()
    for name, (n, seed) in {"train": (300, 0), "dev": (40, 1), "test": (40, 2)}.items():
        write_tsv(data / f"{name}.tsv", toy_rows(n, seed))
    train = {"max_steps": 80, "eval_every": 40, "save_every": 40}
    config = toy_config(tmp_path, data, tmp_path / "run", train=train)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "aiayn.cli", "train", str(config),
           "--train.fsdp", "true", "--quiet"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    test = json.loads((tmp_path / "run" / "test_scores.json").read_text())
    assert test["examples"] == 40 and test["accuracy"] >= 90.0, test
