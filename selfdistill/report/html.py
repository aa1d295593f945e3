"""`report.html`: one self-contained file (figures embedded as base64 PNG, no external assets)."""

from __future__ import annotations

import base64
from html import escape

from selfdistill.report import tables

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1300px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 9px; text-align: right; vertical-align: top; }
th { background: #f2f2f2; } td:first-child, th:first-child, td:nth-child(2) { text-align: left; }
figure { margin: 1em 0 2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.92em; max-width: 900px; }
.meta { color: #555; } .legend { color: #555; font-size: 0.9em; max-width: 1000px; }
.sample { border: 1px solid #ddd; border-radius: 4px; padding: 0.6em 0.8em; margin: 0.8em 0; }
.sample table { width: 100%; } .sample td { text-align: left; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; font-size: 0.88em; }
.finding { font-size: 1.08em; background: #f6f8fa; border-left: 4px solid #1f77b4; padding: 0.6em 0.9em; max-width: 1000px; }
.ok { color: #1a7f37; font-weight: bold; } .bad { color: #b42318; font-weight: bold; }
"""


def html_table(header: list[str], rows: list[list[str]], css: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def render(results: dict, figures: list, samples: list[dict], intro: str) -> str:
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>selfdistill continual-learning report</title>"
        f"<style>{STYLE}</style></head><body>",
        "<h1>Continual-learning report</h1>",
        f"<p class='meta'>{escape(intro)}</p>",
    ]
    if not results.get("complete"):
        parts.append("<p class='bad'>This run is not finished: numbers cover the stages done so far.</p>")
    parts += _finding(results)
    parts += _tables(results)
    for figure in figures:
        data = base64.b64encode(figure.png).decode("ascii")
        parts.append(
            f"<h2>{escape(figure.title)}</h2><figure><img alt='{escape(figure.title)}' "
            f"src='data:image/png;base64,{data}'><figcaption>{escape(figure.caption)}</figcaption></figure>"
        )
    parts += _samples(samples)
    parts.append("</body></html>")
    return "\n".join(parts)


def _finding(results: dict) -> list[str]:
    """The finding, the grids and the point-by-point comparison (what there is of them)."""
    parts = []
    found = tables.finding(results)
    if found["headline"]:
        parts.append(f"<h2>Finding</h2><p class='finding'>{escape(found['headline'])}</p>")
    if tables.grids(results):
        parts.append(f"<p>{escape(tables.grids(results))}</p>")
    if found["details"]:
        items = "".join(f"<li>{escape(d)}</li>" for d in found["details"])
        parts.append(
            "<details><summary>Point by point, with 95% intervals ('within the noise': the intervals overlap)"
            f"</summary><ul class='legend'>{items}</ul></details>"
        )
    return parts


def _tables(results: dict) -> list[str]:
    """The frontier, summary metrics, scores, log-likelihood and lenient tables, each with its legend."""
    parts = []
    if tables.frontier_rows(results):
        parts.append("<h2>Frontier: every grid point at the end of the stream</h2>")
        parts.append(html_table(tables.frontier_header(), tables.frontier_rows(results), "frontier"))
        parts.append(f"<p class='legend'>{escape(tables.FRONTIER_LEGEND)}</p>")
    parts.append("<h2>Summary metrics</h2>")
    parts.append(html_table(tables.metric_header(), tables.metric_rows(results), "metrics"))
    legend = "; ".join(f"<b>{escape(label)}</b>: {escape(text)}" for _, label, text in tables.COLUMNS)
    parts.append(f"<p class='legend'>{legend}. Brackets: {escape(results['ci_method'])}.</p>")
    parts.append("<h2>Scores after every stage</h2>")
    parts.append(html_table(tables.score_header(results), tables.score_rows(results), "scores"))
    parts.append(
        "<p class='legend'>Task scores are fractions of evaluation items answered correctly (greedy decoding).</p>"
    )
    for title, (header, rows), legend in (
        ("Held-out demonstration log-likelihood", tables.loglik_table(results), tables.LOGLIK_LEGEND),
        ("Lenient and partial scores", tables.lenient_table(results), tables.LENIENT_LEGEND),
    ):
        if rows:
            parts.append(
                f"<h2>{escape(title)}</h2>"
                + html_table(header, rows, "scores")
                + f"<p class='legend'>{escape(legend)}</p>"
            )
    return parts


def _samples(samples: list[dict]) -> list[str]:
    """Per task, each sample item's prompt, expected answer and every model's output with its score."""
    parts = ["<h2>Sample outputs</h2>"] if samples else []
    for block in samples:
        parts.append(f"<h3>Task: {escape(block['task'])}</h3>")
        for item in block["items"]:
            rows = "".join(
                f"<tr><td style='width:22%'>{escape(who)}</td><td style='width:6%' class='{'ok' if score >= 1 else 'bad'}'>"
                f"{score:.2f}</td><td><pre>{escape(tables.clip(text))}</pre></td></tr>"
                for who, text, score in item["outputs"]
            )
            parts.append(
                f"<div class='sample'><b>Prompt</b><pre>{escape(tables.clip(item['prompt']))}</pre>"
                f"<p><b>Expected answer:</b> {escape(tables.clip(item['answer'], 200))}</p>"
                f"<table><thead><tr><th>Model</th><th>Score</th><th>Output</th></tr></thead><tbody>{rows}</tbody></table></div>"
            )
    return parts
