"""Sampling completions: the `Sampler` contract (base.py), building one (engines.py), our decode loop
(decode.py), vLLM (vllm_engine.py), and truncated importance sampling for engines whose numbers differ
from the trainer's (importance.py).

Every engine is registered in `selfdistill.registry.ENGINE_INFO`; `make_sampler` builds the one a
name chooses, and every caller (training, replay answers, evaluation, drift, the ceiling) generates
through it. docs/rollout-engines.md shows how to add one.
"""

from selfdistill.registry import engine_class
from selfdistill.sampling.base import Completions, EngineMemory, Sampler, SamplingSettings, rollout_seed
from selfdistill.sampling.decode import generate
from selfdistill.sampling.engines import check_engine, make_sampler, sampling_from

__all__ = [
    "Completions",
    "EngineMemory",
    "Sampler",
    "SamplingSettings",
    "rollout_seed",
    "generate",
    "engine_class",
    "make_sampler",
    "sampling_from",
    "check_engine",
]
