"""The diagnosis in a few numbers, and the advice those numbers justify."""

from __future__ import annotations

import math

from selfdistill.diagnosis.core import RecordTrace
from selfdistill.eval.ceiling import CeilingResult

FIRST_K = (1, 4, 16)


def _share(part: float, total: float) -> float | None:
    return part / total if total > 0 else None  # no divergence at all: shares are undefined


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else None


def summarize(traces: list[RecordTrace], skip_first_tokens: int) -> dict:
    """Totals over every position of every completion (see docs/diagnose.md for each field)."""
    completions = [c for r in traces for c in r.completions]
    positions = [(j, c) for c in completions for j in range(len(c.token_ids))]
    total = sum(c.divergence[j] for j, c in positions)
    first = {k: sum(c.divergence[j] for j, c in positions if j < k) for k in FIRST_K}
    fmt = sum(c.divergence[j] for j, c in positions if c.is_format[j])
    in_loss = sum(c.divergence[j] for j, c in positions if c.in_loss[j])
    count = len(positions)
    return {
        "records": len(traces),
        "completions": len(completions),
        "tokens": count,
        "mean_completion_tokens": count / len(completions) if completions else 0.0,
        "clipped_fraction": sum(not c.finished for c in completions) / len(completions) if completions else 0.0,
        "divergence_total": total,
        "divergence_per_token": total / count if count else 0.0,
        "first_k_share": {str(k): _share(v, total) for k, v in first.items()},
        "in_loss_share": _share(in_loss, total),
        "skip_first_tokens": skip_first_tokens,
        "format_share": _share(fmt, total),
        "answer_share": _share(total - fmt, total),
        "format_token_fraction": sum(c.is_format[j] for j, c in positions) / count if count else 0.0,
        "logp_gap_mean": sum(c.teacher_logp[j] - c.student_logp[j] for j, c in positions) / count if count else 0.0,
        "teacher_top_differs": sum(c.teacher_top[j][0][0] != c.token_ids[j] for j, c in positions) / count
        if count
        else 0.0,
        "student_top_differs": sum(c.student_top[j][0][0] != c.token_ids[j] for j, c in positions) / count
        if count
        else 0.0,
        "demo_first_token_teacher_p": _mean([r.demo_first_teacher_p for r in traces]),
        "demo_first_token_student_p": _mean([r.demo_first_student_p for r in traces]),
    }


def ceiling_rows(results: list[CeilingResult]) -> list[dict]:
    """The ceiling as JSON rows: scores, demonstration log-likelihood and gains over the student prompt."""
    student = results[0]
    rows = []
    for r in results:
        row = {
            "prompt": r.prompt,
            "scores": r.scores,
            "demo_loglik": r.loglik,
            "demo_first_token_loglik": r.first_token_loglik,
        }
        if r.loglik is not None and student.loglik is not None:
            row["demo_loglik_gain"] = r.loglik - student.loglik
            row["demo_first_token_gain"] = r.first_token_loglik - student.first_token_loglik
        rows.append(row)
    return rows


# Thresholds of the advice. They are rules of thumb, stated with the advice so a reader can judge them.
NO_GAIN_NATS = 0.1  # demonstration log-likelihood gain below this: the demonstration barely changes the model
EARLY_SHARE = 0.5  # half or more of the divergence in the first 4 tokens: the disagreement is about the start
LOW_FIRST_P = 0.1  # the teacher rarely starts like the demonstration
WEAK_DIVERGENCE = 0.05  # nats per token: teacher and student nearly agree on the student's samples
CLIPPED = 0.25
CONCENTRATED = 1.5  # a kind of token carries 1.5x its share of positions
OFF_MODE = 0.5  # the sampled token is not the student's own top token at half the positions or more


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def advice(summary: dict, ceiling: list[dict] | None, temperature: float) -> list[str]:
    """Plain-language advice, each item derived from a number above (and quoting it)."""
    out = _ceiling_advice(ceiling) if ceiling else []
    out += _start_advice(summary)
    if summary["divergence_per_token"] < WEAK_DIVERGENCE:
        out.append(
            f"Teacher and student nearly agree on the student's own samples ({summary['divergence_per_token']:.3f} nats "
            "per token): the per-token training signal is weak, so expect many steps or a larger learning rate."
        )
    fmt, fmt_positions = summary["format_share"], summary["format_token_fraction"]
    # Only worth saying when one kind of token carries clearly more than its share of positions.
    if fmt is not None and 0 < fmt_positions < 1:
        if fmt >= CONCENTRATED * fmt_positions:
            out.append(
                f"Format tokens (punctuation, brackets, newlines) carry {_pct(fmt)} of the divergence while being "
                f"{_pct(fmt_positions)} of the positions: the teacher mainly disagrees about the format."
            )
        elif 1 - fmt >= CONCENTRATED * (1 - fmt_positions):
            out.append(
                f"Answer (content) tokens carry {_pct(1 - fmt)} of the divergence while being "
                f"{_pct(1 - fmt_positions)} of the positions: the teacher mainly disagrees about the content."
            )
    if summary["student_top_differs"] >= OFF_MODE and temperature > 0:
        out.append(
            f"At temperature {temperature:g} the sampled token is not the student's own top token at "
            f"{_pct(summary['student_top_differs'])} of positions (and not the teacher's at "
            f"{_pct(summary['teacher_top_differs'])}): samples drift from both models' likely text, which spreads the "
            "signal; a lower rollout.temperature keeps samples nearer what the student would write."
        )
    if summary["clipped_fraction"] >= CLIPPED:
        out.append(
            f"{_pct(summary['clipped_fraction'])} of completions hit --max-new-tokens: the numbers miss their ends; "
            "raise it (rollout.max_new_tokens) if training will allow longer completions."
        )
    return out


