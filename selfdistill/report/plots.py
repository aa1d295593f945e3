"""The report's figures, drawn with matplotlib (Agg, no display) and returned as PNG bytes.

Each function takes the `results.json` dict (and, for training curves, the run directory) and
returns a `Figure(title, caption, png)`; `all_figures` returns them in report order. Figures are
written for readers who have not read the paper: every axis says what it measures and in which
unit, and captions say how to read the figure.
"""

from __future__ import annotations

import json
from pathlib import Path

from selfdistill.continual import layout
from selfdistill.report.figures import COLORS, Figure, finished_methods, plt, png, stage_labels
from selfdistill.report.frontier_plots import frontier, loglik_matrices


def accuracy_matrices(results: dict) -> Figure:
    tasks = [t["name"] for t in results["tasks"]]
    methods = finished_methods(results)
    fig, axes = plt.subplots(
        1,
        len(methods),
        figsize=(2.5 + 1.5 * len(tasks) * len(methods) + 1.5, 1.6 + 0.6 * (len(tasks) + 1)),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for ax, (name, summary) in zip(axes[0], methods):
        matrix = [[cell["mean"] for cell in row] for row in summary["R"]]
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for k, row in enumerate(matrix):
            for i, value in enumerate(row):
                ax.text(
                    i,
                    k,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white" if value < 0.6 else "black",
                )
        ax.set_xticks(range(len(tasks)), tasks, rotation=20)
        ax.set_yticks(range(len(tasks) + 1), stage_labels(tasks) if ax is axes[0][0] else [""] * (len(tasks) + 1))
        ax.set_xlabel("evaluated on task")
        ax.set_title(f"method: {name}")
    axes[0][0].set_ylabel("model after stage")
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label="score (fraction correct)", shrink=0.9)
    fig.suptitle("Accuracy matrix R: score on each task (columns) after each training stage (rows)")
    return Figure(
        "matrix",
        "Accuracy matrix per method",
        "Row k is the model after training on the first k tasks; the diagonal below 'start' is each task "
        "right after it was learned. Colour and number: mean score over seeds (0 = none correct, 1 = all).",
        png(fig),
    )


def task_curves(results: dict) -> Figure:
    tasks = [t["name"] for t in results["tasks"]]
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False, sharey=True, layout="constrained"
    )
    stages = list(range(len(tasks) + 1))
    for i, (ax, task) in enumerate(zip(axes[0], tasks)):
        for c, (name, summary) in enumerate(finished_methods(results)):
            means = [summary["R"][k][i]["mean"] for k in stages]
            ax.plot(stages, means, marker="o", color=COLORS[c % len(COLORS)], label=name)
            cis = [summary["R"][k][i]["ci95"] for k in stages]
            if all(ci is not None for ci in cis):
                ax.fill_between(
                    stages, [ci[0] for ci in cis], [ci[1] for ci in cis], color=COLORS[c % len(COLORS)], alpha=0.15
                )
        ax.axvline(i + 1, color="grey", linestyle=":", linewidth=1)
        ax.text(i + 1, 1.02, " trained here", color="grey", fontsize=8, transform=ax.get_xaxis_transform())
        ax.set_xticks(stages, ["start"] + [f"{k}" for k in stages[1:]])
        ax.set_xlabel("training stage (tasks learned so far)")
        ax.set_title(f"task: {task}", pad=14)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score (fraction correct)")
    axes[0][-1].legend(title="method", loc="best", fontsize=8)
    fig.suptitle("Score on each task across the stream")
    return Figure(
        "tasks",
        "Per-task score across stages",
        "One panel per task, one line per method. The dotted line marks the stage that trained on the task: "
        "a line that drops after it shows forgetting. Shaded: 95% interval across seeds (when more than one).",
        png(fig),
    )


def _curves(out: Path, method: str, seed: int, stages: int) -> tuple[list[dict], list[int]]:
    rows, boundaries, offset = [], [], 0
    for k in range(1, stages + 1):
        path = layout.train_metrics(layout.stage_dir(out, method, seed, k))
        if not path.is_file():
            break
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for line in lines:
            rows.append({**line, "global_step": offset + line["step"]})
        offset += len(lines)
        boundaries.append(offset)
    return rows, boundaries


