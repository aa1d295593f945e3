"""diagnose.json (every number) and diagnose.html (one self-contained page, no external resources)."""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path

from selfdistill.diagnosis.core import RecordTrace
from selfdistill.files import write_atomic

# What each field of diagnose.json means; written into the file so it explains itself.
FIELDS = {
    "settings": "model, task, template and the rollout / divergence settings the numbers were measured with",
    "summary.divergence_total": "sum of the per-token divergence over every position of every completion, nats",
    "summary.divergence_per_token": "divergence_total / tokens",
    "summary.first_k_share": "share of divergence_total at completion positions j < k (k = 1, 4, 16); null if the total is 0",
    "summary.in_loss_share": "share of divergence_total at positions training counts (j >= skip_first_tokens)",
    "summary.format_share / answer_share": "share of divergence_total at format tokens (no letter or digit: punctuation, "
    "brackets, quotes, whitespace, special tokens) / at all other tokens; they add up to 1",
    "summary.format_token_fraction": "fraction of positions that are format tokens",
    "summary.logp_gap_mean": "mean over positions of log p_teacher(sampled token) - log p_student(sampled token), nats",
    "summary.teacher_top_differs / student_top_differs": "fraction of positions where the teacher's (student's) most likely "
    "token is not the sampled token",
    "summary.demo_first_token_teacher_p / _student_p": "mean over records of the probability of the demonstration's first "
    "token right after the teacher (student) prompt",
    "summary.clipped_fraction": "fraction of completions that hit max_new_tokens",
    "ceiling": "greedy scores (0-1) with the student prompt and with the teacher prompt, mean demonstration "
    "log-likelihood (nats/token) and its gain over the student prompt (null with --no-ceiling)",
    "advice": "the advice printed with the summary, each derived from a number above",
    "records[].completions[]": "one sampled completion: per-position arrays of equal length, position j is completion token j",
    "records[].completions[].student_logp / teacher_logp": "log-probability of the sampled token after the student / teacher "
    "prompt and the earlier completion tokens",
    "records[].completions[].student_p / teacher_p": "the same as probabilities",
    "records[].completions[].logp_gap": "teacher_logp - student_logp (positive: the teacher likes the token more)",
    "records[].completions[].divergence": "per-position divergence of settings.divergence between the two next-token "
    "distributions, over the full vocabulary (or top_k), nats",
    "records[].completions[].is_format / in_loss": "format token (see above) / counted by the training loss",
    "records[].completions[].teacher_top / student_top": "the 5 most likely tokens as [token id, text, probability]",
}


def _completion_json(c) -> dict:
    return {
        "rollout": c.rollout,
        "seed": c.seed,
        "finished": c.finished,
        "text": "".join(c.token_texts),
        "token_ids": c.token_ids,
        "token_texts": c.token_texts,
        "student_logp": c.student_logp,
        "teacher_logp": c.teacher_logp,
        "student_p": [math.exp(v) for v in c.student_logp],
        "teacher_p": [math.exp(v) for v in c.teacher_logp],
        "logp_gap": [t - s for t, s in zip(c.teacher_logp, c.student_logp)],
        "divergence": c.divergence,
        "is_format": c.is_format,
        "in_loss": c.in_loss,
        "teacher_top": [[list(t) for t in row] for row in c.teacher_top],
        "student_top": [[list(t) for t in row] for row in c.student_top],
    }


def _nan_to_none(x):
    return None if isinstance(x, float) and math.isnan(x) else x


def to_json(
    settings: dict,
    summary: dict,
    ceiling: list[dict] | None,
    advice: list[str],
    traces: list[RecordTrace],
    greedy: dict[int, dict[str, str]] | None = None,
) -> dict:
    records = []
    for r in traces:
        records.append(
            {
                "index": r.index,
                "student_prompt": r.student_prompt,
                "teacher_prompt": r.teacher_prompt,
                "demonstration": r.demonstration,
                "demo_first_token": r.demo_first_token,
                "demo_first_token_student_p": _nan_to_none(r.demo_first_student_p),
                "demo_first_token_teacher_p": _nan_to_none(r.demo_first_teacher_p),
                "greedy_outputs": (greedy or {}).get(r.index, {}),
                "completions": [_completion_json(c) for c in r.completions],
            }
        )
    return {
        "fields": FIELDS,
        "settings": settings,
        "summary": summary,
        "ceiling": ceiling,
        "advice": advice,
        "records": records,
    }


