"""Resolving `--task`: a JSONL file of records, or a built-in task by name.

Built-in tasks live in `selfdistill.tasks` (written separately); when that module exists,
`get_task(name)` is expected to return an object with `records` (or `records()`) and a
`grader` name. Until then only files work, and a name gets a clear message.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from selfdistill.data.records import Record, load_records
from selfdistill.errors import UserError

# Graders guessed from the fields of a file, when --grader is not given.
_GUESS_BY_FIELD = (("golden_answer", "toolalpaca"),)


def guess_grader(records: list[Record]) -> str:
    first = records[0]
    for field, grader in _GUESS_BY_FIELD:
        if field in first.meta:
            return grader
    if isinstance(first.prompt, list) and any("<answer>" in m["content"] for m in first.prompt if m["role"] == "system"):
        return "choice_tag"
    return "contains"


def named_task(name: str) -> tuple[list[Record], str | None]:
    """The hook for built-in tasks: `selfdistill.tasks.get_task(name)` when that module exists."""
    try:
        tasks = importlib.import_module("selfdistill.tasks")
    except ModuleNotFoundError:
        raise UserError(f"Task {name!r}: no such file, and this version has no built-in tasks; pass a .jsonl file.") from None
    task = tasks.get_task(name)
    records = task.records() if callable(getattr(task, "records", None)) else task.records
    return list(records), getattr(task, "grader", None)


def resolve_task(task: str, grader: str | None = None, limit: int | None = None) -> tuple[list[Record], str]:
    """(records, grader name) for a file path or a built-in task name."""
    path = Path(task)
    if path.suffix in (".jsonl", ".json") or path.exists() or "/" in task:
        records = load_records(path, require_demonstration=False)
        default = guess_grader(records)
    else:
        records, default = named_task(task)
        default = default or guess_grader(records)
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be at least 1, got {limit}.")
        records = records[:limit]
    return records, grader or default
