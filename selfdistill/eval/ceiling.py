"""The teacher ceiling: how much better the model does when shown the demonstration.

SDFT distils the teacher (the model with the demonstration in its prompt) into the student
(the model without it), so it can only help where the teacher is clearly better. Two measures:

- greedy accuracy on the student prompt vs the teacher prompt, graded with the task's graders;
- the demonstration log-likelihood gain: mean over demonstration tokens of
  log p(demo | teacher prompt) - log p(demo | student prompt), in nats, and the same for the
  first demonstration token. On small models greedy teacher accuracy is brittle (a flat first-
  token distribution flips with precision), and this gain shows the signal the teacher gives.

`measure` takes a loaded model and records (`sdft diagnose` uses it with the training config's template);
`measure_ceiling` is what `sdft data ceiling` runs, from a task or a data file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from selfdistill.data.prompts import TEACHER_TEMPLATES, PromptBuilder
from selfdistill.data.records import Record
from selfdistill.errors import UserError
from selfdistill.eval import graders as eval_graders
from selfdistill.eval.evaluate import gold_rows
from selfdistill.eval.loglik import demonstration_token_logps
from selfdistill.files import write_jsonl
from selfdistill.models import loading
from selfdistill.precision import resolve_precision
from selfdistill.sampling import SamplingSettings, sampling_from
from selfdistill.tasks import Metric, get_task, list_tasks, make_task
from selfdistill.tasks.loaders import load_dataset_records
from selfdistill.tasks.resolve import guess_grader
from selfdistill.tasks.settings import CeilingSettings

Grader = Callable[[str, dict], float]


def default_grader(name: str) -> Grader:
    return eval_graders.get(name)


def score(output: str, record: Record, metric: Metric, grader: Grader) -> float:
    """One output's score; a list in the metric's answer field means 'any of these answers'."""
    row = record.to_dict()
    gold = row.get(metric.answer_field)
    if metric.answer_field == "answer" or not isinstance(gold, list):
        if metric.answer_field != "answer":
            row["answer"] = gold
        return float(grader(output, row))
    return max((float(grader(output, {**row, "answer": alternative})) for alternative in gold), default=0.0)


@dataclass
class CeilingResult:
    prompt: str  # "student" or "teacher:<template>"
    scores: dict[str, float]  # metric name -> mean score (0-1)
    outputs: list[str] = field(default_factory=list)
    loglik: float | None = None  # mean log p(demo token | prompt), nats
    first_token_loglik: float | None = None


def demonstration_loglik(
    model, prompts: list[list[int]], demos: list[list[int]], precision: str
) -> tuple[float, float]:
    """Mean per-token and mean first-token log-likelihood of each demonstration after its prompt."""
    logps = demonstration_token_logps(model, prompts, demos, precision)
    token_count = sum(len(lp) for lp in logps)
    token_sum = sum(sum(lp) for lp in logps)
    first_sum = sum(lp[0] for lp in logps if lp)
    return token_sum / max(token_count, 1), first_sum / max(len(prompts), 1)


def measure(
    model,
    tokenizer,
    records: list[Record],
    metrics: tuple[Metric, ...],
    *,
    templates: tuple[str, ...] = ("plain",),
    max_new_tokens: int = 96,
    precision: str = "fp32",
    batch_size: int = 8,
    stop_token_ids: list[int] | None = None,
    loglik: bool = True,
    grader_lookup: Callable[[str], Grader] = default_grader,
    system_prompt: str | None = None,
    engine: str = "decode",
) -> list[CeilingResult]:
    """Greedy scores (and demonstration log-likelihoods) with the student prompt and each teacher template.

    `system_prompt` is the one training would prepend to plain-string prompts (data.system_prompt),
    so the ceiling is measured on the prompts training would use. The answers come from the rollout
    engine `engine` (a registered name; its defaults), one sampler for every prompt set.
    """
    graders = {m.name: grader_lookup(m.grader) for m in metrics}
    stops = stop_token_ids or loading.stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    demos, prompt_sets = _prompt_sets(tokenizer, records, templates, system_prompt)
    settings = SamplingSettings(max_new_tokens, stops, pad, temperature=0, batch_size=batch_size, precision=precision)
    longest = max((len(p) for _, prompts in prompt_sets for p in prompts), default=0)
    with sampling_from(model, settings, engine=engine, max_prompt_tokens=longest) as sampler:
        answers = [
            (label, prompts, sampler.generate(prompts, None, desc=f"ceiling {label}")) for label, prompts in prompt_sets
        ]
    results = []
    for label, prompts, done in answers:
        outputs = [tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True) for ids in done.ids]
        scores = {
            name: sum(score(o, r, m, graders[name]) for o, r in zip(outputs, records)) / len(records)
            for m in metrics
            for name in [m.name]
        }
        result = CeilingResult(prompt=label, scores=scores, outputs=outputs)
        if loglik:
            result.loglik, result.first_token_loglik = demonstration_loglik(model, prompts, demos, precision)
        results.append(result)
    return results


def _prompt_sets(
    tokenizer, records: list[Record], templates: tuple[str, ...], system_prompt: str | None
) -> tuple[list[list[int]], list[tuple[str, list[list[int]]]]]:
    """The demonstrations' ids (ended with the chat template's end of turn), and the prompts to measure:
    ("student", ids) then ("teacher:<template>", ids) for each template."""
    # No prompt limits here: the ceiling is a diagnostic, and long prompts are part of what it shows.
    builders = {t: PromptBuilder.unlimited(tokenizer, t, system_prompt) for t in templates}
    first = builders[templates[0]]
    demos = [first.encode(r).demonstration_ids for r in records]
    prompt_sets = [("student", [first.student_ids(r) for r in records])]
    for i, t in enumerate(templates):
        # A custom template's text would break the table; name it by its position instead.
        name = t if t in TEACHER_TEMPLATES else f"custom{i + 1}"
        prompt_sets.append((f"teacher:{name}", [builders[t].teacher_ids(r) for r in records]))
    return demos, prompt_sets


def table(results: list[CeilingResult]) -> str:
    """A Markdown table: one row per prompt, scores in percent, log-likelihood gain over the student."""
    metric_names = list(results[0].scores)  # none for records without answers: log-likelihoods only
    columns = ["prompt", *metric_names, "demo loglik (nats/token)", "gain", "first-token gain"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    student = results[0]
    for r in results:
        cells = [f"{100 * r.scores[m]:.1f}" for m in metric_names]
        if r.loglik is None:
            cells += ["-", "-", "-"]
        else:
            gain = r.loglik - student.loglik
            first_gain = r.first_token_loglik - student.first_token_loglik
            cells += [f"{r.loglik:.3f}", f"{gain:+.3f}", f"{first_gain:+.3f}"]
        lines.append(f"| {r.prompt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class Ceiling(NamedTuple):
    results: list  # a CeilingResult per prompt: the student's, then each template's
    records: int  # records measured
    precision: str  # the precision used ('auto' resolved for the device)


def measure_ceiling(settings: CeilingSettings) -> Ceiling:
    """Greedy accuracy without the demonstration (student) and with it (teacher), and the log-likelihood
    gain; with settings.outputs, every prompt's outputs are written there."""
    records, metrics, recommended = _records(settings)
    templates = [recommended if t == "task" else t for t in settings.template] or list(
        dict.fromkeys(["paper", "plain", recommended])
    )
    records = records[: settings.limit]
    lm, tokenizer = loading.load_model(settings.model)
    precision = resolve_precision(settings.precision, next(lm.parameters()).device)
    results = measure(
        lm,
        tokenizer,
        records,
        metrics,
        templates=tuple(templates),
        max_new_tokens=settings.max_new_tokens,
        precision=precision,
        batch_size=settings.batch_size,
        stop_token_ids=loading.stop_token_ids(lm, tokenizer),
        loglik=settings.loglik,
    )
    if settings.outputs:
        rows = [{"prompt": r.prompt, "index": i, "output": o} for r in results for i, o in enumerate(r.outputs)]
        write_jsonl(settings.outputs, rows)
    return Ceiling(results, len(records), precision)


