"""`sdft learn`: a model that keeps learning in a workspace (init, add, round, status, rollback, export)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from selfdistill.options import SET_HELP

app = typer.Typer(
    help="A model that keeps learning: demonstrations arrive, rounds train and are gated against forgetting, "
    "versions can be rolled back.",
    no_args_is_help=True,
)


@app.command("init")
def init_command(
    workdir: Path = typer.Argument(..., help="New or empty directory for the learner."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Training config YAML (as for `sdft train`)."),
    set_: list[str] = typer.Option(
        [],
        "--set",
        "-s",
        help=SET_HELP + " gate.* (max_task_drop, max_loglik_drop, max_probe_drop, max_drift, max_base_drift, "
        "min_gain), eval.* and learner.* (heldout_share, seed, keep_rejected) set the learner's own settings.",
    ),
    model: Optional[str] = typer.Option(None, help="Base model: hub id, directory, .gguf file or 'smollm2-135m'."),
    method: Optional[str] = typer.Option(None, help="Training method of every round (default sdft)."),
    database: Optional[str] = typer.Option(
        None,
        help="SQLAlchemy URL of the database (default: SQLite learner.db in WORKDIR), e.g. postgresql+psycopg://...",
    ),
) -> None:
    """Create a learner: base model, method and settings, gate, evaluation, database."""
    from selfdistill.learner import Learner

    Learner.init(workdir, model=model, method=method, config=config, overrides=set_, database=database, echo=typer.echo)


@app.command("add")
def add_command(
    workdir: Path = typer.Argument(..., help="The learner's directory."),
    source: str = typer.Argument(..., help="Records: .jsonl, dataset dir, hf:NAME or builtin:NAME."),
    task: str = typer.Option(..., "--task", "-t", help="Task the records belong to."),
    grader: Optional[str] = typer.Option(
        None,
        help="How the task's held-out records are scored (first add of a task; default: the built-in task's, else contains).",
    ),
    heldout: bool = typer.Option(
        False, "--heldout", help="Keep every record for evaluation (an evaluation set), none for training."
    ),
) -> None:
    """Add demonstrations under a task (a bad file stores nothing; exact duplicates are dropped).

    A seeded share of every added batch (learner.heldout_share, default 0.2) is kept for evaluation only."""
    from selfdistill.learner import Learner

    Learner(workdir, echo=typer.echo).add(source, task, grader=grader, heldout=heldout)


@app.command("round")
def round_command(
    workdir: Path = typer.Argument(..., help="The learner's directory."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Training settings for this round only. " + SET_HELP),
) -> None:
    """Train on the demonstrations added since the last round, evaluate, and promote or keep (the gate decides).

    Under `torchrun --nproc_per_node N` the N processes train the round sharded, as `sdft train` does; the first
    evaluates and decides. A killed round continues where it stopped when this is run again. The report is WORKDIR/report.html."""
    from selfdistill.learner import Learner

    result = Learner(workdir, echo=typer.echo).round(set_)
    if result is not None:  # under torchrun the first process reports for all
        typer.echo(f"round {result.number}: {result.outcome}; serving v{result.version}")


@app.command("status")
def status_command(
    workdir: Path = typer.Argument(..., help="The learner's directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON (for scripts)."),
) -> None:
    """Versions, rounds, the held-out scores over rounds, pending demonstrations and the last decision."""
    from selfdistill.learner import Learner
    from selfdistill.learner.history import status_text

    learner = Learner(workdir, echo=typer.echo)
    status = learner.status()
    typer.echo(json.dumps(status, indent=2) if as_json else status_text(status))
    if not as_json:
        typer.echo(f"report: {learner.write_report()}")


@app.command("rollback")
def rollback_command(
    workdir: Path = typer.Argument(..., help="The learner's directory."),
    version: int = typer.Argument(..., help="Version to serve again."),
) -> None:
    """Serve an earlier version again (refused while a round runs)."""
    from selfdistill.learner import Learner

    Learner(workdir, echo=typer.echo).rollback(version)


@app.command("export")
def export_command(
    workdir: Path = typer.Argument(..., help="The learner's directory."),
    version: int = typer.Argument(..., help="Version to export."),
    out: Path = typer.Argument(..., help="New or empty directory for the Hugging Face model."),
) -> None:
    """Write a version as a Hugging Face directory whose model card tells its learning history."""
    from selfdistill.learner import Learner

    Learner(workdir, echo=typer.echo).export(version, out)


@app.command("demo")
def demo_command(
    workdir: Path = typer.Option(Path("runs/learn-demo"), "--output-dir", "-o", help="The demo learner's directory."),
    method: str = typer.Option("sft_replay", help="Training method of the demo's rounds (a new demo directory only)."),
) -> None:
    """The embedded model keeps learning over 4 rounds of built-in tasks, one of them refused by the gate.

    Run again, it continues where it stopped. The report is WORKDIR/report.html."""
    from selfdistill.learner.demo import run_demo
    from selfdistill.learner.history import status_text

    status = run_demo(workdir, method=method, echo=typer.echo)
    typer.echo("")
    typer.echo(status_text(status))
    typer.echo(f"report: {workdir / 'report.html'}")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="learn")
