"""Sampling completions: the `Sampler` contract (base.py), our decode loop (decode.py), vLLM (vllm_engine.py),
and truncated importance sampling for engines whose numbers differ from the trainer's (importance.py).

`make_sampler` builds the sampler `rollout.engine` names; docs/rollout-engines.md shows how to add one.
"""

from __future__ import annotations

from selfdistill.sampling.base import Completions, Sampler, rollout_seed
from selfdistill.sampling.decode import DecodeSampler, generate
from selfdistill.sampling.vllm_engine import VLLMSampler

__all__ = ["Completions", "Sampler", "rollout_seed", "generate", "make_sampler", "check_engine", "ENGINES"]

# rollout.engine -> its Sampler. A new engine adds its class here and its name to config.RolloutEngine.
ENGINES: dict[str, type[Sampler]] = {"decode": DecodeSampler, "vllm": VLLMSampler}


def engine_class(cfg) -> type[Sampler]:
    """The Sampler class `rollout.engine` names: the one place the choice is read."""
    return ENGINES[cfg.rollout.engine]


def check_engine(cfg) -> None:
    """Fail now, with how to install it, when the chosen engine cannot run here (before a run writes anything)."""
    engine_class(cfg).check_installed()


def make_sampler(
    cfg,
    model,
    *,
    stop_token_ids: list[int],
    pad_token_id: int,
    precision: str,
    max_prompt_tokens: int | None = None,
) -> Sampler:
    """The sampler for a run's rollout settings, sampling from `model`'s weights.

    `stop_token_ids` end a completion (empty: every completion runs to rollout.max_new_tokens);
    `precision` is the run's compute precision (fp32 or bf16); `max_prompt_tokens` is the longest
    prompt it will be given (default data.max_prompt_tokens, the student prompt's limit), which an
    engine with a fixed context sizes it by.
    """
    longest = cfg.data.max_prompt_tokens if max_prompt_tokens is None else max_prompt_tokens
    return engine_class(cfg).from_config(
        cfg,
        model,
        stop_token_ids=list(stop_token_ids),
        pad_token_id=pad_token_id,
        precision=precision,
        max_prompt_tokens=longest,
    )
