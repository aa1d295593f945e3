"""`sdft continual`, `sdft compare`, `sdft report` and `sdft demo`."""

from __future__ import annotations

import functools
import signal
import time
from pathlib import Path
from typing import Optional

import typer

from selfdistill.continual.settings import CompareSettings, DemoSettings, StreamSettings
from selfdistill.options import cli_option, help_of

_stream = functools.partial(cli_option, StreamSettings)
_compare = functools.partial(cli_option, CompareSettings)
_demo = functools.partial(cli_option, DemoSettings)


def run_and_report(cfg, overwrite: bool) -> dict:
    from selfdistill.continual.results import summary_table
    from selfdistill.continual.runner import Runner
    from selfdistill.errors import RunFailed, RunStopped
    from selfdistill.report import write_report

    start = time.perf_counter()
    again = "Run the same command again (without --overwrite/--fresh) to continue from the last finished step."
    try:
        Runner(cfg, overwrite=overwrite, echo=typer.echo).run()
    except RunStopped as exc:  # the loop's own advice (--resume) is for `sdft train`; the exit status stays 128+signal
        raise RunStopped(f"{str(exc).split(';')[0]}; checkpoint written. {again}", exc.signum) from None
    except RunFailed as exc:
        raise RunFailed(f"{exc} {again}") from None
    except KeyboardInterrupt:
        typer.secho(f"\nStopped by Ctrl-C (SIGINT). {again}", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(128 + signal.SIGINT) from None
    paths = write_report(cfg.output_dir)
    typer.echo("")
    typer.echo(summary_table(paths["data"]))
    typer.echo(f"\nwall-clock {time.perf_counter() - start:.0f} s")
    typer.echo(f"results: {paths['results']}")
    typer.echo(f"report:  {paths['html']}  (and {paths['markdown'].name})")
    return paths


def continual_command(
    config: Path = typer.Argument(..., help=help_of(StreamSettings, "config")),
    output_dir: Optional[str] = _stream("output_dir", "--output-dir", "-o"),
    overrides: list[str] = _stream("overrides", "--set", "-s"),
    overwrite: bool = _stream("overwrite", "--overwrite"),
    workers: Optional[int] = _stream("workers", "--workers"),
    grid: list[str] = _stream("grid", "--grid"),
) -> None:
    """Train every method on a stream of tasks, evaluating everything after every stage; resumable."""
    settings = StreamSettings(
        config=config, output_dir=output_dir, overrides=overrides, overwrite=overwrite, workers=workers, grid=grid
    )
    run_and_report(settings.stream_config(), settings.overwrite)


def compare_command(
    ctx: typer.Context,
    config: Optional[Path] = typer.Argument(None, help=help_of(CompareSettings, "config")),
    task: Optional[str] = _compare("task", "--task"),
    methods: Optional[str] = _compare("methods", "--methods"),
    output_dir: Optional[str] = _compare("output_dir", "--output-dir", "-o"),
    overrides: list[str] = _compare("overrides", "--set", "-s"),
    overwrite: bool = _compare("overwrite", "--overwrite"),
    workers: Optional[int] = _compare("workers", "--workers"),
    grid: list[str] = _compare("grid", "--grid"),
) -> None:
    """Compare methods on one task: the one-stage case of `continual`, with the same outputs."""
    settings = CompareSettings(**ctx.params)  # the options are named as the settings' fields
    run_and_report(settings.stream_config(), settings.overwrite)


def report_command(
    run_dir: Path = typer.Argument(..., help="A directory written by continual, compare or demo."),
) -> None:
    """Rebuild results.json, report.html and report.md of a run (finished or not)."""
    from selfdistill.continual.results import summary_table
    from selfdistill.report import write_report

    paths = write_report(run_dir)
    typer.echo(summary_table(paths["data"]))
    typer.echo(f"report: {paths['html']}  (and {paths['markdown'].name}, {paths['results'].name})")


def demo_command(
    quick: bool = _demo("quick", "--quick"),
    output_dir: Optional[str] = _demo("output_dir", "--output-dir", "-o"),
    fresh: bool = _demo("fresh", "--fresh"),
    show_config: bool = _demo("show_config", "--show-config"),
    workers: Optional[int] = _demo("workers", "--workers"),
) -> None:
    """The embedded SmolLM2-135M learns two built-in tasks in a row with SDFT and with SFT, each over the same
    learning-rate grid; prints the finding and the summary, and the report's path."""
    settings = DemoSettings(quick=quick, output_dir=output_dir, fresh=fresh, show_config=show_config, workers=workers)
    path = settings.config_path()
    if settings.show_config:
        typer.echo(path.read_text(encoding="utf-8"))
        return
    typer.echo(f"demo config: {path}  (copy it, edit it, run `sdft continual FILE`)")
    run_and_report(settings.stream_config(), settings.fresh)


def register(app: typer.Typer) -> None:
    app.command("continual")(continual_command)
    app.command("compare")(compare_command)
    app.command("report")(report_command)
    app.command("demo")(demo_command)
