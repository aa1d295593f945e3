"""What the `sdft data` commands run: a built-in task's files, and the teacher ceiling of a model on a task."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from selfdistill.errors import UserError
from selfdistill.files import write_jsonl
from selfdistill.tasks.settings import CeilingSettings, MakeSettings


def write_task_files(settings: MakeSettings) -> list[tuple[Path, int, str]]:
    """Write each split as SPLIT.jsonl (and documents.jsonl) under settings.out; (path, count, what) per file."""
    from selfdistill.tasks import make_task

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


class Ceiling(NamedTuple):
    results: list  # a CeilingResult per prompt: the student's, then each template's
    records: int  # records measured
    precision: str  # the precision used ('auto' resolved for the device)


def measure_ceiling(settings: CeilingSettings) -> Ceiling:
    """Greedy accuracy without the demonstration (student) and with it (teacher), and the log-likelihood
    gain; with settings.outputs, every prompt's outputs are written there."""
    from selfdistill.models import load_model, stop_token_ids
    from selfdistill.precision import resolve_precision
    from selfdistill.tasks import ceiling

    records, metrics, recommended = _records(settings)
    templates = [recommended if t == "task" else t for t in settings.template] or list(
        dict.fromkeys(["paper", "plain", recommended])
    )
    records = records[: settings.limit]
    lm, tokenizer = load_model(settings.model)
    precision = resolve_precision(settings.precision, next(lm.parameters()).device)
    results = ceiling.measure(
        lm,
        tokenizer,
        records,
        metrics,
        templates=tuple(templates),
        max_new_tokens=settings.max_new_tokens,
        precision=precision,
        batch_size=settings.batch_size,
        stop_token_ids=stop_token_ids(lm, tokenizer),
        loglik=settings.loglik,
    )
    if settings.outputs:
        rows = [{"prompt": r.prompt, "index": i, "output": o} for r in results for i, o in enumerate(r.outputs)]
        write_jsonl(settings.outputs, rows)
    return Ceiling(results, len(records), precision)


def _records(settings: CeilingSettings) -> tuple[list, tuple, str]:
    """(records of the split, metrics, the recommended template) of a built-in task or a data source."""
    from selfdistill.tasks import get_task, list_tasks, make_task
    from selfdistill.tasks.loaders import load_dataset_records

    task, split = settings.task, settings.split
    if task in {spec.name for spec in list_tasks()}:
        spec = get_task(task)
        splits = make_task(task, settings.seed, settings.size).splits()
        if split not in splits:
            raise UserError(f"Task {task!r} has no split {split!r}; it has {', '.join(splits)}.")
        return splits[split], spec.metrics, spec.teacher_template
    records = load_dataset_records(task, format=settings.format, split="train" if split == "eval" else split)
    if not records:
        raise UserError(f"{task}: no records.")
    return records, _file_metrics(task, records[: settings.limit], settings), "plain"


def _file_metrics(task: str, records: list, settings: CeilingSettings) -> tuple:
    """The metrics of a data file: --grader, or the grader `sdft eval` and `sdft diagnose` guess from the
    records; none when no record has the field the guessed grader reads (the demonstration log-likelihood
    is then measured alone). Every measured record is checked for its grader's field before the model is
    loaded, so a file with gaps fails at once rather than after generating."""
    from selfdistill.eval.evaluate import gold_rows
    from selfdistill.eval.graders import GOLD_FIELDS, check_gold_fields
    from selfdistill.tasks import Metric
    from selfdistill.tasks.resolve import guess_grader

    rows = gold_rows(records)
    if settings.grader:
        names, how = list(settings.grader), "chosen with --grader"
    else:
        names, how = [guess_grader(records)], "guessed from the file, as no --grader was given"
        fields = GOLD_FIELDS.get(names[0], ())
        if not any(row.get(f) is not None for _, row in rows for f in fields):
            if settings.loglik:
                return ()
            raise UserError(
                f"{task}: no record has {' or '.join(map(repr, fields))} to grade, and --no-loglik turns off the "
                "log-likelihood gain: nothing to measure. Drop --no-loglik, or give --grader."
            )
    for name in names:
        check_gold_fields(name, rows, how)
    return tuple(Metric(g, g) for g in names)