# ---- HTML ----------------------------------------------------------------------------------

GAP_SCALE = 3.0  # nats: a gap of this size or more gets the full colour

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; } td:first-child, th:first-child { text-align: left; }
th { background: #f2f2f2; }
.completion { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.9em; white-space: pre-wrap;
              word-break: break-word; border: 1px solid #ddd; border-radius: 4px; padding: 0.5em; margin: 0.4em 0 1em; }
.tok { border-radius: 2px; } .tok.masked { text-decoration: underline dotted #888; }
pre { white-space: pre-wrap; word-break: break-word; font-size: 0.85em; background: #fafafa; padding: 0.4em; margin: 0.3em 0; }
.meta, .legend { color: #555; font-size: 0.92em; } li { margin: 0.3em 0; }
.key span { padding: 0 0.6em; }
"""


def gap_colour(gap: float) -> str:
    """Red when the teacher likes the sampled token less than the student, green when more."""
    strength = min(abs(gap) / GAP_SCALE, 1.0)
    red, green = (220, 38, 38), (22, 163, 74)
    r, g, b = red if gap < 0 else green
    return f"rgba({r},{g},{b},{0.08 + 0.72 * strength:.3f})"


def _fmt_top(row) -> str:
    return ", ".join(f"{json.dumps(text, ensure_ascii=False)} {p:.3f}" for _, text, p in row)


def _token_span(c, j: int) -> str:
    gap = c.teacher_logp[j] - c.student_logp[j]
    title = (
        f"position {j}{'' if c.in_loss[j] else ' (left out of the loss)'}; {'format' if c.is_format[j] else 'answer'} token\n"
        f"student p {math.exp(c.student_logp[j]):.4f}, teacher p {math.exp(c.teacher_logp[j]):.4f}, "
        f"gap {gap:+.3f} nats, divergence {c.divergence[j]:.4f}\n"
        f"teacher top: {_fmt_top(c.teacher_top[j])}\nstudent top: {_fmt_top(c.student_top[j])}"
    )
    text = c.token_texts[j].replace("\n", "\u21b5\n")  # make newlines visible
    css = "tok" if c.in_loss[j] else "tok masked"
    return f'<span class="{css}" style="background:{gap_colour(gap)}" title="{escape(title)}">{escape(text)}</span>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def summary_lines(summary: dict) -> list[tuple[str, str]]:
    """(label, value) pairs, shared by the terminal output and the HTML table."""

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def num(x, spec):
        return "n/a" if x is None else format(x, spec)

    first = summary["first_k_share"]
    return [
        (
            "completions / tokens",
            f"{summary['completions']} / {summary['tokens']} "
            f"(mean {summary['mean_completion_tokens']:.1f} tokens, {pct(summary['clipped_fraction'])} clipped)",
        ),
        (
            "divergence total / per token",
            f"{summary['divergence_total']:.3f} / {summary['divergence_per_token']:.4f} nats",
        ),
        ("share in first 1 / 4 / 16 tokens", f"{pct(first['1'])} / {pct(first['4'])} / {pct(first['16'])}"),
        (
            "share counted by the loss",
            f"{pct(summary['in_loss_share'])} (skip_first_tokens={summary['skip_first_tokens']})",
        ),
        (
            "share at format / answer tokens",
            f"{pct(summary['format_share'])} / {pct(summary['answer_share'])} "
            f"(format tokens: {pct(summary['format_token_fraction'])} of positions)",
        ),
        ("mean teacher - student log p (sampled tokens)", f"{summary['logp_gap_mean']:+.4f} nats"),
        (
            "teacher's / student's top token != sampled",
            f"{pct(summary['teacher_top_differs'])} / {pct(summary['student_top_differs'])}",
        ),
        (
            "p(demonstration's first token): teacher / student",
            f"{num(summary['demo_first_token_teacher_p'], '.4f')} / "
            f"{num(summary['demo_first_token_student_p'], '.4f')}",
        ),
    ]


def ceiling_table_rows(ceiling: list[dict]) -> tuple[list[str], list[list[str]]]:
    metrics = list(ceiling[0]["scores"])
    header = ["prompt"] + [f"{m} (%)" for m in metrics] + ["demo loglik (nats/token)", "gain", "first-token gain"]
    rows = []
    for row in ceiling:
        cells = [row["prompt"]] + [f"{100 * row['scores'][m]:.1f}" for m in metrics]
        if row.get("demo_loglik") is None:
            cells += ["-", "-", "-"]
        else:
            cells += [
                f"{row['demo_loglik']:.3f}",
                f"{row['demo_loglik_gain']:+.3f}",
                f"{row['demo_first_token_gain']:+.3f}",
            ]
        rows.append(cells)
    return header, rows


HOW_TO_READ = (
    "Each token of the student's own sampled completions is coloured by the gap log p_teacher - log p_student of that "
    "token: <b style='background:{red}'>red</b>, the teacher (shown the demonstration) likes it less than the student, "
    "so training pushes it down; <b style='background:{green}'>green</b>, the teacher likes it more, so training pushes it "
    "up; pale, they agree. Hover a token for both probabilities, the divergence and each model's top tokens. Dotted "
    "underlines mark the first tokens training leaves out of the loss. SDFT can only move the student toward what the "
    "teacher does better: if the ceiling table shows no gain, no setting of SDFT will help (change the template or use "
    "SFT). If most of the divergence sits in the first few tokens, the teacher mainly disagrees with how the student "
    "starts; if the teacher's probability of the demonstration's first token is low, the template does not carry the "
    "demonstrated format. The advice below is derived from these numbers."
)


def render_html(data: dict, traces: list[RecordTrace]) -> str:
    s = data["settings"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>sdft diagnose</title>"
        f"<style>{STYLE}</style></head><body>",
        f"<h1>SDFT diagnosis: {escape(str(s['task']))}</h1>",
        f"<p class='meta'>model {escape(str(s['model']))}; template {escape(str(s['template']))}; "
        f"{s['records']} records x {s['num_rollouts']} rollouts at temperature {s['temperature']:g}, "
        f"max {s['max_new_tokens']} new tokens; divergence {escape(str(s['divergence']))}; precision "
        f"{escape(str(s['precision']))}; seed {s['seed']}</p>",
        "<h2>How to read this</h2>",
        "<p>" + HOW_TO_READ.format(red=gap_colour(-GAP_SCALE), green=gap_colour(GAP_SCALE)) + "</p>",
    ]
    if data["advice"]:
        parts.append("<ul>" + "".join(f"<li>{escape(a)}</li>" for a in data["advice"]) + "</ul>")
    parts.append("<h2>Summary</h2>")
    parts.append(_table(["measure", "value"], [list(p) for p in summary_lines(data["summary"])]))
    parts.append("<h2>Teacher ceiling (greedy)</h2>")
    if data["ceiling"]:
        header, rows = ceiling_table_rows(data["ceiling"])
        parts.append(_table(header, rows))
    else:
        parts.append("<p class='meta'>Not measured (--no-ceiling).</p>")
    key = "".join(f"<span style='background:{gap_colour(g)}'>{g:+g}</span>" for g in (-3, -2, -1, -0.3, 0.3, 1, 2, 3))
    parts.append(f"<h2>Completions</h2><p class='legend key'>teacher - student log p (nats): {key}</p>")
    records = {r["index"]: r for r in data["records"]}
    for trace in traces:
        r = records[trace.index]
        parts.append(f"<h3>Record {trace.index}</h3>")
        parts.append(f"<details><summary>student prompt</summary><pre>{escape(trace.student_prompt)}</pre></details>")
        parts.append(f"<details><summary>teacher prompt</summary><pre>{escape(trace.teacher_prompt)}</pre></details>")
        parts.append(f"<details><summary>demonstration</summary><pre>{escape(trace.demonstration)}</pre></details>")
        for label, text in r["greedy_outputs"].items():
            parts.append(
                f"<details><summary>greedy output, {escape(label)} prompt</summary><pre>{escape(text)}</pre></details>"
            )
        for c in trace.completions:
            total = sum(c.divergence)
            parts.append(
                f"<p class='meta'>rollout {c.rollout} (seed {c.seed}): {len(c.token_ids)} tokens"
                f"{'' if c.finished else ', clipped'}; divergence {total:.3f} nats</p>"
            )
            parts.append(
                "<div class='completion'>" + "".join(_token_span(c, j) for j in range(len(c.token_ids))) + "</div>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def write(out: Path, data: dict, traces: list[RecordTrace]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "diagnose.json", out / "diagnose.html"
    write_atomic(json_path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    write_atomic(html_path, render_html(data, traces))
    return json_path, html_path
