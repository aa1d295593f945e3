"""Built-in learning tasks: deterministic generators of train / evaluation records.

Each task is sized for a CPU run on the embedded 135M model and designed so that the model,
shown the demonstration (teacher prompt), does much better than without it (student prompt):
that gap, the "teacher ceiling", is what SDFT can distil. `get_task(name).make(seed, size)`
returns the splits; the same seed always gives the same records, and the splits share no item.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from selfdistill.data.records import Record
from selfdistill.errors import UserError


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


def _registry() -> dict[str, TaskSpec]:
    # Imported here so that listing tasks does not import every generator at package import.
    from selfdistill.tasks import knowledge, science, tooluse

    return {spec.name: spec for spec in (tooluse.SPEC, tooluse.HINTED_SPEC, knowledge.SPEC, science.SPEC)}


def list_tasks() -> list[TaskSpec]:
    return list(_registry().values())


def get_task(name: str) -> TaskSpec:
    tasks = _registry()
    if name not in tasks:
        raise UserError(f"Unknown task {name!r}; built-in tasks: {', '.join(tasks)}.")
    return tasks[name]


def make_task(name: str, seed: int = 0, size: int | None = None) -> TaskData:
    spec = get_task(name)
    size = spec.default_size if size is None else size
    if size < 1:
        raise UserError(f"Task {name!r}: size must be at least 1, got {size}.")
    return spec.make(seed, size)
