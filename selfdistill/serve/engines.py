"""What answers a server's requests: the engine behind `sdft serve --engine`.

    decode     our decode loop on the version's weights in the server's process: one request at a time per
               model (on a CPU two decode loops would only share the same cores). The embedded model on a CPU.
    vllm       an in-process vLLM engine: requests are batched continuously; a promoted version's weights
               are loaded into the engine in place, once the requests in flight have finished.
    URL        an external vLLM server (`vllm serve BASE --enable-lora`, started with
               VLLM_ALLOW_RUNTIME_LORA_UPDATING=True): every version is loaded into it as one LoRA adapter
               against the base model, at run time, and requests name the version's adapter. For a learner
               that trains LoRA adapters (`--set model.lora.enabled=true` at `sdft learn init`).

An engine prepares a version beside the serving (`prepare`, in the host's watcher thread), makes it the one
it serves (`activate`), generates for a request (`stream`) and lets a version go (`release`). The host
(`selfdistill.serve.host`) decides when: `one_version_at_a_time` engines are swapped with no request running.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class GenerationRequest:
    """How one request asks to be completed (temperature 0 is greedy)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def sampling_seed(self) -> int | None:
        return None if self.temperature == 0 else (self.seed if self.seed is not None else 0)


class ServingEngine(ABC):
    name = "engine"
    # True: the engine holds one version's weights, so a swap waits until no request runs on the old ones.
    one_version_at_a_time = False

    @abstractmethod
    def prepare(self, learner, version: int, path: str) -> object:
        """A handle on `version` (weights in the directory `path`), ready for `activate`; may take long."""

    def activate(self, handle: object) -> None:
        """Serve `handle`'s version from now on (called with no request running when `one_version_at_a_time`)."""
        return None

    @abstractmethod
    def stream(self, handle: object, prompt_ids: list[int], request: GenerationRequest, stop_ids: list[int]):
        """The completion's tokens as they are generated, up to and including a stop token. Closing the
        iterator early (a client that went away) stops the generation."""

    def release(self, handle: object) -> None:
        """`handle`'s version is no longer served (requests already holding it may still finish on it)."""
        return None

    def close(self) -> None:
        return None


@dataclass
class _DecodeHandle:
    model: object
    pad_token_id: int
    lock: threading.Lock = field(default_factory=threading.Lock)


class DecodeServing(ServingEngine):
    """Our decode loop on the version's fp32 weights, loaded into the server's process."""

    name = "decode"

    def prepare(self, learner, version: int, path: str) -> _DecodeHandle:
        from selfdistill.models import load_model

        model, tokenizer = load_model(path, torch.float32)
        model.eval()
        return _DecodeHandle(model, tokenizer.pad_token_id)

    def stream(self, handle: _DecodeHandle, prompt_ids, request: GenerationRequest, stop_ids) -> Iterator[int]:
        from selfdistill.sampling import SamplingSettings, make_sampler

        settings = SamplingSettings(
            max_new_tokens=request.max_tokens,
            stop_token_ids=tuple(stop_ids),
            pad_token_id=handle.pad_token_id,
            temperature=request.temperature,
            top_p=request.top_p,
            batch_size=1,
        )
        sampler = make_sampler(handle.model, settings, engine="decode")
        with handle.lock:
            yield from sampler.stream(prompt_ids, request.sampling_seed)
