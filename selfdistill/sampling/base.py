"""The contract every rollout engine keeps: `Sampler`, its settings (`SamplingSettings`), what it
returns (`Completions`), and the seeds.

A sampler is built once for its settings (`selfdistill.sampling.make_sampler`), then used as:
`sync(model)` whenever the model's weights may have changed since the last sample, then
`generate(prompts, seeds)`; `close()` when nothing will be sampled any more. Training, replay
answers, evaluation, drift and the teacher ceiling all generate through it.
docs/rollout-engines.md describes the contract and how to add an engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
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


@dataclass(frozen=True)
class SamplingSettings:
    """How a sampler completes prompts: the same for every call, except that a call may ask for fewer new tokens.

    `stop_token_ids` end a completion (empty: every completion runs to its budget of new tokens);
    `temperature` 0 is greedy; `precision` is the compute precision (fp32, or bf16 autocast).
    """

    max_new_tokens: int
    stop_token_ids: tuple[int, ...]
    pad_token_id: int
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16
    precision: str = "fp32"

    def __post_init__(self) -> None:
        # A list is accepted and stored as a tuple, so that settings stay hashable and unchanged.
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @classmethod
    def for_rollouts(cls, cfg, *, stop_token_ids, pad_token_id: int, precision: str) -> SamplingSettings:
        """A training run's rollout settings: cfg.rollout's length, temperature, top-p and batch size, with
        the run's stop tokens (empty with rollout.ignore_eos, which the caller decides), pad token and
        compute precision."""
        rollout = cfg.rollout
        return cls(
            max_new_tokens=rollout.max_new_tokens,
            stop_token_ids=tuple(stop_token_ids),
            pad_token_id=pad_token_id,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            batch_size=rollout.batch_size,
            precision=precision,
        )

    def budget(self, max_new_tokens: int | None) -> int:
        """The new tokens a call may generate: `max_new_tokens`, at most the built budget (None: the built one).

        An engine with a fixed context was sized for the built budget, so a call may not ask for more.
        """
        if max_new_tokens is None:
            return self.max_new_tokens
        if not 0 < max_new_tokens <= self.max_new_tokens:
            raise ValueError(f"max_new_tokens={max_new_tokens}: a call may ask for 1 to {self.max_new_tokens}")
        return max_new_tokens


@dataclass(frozen=True)
class EngineMemory:
    """The GPU memory an engine with weights of its own holds beside training, for `sdft plan`."""

    label: str  # the engine as messages name it ("vLLM")
    share: float  # the fraction of the GPU it may take: its weights and KV cache
    setting: str  # the setting `share` comes from ("rollout.vllm_gpu_memory"), for messages and suggestions
    precision: str  # its weights' precision: fp32 or bf16
    sleeps: bool  # it frees its share during the training step (taken while it syncs and samples)


class Sampler(ABC):
    """Completes token prompts with the `SamplingSettings` it was built with.

    `copies_weights`: the engine samples from a copy of the weights of its own, which `sync` brings up to
    the trainer's (its seconds are logged as `time_weight_sync`); False when it samples from the model itself.
    The classmethods below are asked before anything is built (set-up checks, `sdft plan`); their
    defaults suit an engine that samples from the trainer's model and needs nothing installed.
    """

    copies_weights = False

    @classmethod
    def check_installed(cls) -> None:
        """Raise a UserError saying how to install what this engine needs (nothing, by default)."""
        return None

    @classmethod
    def check_prompts(cls, cfg, model, records, encoded) -> None:
        """Raise a UserError, before a run writes anything, for a training prompt the engine could not
        complete (`encoded`: the records' EncodedRecords; an engine with a fixed context checks them)."""
        return None

    @classmethod
    def gpu_memory(cls, cfg, precision: str) -> EngineMemory | None:
        """The GPU memory the engine holds beside training for a run of `cfg` computing in `precision`;
        None: it samples with the trainer's model, in the trainer's memory (`sdft plan` traces it)."""
        return None

    @classmethod
    @abstractmethod
    def build(cls, model, settings: SamplingSettings, *, cfg, max_prompt_tokens: int | None) -> Sampler:
        """The sampler for `settings`, sampling from `model`'s weights.

        `cfg`: a training Config whose settings of this engine's own apply (rollout.vllm_*, train.seed),
        or None for the engine's defaults. `max_prompt_tokens`: the longest prompt it will be given
        (None: not known), which an engine with a fixed context sizes itself by.
        """

    @abstractmethod
    def generate(
        self,
        prompts: list[list[int]],
        seeds: list[int] | None,
        *,
        desc: str | None = None,
        max_new_tokens: int | None = None,
    ) -> Completions:
        """Complete every prompt (token ids), with one seed per prompt (None or unused at temperature 0).

        `max_new_tokens` lowers the built budget for this call (`SamplingSettings.budget`). A completion
        may depend only on its prompt, its seed and the weights (not on the other prompts of the call),
        where the engine can promise it; `desc` labels a progress bar.
        """

    def stream(self, prompt: list[int], seed: int | None, *, max_new_tokens: int | None = None) -> Iterator[int]:
        """One prompt's tokens, up to and including a stop token, for a server that streams them. This default
        generates the whole completion, then hands its tokens out; an engine that can hand each one out as it
        is decoded overrides it."""
        yield from self.generate([prompt], None if seed is None else [seed], max_new_tokens=max_new_tokens).ids[0]

    @abstractmethod
    def sync(self, model) -> float:
        """Sample from `model`'s current weights from now on; returns the seconds it took."""

    def close(self) -> None:
        """Release what the sampler holds (an engine's memory); it is not used afterwards."""
        return None
