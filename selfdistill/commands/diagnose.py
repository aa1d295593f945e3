"""`sdft diagnose`: why SDFT does (not) learn a task, before spending compute on training it."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import typer

from selfdistill.diagnosis.settings import DiagnoseSettings
from selfdistill.errors import UserError
from selfdistill.options import cli_option, help_of

_option = functools.partial(cli_option, DiagnoseSettings)


def diagnose_command(
    ctx: typer.Context,
    task_arg: Optional[str] = typer.Argument(None, metavar="[TASK]", help=help_of(DiagnoseSettings, "task")),
    task: Optional[str] = typer.Option(DiagnoseSettings.task, "--task", help="The same as TASK, as an option."),
    model: Optional[str] = _option("model", "--model"),
    template: Optional[str] = _option("template", "--template"),
    config: Optional[Path] = _option("config", "--config"),
    overrides: list[str] = _option("overrides", "--set", "-s"),
    split: Optional[str] = _option("split", "--split"),
    format: str = _option("format", "--format"),
    grader: list[str] = _option("grader", "--grader"),
    limit: int = _option("limit", "--limit"),
    rollouts_per_record: Optional[int] = _option("rollouts_per_record", "--rollouts-per-record"),
    temperature: Optional[float] = _option("temperature", "--temperature"),
    max_new_tokens: Optional[int] = _option("max_new_tokens", "--max-new-tokens"),
    divergence: Optional[str] = _option("divergence", "--divergence"),
    beta: Optional[float] = _option("beta", "--beta"),
    top_k: Optional[int] = _option("top_k", "--top-k"),
    skip_first_tokens: Optional[int] = _option("skip_first_tokens", "--skip-first-tokens"),
    precision: Optional[str] = _option("precision", "--precision"),
    seed: Optional[int] = _option("seed", "--seed"),
    task_seed: int = _option("task_seed", "--task-seed"),
    ceiling: bool = _option("ceiling", "--ceiling/--no-ceiling"),
    batch_size: Optional[int] = _option("batch_size", "--batch-size"),
    out: Path = _option("out", "--out"),
) -> None:
    """Per-token teacher vs student numbers on the student's own samples, the teacher ceiling, and advice."""
    from selfdistill.diagnosis.run import diagnose

    if task_arg and task and task_arg != task:
        raise UserError(f"Two tasks given: {task_arg!r} and --task {task!r}; give one.")
    options = dict(ctx.params, task=task_arg or task)  # the options are named as the settings' fields
    del options["task_arg"]
    diagnosis = diagnose(DiagnoseSettings(**options))
    _print(diagnosis.data, diagnosis.json_path, diagnosis.html_path)


def _print(data: dict, json_path: Path, html_path: Path) -> None:
    from selfdistill.diagnosis.report import ceiling_table_rows, summary_lines

    s = data["settings"]
    # A custom template's text is long; it is in diagnose.json.
    template = "custom" if s["template"].startswith("custom:") else s["template"]
    typer.echo(
        f"{s['task']}: {s['records']} records x {s['num_rollouts']} rollouts, {s['model']}, template {template} "
        f"({s['template_source']}), temperature {s['temperature']:g}, max_new_tokens {s['max_new_tokens']}, "
        f"{s['divergence']}, {s['precision']}, seed {s['seed']}"
    )
    if data["ceiling"]:
        header, rows = ceiling_table_rows(data["ceiling"])
        typer.echo("teacher ceiling (greedy):")
        typer.echo("  " + " | ".join(header))
        for row in rows:
            typer.echo("  " + " | ".join(row))
    typer.echo("along the student's own samples:")
    for key, value in summary_lines(data["summary"]):
        typer.echo(f"  {key}: {value}")
    if data["advice"]:
        typer.echo("advice:")
        for item in data["advice"]:
            typer.echo(f"  - {item}")
    typer.echo(f"data: {json_path}")
    typer.echo(f"HTML: {html_path}")


def register(app: typer.Typer) -> None:
    app.command("diagnose")(diagnose_command)
