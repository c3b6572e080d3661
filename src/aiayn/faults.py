"""Fault injection for tests: kill the process, or fail a write, at a named point of training.

Set the environment variable ``AIAYN_FAULT=<point>:<n>[:<action>]`` and the n-th time the
process reaches ``point`` (counting from 1) it

- ``kill`` (the default): sends itself SIGKILL, so no ``finally``, no signal handler and no
  cleanup runs, exactly as when the machine dies or the OOM killer strikes;
- ``enospc``: raises ``OSError(ENOSPC)``, as a full disk does.

The points are where a crash costs the most:

- ``step``: inside an optimiser step, after the backward pass and before the update;
- ``eval``: during a validation, after its metrics are computed and before they are saved;
- ``checkpoint-write``: inside the checkpoint writer, after the weights and optimiser state are
  in the temporary directory and before it is renamed into place;
- ``best-pointer``: after a checkpoint with the best validation so far is saved, before
  ``best.json`` names it.

``tests/test_faults.py`` uses it to kill real ``aiayn train`` runs and resume them. Without the
variable `maybe_fail` is one dictionary lookup: nothing to pay in normal runs.
"""

from __future__ import annotations

import errno
import os
import signal

from aiayn.errors import ConfigError

ENV_VAR = "AIAYN_FAULT"
POINTS = ("step", "eval", "checkpoint-write", "best-pointer")
ACTIONS = ("kill", "enospc")

# How often each point has been reached in this process (only counted while ENV_VAR is set).
_reached: dict[str, int] = {}


def parse(spec: str) -> tuple[str, int, str]:
    """``"eval:2"`` -> ``("eval", 2, "kill")``; a malformed spec is an error, not a silent no-op."""
    parts = spec.split(":")
    if len(parts) == 2:
        parts.append("kill")
    point, count, action = parts if len(parts) == 3 else ("", "", "")
    if point not in POINTS or not count.isdigit() or int(count) < 1 or action not in ACTIONS:
        # A typo must not make a fault test pass by injecting nothing.
        raise ConfigError(
            f"{ENV_VAR}={spec!r} is not <point>:<n>[:<action>]; points: {', '.join(POINTS)}, "
            f"n >= 1, actions: {', '.join(ACTIONS)} (unset it for normal runs)"
        )
    return point, int(count), action


def maybe_fail(point: str) -> None:
    """Kill this process, or raise ``OSError(ENOSPC)``, if ``AIAYN_FAULT`` asks for it here now."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    target, count, action = parse(spec)
    if point != target:
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] != count:
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected by {ENV_VAR}={spec})")
    # SIGKILL cannot be caught: the process dies here with whatever it has written so far.
    os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