def _records(settings: CeilingSettings) -> tuple[list, tuple, str]:
    """(records of the split, metrics, the recommended template) of a built-in task or a data source."""
    task, split = settings.task, settings.split
    if task in {spec.name for spec in list_tasks()}:
        spec = get_task(task)
        splits = make_task(task, settings.seed, settings.size).splits()
        if split not in splits:
            raise UserError(f"Task {task!r} has no split {split!r}; it has {', '.join(splits)}.")
        return splits[split], spec.metrics, spec.teacher_template
    records = load_dataset_records(task, format=settings.format, split="train" if split == "eval" else split)
    if not records:
        raise UserError(f"{task}: no records.")
    return records, _file_metrics(task, records[: settings.limit], settings), "plain"


def _file_metrics(task: str, records: list, settings: CeilingSettings) -> tuple:
    """The metrics of a data file: --grader, or the grader `sdft eval` and `sdft diagnose` guess from the
    records; none when no record has the field the guessed grader reads (the demonstration log-likelihood
    is then measured alone). Every measured record is checked for its grader's field before the model is
    loaded, so a file with gaps fails at once rather than after generating."""
    rows = gold_rows(records)
    if settings.grader:
        names, how = list(settings.grader), "chosen with --grader"
    else:
        names, how = [guess_grader(records)], "guessed from the file, as no --grader was given"
        fields = eval_graders.GOLD_FIELDS.get(names[0], ())
        if not any(row.get(f) is not None for _, row in rows for f in fields):
            if settings.loglik:
                return ()
            raise UserError(
                f"{task}: no record has {' or '.join(map(repr, fields))} to grade, and --no-loglik turns off the "
                "log-likelihood gain: nothing to measure. Drop --no-loglik, or give --grader."
            )
    for name in names:
        eval_graders.check_gold_fields(name, rows, how)
    return tuple(Metric(g, g) for g in names)
