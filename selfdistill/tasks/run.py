"""What `sdft data make` runs: a built-in task's files (the teacher ceiling is `selfdistill.eval.ceiling`)."""

from __future__ import annotations

from pathlib import Path

from selfdistill.files import write_jsonl
from selfdistill.tasks.catalog import make_task
from selfdistill.tasks.settings import MakeSettings


def write_task_files(settings: MakeSettings) -> list[tuple[Path, int, str]]:
    """Write each split as SPLIT.jsonl (and documents.jsonl) under settings.out; (path, count, what) per file."""
    data = make_task(settings.task, settings.seed, settings.size)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for split, records in data.splits().items():
        write_jsonl(out / f"{split}.jsonl", [r.to_dict() for r in records])
        written.append((out / f"{split}.jsonl", len(records), "records"))
    if data.documents:
        write_jsonl(out / "documents.jsonl", [{"text": d} for d in data.documents])
        written.append((out / "documents.jsonl", len(data.documents), "documents"))
    return written
