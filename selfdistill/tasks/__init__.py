"""Built-in learning tasks: deterministic generators of train / evaluation records.

Each task is sized for a CPU run on the embedded 135M model and designed so that the model,
shown the demonstration (teacher prompt), does much better than without it (student prompt):
that gap, the "teacher ceiling", is what SDFT can distil. `get_task(name).make(seed, size)`
returns the splits; the same seed always gives the same records, and the splits share no item.
"""

from __future__ import annotations

from selfdistill.errors import UserError
from selfdistill.tasks.base import Metric, TaskData, TaskSpec, eval_size

__all__ = ["Metric", "TaskData", "TaskSpec", "eval_size", "get_task", "list_tasks", "make_task"]


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