# The training-curve panels: (metrics.jsonl key, y axis label, title).
CURVE_PANELS = [
    ("loss", "loss (nats/token)", "training loss (each method's own)"),
    ("divergence", "divergence (nats/token)", "SDFT: teacher-student divergence"),
    ("completion_length", "length (tokens)", "SDFT: student completion length"),
    (
        "demonstration_logp",
        "log-likelihood (nats/token)",
        "demonstration log-likelihood\n(lines: training batches; markers: held-out)",
    ),
]


def training_curves(results: dict, out_dir: str | Path) -> Figure:
    out = Path(out_dir)
    tasks = [t["name"] for t in results["tasks"]]
    seed = results["config"]["seeds"][0]
    n = len(CURVE_PANELS)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.6), squeeze=False, layout="constrained")
    for c, (name, entry) in enumerate(results["methods"].items()):
        rows, boundaries = _curves(out, name, seed, len(tasks))
        _method_curves(axes[0], COLORS[c % len(COLORS)], name, rows, boundaries)
        _heldout_loglik(axes[0][3], COLORS[c % len(COLORS)], name, entry["seeds"].get(str(seed)) or {}, boundaries)
    for ax, (_key, label, title) in zip(axes[0], CURVE_PANELS):
        ax.set_xlabel("optimizer step (dotted: next task)")
        ax.set_ylabel(label)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if not ax.lines or all(line.get_linestyle() == ":" for line in ax.lines):
            ax.text(
                0.5, 0.5, "not logged by these methods", ha="center", va="center", transform=ax.transAxes, color="grey"
            )
    axes[0][0].legend(title="method", fontsize=8)
    if axes[0][3].lines:
        axes[0][3].legend(fontsize=7)
    fig.suptitle(f"Training curves over the whole stream (seed {seed})")
    return Figure(
        "training",
        "Training curves",
        "Per optimizer step over the whole stream. Loss is each method's own objective, so values are "
        "comparable over time within a method, not across methods. The last panel is one quantity for every "
        "method: the log-likelihood of the demonstrations under the student prompt. Lines: the training "
        "batch's, before the step (SFT at every step; SDFT every train.demonstration_logp_every steps, "
        "with a forward of its own); markers: the held-out items' (mean over tasks with demonstrations) "
        "at the start and after each stage.",
        png(fig),
    )


def _method_curves(axes, color: str, name: str, rows: list[dict], boundaries: list[int]) -> None:
    """One method's logged values in every panel, with a dotted line where the next task begins."""
    for ax, (key, _label, _title) in zip(axes, CURVE_PANELS):
        points = [(r["global_step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), color=color, label=name, linewidth=1.3)
        for b in boundaries[:-1]:
            ax.axvline(b + 0.5, color="grey", linestyle=":", linewidth=1)


def _heldout_loglik(ax, color: str, name: str, seq: dict, boundaries: list[int]) -> None:
    """Beside the training batches' likelihood (before each logged step), the held-out one after each
    stage: the mean over the tasks that have demonstrations, on items no method trained on."""
    held = [(0, _mean(seq["loglik"][0]))] if seq.get("loglik") else []
    held += [(b, _mean(seq["loglik"][k])) for k, b in enumerate(boundaries, 1) if k < len(seq.get("loglik", []))]
    held = [(x, y) for x, y in held if y is not None]
    if held:
        ax.plot(*zip(*held), color=color, marker="o", linestyle="--", linewidth=1, label=f"{name} (held-out)")


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def all_figures(results: dict, out_dir: str | Path) -> list[Figure]:
    if not finished_methods(results):
        return []
    figures = [
        frontier(results),
        accuracy_matrices(results),
        loglik_matrices(results),
        task_curves(results),
        training_curves(results, out_dir),
    ]
    return [f for f in figures if f is not None]
