"""Rounds started by the server, each in a process of its own, so requests keep being answered.

A round is `sdft learn round WORKDIR` in a child process (its own GPUs where the launcher gives it
some): the server only starts it, and the model host's watcher serves its version once the learner
promotes it. Rounds start on `POST /v1/rounds`, after `every` new demonstrations, or every
`interval` seconds when demonstrations are pending. One at a time: the learner's own lock refuses
a second, and the runner does not start one while its child runs.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from selfdistill.learner import Learner

log = logging.getLogger(__name__)


class RoundBusy(Exception):
    """A round is running already."""


class RoundRunner:
    def __init__(
        self, learner: Learner, every: int | None = None, interval: float | None = None, devices: str | None = None
    ):
        self.learner = learner
        # The GPUs rounds train on (CUDA_VISIBLE_DEVICES), away from the one the server's engine answers on;
        # several: the round runs under torchrun, one process per GPU, sharded as `sdft learn round` is there.
        self.devices = [d.strip() for d in devices.split(",") if d.strip()] if devices else []
        self.every = every
        self.interval = interval
        self.process: subprocess.Popen | None = None
        # The cores are split while a round runs: the round's process gets half of them, the server keeps the
        # rest. Both at torch's default (every core each) oversubscribe them: measured on 2 cores, a round took
        # 26 s instead of 7 s and chat p99 rose from 0.1 to 0.9 s (benchmarks/serve_load.py).
        self.cores = len(os.sched_getaffinity(0))
        self.round_threads = max(1, self.cores // 2)
        self._serving_threads = None
        self.log_path: Path | None = None
        self._lock = threading.Lock()
        self._last_start = time.monotonic()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, overrides: list[str] | tuple = ()) -> int:
        """Start a round; returns its number once the child has opened it. Raises RoundBusy while one runs,
        ValueError with the child's message when it could not open one (nothing to learn)."""
        with self._lock:
            if self.running():
                raise RoundBusy("a round is running; wait until it finishes")
            before, unfinished = self._newest_round()
            logs = self.learner.root / "rounds"
            logs.mkdir(parents=True, exist_ok=True)
            self.log_path = logs / "serve-round.log"
            command = self.command(overrides)
            env = {**os.environ, "SELFDISTILL_PROGRESS": "lines", "OMP_NUM_THREADS": str(self.round_threads)}
            if self.devices:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(self.devices)
            with open(self.log_path, "w") as out:
                self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
            self._share_cores()
            self._last_start = time.monotonic()
            if unfinished:  # a round a kill interrupted: the child continues it
                return before
            while True:  # the round exists once the child has opened it (or the child ended without one)
                newest, _ = self._newest_round()
                if newest is not None and newest != before:
                    return newest
                if self.process.poll() is not None:
                    message = self.log_path.read_text(errors="replace").strip().splitlines()
                    raise ValueError(message[-1] if message else "the round could not start")
                time.sleep(0.1)

    def command(self, overrides: list[str] | tuple = ()) -> list[str]:
        """`sdft learn round WORKDIR --set ...`, under torchrun when the round has several GPUs."""
        command = [sys.executable, "-m"]
        if len(self.devices) > 1:
            command += ["torch.distributed.run", "--standalone", f"--nproc_per_node={len(self.devices)}", "-m"]
        command += ["selfdistill.cli", "learn", "round", str(self.learner.root)]
        for item in overrides:
            command += ["--set", item]
        return command

    def _newest_round(self) -> tuple[int | None, bool]:
        """(the newest round's number or None, whether it is unfinished)."""
        newest = self.learner.round_info()
        if newest is None:
            return None, False
        return newest["number"], newest["stage"] != "done"

    def maybe_start(self) -> int | None:
        """Start a round when the pending demonstrations reached `every`, or `interval` passed with some pending."""
        if self.running():
            return None
        pending = self.learner.pending()
        due = (self.every and pending >= self.every) or (
            self.interval and pending and time.monotonic() - self._last_start >= self.interval
        )
        if not due:
            return None
        try:
            return self.start()
        except (RoundBusy, ValueError) as exc:
            log.info("no round started: %s", exc)
            return None

    def _share_cores(self) -> None:
        import torch

        if self._serving_threads is None:
            self._serving_threads = torch.get_num_threads()
        torch.set_num_threads(max(1, self.cores - self.round_threads))

    def _reclaim_cores(self) -> None:
        import torch

        if self._serving_threads is not None and not self.running():
            torch.set_num_threads(self._serving_threads)
            self._serving_threads = None

    def start_schedule(self) -> None:
        """Every second: give the server its cores back once a round ended; with `interval`, start a round
        when one is due (`maybe_start`)."""
        self._stopped = threading.Event()

        def tick() -> None:
            while not self._stopped.wait(1.0):
                try:
                    self._reclaim_cores()
                    if self.interval:
                        self.maybe_start()
                except Exception:  # noqa: BLE001 - the schedule goes on; the next tick tries again
                    log.exception("round schedule check failed")

        threading.Thread(target=tick, daemon=True, name="selfdistill-rounds").start()

    def stop(self) -> None:
        """Stop the schedule. A running round is left to finish on its own: its result is the learner's, and a
        round stopped half-way is continued by the next one."""
        if getattr(self, "_stopped", None) is not None:
            self._stopped.set()
        self.process = None
