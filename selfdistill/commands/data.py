"""`sdft data`: list, show, make built-in tasks, and measure a model's teacher ceiling."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

import typer

from selfdistill.options import cli_option, help_of
from selfdistill.tasks.settings import CeilingSettings, MakeSettings, ShowSettings

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


_show = functools.partial(cli_option, ShowSettings)


@data_app.command("show")
def show_command(
    task: str = typer.Argument(..., help=help_of(ShowSettings, "task")),
    seed: int = _show("seed"),
    size: Optional[int] = _show("size"),
    count: int = _show("count"),
) -> None:
    """Print a few generated records of each split, and the split sizes."""
    from selfdistill.tasks import make_task

    settings = ShowSettings(task=task, seed=seed, size=size, count=count)
    data = make_task(settings.task, settings.seed, settings.size)
    for split, records in data.splits().items():
        typer.secho(f"== {split}: {len(records)} records", bold=True)
        for record in records[: settings.count]:
            typer.echo(json.dumps(record.to_dict(), indent=2, ensure_ascii=False))
    if data.documents:
        typer.secho(f"== documents: {len(data.documents)}", bold=True)
        for doc in data.documents[: settings.count]:
            typer.echo(doc)


_make = functools.partial(cli_option, MakeSettings)


@data_app.command("make")
def make_command(
    task: str = typer.Argument(..., help=help_of(MakeSettings, "task")),
    out: Path = _make("out"),
    seed: int = _make("seed"),
    size: Optional[int] = _make("size"),
) -> None:
    """Write the task's splits as JSONL files under --out: train.jsonl, eval.jsonl and, for tasks that have
    them, ood.jsonl and documents.jsonl."""
    from selfdistill.tasks.run import write_task_files

    for path, count, what in write_task_files(MakeSettings(task=task, out=out, seed=seed, size=size)):
        typer.echo(f"{path}: {count} {what}")


_ceiling = functools.partial(cli_option, CeilingSettings)


@data_app.command("ceiling")
def ceiling_command(
    ctx: typer.Context,
    task: str = typer.Argument(..., help=help_of(CeilingSettings, "task")),
    model: str = _ceiling("model"),
    template: list[str] = _ceiling("template"),
    split: str = _ceiling("split"),
    limit: int = _ceiling("limit"),
    seed: int = _ceiling("seed"),
    size: Optional[int] = _ceiling("size"),
    format: str = _ceiling("format"),
    grader: list[str] = _ceiling("grader"),
    max_new_tokens: int = _ceiling("max_new_tokens"),
    precision: str = _ceiling("precision"),
    batch_size: int = _ceiling("batch_size"),
    loglik: bool = _ceiling("loglik"),
    outputs: Optional[Path] = _ceiling("outputs"),
) -> None:
    """Greedy accuracy without the demonstration (student) and with it (teacher), and the log-likelihood gain."""
    from selfdistill.eval import ceiling

    settings = CeilingSettings(**ctx.params)  # the options are named as the settings' fields
    measured = ceiling.measure_ceiling(settings)
    typer.echo(
        f"{settings.task} ({settings.split}, {measured.records} records, {settings.model}, greedy, "
        f"{measured.precision}, max_new_tokens {settings.max_new_tokens})"
    )
    typer.echo(ceiling.table(measured.results))
