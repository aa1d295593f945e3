"""Task evaluation: generate for every record, grade, and summarize.

Greedy decoding by default (one output per record, as the paper evaluates). With
`n_samples > 1` each record is sampled `n` times (each sample with its own seed, so results do
not depend on batch size) and pass@k is reported with the unbiased estimator of Chen et al.
(2021): pass@k = 1 - C(n - c, k) / C(n, k), for c correct samples out of n.

The headline `score` is the mean over records of each record's mean sample score; the 95%
interval around it is the Wilson score interval with the number of records as n (exact
coverage theory holds for 0/1 scores; for fractional scores it is the usual approximation).

Prompts are checked against the model's context before anything is generated: a prompt that
fills the context is refused (as training refuses a prompt over its limit; cutting the prompt
would grade the model on a question it was not asked), and a prompt that leaves less than
`max_new_tokens` has its answer budget cut to what fits, with one warning and a count.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

from selfdistill.data.prompts import PromptBuilder
from selfdistill.data.records import Record
from selfdistill.errors import UserError
from selfdistill.files import write_json, write_jsonl
from selfdistill.models import stop_token_ids
from selfdistill.sampling import Completions, Sampler, SamplingSettings, sampling_from

log = logging.getLogger(__name__)

CORRECT = 1.0 - 1e-9  # a sample counts as correct for pass@k when its score is 1

# Config fields that hold the number of positions a model was built for, as transformers' model
# families name it (Llama/Qwen/Mistral, GPT-2, some remote-code models).
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) as a running product, which stays accurate for large n.
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def wilson_interval(mean: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion `mean` observed over n items."""
    if n == 0:
        return (0.0, 1.0)
    denom = 1 + z * z / n
    centre = (mean + z * z / (2 * n)) / denom
    half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def grading_record(record: Record) -> dict:
    """What a grader sees: the record's fields (meta included) with its gold answer."""
    row = record.to_dict()
    row["answer"] = record.answer
    row["source"] = record.source
    return row


def record_sources(records: list[Record]) -> list[str]:
    """Where each record came from, for messages: its file and line, else its index."""
    return [r.source or f"record {i}" for i, r in enumerate(records)]


def gold_rows(records: list[Record]) -> list[tuple[str, dict]]:
    """(where, what the grader sees) of each record: what graders.check_gold_fields checks."""
    return list(zip(record_sources(records), map(grading_record, records)))


def context_length(model) -> tuple[int, str] | None:
    """(positions, the config field that says so) of the model's context; None when its config names
    none, and then prompts are not checked (the model itself may still fail on a long one)."""
    config = getattr(model, "config", None)
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value, name
    return None


def answer_budgets(model, prompts: list[list[int]], sources: list[str], max_new_tokens: int) -> list[int]:
    """Each prompt's budget of new tokens: `max_new_tokens`, or what the model's context leaves after
    the prompt. A prompt that leaves no room is a UserError naming it (and how many more there are)."""
    found = context_length(model)
    if found is None:
        return [max_new_tokens] * len(prompts)
    context, field = found
    over = [i for i, p in enumerate(prompts) if len(p) >= context]
    if over:
        first = over[0]
        more = f" {len(over) - 1} more prompts are too long as well." if len(over) > 1 else ""
        raise UserError(
            f"{sources[first]}, field 'prompt': the prompt has {len(prompts[first])} tokens, but the model's "
            f"context is {context} positions ({field}), which leaves no room for an answer. Shorten the prompt "
            f"or leave the record out.{more}"
        )
    budgets = [min(max_new_tokens, context - len(p)) for p in prompts]
    cut = [b for b in budgets if b < max_new_tokens]
    if cut:
        log.warning(
            "%d of %d prompts leave fewer than the %d new tokens asked for within the model's context of %d "
            "positions (%s): their answers stop at the context's end (after as few as %d tokens).",
            len(cut),
            len(prompts),
            max_new_tokens,
            context,
            field,
            min(cut),
        )
    return budgets


def answer_settings(model, tokenizer, max_new_tokens: int, **options) -> SamplingSettings:
    """The sampling settings of a model's answers: every end-of-turn token of the model stops one, padded
    with the tokenizer's pad token; `options`: temperature, top_p, batch_size, precision."""
    return SamplingSettings(max_new_tokens, stop_token_ids(model, tokenizer), tokenizer.pad_token_id, **options)


def generate_within(
    sampler: Sampler, rows: list[list[int]], budgets: list[int], *, seeds: list[int] | None, desc: str | None = None
) -> Completions:
    """`sampler.generate` with a budget of new tokens per row: one call per distinct budget, so rows whose
    budget the context cut share no batch with the others (usually there is one budget, one call).
    Each row is seeded on its own, so the grouping changes no output."""
    ids: list[list[int]] = [[] for _ in rows]
    finished = [False] * len(rows)
    for budget in sorted(set(budgets), reverse=True):
        chosen = [i for i, b in enumerate(budgets) if b == budget]
        done = sampler.generate(
            [rows[i] for i in chosen],
            [seeds[i] for i in chosen] if seeds is not None else None,
            desc=desc,
            max_new_tokens=budget,
        )
        for i, out, end in zip(chosen, done.ids, done.finished):
            ids[i], finished[i] = out, end
    return Completions(ids=ids, finished=finished)


