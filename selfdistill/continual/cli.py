"""`sdft continual`, `sdft compare`, `sdft report` and `sdft demo`."""

from __future__ import annotations

import signal
import time
from importlib import resources
from pathlib import Path
from typing import Optional

import typer
import yaml

from selfdistill.errors import UserError


def _overrides(output_dir: Optional[str], set_: list[str], workers: Optional[int] = None, grid: list[str] = ()) -> dict:
    from selfdistill.config import parse_overrides

    data = parse_overrides(set_) if set_ else {}
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise UserError(f"--grid {item!r}: write it as section.key=value1,value2, e.g. train.lr=1e-4,3e-4.")
        data.setdefault("grid", {})[key.strip()] = [yaml.safe_load(v) for v in values.split(",") if v.strip()]
    if output_dir:
        data["output_dir"] = output_dir
    if workers is not None:
        data["workers"] = workers
    return data


WORKERS_HELP = "Method x seed sequences run at once, each in its own process (overrides the config's workers)."
GRID_HELP = (
    "Run every method at each value: section.key=v1,v2 (e.g. train.lr=1e-4,3e-4); repeat for more keys. "
    "Sets that key of the shared grid; a method's own grid still wins."
)


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
        typer.secho(f"\ninterrupted. {again}", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(128 + signal.SIGINT) from None
    paths = write_report(cfg.output_dir)
    typer.echo("")
    typer.echo(summary_table(paths["data"]))
    typer.echo(f"\nwall-clock {time.perf_counter() - start:.0f} s")
    typer.echo(f"results: {paths['results']}")
    typer.echo(f"report:  {paths['html']}  (and {paths['markdown'].name})")
    return paths


def demo_config_path(quick: bool) -> Path:
    return Path(str(resources.files("selfdistill") / "resources" / ("demo-quick.yaml" if quick else "demo.yaml")))


def register(app: typer.Typer) -> None:
    @app.command("continual")
    def continual_command(
        config: Path = typer.Argument(..., help="Stream config YAML (stream, methods, seeds, base, eval)."),
        output_dir: Optional[str] = typer.Option(
            None, "--output-dir", "-o", help="Run directory (overrides output_dir)."
        ),
        set_: list[str] = typer.Option(
            [], "--set", "-s", help="Override a key of the stream config, e.g. seeds=[0,1]."
        ),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Delete the results already in the run directory first."
        ),
        workers: Optional[int] = typer.Option(None, "--workers", help=WORKERS_HELP),
        grid: list[str] = typer.Option([], "--grid", help=GRID_HELP),
    ) -> None:
        """Train every method on a stream of tasks, evaluating everything after every stage; resumable."""
        from selfdistill.continual.config import load_continual_config

        run_and_report(load_continual_config(config, _overrides(output_dir, set_, workers, grid)), overwrite)

    @app.command("compare")
    def compare_command(
        config: Optional[Path] = typer.Argument(None, help="Stream config YAML with one stage (optional with --task)."),
        task: Optional[str] = typer.Option(
            None, "--task", help="A built-in task to compare on (replaces the config's stream)."
        ),
        methods: Optional[str] = typer.Option(
            None, "--methods", help="Comma-separated methods with base settings, e.g. sdft,sft."
        ),
        output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="Run directory."),
        set_: list[str] = typer.Option([], "--set", "-s", help="Override a key of the stream config."),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Delete the results already in the run directory first."
        ),
        workers: Optional[int] = typer.Option(None, "--workers", help=WORKERS_HELP),
        grid: list[str] = typer.Option([], "--grid", help=GRID_HELP),
    ) -> None:
        """Compare methods on one task: the one-stage case of `continual`, with the same outputs."""
        from selfdistill.continual.config import load_continual_config, parse_config

        data = _overrides(output_dir, set_, workers, grid)
        if task:
            data["stream"] = [{"task": task}]
        if methods:
            data["methods"] = [m.strip() for m in methods.split(",") if m.strip()]
        if config is not None:
            cfg = load_continual_config(config, data)
        else:
            data.setdefault("methods", ["sdft", "sft"])
            data.setdefault("output_dir", "runs/compare")
            if "stream" not in data:
                raise UserError("Give a config file or --task NAME (a built-in task, see `sdft data list`).")
            cfg = parse_config(data, "compare")
        if len(cfg.stream) != 1:
            raise UserError(
                f"compare runs one task; the config's stream has {len(cfg.stream)}. Use `sdft continual` "
                "for a stream, or --task NAME."
            )
        run_and_report(cfg, overwrite)

    @app.command("report")
    def report_command(
        run_dir: Path = typer.Argument(..., help="A directory written by continual, compare or demo."),
    ) -> None:
        """Rebuild results.json, report.html and report.md of a run (finished or not)."""
        from selfdistill.continual.results import summary_table
        from selfdistill.report import write_report

        paths = write_report(run_dir)
        typer.echo(summary_table(paths["data"]))
        typer.echo(f"report: {paths['html']}  (and {paths['markdown'].name}, {paths['results'].name})")

    @app.command("demo")
    def demo_command(
        quick: bool = typer.Option(False, "--quick", help="A smaller version (under 5 minutes on 2 CPU cores)."),
        output_dir: Optional[str] = typer.Option(
            None, "--output-dir", "-o", help="Run directory (default runs/demo or runs/demo-quick)."
        ),
        fresh: bool = typer.Option(False, "--fresh", help="Start again instead of continuing an earlier demo run."),
        show_config: bool = typer.Option(
            False, "--show-config", help="Print the demo's config file (to copy and edit) and exit."
        ),
        workers: Optional[int] = typer.Option(None, "--workers", help=WORKERS_HELP),
    ) -> None:
        """The embedded SmolLM2-135M learns two built-in tasks in a row with SDFT and with SFT, each over the same
        learning-rate grid; prints the finding and the summary, and the report's path."""
        from selfdistill.continual.config import load_continual_config

        path = demo_config_path(quick)
        if show_config:
            typer.echo(path.read_text(encoding="utf-8"))
            return
        typer.echo(f"demo config: {path}  (copy it, edit it, run `sdft continual FILE`)")
        run_and_report(load_continual_config(path, _overrides(output_dir, [], workers)), fresh)
