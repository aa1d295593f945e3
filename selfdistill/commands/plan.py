"""`sdft plan`: the memory each process of a torchrun launch needs for a training config, before renting GPUs."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import typer

from selfdistill.memory_plan.settings import Hardware, PlanSettings
from selfdistill.options import SET_HELP, cli_option

_option = functools.partial(cli_option, PlanSettings)
_hardware = functools.partial(cli_option, Hardware)


def plan_command(
    config: Optional[Path] = typer.Argument(None, help="The training YAML config (as for `sdft train`)."),
    processes: int = _option("processes", "--processes", "-n"),
    set_: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    model: Optional[str] = typer.Option(
        None,
        "--model",
        help="Model: a directory with config.json, or a shipped architecture (e.g. Qwen/Qwen2.5-7B-Instruct).",
    ),
    gpu_memory: Optional[float] = _option("gpu_memory", "--gpu-memory"),
    json_file: Optional[Path] = _option("json_file", "--json"),
    gpus_per_node: int = _hardware("gpus_per_node", "--gpus-per-node"),
    intra_node_bandwidth: float = _hardware("intra_node_bandwidth", "--intra-node-bandwidth"),
    inter_node_bandwidth: float = _hardware("inter_node_bandwidth", "--inter-node-bandwidth"),
    gpu_tflops: float = _hardware("gpu_tflops", "--gpu-tflops"),
    mfu: float = _hardware("mfu", "--mfu"),
) -> None:
    """Memory per process (GiB) for this config with N processes: weights, gradients, optimizer, teacher,
    gathered units, activations with and without activation checkpointing, rollouts, the vLLM engine's share,
    a reserve for what no trace sees, and with --gpu-memory a verdict: fits or does not fit (and what would).
    Then the bytes each process communicates per optimizer step, by collective, and the seconds they and the
    step's compute take on the given links and GPUs (defaults: nodes of 8 H100 SXM).

    No GPU, no weights, no network: the model is built from its architecture config on fake tensors
    and the training step traced in this process (seconds to a minute). `model.precision: auto` is
    planned as bf16, as on GPUs.
    """
    from selfdistill.config import load_config
    from selfdistill.memory_plan import plan

    settings = PlanSettings(processes=processes, gpu_memory=gpu_memory, json_file=json_file)
    hardware = Hardware(
        gpus_per_node=gpus_per_node,
        intra_node_bandwidth=intra_node_bandwidth,
        inter_node_bandwidth=inter_node_bandwidth,
        gpu_tflops=gpu_tflops,
        mfu=mfu,
    )
    overrides = list(set_) + ([f"model.name={model}"] if model is not None else [])
    result = plan(load_config(config, overrides), settings.processes, settings.gpu_memory, hardware=hardware)
    typer.echo(result.table())
    if settings.json_file is not None:
        from selfdistill.files import write_json

        write_json(settings.json_file, result.to_dict())
        typer.echo(f"figures in {settings.json_file}")


def register(app: typer.Typer) -> None:
    app.command("plan", context_settings={"max_content_width": 120})(plan_command)
