"""Data parallel training: 2 processes (gloo, CPU) end with the parameters of 1 process on the same global batch."""

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from test_train import copy_examples, make_trainer  # noqa: E402

STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, run_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    trainer = make_trainer(run_dir, STEPS, copy_examples(), dropout=0.0, dtype=torch.float64)
    trainer.fit(progress=False)
    if rank == 0:
        torch.save(trainer.model.state_dict(), os.path.join(run_dir, "final.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    mp.start_processes(
        worker, args=(2, free_port(), str(tmp_path / "ddp")), nprocs=2, start_method="spawn"
    )
    ddp = torch.load(tmp_path / "ddp" / "final.pt", weights_only=True)

    torch.set_num_threads(1)
    single = make_trainer(
        tmp_path / "single", STEPS, copy_examples(), dropout=0.0, dtype=torch.float64, grad_accum=2
    )
    single.fit(progress=False)
    start = make_trainer(tmp_path / "start", 1, copy_examples(), dropout=0.0).model.state_dict()

    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-9, atol=1e-12, msg=f"{name} differs")
    moved = [name for name, value in start.items() if not torch.equal(value.double(), ddp[name])]
    assert len(moved) > 10, "training should have changed the parameters"