def _check(records: list[Record], n_samples: int, temperature: float) -> None:
    if not records:
        raise UserError("Nothing to evaluate: the task has no records.")
    if n_samples < 1:
        raise UserError(f"n_samples must be at least 1, got {n_samples}.")
    if n_samples > 1 and temperature <= 0:
        raise UserError("n_samples > 1 with greedy decoding gives n identical outputs; set a temperature > 0.")


def evaluate(
    model,
    tokenizer,
    records: list[Record],
    grader: Callable[[str, dict], float],
    *,
    n_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    precision: str = "fp32",
    seed: int = 0,
    system_prompt: str | None = None,
    ks: list[int] | None = None,
    out_dir: str | Path | None = None,
    desc: str = "evaluate",
    examples: list | None = None,
    engine: str = "decode",
    sampler: Sampler | None = None,
) -> dict:
    """Generate, grade and summarize; with `out_dir`, write `examples.jsonl` and `summary.json` there.

    Pass a list as `examples` to receive the per-record results in memory. The answers come from the
    rollout engine `engine` (a registered name; its defaults), or from a ready `sampler`, built by the
    caller with these settings (temperature, top_p, batch_size, precision, at least max_new_tokens).
    """
    _check(records, n_samples, temperature)
    builder = PromptBuilder(tokenizer, system_prompt=system_prompt)
    prompts = [builder.student_ids(r) for r in records]
    budgets = answer_budgets(model, prompts, record_sources(records), max_new_tokens)  # before any generating
    # Sample j of record i is row i * n + j, seeded by (seed, i, j) only.
    rows = [p for p in prompts for _ in range(n_samples)]
    seeds = [seed * 1_000_003 + i for i in range(len(rows))] if temperature > 0 else None
    sampling = {"temperature": temperature, "top_p": top_p, "batch_size": batch_size, "precision": precision}
    settings = answer_settings(model, tokenizer, max_new_tokens, **sampling)
    longest = max(map(len, prompts))
    with sampling_from(model, settings, engine=engine, max_prompt_tokens=longest, sampler=sampler) as chosen:
        done = generate_within(chosen, rows, [b for b in budgets for _ in range(n_samples)], seeds=seeds, desc=desc)
    examples = [] if examples is None else examples
    for i, record in enumerate(records):
        examples.append(_example(i, record, done, tokenizer, grader, n_samples))
        if budgets[i] < max_new_tokens:
            examples[-1]["context_budget"] = budgets[i]  # the new tokens the model's context left it
    summary = summarize(examples, n_samples, ks)
    summary.update(
        n_samples=n_samples,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        context_cut=sum(b < max_new_tokens for b in budgets),  # records whose budget the context cut
        precision=precision,
        seed=seed,
    )
    if out_dir is not None:
        write_results(out_dir, examples, summary)
    return summary


def _example(i: int, record: Record, done, tokenizer, grader: Callable[[str, dict], float], n_samples: int) -> dict:
    """Record i's outputs (rows i * n_samples ... of the generation), graded, as examples.jsonl holds them."""
    gold = grading_record(record)
    outputs, scores, clipped = [], [], 0
    for j in range(n_samples):
        row = i * n_samples + j
        text = tokenizer.decode(done.ids[row], skip_special_tokens=True)
        score = float(grader(text, gold))
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"grader returned {score}, outside [0, 1]")
        outputs.append(text)
        scores.append(score)
        clipped += not done.finished[row]
    # Tool-use records keep their gold calls in `golden_answer`; show them as the answer.
    answer = record.answer if record.answer is not None else record.meta.get("golden_answer")
    example = {
        "index": i,
        "source": record.source,
        "prompt": record.prompt,
        "answer": answer,
        "output": outputs[0] if n_samples == 1 else outputs,
        "score": sum(scores) / n_samples,
        "clipped": clipped,
    }
    if n_samples > 1:
        example["scores"] = scores
    return example


def summarize(examples: list[dict], n_samples: int = 1, ks: list[int] | None = None) -> dict:
    count = len(examples)
    mean = sum(e["score"] for e in examples) / count
    low, high = wilson_interval(mean, count)
    summary = {
        "score": mean,
        "count": count,
        "ci95": [low, high],
        "ci_method": "wilson",
        "clipped": sum(e["clipped"] for e in examples),
    }
    if n_samples > 1:
        ks = sorted({k for k in (ks or [1, n_samples]) if 1 <= k <= n_samples})
        summary["pass_at_k"] = {
            str(k): sum(pass_at_k(n_samples, sum(s >= CORRECT for s in e["scores"]), k) for e in examples) / count
            for k in ks
        }
    return summary


def write_results(out_dir: str | Path, examples: list[dict], summary: dict) -> None:
    out = Path(out_dir)
    write_jsonl(out / "examples.jsonl", examples)
    write_json(out / "summary.json", summary)
