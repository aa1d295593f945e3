"""Fault injection for the reliability tests: die, fail a write, or get a signal at a named point.

Normal runs never set it. The tests set the environment variable

    SELFDISTILL_FAULT=POINT:STEP[:ACTION]

and the training loop calls `fault(POINT, step)` at each point below; when POINT and STEP match,
ACTION happens there:

    kill     (default) SIGKILL this process: a crash / power cut at exactly that point
    enospc   raise OSError(ENOSPC), as a full disk would
    sigint, sigterm    send that signal to this process (a user's Ctrl-C, a scheduler's stop)

STEP is the optimizer step being run (1-based), or the step a checkpoint is written for; an
empty STEP (`final:`) matches any step.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable

ENV = "SELFDISTILL_FAULT"

POINTS = {
    "rollout": "after the step's rollouts were generated, before any backward pass",
    "backward": "after the first micro-batch's backward pass",
    "optimizer_step": "after optimizer.step(), before the teacher update",
    "metrics": "half-way through appending the step's line to metrics.jsonl",
    "checkpoint_model": "checkpoint write: model weights written, teacher and trainer state not yet",
    "checkpoint_rename": "checkpoint write: every file written, temporary directory not yet renamed",
    "checkpoint_prune": "checkpoint renamed into place, older checkpoints not yet pruned",
    "final": "final model written to its temporary directory, not yet renamed to final/",
    # A learner's round (STEP is the round's number): each stage's work done, the database not yet told.
    "round_train": "learner round: the candidate trained (final/ written), its stage not yet recorded",
    "round_evaluate": "learner round: both models evaluated, the numbers not yet recorded",
    "round_gate": "learner round: the gate decided, the decision not yet recorded",
    "round_promote": "learner round: the candidate's weights moved into versions/, the version not yet recorded",
}
ACTIONS = ("kill", "enospc", "sigint", "sigterm")


def _parse(spec: str) -> tuple[str, int | None, str]:
    parts = spec.split(":")
    point = parts[0]
    step = int(parts[1]) if len(parts) > 1 and parts[1] else None
    action = parts[2] if len(parts) > 2 else "kill"
    if point not in POINTS or action not in ACTIONS:
        raise ValueError(f"{ENV}={spec!r}: points are {', '.join(POINTS)}; actions are {', '.join(ACTIONS)}")
    return point, step, action


def fault(point: str, step: int, on_hit: Callable[[], None] | None = None) -> None:
    """Inject the configured fault if it is set for this point and step (`on_hit` runs first)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, at, action = _parse(spec)
    if target != point or (at is not None and at != step):
        return
    if on_hit is not None:
        on_hit()
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    else:
        os.kill(os.getpid(), signal.SIGINT if action == "sigint" else signal.SIGTERM)
