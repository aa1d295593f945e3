"""`write_learner_report(status, out_dir)`: a learner's history as one HTML page and its figures.

It reads only the plain data of `Learner.status()` (what `sdft learn status` prints and `status --json`
returns), so the page never disagrees with them. It is built from the continual report's pieces: its
CSS and escaped tables (report.html), its colours, markers and PNG encoding (report.figures). The
figures are PNG files in report_files/ beside the page, as the continual report's Markdown has them,
named learner-*.png so that a continual report written to the same directory keeps its own.
"""

from __future__ import annotations

import time
from html import escape
from pathlib import Path

from selfdistill.continual import layout
from selfdistill.files import write_atomic
from selfdistill.learner.history import format_number
from selfdistill.report.figures import COLORS, MARKERS, Figure, plt, png
from selfdistill.report.html import STYLE, html_table

PREFIX = "learner-"  # of the figure files: ours to replace, every other PNG there is left alone


def write_learner_report(status: dict, out_dir: str | Path) -> Path:
    """Write `out_dir/report.html` and its figures in `out_dir/report_files/`; returns the page's path."""
    out = Path(out_dir)
    figures = [f for f in (score_figure(status), drift_figure(status)) if f is not None]
    files = out / layout.REPORT_FILES
    files.mkdir(parents=True, exist_ok=True)
    for old in files.glob(f"{PREFIX}*.png"):  # a figure an earlier page had and this one has not
        if old.stem not in {f.key for f in figures}:
            old.unlink()
    for figure in figures:
        write_atomic(files / f"{figure.key}.png", figure.png)
    return write_atomic(out / layout.REPORT_HTML, render(status, figures))


# --- figures -----------------------------------------------------------------------------------


def _label(text: str) -> str:
    """A user's name as matplotlib shows it verbatim: `$` would start mathtext, a leading `_` hides a legend entry."""
    text = str(text).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _points(ax, xs: list, ys: list, outcomes: list, color: str, marker: str, **line) -> None:
    """A line through the measured points, each marker filled unless its round was rejected (hollow)."""
    kept = [(x, y, o) for x, y, o in zip(xs, ys, outcomes) if y is not None]
    if not kept:
        return
    ax.plot([x for x, _, _ in kept], [y for _, y, _ in kept], color=color, **line)
    for x, y, outcome in kept:
        face = "white" if outcome == "rejected" else color
        ax.plot([x], [y], linestyle="none", marker=marker, markersize=8, color=color, markerfacecolor=face)


def _outcome_legend(ax) -> None:
    """The legend, with one entry that says what filled and hollow markers mean."""
    handles, labels = ax.get_legend_handles_labels()
    for face, text in (("grey", "candidate promoted"), ("white", "candidate rejected")):
        handles += ax.plot([], [], linestyle="none", marker="o", color="grey", markerfacecolor=face)
        labels.append(text)
    ax.legend(handles, labels, fontsize=8, loc="best")


def score_figure(status: dict) -> Figure | None:
    rows = status["matrix"]["rows"]
    if not rows:
        return None
    candidates = [r for r in rows if r["model"] == "candidate"]
    served = [r for r in rows if r["model"] == "current"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), layout="constrained")
    for i, task in enumerate(status["matrix"]["tasks"]):
        color, marker = COLORS[i % len(COLORS)], MARKERS[i % len(MARKERS)]
        xs = [r["round"] for r in candidates]
        _points(ax, xs, [r["scores"][i] for r in candidates], [r["outcome"] for r in candidates], color, marker)
        ax.plot([], [], color=color, marker=marker, label=_label(task))  # the task's legend entry
        ys = [(r["round"], r["scores"][i]) for r in served if r["scores"][i] is not None]
        if ys:
            ax.plot(*zip(*ys), color=color, linestyle=":", linewidth=1.2, alpha=0.8)
    ax.plot([], [], color="grey", linestyle=":", label="served version (before the round)")
    ax.set_ylim(-0.03, 1.03)
    _round_axes(
        ax,
        sorted({r["round"] for r in rows}),
        "held-out score (fraction correct)",
        "Held-out score of every task, per round",
    )
    return Figure(
        f"{PREFIX}scores",
        "Held-out scores per round",
        "One colour per task. Solid line and markers: the round's candidate (filled: promoted, hollow: rejected "
        "by the gate); dotted: the version served when the round began, evaluated on the same records.",
        png(fig),
    )


# (key in the round's metrics, which side, legend label): every drift the rounds measure, in KL nats/token.
DRIFTS = [
    ("drift_from_base", "current", "served version: from the base model"),
    ("drift_from_base", "candidate", "candidate: from the base model"),
    ("drift_from_current", "candidate", "candidate: from the served version"),
]


def _round_axes(ax, rounds: list[int], ylabel: str, title: str) -> None:
    """Rounds on the x axis, a grid, the promoted/rejected legend and the title: what both figures share."""
    ax.set_xticks(rounds)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    _outcome_legend(ax)
    ax.set_title(title)


