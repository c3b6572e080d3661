"""One training at a time in a run directory.

Two `aiayn train` processes on one run_dir would write over each other's tokenizer, config and
log, and their checkpoints would interleave; both would end "finished". So a training holds
its run_dir for as long as it runs: an exclusive `flock` on the folder itself (nothing is
written for it), which the operating system releases when the process ends, however it ends
(SIGKILL included). A second training on the folder is refused with one line.

Under torchrun only rank 0 holds it (the processes of one job share the folder). Where the
filesystem has no `flock` (Windows, some network filesystems) nothing is held.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from aiayn.errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["hold", "release"]

# The folders this process holds, by resolved path: the open descriptor that carries the lock.
_held: dict[Path, int] = {}


TRAINING_ADVICE = (
    "wait for it to end (then continue it with --resume), or pass --run_dir with another folder"
)


def hold(run_dir: Path, advice: str = TRAINING_ADVICE) -> None:
    """Hold the existing folder `run_dir` for this process (nothing to do if it already does).

    Raises:
        ConfigError: another process holds it: a training is running there (the message
            ends with `advice`, what to do).
    """
    key = Path(run_dir).resolve()
    if key in _held or fcntl is None:
        return
    fd = os.open(key, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ConfigError(f"another aiayn process is training in {run_dir}: {advice}") from None
        return  # a filesystem without flock: train unguarded rather than not at all
    _held[key] = fd


def release(run_dir: Path) -> None:
    """Let go of `run_dir` if this process holds it (closing the descriptor drops the lock)."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)
