"""`sdft eval`: task scores, prior-capability probes, HumanEval and lm-eval tasks on any checkpoint."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import typer

from selfdistill.eval.settings import EvalSettings
from selfdistill.options import cli_option

_option = functools.partial(cli_option, EvalSettings)


def eval_command(
    ctx: typer.Context,
    model: str = _option("model", "--model"),
    task: Optional[str] = _option("task", "--task"),
    grader: Optional[str] = _option("grader", "--grader"),
    probes: bool = _option("probes", "--probes"),
    base: Optional[str] = _option("base", "--base"),
    humaneval: bool = _option("humaneval", "--humaneval"),
    lm_eval_tasks: Optional[str] = _option("lm_eval_tasks", "--lm-eval"),
    lm_eval_include: Optional[str] = _option("lm_eval_include", "--lm-eval-include"),
    out: Path = _option("out", "--out"),
    limit: Optional[int] = _option("limit", "--limit"),
    n_samples: int = _option("n_samples", "--n-samples"),
    temperature: float = _option("temperature", "--temperature"),
    max_new_tokens: int = _option("max_new_tokens", "--max-new-tokens"),
    probe_tokens: int = _option("probe_tokens", "--probe-tokens"),
    drift_tokens: int = _option("drift_tokens", "--drift-tokens"),
    batch_size: int = _option("batch_size", "--batch-size"),
    precision: str = _option("precision", "--precision"),
    seed: int = _option("seed", "--seed"),
    engine: str = _option("engine", "--engine"),
) -> None:
    """Evaluate a model on a task and/or on prior-capability probes; writes JSON results under --out."""
    from selfdistill.eval.run import run_evaluations

    settings = EvalSettings(**ctx.params)  # the options are named as the settings' fields
    run_evaluations(settings, echo=typer.echo)
    typer.echo(f"results in {settings.out}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