def drift_figure(status: dict) -> Figure | None:
    rounds = [r for r in status["rounds"] if r["metrics"]]
    series = [[r["metrics"][side].get(key) for r in rounds] for key, side, _ in DRIFTS]
    if not any(v is not None for values in series for v in values):
        return None  # drift is off (eval.drift.enabled: false) or no round was evaluated yet
    fig, ax = plt.subplots(figsize=(7.5, 4.0), layout="constrained")
    xs = [r["number"] for r in rounds]
    for c, ((_key, side, label), values) in enumerate(zip(DRIFTS, series)):
        outcomes = [r["outcome"] if side == "candidate" else None for r in rounds]
        style = "-" if side == "candidate" else ":"  # dotted like the served version's scores
        _points(ax, xs, values, outcomes, COLORS[c], MARKERS[c], linestyle=style)
        ax.plot([], [], color=COLORS[c], marker=MARKERS[c], linestyle=style, label=label)
    _round_axes(ax, xs, "KL divergence (nats/token)", "Drift per round")
    return Figure(
        f"{PREFIX}drift",
        "Drift across versions",
        "KL divergence per token on the general drift prompts. The base-model lines show how far the line of "
        "versions has moved in total; the candidate's drift from the served version is what one round adds. "
        "Hollow markers: rejected candidates.",
        png(fig),
    )


# --- the page ----------------------------------------------------------------------------------


def render(status: dict, figures: list[Figure]) -> str:
    by_key = {f.key: f for f in figures}
    served = status["current_version"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>selfdistill learner report</title>"
        f"<style>{STYLE}</style></head><body>",
        "<h1>Learner report</h1>",
        f"<p class='meta'>Learner {escape(status['workspace'])} - base model {escape(status['base_model'])}, "
        f"method {escape(status['method'])}. Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.</p>",
        f"<p class='finding'>Serving version v{served}.</p>",
        "<h2>Versions</h2>",
        html_table(["Version", "Parent", "Round", "Kind", "Served", "Created", "Decision"], _version_rows(status)),
        "<h2>Held-out scores per round</h2>",
        _figure(by_key.get(f"{PREFIX}scores")) or "<p>No round has been evaluated yet.</p>",
    ]
    if status["matrix"]["rows"]:
        header = ["Round", "Model", *status["matrix"]["tasks"], "Probes", "Drift from base"]
        parts.append(html_table(header, _matrix_rows(status), "scores"))
        parts.append("<p class='legend'>Scores: fraction of each task's held-out records answered correctly.</p>")
    parts += ["<h2>Gate decisions</h2>", *_decisions(status)]
    parts.append("<h2>Drift across versions</h2>")
    parts.append(_figure(by_key.get(f"{PREFIX}drift")) or "<p>No drift was measured (eval.drift is off).</p>")
    parts.append(_drift_table(status))
    parts.append("<h2>Demonstrations per task</h2>")
    rows = [[name, t["grader"], t["train"], t["heldout"], t["pending"]] for name, t in status["tasks"].items()]
    parts.append(html_table(["Task", "Grader", "Train", "Held out", "Pending (next round)"], rows))
    parts.append("</body></html>")
    return "\n".join(parts)


def _figure(figure: Figure | None) -> str:
    if figure is None:
        return ""
    src = f"{layout.REPORT_FILES}/{figure.key}.png"
    return (
        f"<figure><img alt='{escape(figure.title)}' src='{escape(src)}'>"
        f"<figcaption>{escape(figure.caption)}</figcaption></figure>"
    )


def _version_rows(status: dict) -> list[list[str]]:
    rounds = {r["number"]: r for r in status["rounds"]}
    rows = []
    for v in status["versions"]:
        decision = (rounds.get(v["round"]) or {}).get("decision") or {}
        summary = decision.get("summary", "base model" if v["kind"] == "base" else "")
        parent = "" if v["parent"] is None else f"v{v['parent']}"
        served = "yes" if v["number"] == status["current_version"] else ""
        rows.append([f"v{v['number']}", parent, v["round"] or "", v["kind"], served, v["created_at"], summary])
    return rows


def _matrix_rows(status: dict) -> list[list[str]]:
    rows = []
    for row in status["matrix"]["rows"]:
        label = (
            f"v{row['version']} (served)" if row["model"] == "current" else f"candidate ({row['outcome'] or 'open'})"
        )
        rows.append(
            [
                row["round"],
                label,
                *[format_number(s) for s in row["scores"]],
                format_number(row["probes"]),
                format_number(row["drift_from_base"], 4),
            ]
        )
    return rows


def _decisions(status: dict) -> list[str]:
    """Per round: its outcome and summary, then every check with its value, limit and verdict."""
    parts = []
    for r in status["rounds"]:
        outcome = r["outcome"] or f"open (stage {r['stage']})"
        css = {"promoted": "ok", "rejected": "bad"}.get(r["outcome"], "meta")
        parts.append(
            f"<h3>Round {r['number']} from v{r['parent_version']}: <span class='{css}'>{escape(outcome)}</span></h3>"
        )
        decision = r["decision"]
        if not decision:
            parts.append("<p>No decision yet.</p>")
            continue
        parts.append(f"<p>{escape(decision['summary'])}</p>")
        rows = [
            [
                c["name"],
                "n/a" if c["value"] is None else f"{c['value']:+.4f}",
                f"{c['rule']} {c['limit']:g}",
                "pass" if c["passed"] else "FAILED",
            ]
            for c in decision["checks"]
        ]
        if rows:
            parts.append(html_table(["Check", "Value", "Allowed", "Result"], rows))
    return parts or ["<p>No round yet.</p>"]


def _drift_table(status: dict) -> str:
    rows = [
        [
            r["number"],
            r["outcome"] or "open",
            *[format_number(r["metrics"][side].get(key), 4) for key, side, _ in DRIFTS],
        ]
        for r in status["rounds"]
        if r["metrics"]
    ]
    return html_table(["Round", "Outcome", *[label for _, _, label in DRIFTS]], rows) if rows else ""
