"""What `sdft eval` and `selfdistill.evaluate` run: a task score, probes, HumanEval and lm-eval tasks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from selfdistill.data.records import Record
from selfdistill.errors import UserError
from selfdistill.eval.settings import EvalSettings, EvaluateSettings
from selfdistill.files import write_json
from selfdistill.precision import resolve_precision
from selfdistill.registry import engine_class


def load_fp32(name: str):
    """(model, tokenizer) of a name, directory or .gguf file, in fp32 (autocast gives bf16 compute)."""
    from selfdistill.models import load_model

    return load_model(name, dtype=torch.float32)


def evaluate_task(
    model, task: str | Path | list[Record], settings: EvaluateSettings, *, tokenizer=None, out: str | Path | None = None
) -> dict:
    """Score `model` (a name/directory/.gguf file, or a loaded model with its `tokenizer`) on `task` (a .jsonl
    file, a built-in task name or records); the task, the grader and the field the grader reads are checked
    before the model is loaded. With `out`, examples.jsonl and summary.json are written there. Returns the
    summary."""
    from selfdistill.eval import graders
    from selfdistill.eval.evaluate import evaluate, gold_rows
    from selfdistill.tasks.resolve import guess_grader, resolve_task

    if isinstance(task, (str, Path)):
        records, grader_name = resolve_task(str(task), settings.grader, settings.limit, settings.seed)
        label = Path(str(task)).stem
    else:
        records = task[: settings.limit]
        if not records:
            raise UserError("Nothing to evaluate: the task has no records.")
        grader_name, label = settings.grader or guess_grader(records), "records"
    grade = graders.get(grader_name)
    how = "chosen with --grader" if settings.grader else "guessed from the task, as no --grader was given"
    graders.check_gold_fields(grader_name, gold_rows(records), how)
    engine_class(settings.engine).check_installed()  # before the model is loaded
    if isinstance(model, (str, Path)):
        model, tokenizer = load_fp32(str(model))
    elif tokenizer is None:
        raise UserError("evaluate(): a loaded model needs its tokenizer (tokenizer=...).")
    summary = evaluate(
        model,
        tokenizer,
        records,
        grade,
        out_dir=out,
        desc=f"eval {label}",
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        precision=resolve_precision(settings.precision, next(model.parameters()).device),
        temperature=settings.temperature,
        n_samples=settings.n_samples,
        seed=settings.seed,
        engine=settings.engine,
    )
    summary.update({"task": str(task) if isinstance(task, (str, Path)) else label, "grader": grader_name})
    if out is not None:
        write_json(Path(out) / "summary.json", summary)
    return summary


def run_evaluations(settings: EvalSettings, echo: Callable[[str], None] = print) -> dict:
    """Every evaluation `settings` asks for, in turn (task, probes and HumanEval, lm-eval), each result
    echoed as it is ready; writes results.json under settings.out and returns its content."""
    out = Path(settings.out)
    results: dict = {"model": settings.model}
    if settings.task:
        summary = evaluate_task(settings.model, settings.task, settings, out=out / "task")
        results["task"] = summary
        echo(
            f"task {settings.task}: score {summary['score']:.4f} over {summary['count']} "
            f"(95% CI {summary['ci95'][0]:.3f}-{summary['ci95'][1]:.3f}, grader {summary['grader']})"
        )
    if settings.probes or settings.humaneval:
        results["probes"] = _probes(settings, out / "probes")
        echo(probes_line(results["probes"], out / "probes" / "report.json"))
    if settings.lm_eval_tasks:
        results["lm_eval"] = _lm_eval(settings)
        write_json(out / "lm_eval.json", results["lm_eval"])
        echo(lm_eval_line(results["lm_eval"], out / "lm_eval.json"))
    write_json(out / "results.json", results)
    return results


def probes_line(report: dict, path: Path) -> str:
    """One line for the terminal: each suite's score (and its change from the base), drift, and where the
    whole report is (it runs to hundreds of lines: categories, intervals, per-prompt drift)."""
    parts = []
    relative = report.get("relative") or {}
    for suite, scores in report["absolute"].items():
        key = "pass_at_1" if "pass_at_1" in scores else "score"
        name = f"{suite} pass@1" if key == "pass_at_1" else suite
        part = f"{name} {scores[key]:.4f} over {scores['count']}"
        if key in relative.get(suite, {}):
            part += f" ({relative[suite][key]:+.4f} vs base)"
        parts.append(part)
    if "drift" in report:
        drift = report["drift"]
        parts.append(f"drift KL {drift['kl_nats']:.4f} nats/token over {drift['prompts']} prompts")
    return f"probes: {'; '.join(parts)}; report in {path}"


def lm_eval_line(scores: dict, path: Path) -> str:
    """One line for the terminal: each lm-eval task's first metric, and the file with all of them."""
    parts = []
    for task, metrics in scores.items():
        shown = [(k, v) for k, v in metrics.items() if k != "documents" and "stderr" not in k][:1]
        parts.append(task + "".join(f" {k} {v:.4f}" for k, v in shown))
    return f"lm-eval: {'; '.join(parts)}; all metrics in {path}"


def _probes(settings: EvalSettings, out_dir: Path) -> dict:
    from selfdistill.eval.probes import probe_report

    return probe_report(
        settings.model,
        settings.base,
        out_dir=out_dir,
        load=load_fp32,
        limit=settings.limit,
        humaneval=settings.humaneval,
        suite=settings.probes,
        batch_size=settings.batch_size,
        precision=resolve_precision(settings.precision, "cuda" if torch.cuda.is_available() else "cpu"),
        max_new_tokens=settings.probe_tokens,
        drift_tokens=settings.drift_tokens,
    )


def _lm_eval(settings: EvalSettings) -> dict:
    from selfdistill.eval.lmeval import run_lm_eval

    net, tok = load_fp32(settings.model)
    return run_lm_eval(
        net,
        tok,
        [t for t in settings.lm_eval_tasks.split(",") if t],
        limit=settings.limit,
        include_path=settings.lm_eval_include,
        seed=settings.seed,
        batch_size=settings.batch_size,
    )
