"""`sdft plan`: the memory each process of a torchrun launch needs for a training config, before renting GPUs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from selfdistill.errors import UserError


def plan_command(
    config: Optional[Path] = typer.Argument(None, help="The training YAML config (as for `sdft train`)."),
    processes: int = typer.Option(
        ..., "--processes", "-n", help="Processes of the torchrun launch (GPUs), e.g. 8 for --nproc_per_node 8."
    ),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a setting: section.key=value (repeatable)."),
    model: Optional[str] = typer.Option(
        None,
        "--model",
        help="Model: a directory with config.json, or a shipped architecture (e.g. Qwen/Qwen2.5-7B-Instruct).",
    ),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Also write the figures (bytes) to this JSON file."),
) -> None:
    """Memory per process (GiB) for this config with N processes: weights, gradients, optimizer, teacher,
    gathered units, activations with and without activation checkpointing, rollouts and the peak.

    No GPU, no weights, no network: the model is built from its architecture config on fake tensors
    and the training step traced in this process (seconds to a minute). `model.precision: auto` is
    planned as bf16, as on GPUs.
    """
    from selfdistill.config import load_config

    overrides = list(set_)
    if model is not None:
        overrides.append(f"model.name={model}")
    if processes < 1:
        raise UserError(f"--processes must be at least 1, got {processes}.")
    cfg = load_config(config, overrides)
    from selfdistill.memory_plan import plan  # torch and transformers only once the input is good

    result = plan(cfg, processes)
    typer.echo(result.table())
    if json_file is not None:
        from selfdistill.files import write_json

        write_json(json_file, result.to_dict())
        typer.echo(f"figures in {json_file}")


def register(app: typer.Typer) -> None:
    app.command("plan", context_settings={"max_content_width": 120})(plan_command)
