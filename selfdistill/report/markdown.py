"""`report.md`: the same content as the HTML report; figures are PNG files beside it."""

from __future__ import annotations

from selfdistill.report import tables


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render(results: dict, figure_files: list[tuple[object, str]], samples: list[dict], intro: str) -> str:
    parts = ["# Continual-learning report", "", intro, ""]
    if not results.get("complete"):
        parts += ["**This run is not finished: numbers cover the stages done so far.**", ""]
    found = tables.finding(results)
    if found["headline"]:
        parts += ["## Finding", "", found["headline"], ""]
    if tables.grids(results):
        parts += [tables.grids(results), ""]
    if found["details"]:
        parts += ["Point by point, with 95% intervals ('within the noise': the intervals overlap):", ""]
        parts += [f"- {d}" for d in found["details"]] + [""]
    if tables.frontier_rows(results):
        parts += [
            "## Frontier: every grid point at the end of the stream",
            "",
            _table(tables.frontier_header(), tables.frontier_rows(results)),
            "",
            tables.FRONTIER_LEGEND,
            "",
        ]
    parts += ["## Summary metrics", "", _table(tables.metric_header(), tables.metric_rows(results)), ""]
    parts += [f"- **{label}**: {text}" for _, label, text in tables.COLUMNS]
    parts += [f"- Brackets: {results['ci_method']}.", ""]
    parts += ["## Scores after every stage", "", _table(tables.score_header(results), tables.score_rows(results)), ""]
    for title, (header, rows), legend in (
        ("Held-out demonstration log-likelihood", tables.loglik_table(results), tables.LOGLIK_LEGEND),
        ("Lenient and partial scores", tables.lenient_table(results), tables.LENIENT_LEGEND),
    ):
        if rows:
            parts += [f"## {title}", "", _table(header, rows), "", legend, ""]
    for figure, filename in figure_files:
        parts += [f"## {figure.title}", "", f"![{figure.title}]({filename})", "", figure.caption, ""]
    if samples:
        parts += ["## Sample outputs", ""]
    for block in samples:
        parts += [f"### Task: {block['task']}", ""]
        for item in block["items"]:
            prompt = tables.clip(item["prompt"]).replace("\n", "\n> ")
            parts += [f"> {prompt}", "", f"Expected answer: `{_cell(tables.clip(item['answer'], 200))}`", ""]
            parts += [
                _table(
                    ["Model", "Score", "Output"],
                    [[who, f"{score:.2f}", tables.clip(text, 300)] for who, text, score in item["outputs"]],
                ),
                "",
            ]
    return "\n".join(parts) + "\n"
