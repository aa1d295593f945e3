"""`sdft data`: list, show, make built-in tasks, and measure a model's teacher ceiling."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from selfdistill.errors import UserError
from selfdistill.files import write_jsonl
from selfdistill.precision import PRECISIONS, resolve_precision

data_app = typer.Typer(
    help="Built-in learning tasks, dataset loaders and the teacher-ceiling diagnostic.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


@data_app.command("list")
def list_command() -> None:
    """The built-in tasks, their graders and default size."""
    from selfdistill.tasks import list_tasks

    for spec in list_tasks():
        graders = ", ".join(f"{m.name}={m.grader}" for m in spec.metrics)
        typer.echo(
            f"{spec.name:<10} {spec.description}\n{'':<10} graders: {graders}; default size {spec.default_size}; "
            f"teacher template {spec.teacher_template!r}"
        )


@data_app.command("show")
def show_command(
    task: str,
    seed: int = typer.Option(0, help="Generator seed."),
    size: int = typer.Option(None, help="Training records (default: the task's)."),
    count: int = typer.Option(2, help="Records to print from each split."),
) -> None:
    """Print a few generated records of each split, and the split sizes."""
    from selfdistill.tasks import make_task

    data = make_task(task, seed, size)
    for split, records in data.splits().items():
        typer.secho(f"== {split}: {len(records)} records", bold=True)
        for record in records[:count]:
            typer.echo(json.dumps(record.to_dict(), indent=2, ensure_ascii=False))
    if data.documents:
        typer.secho(f"== documents: {len(data.documents)}", bold=True)
        for doc in data.documents[:count]:
            typer.echo(doc)


@data_app.command("make")
def make_command(
    task: str,
    out: Path = typer.Option(..., help="Directory for the JSONL files."),
    seed: int = typer.Option(0, help="Generator seed: the same seed gives identical files."),
    size: int = typer.Option(None, help="Training records (default: the task's)."),
) -> None:
    """Write TRAIN/EVAL (and other) splits as JSONL: train.jsonl, eval.jsonl, [ood.jsonl, documents.jsonl]."""
    from selfdistill.tasks import make_task

    data = make_task(task, seed, size)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory.")
    out.mkdir(parents=True, exist_ok=True)
    for split, records in data.splits().items():
        write_jsonl(out / f"{split}.jsonl", [r.to_dict() for r in records])
        typer.echo(f"{out / f'{split}.jsonl'}: {len(records)} records")
    if data.documents:
        write_jsonl(out / "documents.jsonl", [{"text": d} for d in data.documents])
        typer.echo(f"{out / 'documents.jsonl'}: {len(data.documents)} documents")


@data_app.command("ceiling")
def ceiling_command(
    task: str = typer.Argument(..., help="A built-in task, or a data file/directory/hf:NAME (then give --grader)."),
    model: str = typer.Option("smollm2-135m", help="Model: alias, hub id, directory or .gguf file."),
    template: list[str] = typer.Option(
        [],
        help="Teacher template(s): paper, plain, task (the task's own) or a custom one; "
        "default: paper, plain and the task's own.",
    ),
    split: str = typer.Option("eval", help="Split to measure (built-in tasks: eval, ood; files: the split to load)."),
    limit: int = typer.Option(40, help="Records to measure (the first N of the split)."),
    seed: int = typer.Option(0, help="Generator seed (built-in tasks)."),
    size: int = typer.Option(None, help="Task size (built-in tasks; default: the task's)."),
    format: str = typer.Option(
        "auto", help="Row format of a data file: auto, records, paper-tooluse, paper-science, huatuo, messages."
    ),
    grader: list[str] = typer.Option([], help="Grader(s) for a data file (e.g. toolalpaca, choice_tag)."),
    max_new_tokens: int = typer.Option(96, help="Greedy generation budget per answer."),
    # auto, as for every command: bf16 only where the device computes it fast. Greedy teacher outputs
    # of a small model can flip between precisions (SmolLM2-135M's first-token distribution is flat).
    precision: str = typer.Option("auto", help="auto (chosen from the device at run time), fp32 or bf16."),
    batch_size: int = typer.Option(8),
    loglik: bool = typer.Option(True, help="Also measure the demonstration log-likelihood gain."),
    outputs: Path = typer.Option(None, help="Write every prompt's outputs and scores to this JSONL file."),
) -> None:
    """Greedy accuracy without the demonstration (student) and with it (teacher), and the log-likelihood gain."""
    from selfdistill.models import load_model, stop_token_id
    from selfdistill.tasks import Metric, ceiling, get_task, list_tasks, make_task
    from selfdistill.tasks.loaders import load_dataset_records

    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if task in {spec.name for spec in list_tasks()}:
        spec = get_task(task)
        splits = make_task(task, seed, size).splits()
        if split not in splits:
            raise UserError(f"Task {task!r} has no split {split!r}; it has {', '.join(splits)}.")
        records, metrics = splits[split], spec.metrics
    else:
        if not grader:
            raise UserError(
                f"{task}: not a built-in task; to measure a data file give --grader (e.g. toolalpaca, choice_tag)."
            )
        records = load_dataset_records(task, format=format, split="train" if split == "eval" else split)
        metrics = tuple(Metric(g, g) for g in grader)
    recommended = spec.teacher_template if task in {s.name for s in list_tasks()} else "plain"
    chosen = [recommended if t == "task" else t for t in template] or list(
        dict.fromkeys(["paper", "plain", recommended])
    )
    records = records[:limit]
    lm, tokenizer = load_model(model)
    precision = resolve_precision(precision, next(lm.parameters()).device)
    results = ceiling.measure(
        lm,
        tokenizer,
        records,
        metrics,
        templates=tuple(chosen),
        max_new_tokens=max_new_tokens,
        precision=precision,
        batch_size=batch_size,
        stop_token_ids=[stop_token_id(lm, tokenizer)],
        loglik=loglik,
    )
    typer.echo(
        f"{task} ({split}, {len(records)} records, {model}, greedy, {precision}, max_new_tokens {max_new_tokens})"
    )
    typer.echo(ceiling.table(results))
    if outputs:
        rows = [{"prompt": r.prompt, "index": i, "output": o} for r in results for i, o in enumerate(r.outputs)]
        write_jsonl(outputs, rows)
