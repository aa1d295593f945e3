"""The list of built-in tasks: look one up by name, or make its records."""

from __future__ import annotations

from selfdistill.errors import UserError
from selfdistill.tasks import knowledge, science, tooluse
from selfdistill.tasks.base import TaskData, TaskSpec

# name -> task, in the order `sdft data list` shows them. A new task adds its SPEC here.
TASKS: dict[str, TaskSpec] = {
    spec.name: spec for spec in (tooluse.SPEC, tooluse.HINTED_SPEC, knowledge.SPEC, science.SPEC)
}


def list_tasks() -> list[TaskSpec]:
    return list(TASKS.values())


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UserError(f"Unknown task {name!r}; built-in tasks: {', '.join(TASKS)}.")
    return TASKS[name]


def make_task(name: str, seed: int = 0, size: int | None = None) -> TaskData:
    spec = get_task(name)
    size = spec.default_size if size is None else size
    if size < 1:
        raise UserError(f"Task {name!r}: size must be at least 1, got {size}.")
    return spec.make(seed, size)
