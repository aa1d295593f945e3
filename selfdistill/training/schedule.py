"""The learning-rate schedule: linear warm-up, then cosine decay, and no optimizer step at rate 0.

With W = ceil(train.warmup_ratio · N) warm-up steps of N, step k (0-based) uses train.lr times

    (k + 1) / (W + 1)                     for k < W    (warm-up)
    (1 + cos(π · (k − W) / (N − W))) / 2  for k >= W   (cosine decay)

Both ends of the schedule at 0 lie outside the steps that run: the warm-up line starts at 0 one
step before the first and reaches the full rate at step W, the first after the warm-up; the
cosine falls from the full rate at step W to 0 one step after the last. A step at rate 0 would
compute a gradient and change nothing, and with the usual k / W warm-up the first step always
did, so a one-step run trained nothing. Without warm-up (W = 0) the rates are exactly those of
transformers' get_cosine_schedule_with_warmup: step 0 at the full rate.
"""

from __future__ import annotations

import functools
import logging
import math

import torch

log = logging.getLogger(__name__)


def warmup_steps(warmup_ratio: float, steps: int) -> int:
    return math.ceil(warmup_ratio * steps)


def rate_factor(step: int, warmup: int, steps: int) -> float:
    """The fraction of the peak rate that 0-based optimizer step `step` uses (see the module's formula)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    decay = max(1, steps - warmup)
    # progress computed as one division, then π · progress: the same floats as transformers' schedule.
    progress = min(step - warmup, decay) / decay
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_ratio: float, steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of a run of `steps` optimizer steps; warns when the warm-up covers every step.

    A partial, not a closure or an object with attributes: LambdaLR's state_dict saves a callable
    object's attributes, and a partial has none, so checkpoints hold only the step count and rates.
    """
    warmup = warmup_steps(warmup_ratio, steps)
    if warmup >= steps:
        peak = optimizer.param_groups[0]["lr"]
        log.warning(
            "train.warmup_ratio=%g makes all %d steps warm-up steps: no step trains at the full train.lr=%g "
            "(the last uses %.3g); lower train.warmup_ratio (0 starts at the full rate) or train more steps",
            warmup_ratio,
            steps,
            peak,
            peak * rate_factor(steps - 1, warmup, steps),
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(rate_factor, warmup=warmup, steps=steps))
