"""Stopping on purpose: SIGINT / SIGTERM end a run cleanly instead of killing it mid-write.

`StopFlag` is the training loop's: the first signal asks for a checkpoint and a stop at the end
of the current step, a second one stops at once. `StopSignalsForwarded` is the continual runner's:
it passes each signal on to the worker processes that train in parallel, which then stop the
same way, so no worker outlives its parent.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal

from selfdistill.errors import RunStopped


class StopFlag:
    """SIGINT / SIGTERM ask the loop to checkpoint and stop at the end of the current step.

    A second signal stops at once: the step in flight is dropped, and so is a checkpoint being
    written (it is still in its temporary directory), so the newest complete checkpoint stays.
    """

    def __init__(self):
        self.requested = None
        self.previous = {}

    def __enter__(self):
        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.requested is not None:
                raise RunStopped(
                    f"Stopped at once by a second signal ({name}); the newest complete checkpoint "
                    "is kept. Run the same command with --resume to continue from it.",
                    signum,
                )
            self.requested = name

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self.previous.items():
            signal.signal(sig, old)


class StopSignalsForwarded(contextlib.AbstractContextManager):
    """While open, SIGINT / SIGTERM received here are passed on to this process's worker processes."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}

    def __enter__(self):
        def forward(signum, frame):
            self.signum = signum
            for child in multiprocessing.active_children():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signum)

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
                self.previous[sig] = signal.signal(sig, forward)
        return self

    def __exit__(self, *exc):
        for sig, old in self.previous.items():
            signal.signal(sig, old)
