"""The gate: promote a round's candidate only if it learned the new tasks without forgetting the others.

Both models, the version being served and the candidate, are evaluated in the round on the same
held-out records, probes and drift prompts, so every check compares paired numbers:

- each earlier task (one the round brought no new demonstrations for): its score may drop by at
  most `max_task_drop`; its held-out demonstration log-likelihood by at most `max_loglik_drop`;
- the prior-capability probes: their score may drop by at most `max_probe_drop`;
- drift: the candidate's KL from the served version on the drift prompts at most `max_drift`, and
  from the base model at most `max_base_drift` (nats/token);
- each new task (one the round trained on): its score must rise by at least `min_gain`.

A threshold set to None switches its check off. Every check is reported with its numbers, passed
or not, so the decision says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from selfdistill.config import Section


@dataclass
class GateSettings(Section):
    key: ClassVar[str] = "gate"

    max_task_drop: float | None = 0.05
    max_loglik_drop: float | None = None
    max_probe_drop: float | None = 0.05
    max_drift: float | None = None
    max_base_drift: float | None = None
    min_gain: float | None = 0.0

    def check(self) -> None:
        for name in ("max_task_drop", "max_loglik_drop", "max_probe_drop", "max_drift", "max_base_drift"):
            value = getattr(self, name)
            self._require(value is None or value >= 0, name, "must be >= 0 or null (no check)")


@dataclass
class Check:
    name: str  # e.g. "task tooluse: score drop"
    value: float | None
    limit: float
    passed: bool
    rule: str  # "<=" or ">="

    def line(self) -> str:
        shown = "n/a" if self.value is None else f"{self.value:+.4f}"
        verdict = "ok" if self.passed else "FAILED"
        return f"{self.name} {shown} (allowed {self.rule} {self.limit:g}): {verdict}"


def _at_most(name: str, value: float | None, limit: float | None, checks: list[Check]) -> None:
    if limit is None or value is None:
        return
    checks.append(Check(name, value, limit, value <= limit + 1e-12, "<="))


def decide(settings: GateSettings, current: dict, candidate: dict, new_tasks: list[str]) -> dict:
    """The decision on `candidate` against `current` (each {"tasks": {name: {"score", "loglik"}},
    "probes", "drift_from_base", "drift_from_current"}): {"promote", "checks", "reasons", "summary"}."""
    checks: list[Check] = []
    for task, now in current["tasks"].items():
        after = candidate["tasks"][task]
        if task in new_tasks:
            if settings.min_gain is not None and now.get("score") is not None:
                gain = after["score"] - now["score"]
                checks.append(
                    Check(
                        f"new task {task}: score gain", gain, settings.min_gain, gain >= settings.min_gain - 1e-12, ">="
                    )
                )
            continue
        if now.get("score") is not None:
            _at_most(f"task {task}: score drop", now["score"] - after["score"], settings.max_task_drop, checks)
        if now.get("loglik") is not None and after.get("loglik") is not None:
            _at_most(
                f"task {task}: log-likelihood drop", now["loglik"] - after["loglik"], settings.max_loglik_drop, checks
            )
    if current.get("probes") is not None and candidate.get("probes") is not None:
        _at_most("probes: score drop", current["probes"] - candidate["probes"], settings.max_probe_drop, checks)
    _at_most(
        "drift from the served version (KL nats/token)", candidate.get("drift_from_current"), settings.max_drift, checks
    )
    _at_most(
        "drift from the base model (KL nats/token)", candidate.get("drift_from_base"), settings.max_base_drift, checks
    )
    failed = [c for c in checks if not c.passed]
    promote = not failed
    if promote:
        summary = f"promoted: all {len(checks)} checks passed"
    else:
        summary = "rejected: " + "; ".join(c.line() for c in failed)
    return {
        "promote": promote,
        "summary": summary,
        "checks": [c.__dict__ for c in checks],
        "reasons": [c.line() for c in (failed or checks)],
    }
