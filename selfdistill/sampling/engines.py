"""Building a sampler: the engine a name chooses (from the registry), for one set of sampling settings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from selfdistill.registry import engine_class
from selfdistill.sampling.base import Sampler, SamplingSettings


def check_engine(cfg) -> None:
    """Fail now, with how to install it, when the run's engine (rollout.engine) cannot run here
    (before a run writes anything)."""
    engine_class(cfg.rollout.engine).check_installed()


def make_sampler(
    model,
    settings: SamplingSettings,
    *,
    engine: str = "decode",
    cfg=None,
    max_prompt_tokens: int | None = None,
) -> Sampler:
    """The sampler of the engine registered as `engine`, for `settings`, sampling from `model`'s weights.

    `engine` is explicit, never read from `cfg`: a training run passes cfg.rollout.engine itself.
    `cfg` is a training Config whose settings of the engine's own apply (rollout.vllm_*, train.seed);
    None: the engine's defaults. `max_prompt_tokens` is the longest prompt it will be given (default
    with a cfg: data.max_prompt_tokens, the student prompt's limit), which an engine with a fixed
    context sizes itself by.
    """
    if max_prompt_tokens is None and cfg is not None:
        max_prompt_tokens = cfg.data.max_prompt_tokens
    return engine_class(engine).build(model, settings, cfg=cfg, max_prompt_tokens=max_prompt_tokens)


@contextmanager
def sampling_from(
    model,
    settings: SamplingSettings,
    *,
    engine: str = "decode",
    cfg=None,
    max_prompt_tokens: int | None = None,
    sampler: Sampler | None = None,
) -> Iterator[Sampler]:
    """A sampler synced to `model`'s weights, for one piece of work (evaluation, drift, the ceiling).

    `sampler`, when given, is used as it is (its own settings decide; it is left open for its owner);
    otherwise one is built with `make_sampler` and closed on leaving, so an engine's memory is freed.
    Synced either way: a shared engine may hold other weights.
    """
    own = sampler is None
    if own:
        sampler = make_sampler(model, settings, engine=engine, cfg=cfg, max_prompt_tokens=max_prompt_tokens)
    try:
        sampler.sync(model)
        yield sampler
    finally:
        if own:
            sampler.close()
