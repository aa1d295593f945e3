"""The exceptions a user sees, and the exit status each gives on the command line.

| exception | exit status | meaning |
|---|---|---|
| `UserError` | 2 | a mistake in the input (file, line, field or option named); nothing was written |
| `RunFailed` | 1 | the run could not go on (non-finite steps, full disk); the last checkpoint is intact |
| `RunStopped` | 128 + signal (130 Ctrl-C, 143 SIGTERM) | stopped on purpose after writing a checkpoint; `--resume` continues |

The CLI prints `error: MESSAGE` (a stop: its own "Stopped by ..." line, since a stop asked for is not an
error) and exits with the status, without a traceback.
"""

from __future__ import annotations

import signal


class UserError(Exception):
    """A mistake in the user's input: the message says where it is and what to do."""

    exit_code = 2


class RunFailed(Exception):
    """The run could not go on; the message says what was kept and how to continue."""

    exit_code = 1


class RunStopped(Exception):
    """The run stopped on purpose (a signal), after writing a checkpoint it can resume from; the message
    starts with "Stopped" (e.g. "Stopped by SIGTERM after step 3; ...")."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = int(signum)

    def __reduce__(self):  # keeps the signal when raised in a worker process and re-raised in its parent
        return (type(self), (str(self), self.signum))

    @property
    def exit_code(self) -> int:
        # The shell's convention for "ended by signal N", so schedulers treat it as a pre-emption.
        return 128 + self.signum
