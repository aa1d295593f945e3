"""`sdft train`: one method on one dataset, from a YAML config plus overrides."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional

import typer

from selfdistill.config import METHODS, describe_options, load_config
from selfdistill.options import SET_HELP, cli_option
from selfdistill.training.settings import TrainSettings

_option = functools.partial(cli_option, TrainSettings)

# The options that set one training setting: option -> its config key.
SHORTCUTS = {
    "method": "method",
    "model": "model.name",
    "data": "data.train",
    "output_dir": "train.output_dir",
    "max_steps": "train.max_steps",
    "lr": "train.lr",
    "batch_size": "train.batch_size",
}


def _epilog() -> str:
    methods = "\n".join(f"  {name}: {text}" for name, text in METHODS.items())
    options = "\n".join(f"  {key} = {default}\n      {text}" for key, default, text in describe_options())
    # Typer/rich reflows epilogs; \b blocks keep the layout in plain click help.
    return f"\b\nMethods (--method):\n{methods}\n\n\b\nAll settings (YAML keys or --set KEY=VALUE), with defaults:\n{options}"


def register(app: typer.Typer) -> None:
    @app.command("train", epilog=_epilog(), context_settings={"max_content_width": 120})
    def train_command(
        ctx: typer.Context,
        config: Optional[Path] = typer.Argument(None, help="YAML config file (sections as listed below)."),
        set_: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
        method: Optional[str] = typer.Option(None, help="Training method (see the list below)."),
        model: Optional[str] = typer.Option(None, help="Model: hub id, directory, .gguf file or 'smollm2-135m'."),
        data: Optional[str] = typer.Option(
            None, help="Training records: .jsonl, dataset dir, hf:NAME or builtin:demo."
        ),
        output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="Run directory."),
        max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps."),
        lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
        batch_size: Optional[int] = typer.Option(None, help="Prompts per optimizer step."),
        resume: bool = _option("resume", "--resume"),
        overwrite: bool = _option("overwrite", "--overwrite"),
    ) -> None:
        """Train a model on demonstrations (SDFT by default) and save an HF-compatible checkpoint.

        Under `torchrun --nproc_per_node N` the N processes train one model sharded with FSDP2.
        """
        settings = TrainSettings(resume=resume, overwrite=overwrite)
        shortcuts = [f"{key}={ctx.params[name]}" for name, key in SHORTCUTS.items() if ctx.params[name] is not None]
        cfg = load_config(config, list(set_) + shortcuts)
        from selfdistill.training.loop import train  # heavy imports only when training
        from selfdistill.training.run_directory import check_resume

        check_resume(cfg, settings.resume, settings.overwrite)

        _report(train(cfg, resume=settings.resume, overwrite=settings.overwrite))


def _report(result) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun the first process reports for all
        return
    if result.metrics:
        last = result.metrics[-1]
        typer.echo(f"trained {result.steps} steps; last loss {last['loss']:.4f}")
    typer.echo(f"model: {result.final_dir}")
    typer.echo(f"metrics: {result.output_dir / 'metrics.jsonl'}")