def _ceiling_advice(ceiling: list[dict]) -> list[str]:
    """Whether the teacher (the last prompt of the ceiling) is better than the student (the first)."""
    out: list[str] = []
    student, teacher = ceiling[0], ceiling[-1]
    metrics = list(student["scores"])
    gain_points = 100 * (teacher["scores"][metrics[0]] - student["scores"][metrics[0]]) if metrics else None
    gain_nats = teacher.get("demo_loglik_gain")
    if gain_nats is not None and gain_nats < NO_GAIN_NATS and (gain_points is None or gain_points <= 0):
        out.append(
            f"No teacher ceiling: with the demonstration the model is not better (demonstration log-likelihood "
            f"gain {gain_nats:+.2f} nats/token"
            + (f", accuracy {gain_points:+.0f} points" if gain_points is not None else "")
            + "). SDFT distils exactly that difference, so it cannot help here: try another teacher template "
            "(--template plain, or the task's own) or use SFT."
        )
    elif gain_points is not None and gain_points <= 0:
        out.append(
            f"Greedy accuracy does not rise with the demonstration ({gain_points:+.0f} points on {metrics[0]}), but the "
            f"demonstration becomes more likely ({gain_nats:+.2f} nats/token): the teacher's signal exists but does not "
            "produce correct greedy answers. Expect slow progress in accuracy; during training watch the "
            "demonstration log-likelihood under the student prompt, and try other templates first."
        )
    elif gain_points is not None:
        out.append(
            f"The teacher is better than the student by {gain_points:+.0f} points ({metrics[0]}): there is something to "
            "distil."
        )
    return out


def _start_advice(summary: dict) -> list[str]:
    """How much of the divergence is at the start of the answer, and how likely the teacher finds the
    demonstration's start."""
    out: list[str] = []
    first4 = summary["first_k_share"]["4"]
    if first4 is not None and first4 >= EARLY_SHARE:
        text = (
            f"{_pct(first4)} of the divergence sits in the first 4 tokens: the teacher mostly disagrees with how the "
            "student starts its answer. More rollouts per prompt (more chances to sample a start the teacher likes), a "
            "larger learning rate, or a format hint in the prompt (so the student's own samples start closer to the "
            "demonstration) target that."
        )
        masked = 1 - summary["in_loss_share"] if summary["in_loss_share"] is not None else 0.0
        if summary["skip_first_tokens"] > 0 and masked >= 0.25:
            text += (
                f" Note that loss.skip_first_tokens={summary['skip_first_tokens']} leaves {_pct(masked)} of the divergence "
                "out of the loss; consider 0 when the start is what must change."
            )
        out.append(text)
    first_p, student_p = summary["demo_first_token_teacher_p"], summary["demo_first_token_student_p"]
    if first_p is not None and first_p < LOW_FIRST_P:
        relation = (
            "more likely than the student does"
            if student_p is not None and first_p > 2 * student_p
            else "no more likely than the student does"
        )
        out.append(
            f"The teacher gives the demonstration's first token p={first_p:.4f} (student {student_p:.4f}): shown the "
            f"demonstration, it finds that start {relation}, but still rarely starts that way, so the student's own "
            "samples start elsewhere and the signal toward the demonstrated format has to come later in the "
            "completion. Another template wording may raise it: `sdft data ceiling TASK --template ...` compares "
            "templates."
        )
    return out
