"""The contract every rollout engine keeps: `Sampler`, what it returns (`Completions`), and the seeds.

A sampler is built once for a run's rollout settings (`selfdistill.sampling.make_sampler`), then
used as: `sync(model)` whenever the model's weights may have changed since the last sample, then
`generate(prompts, seeds)`; `close()` when nothing will be sampled any more.
docs/rollout-engines.md describes the contract and how to add an engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


def rollout_seed(seed: int, position: int, rollout: int) -> int:
    """The sampling seed of one completion: a function of the run seed and its place in the data stream."""
    return (seed * 1_000_003 + position * 1_009 + rollout) % (2**63 - 1)


@dataclass
class Completions:
    ids: list[list[int]]  # generated tokens, up to and including the stop token
    finished: list[bool]  # False when the completion hit max_new_tokens (clipped)
    # Each sampled token's log-probability under the sampler, when the engine reports it (vLLM);
    # None from our decode loop, whose numbers are the trainer's own.
    logprobs: list[list[float]] | None = None


class Sampler(ABC):
    """Completes token prompts with the settings it was built with (stop tokens, length, temperature, top-p).

    `copies_weights`: the engine samples from a copy of the weights of its own, which `sync` brings up to
    the trainer's (its seconds are logged as `time_weight_sync`); False when it samples from the model itself.
    """

    copies_weights = False

    @classmethod
    def check_installed(cls) -> None:
        """Raise a UserError saying how to install what this engine needs (nothing, by default)."""
        return None

    @classmethod
    @abstractmethod
    def from_config(
        cls, cfg, model, *, stop_token_ids: list[int], pad_token_id: int, precision: str, max_prompt_tokens: int
    ) -> Sampler:
        """The sampler a run's settings (cfg.rollout, ...) describe, sampling from `model`'s weights."""

    @abstractmethod
    def generate(self, prompts: list[list[int]], seeds: list[int], *, desc: str | None = None) -> Completions:
        """Complete every prompt (token ids), with one seed per prompt (unused at temperature 0).

        A completion may depend only on its prompt, its seed and the weights (not on the other
        prompts of the call), where the engine can promise it; `desc` labels a progress bar.
        """

    @abstractmethod
    def sync(self, model) -> float:
        """Sample from `model`'s current weights from now on; returns the seconds it took."""

    def close(self) -> None:
        """Release what the sampler holds (an engine's memory); it is not used afterwards."""
        return None
