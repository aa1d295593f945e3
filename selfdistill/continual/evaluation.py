"""One stage's evaluation: every task's held-out scores, the prior-capability probes and drift.

`sdft continual` evaluates the starting model and the model after each stage with it, and anything else
that builds an accuracy matrix over a stream of tasks (a learner evaluating a candidate after each round)
uses the same class, so their numbers are the same measurement. It writes into a stage directory, with
the names `selfdistill.continual.layout` gives them:

    eval/<task>/{examples.jsonl, summary.json}   each task's outputs and scores (summary.json: score, count,
                                                 ci95, task, grader; `lenient` and `loglik` where measured)
    probes/..., probes.json                      the prior-capability probes (eval.probes)
    drift.json                                   KL from the starting model (eval.drift)

and the starting model's answers to the drift prompts, that every stage's drift is measured against,
to the file it is given. `selfdistill.continual.results.stage_values` reads such a directory back.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from selfdistill.continual import layout
from selfdistill.continual.config import EvalSettings
from selfdistill.data.records import Record
from selfdistill.files import write_json


@dataclass
class StreamTask:
    name: str
    grader: str
    train: list[Record]
    eval: list[Record]
    max_new_tokens: int
    documents: list[str] = field(default_factory=list)
    lenient: object | None = None  # a tasks.Metric giving a lenient or partial score beside the headline one
    teacher_template: str = "paper"  # for the teacher-prompt demonstration log-likelihood (a reference)


# Partial credit for graders of files-based tasks that have one.
LENIENT_GRADERS = {"toolalpaca": "toolalpaca_partial", "toolalpaca_robust": "toolalpaca_partial"}


class StageEvaluation:
    """Evaluates a model on every task of a stream, the probes and drift, into a stage directory.

    Each part is skipped when its file already exists, so evaluating a directory again (a resumed run)
    generates nothing twice; each task's directory appears whole or not at all. `start_model` loads
    the starting model, which drift's reference answers come from; it is called only when those
    answers are missing from `drift_answers_path`.
    """

    def __init__(
        self,
        tasks: list[StreamTask],
        settings: EvalSettings,
        drift_answers_path: Path,
        start_model: Callable[[], tuple],
        base_name: str,
        system_prompt: str | None = None,
        echo: Callable[[str], None] = print,
    ):
        self.tasks = tasks
        self.settings = settings
        self.drift_answers_path = Path(drift_answers_path)
        self.start_model = start_model
        self.base_name = base_name  # recorded with the drift reference answers
        self.system_prompt = system_prompt  # of the prompts the demonstration log-likelihood is measured under
        self.echo = echo
        self._drift_answers = None

    def drift_answers(self) -> dict:
        """The starting model's answers to the drift prompts: read from their file, else generated and saved."""
        from selfdistill.eval import drift as drift_mod
        from selfdistill.precision import resolve_precision

        if self._drift_answers is None:
            answers = drift_mod.load_base_answers(self.drift_answers_path)
            if answers is None:
                model, tokenizer = self.start_model()
                settings = self.settings.drift
                prompts = drift_mod.drift_prompts()[: settings.limit]
                precision = resolve_precision(self.settings.precision, next(model.parameters()).device)
                answers = drift_mod.base_answers(
                    model,
                    tokenizer,
                    prompts=prompts,
                    max_new_tokens=settings.max_new_tokens,
                    batch_size=self.settings.batch_size,
                    precision=precision,
                    base_name=self.base_name,
                )
                drift_mod.save_base_answers(answers, self.drift_answers_path)
            self._drift_answers = answers
        return self._drift_answers

    def evaluate(self, model, tokenizer, where: Path, label: str) -> float:
        """Every task, the probes and drift, each skipped when its files already exist; returns seconds spent."""
        from selfdistill.precision import resolve_precision

        model.eval()
        settings = self.settings
        precision = resolve_precision(settings.precision, next(model.parameters()).device)
        start = time.perf_counter()
        for task in self.tasks:
            if not layout.task_summary(where, task.name).is_file():
                self.evaluate_task(model, tokenizer, task, where, label, precision)
        if settings.probes.enabled and not layout.probes_file(where).is_file():
            self.evaluate_probes(model, tokenizer, where, label, precision)
        if settings.drift.enabled and not layout.drift_file(where).is_file():
            from selfdistill.eval import drift as drift_mod

            result = drift_mod.drift(self.drift_answers(), model, precision=precision)
            write_json(layout.drift_file(where), result)
            self.echo(f"  {label}: drift from the starting model = {result['kl_nats']:.4f} nats/token (KL)")
        return time.perf_counter() - start

    def evaluate_task(self, model, tokenizer, task: StreamTask, where: Path, label: str, precision: str) -> None:
        """One task's scores, lenient score and demonstration log-likelihood, written into the stage at once."""
        from selfdistill.eval import graders
        from selfdistill.eval.evaluate import evaluate

        target = layout.task_eval_dir(where, task.name)
        tmp = target.with_name(task.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        examples: list[dict] = []
        summary = evaluate(
            model,
            tokenizer,
            task.eval,
            graders.get(task.grader),
            max_new_tokens=task.max_new_tokens,
            batch_size=self.settings.batch_size,
            precision=precision,
            out_dir=tmp,
            desc=f"{label} eval {task.name}",
            examples=examples,
        )
        summary.update({"task": task.name, "grader": task.grader})
        if task.lenient is not None:
            summary["lenient"] = self.lenient_score(task, examples)
        loglik = self.demonstration_loglik(model, tokenizer, task, precision)
        if loglik is not None:
            summary["loglik"] = loglik
        write_json(tmp / layout.SUMMARY, summary)
        shutil.rmtree(target, ignore_errors=True)
        tmp.replace(target)
        extra = f", {task.lenient.name} {summary['lenient']['score']:.3f}" if task.lenient is not None else ""
        if loglik is not None:
            extra += f", demonstration log-likelihood {loglik['student']:.3f} nats/token"
        self.echo(f"  {label}: {task.name} = {summary['score']:.3f} ({summary['count']} items{extra})")

    def evaluate_probes(self, model, tokenizer, where: Path, label: str, precision: str) -> None:
        from selfdistill.eval.probes import run_probes

        settings = self.settings
        result = run_probes(
            model,
            tokenizer,
            limit=settings.probes.limit,
            max_new_tokens=settings.probes.max_new_tokens,
            batch_size=settings.batch_size,
            precision=precision,
            out_dir=layout.probes_dir(where),
        )
        write_json(layout.probes_file(where), result)
        self.echo(f"  {label}: prior-capability probes = {result['score']:.3f} ({result['count']} items)")

    def lenient_score(self, task: StreamTask, examples: list[dict]) -> dict:
        """The task's lenient or partial score of the outputs already generated (no new generation)."""
        from selfdistill.eval.ceiling import default_grader, score
        from selfdistill.eval.evaluate import wilson_interval

        grader = default_grader(task.lenient.grader)
        scores = [score(e["output"], record, task.lenient, grader) for e, record in zip(examples, task.eval)]
        mean = sum(scores) / len(scores)
        return {
            "metric": task.lenient.name,
            "grader": task.lenient.grader,
            "score": mean,
            "ci95": list(wilson_interval(mean, len(scores))),
            "scores": scores,
        }

    def demonstration_loglik(self, model, tokenizer, task: StreamTask, precision: str) -> dict | None:
        """Held-out demonstration log-likelihood of the task's evaluation items (None without demonstrations)."""
        from selfdistill.eval.loglik import heldout_loglik

        return heldout_loglik(
            model,
            tokenizer,
            task.eval,
            template=task.teacher_template,
            system_prompt=self.system_prompt,
            precision=precision,
        )
