"""The model a server answers with: the learner's current version, swapped when another one is promoted.

A request takes the `Served` that is current when it starts and keeps it to its end, so a request in
flight finishes on the version it started with while the next one is already answered by the new
one. Loading a new version happens beside the serving (in the watcher's thread); the swap itself is
one reference assignment. On a CPU one model answers one request at a time (`Served.lock`): two
decode loops would only share the same cores.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from selfdistill.data.prompts import PromptBuilder
from selfdistill.data.records import Record
from selfdistill.learner import Learner
from selfdistill.sampling import SamplingSettings, make_sampler

log = logging.getLogger(__name__)


@dataclass
class Served:
    """One loaded version: its weights, tokenizer, how prompts are built, and how it generates."""

    version: int
    path: str
    model: object
    tokenizer: object
    builder: PromptBuilder
    stop_ids: list[int]
    max_new_tokens: int
    lock: threading.Lock = field(default_factory=threading.Lock)

    def sampler(self, temperature: float, top_p: float, max_new_tokens: int):
        settings = SamplingSettings(
            max_new_tokens=max_new_tokens,
            stop_token_ids=tuple(self.stop_ids),
            pad_token_id=self.tokenizer.pad_token_id,
            temperature=temperature,
            top_p=top_p,
            batch_size=1,
        )
        return make_sampler(self.model, settings, engine="decode")

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The prompt the model sees for chat messages: exactly the student prompt a demonstration with these
        messages as its prompt trains on."""
        return self.builder.student_ids(Record(prompt=messages, demonstration=""))

    def text_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]


def load_served(learner: Learner, version: int, max_new_tokens: int) -> Served:
    from selfdistill.config import load_config
    from selfdistill.models import load_model
    from selfdistill.models.loading import stop_token_ids

    path = learner.model_path(version)
    model, tokenizer = load_model(path, torch.float32)
    model.eval()
    cfg = load_config(overrides={**learner.settings.config, "method": learner.settings.method})
    builder = PromptBuilder.unlimited(tokenizer, cfg.data.teacher_template, cfg.data.system_prompt)
    return Served(version, path, model, tokenizer, builder, stop_token_ids(model, tokenizer), max_new_tokens)


class ModelHost:
    """Holds the served version and swaps in the learner's current one (see the module's docstring)."""

    def __init__(self, learner: Learner, max_new_tokens: int = 256, poll_seconds: float = 1.0):
        self.learner = learner
        self.max_new_tokens = max_new_tokens
        self.poll_seconds = poll_seconds
        self._served = load_served(learner, learner.current_version(), max_new_tokens)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.swaps = 0

    @property
    def served(self) -> Served:
        return self._served

    def refresh(self) -> bool:
        """Load and serve the learner's current version if it is not the one served; True if it swapped."""
        current = self.learner.current_version()
        if current == self._served.version:
            return False
        loaded = load_served(self.learner, current, self.max_new_tokens)
        self._served, previous = loaded, self._served.version
        self.swaps += 1
        log.info("serving version %d (was %d)", current, previous)
        return True

    def start(self) -> None:
        """Watch the learner: a promotion or a rollback (from this server or the command line) is served next."""

        def watch() -> None:
            while not self._stop.wait(self.poll_seconds):
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001 - a failed load keeps the served version; logged, tried again
                    log.exception(
                        "could not load the learner's current version; still serving %d", self._served.version
                    )

        self._watcher = threading.Thread(target=watch, daemon=True, name="selfdistill-watch")
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)


def wait_for(condition, timeout: float, every: float = 0.2) -> bool:
    """Poll `condition()` until it is true or `timeout` seconds passed."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(every)
    return bool(condition())
