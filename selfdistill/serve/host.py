"""The model a server answers with: the learner's current version, swapped when another one is promoted.

A request holds a lease on the `Served` that is current when it starts (`ModelHost.lease`) and keeps it to
its end, so a request in flight finishes on the version it started with while the next one is already
answered by the new one. Preparing a new version happens beside the serving (in the watcher's thread).
With an engine that holds two versions at once (our decode loop: two models in memory) the swap is one
reference assignment. With one that holds one set of weights (an in-process vLLM engine loads the new
weights into the old ones' place) the swap waits until the requests in flight have finished, holding new
ones back meanwhile (they wait, none is refused), then loads the weights and lets them through.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

from selfdistill.data.prompts import PromptBuilder
from selfdistill.data.records import Record
from selfdistill.errors import UserError
from selfdistill.learner import Learner
from selfdistill.serve.engines import DecodeServing, GenerationRequest, ServingEngine

log = logging.getLogger(__name__)


@dataclass
class Served:
    """One version as its engine serves it: its tokenizer, how prompts are built, its stop tokens, and the
    engine's handle on its weights."""

    version: int
    path: str
    tokenizer: object
    builder: PromptBuilder
    stop_ids: list[int]
    engine: ServingEngine
    handle: object

    def stream(self, prompt_ids: list[int], request: GenerationRequest) -> Iterator[int]:
        """The completion's tokens as they are generated, up to and including a stop token."""
        return self.engine.stream(self.handle, prompt_ids, request, self.stop_ids)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The prompt the model sees for chat messages: exactly the student prompt a demonstration with these
        messages as its prompt trains on."""
        return self.builder.student_ids(Record(prompt=messages, demonstration=""))

    def text_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]


def load_served(learner: Learner, version: int, engine: ServingEngine) -> Served:
    """`version` made ready to serve by `engine` (its weights loaded or registered), with its tokenizer."""
    from selfdistill.config import load_config
    from selfdistill.models.loading import load_tokenizer, resolve_model_path, stop_token_ids

    path = learner.model_path(version)
    tokenizer = load_tokenizer(path)
    cfg = load_config(overrides={**learner.settings.config, "method": learner.settings.method})
    builder = PromptBuilder.unlimited(tokenizer, cfg.data.teacher_template, cfg.data.system_prompt)
    directory = resolve_model_path(path)
    stop_ids = stop_token_ids(SimpleNamespace(generation_config=_generation_config(directory)), tokenizer)
    handle = engine.prepare(learner, version, directory)
    return Served(version, path, tokenizer, builder, stop_ids, engine, handle)


def _generation_config(directory: str):
    """The version's generation config (its end-of-turn ids), as loading the model would give it."""
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(directory)
    except OSError:  # no generation_config.json: derived from the model's config, as from_pretrained does
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(directory))


def make_serving_engine(spec: str, *, precision: str = "auto", api_key: str | None = None) -> ServingEngine:
    """The engine `sdft serve --engine` names: decode, vllm, or the URL of a vLLM server."""
    if spec == "decode":
        return DecodeServing()
    if spec == "vllm":
        from selfdistill.serve.vllm_engines import InProcessVLLM

        return InProcessVLLM(precision=precision)
    if spec.startswith(("http://", "https://")):
        from selfdistill.serve.vllm_engines import RemoteVLLM

        return RemoteVLLM(spec, api_key=api_key)
    raise UserError(f"--engine {spec!r}: expected decode, vllm, or the URL of a vLLM server (http://HOST:PORT)")


class _Leases:
    """Many readers (requests) or one writer (a swap that needs no request running); a waiting writer holds
    new readers back, so a swap is not starved by a steady stream of requests."""

    def __init__(self):
        self._changed = threading.Condition()
        self._readers = 0
        self._writers = 0  # waiting or writing

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: self._writers == 0)
            self._readers += 1
        try:
            yield
        finally:
            with self._changed:
                self._readers -= 1
                self._changed.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._changed:
            self._writers += 1
            self._changed.wait_for(lambda: self._readers == 0)
        try:
            yield
        finally:
            with self._changed:
                self._writers -= 1
                self._changed.notify_all()


class ModelHost:
    """Holds the served version and swaps in the learner's current one (see the module's docstring)."""

    def __init__(self, learner: Learner, engine: ServingEngine | None = None, poll_seconds: float = 1.0):
        self.learner = learner
        self.engine = engine or DecodeServing()
        self.poll_seconds = poll_seconds
        self._leases = _Leases()
        self._served = load_served(learner, learner.current_version(), self.engine)
        self.engine.activate(self._served.handle)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.swaps = 0

    @property
    def served(self) -> Served:
        """The version serving now (for reporting; a request takes a `lease`)."""
        return self._served

    @contextmanager
    def lease(self) -> Iterator[Served]:
        """The current version, kept for the request until it leaves the block."""
        with self._leases.read():
            yield self._served

    def refresh(self) -> bool:
        """Load and serve the learner's current version if it is not the one served; True if it swapped."""
        current = self.learner.current_version()
        if current == self._served.version:
            return False
        loaded = load_served(self.learner, current, self.engine)
        previous = self._served
        # An engine with one set of weights swaps once the requests on the old ones have finished (new ones wait).
        with self._leases.write() if self.engine.one_version_at_a_time else nullcontext():
            self.engine.activate(loaded.handle)
            self._served = loaded
        self.engine.release(previous.handle)
        self.swaps += 1
        log.info("serving version %d (was %d)", current, previous.version)
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
        self.engine.close()


def wait_for(condition, timeout: float, every: float = 0.2) -> bool:
    """Poll `condition()` until it is true or `timeout` seconds passed."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(every)
    return bool(condition())
