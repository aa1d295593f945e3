"""Resolving `--task`: a JSONL file of records, or a built-in task by name.

A name that is not a file is looked up among the built-in tasks (`selfdistill.tasks.catalog`) and its
evaluation split is used, graded by the task's first metric.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from selfdistill.data.records import Record, load_records
from selfdistill.errors import UserError
from selfdistill.tasks.catalog import get_task, make_task

# Graders guessed from the fields of a file, when --grader is not given.
_GUESS_BY_FIELD = (("golden_answer", "toolalpaca"),)


def guess_grader(records: list[Record]) -> str:
    first = records[0]
    for field, grader in _GUESS_BY_FIELD:
        if field in first.meta:
            return grader
    if isinstance(first.prompt, list) and any(
        "<answer>" in m["content"] for m in first.prompt if m["role"] == "system"
    ):
        return "choice_tag"
    return "contains"


def named_task(name: str, seed: int = 0) -> tuple[list[Record], str | None]:
    """The evaluation split of the built-in task `name` (`make_task(name, seed)`).

    The grader is the task's first metric; a metric reading its gold answer from another field
    (e.g. a list of accepted answers) has that field copied into `answer`.
    """
    spec = get_task(name)
    records = list(make_task(name, seed).eval)
    metric = spec.metrics[0] if spec.metrics else None
    if metric is not None and metric.answer_field != "answer":
        records = [replace(r, answer=r.meta.get(metric.answer_field, r.answer)) for r in records]
    return records, metric.grader if metric is not None else None


def resolve_task(
    task: str, grader: str | None = None, limit: int | None = None, seed: int = 0
) -> tuple[list[Record], str]:
    """(records, grader name) for a file path or a built-in task name."""
    path = Path(task)
    if path.suffix in (".jsonl", ".json") or path.exists() or "/" in task:
        records = load_records(path, require_demonstration=False, origin="--task")
        default = guess_grader(records)
    else:
        records, default = named_task(task, seed)
        default = default or guess_grader(records)
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be at least 1, got {limit}.")
        records = records[:limit]
    return records, grader or default
