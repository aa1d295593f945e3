"""How a step's statistics are combined and logged: each statistic's name says its reduction.

A method's `build_items` and `loss` return statistics as {name: float}. The loop adds them up over
the step's micro-batches and over the processes, then logs them in metrics.jsonl. How a value is
combined and what is logged is read from the end of its name, so a new statistic needs no edit
here and cannot be logged as a meaningless raw sum:

| returned as | combined by | logged as |
|---|---|---|
| `X_sum` (no `X_count`) | sum | `X` = sum / the step's loss tokens (a mean per trained token) |
| `X_sum` and `X_count` | sum, sum | `X` = sum / count (a mean over counts of its own, e.g. sequences); left out when the count is 0 |
| `X_total` | sum | `X` = the sum (e.g. examples of a kind in the step) |
| `X_min` / `X_max` | min / max | `X_min` / `X_max` (an infinite value, from no data, is left out) |
| `time_X` | sum over micro-batches, max over processes | `time_X`: the slowest process's seconds |

A name without one of these endings is refused with a message saying how to name it.
"""

from __future__ import annotations

import math

SUFFIXES = ("_sum", "_count", "_total", "_min", "_max")


def check_name(name: str) -> None:
    """Refuse a statistic whose name does not say how it is reduced."""
    if name.startswith("time_") or name.endswith(SUFFIXES):
        return
    raise ValueError(
        f"statistic {name!r} does not say how it is combined over micro-batches and processes: name it "
        f"{name}_sum (logged as a mean per loss token, or over {name}_count), {name}_total (logged as the sum), "
        f"{name}_min / {name}_max, or time_{name} (seconds)"
    )


def combine(total: dict[str, float], part: dict[str, float]) -> None:
    """Adds a micro-batch's statistics into the step's (in place): `*_min` / `*_max` by min / max, the rest by sum."""
    for key, value in part.items():
        check_name(key)
        if key not in total:
            total[key] = value
        elif key.endswith("_min"):
            total[key] = min(total[key], value)
        elif key.endswith("_max"):
            total[key] = max(total[key], value)
        else:
            total[key] += value


def logged(summed: dict[str, float], loss_tokens: float) -> dict[str, float]:
    """The metrics.jsonl values of a step's combined statistics (see the table above)."""
    per_token = max(loss_tokens, 1.0)
    out: dict[str, float] = {}
    for key, value in summed.items():
        if key.endswith("_sum"):
            name = key.removesuffix("_sum")
            count = summed.get(name + "_count")
            if count is None:
                out[name] = value / per_token
            elif count > 0:  # a mean over nothing is left out, not logged as 0
                out[name] = value / count
        elif key.endswith("_total"):
            out[key.removesuffix("_total")] = value
        elif key.endswith(("_min", "_max")):
            if math.isfinite(value):
                out[key] = value
        elif not key.endswith("_count"):
            out[key] = value  # time_*
    return out
