"""What every built-in task is made of: its metrics, its splits and its spec.

The task generators (knowledge, science, tooluse) build on these; `selfdistill.tasks` keeps the
registry of them and re-exports these names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from selfdistill.data.records import Record


@dataclass(frozen=True)
class Metric:
    """One score of a task: a grader (from selfdistill.eval.graders) and the record field with the gold answer.

    When that field holds a list, the output scores the best over its alternatives (each one put
    in the record's `answer` in turn) - this is how a lenient list of accepted answers is graded.
    """

    name: str
    grader: str
    answer_field: str = "answer"


@dataclass
class TaskData:
    train: list[Record]
    eval: list[Record]
    documents: list[str] = field(default_factory=list)  # raw text, for continued pre-training
    extra: dict[str, list[Record]] = field(default_factory=dict)  # further evaluation splits, e.g. "ood"

    def splits(self) -> dict[str, list[Record]]:
        return {"train": self.train, "eval": self.eval, **self.extra}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    metrics: tuple[Metric, ...]
    make: Callable[[int, int], TaskData]  # (seed, size) -> splits; size = number of training records
    default_size: int = 200
    teacher_template: str = "plain"  # the template that gives this task its teacher ceiling on small models

    @property
    def graders(self) -> list[str]:
        return [m.grader for m in self.metrics]


def eval_size(size: int) -> int:
    """Evaluation records for a task of `size` training records: a quarter, at least 10."""
    return max(10, size // 4)
