"""The frontier and the demonstration log-likelihood figures of the report.

The frontier draws each method entry (a grid of settings) as one line through its grid points,
so two methods are compared over their settings rather than at one arbitrary setting each.
"""

from __future__ import annotations

from selfdistill.report.figures import COLORS, MARKERS, Figure, finished_methods, plt, png, stage_labels


def _err(cell: dict) -> tuple[list[list[float]], bool]:
    """matplotlib's asymmetric error bar for one cell (zero when it has no interval)."""
    ci = cell.get("ci95")
    if not ci or cell["value"] is None:
        return [[0.0], [0.0]], False
    return [[max(cell["value"] - ci[0], 0.0)], [max(ci[1] - cell["value"], 0.0)]], True


def _place_labels(ax, labels: list[tuple[float, float, str, str]]) -> None:
    """Label grid points so that no label is drawn over another.

    Each label goes just above its point unless a label already placed is within a line of it
    (in display points); then it tries below, further above, further below, and so on.
    """
    ax.get_xlim(), ax.get_ylim()  # settle autoscaled limits before converting to display points
    to_points = 72.0 / ax.figure.dpi
    placed: list[tuple[float, float]] = []  # label positions, in points
    for x, y, text, color in labels:
        px, py = (v * to_points for v in ax.transData.transform((x, y)))
        for dy in (4, -10, 14, -20, 24, -30, 34, -40):
            if all(abs(px - qx) > 45 or abs(py + dy - qy) >= 10 for qx, qy in placed):
                break
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, dy), fontsize=8, color=color)
        placed.append((px, py + dy))


def frontier(results: dict) -> Figure | None:
    fig = frontier_figure(results)
    if fig is None:
        return None
    return Figure(
        "frontier",
        "Frontier over each method's grid",
        "One line per method, through the grid points it was run at (labelled by the setting). x: new-task "
        "score; top: prior-capability probe score, bottom: drift from the starting model. Where lines cross "
        "or their bars overlap, the grid does not separate the methods. The black star is the starting model.",
        png(fig),
    )


def frontier_figure(results: dict):
    """The matplotlib figure (a test can count its lines); None before any method finished."""
    data = results.get("frontier") or {}
    points, groups = data.get("points") or {}, data.get("groups") or {}
    if not points:
        return None
    tasks = [t["name"] for t in results["tasks"]]
    n = len(tasks)
    columns = [("final", "end of the stream", "mean score on all the stream's tasks at the end (ACC)")]
    if n > 1:
        columns += [
            (k, f"after stage {k}: {tasks[k - 1]}", f"score on {tasks[k - 1]} right after training on it")
            for k in range(1, n + 1)
        ]
    rows = [
        ("prior", "prior-capability probe score\n(fraction correct; higher: kept more)"),
        ("drift", "drift from the starting model\n(KL, nats/token; lower: changed less)"),
    ]
    fig, axes = plt.subplots(
        len(rows),
        len(columns),
        figsize=(5.2 * len(columns) + 1.2, 4.3 * len(rows)),
        squeeze=False,
        layout="constrained",
    )
    start = results.get("start") or {}
    for c, (where, title, xlabel) in enumerate(columns):
        for r, (measure, ylabel) in enumerate(rows):
            ax = axes[r][c]
            labels = _frontier_lines(ax, groups, points, where, measure)
            if start:
                _starting_model(ax, start, n, where, measure)
            ax.set_xlim(-0.04, 1.04)
            if measure == "prior":
                ax.set_ylim(-0.04, 1.04)
            _place_labels(ax, labels)
            ax.grid(alpha=0.3)
            ax.set_xlabel(f"new-task score: {xlabel}", fontsize=9)
            if c == 0:
                ax.set_ylabel(ylabel)
            if r == 0:
                ax.set_title(title)
    if axes[0][0].get_legend_handles_labels()[0]:  # nothing to name when no point has all its numbers
        axes[0][0].legend(fontsize=8, loc="best", title="method (line through its grid)")
    fig.suptitle(
        "Frontier: what each method learned against what it kept, over its grid of settings\n"
        "(better: right and up in the top row, right and down in the bottom row; bars: 95% intervals)"
    )
    return fig


def _frontier_lines(ax, groups: dict, points: dict, where, measure: str) -> list[tuple[float, float, str, str]]:
    """One line per method through its grid points, at the end (`where` "final") or after stage `where`;
    returns the points' labels (x, y, text, color), to be placed once the axis limits are known."""
    labels = []
    for g, (group, info) in enumerate(groups.items()):
        names = [p for p in info["points"] if p in points]
        if not names:
            continue
        cells = [points[p]["final"] if where == "final" else points[p]["stages"][where - 1] for p in names]
        xs = [cell["new_task"]["value"] for cell in cells]
        ys = [cell[measure]["value"] for cell in cells]
        if any(v is None for v in xs + ys):
            continue
        color, marker = COLORS[g % len(COLORS)], MARKERS[g % len(MARKERS)]
        ax.plot(xs, ys, color=color, marker=marker, markersize=7, linewidth=1.8, label=f"{group} ({info['method']})")
        for cell, x, y, name in zip(cells, xs, ys, names):
            xerr, has_x = _err(cell["new_task"])
            yerr, has_y = _err(cell[measure])
            if has_x or has_y:
                ax.errorbar([x], [y], xerr=xerr, yerr=yerr, color=color, alpha=0.35, linewidth=1, capsize=2)
            labels.append((x, y, points[name]["label"], color))
    return labels


def _starting_model(ax, start: dict, n: int, where, measure: str) -> None:
    """The starting model as a black star (its drift is 0 by definition)."""
    start_x = (sum(start["scores"]) / n) if where == "final" else start["scores"][where - 1]
    start_y = start.get("prior") if measure == "prior" else 0.0
    if start_y is not None:
        ax.plot(
            [start_x], [start_y], marker="*", markersize=13, color="black", linestyle="none", label="starting model"
        )


def _annotated_matrix(ax, matrix: list[list], cmap: str, vmin: float, vmax: float, fmt: str, span: float | None):
    """A [stage][task] matrix as an image with each known value written in its cell; returns the image.
    Values: dark cells (white text) below the middle of the scale. Changes (`span` given): dark beyond 0.6 span."""
    grid = [[v if v is not None else float("nan") for v in r] for r in matrix]
    image = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    for k, r in enumerate(matrix):
        for i, v in enumerate(r):
            if v is not None:
                dark = (v - vmin) / ((vmax - vmin) or 1) < 0.5 if span is None else abs(v) > 0.6 * span
                ax.text(i, k, fmt.format(v), ha="center", va="center", fontsize=9, color="white" if dark else "black")
    return image


def loglik_matrices(results: dict) -> Figure | None:
    """Held-out demonstration log-likelihood after each stage (top) and its change from the start (bottom)."""
    start = results.get("start") or {}
    shown = [i for i, v in enumerate(start.get("loglik") or []) if v is not None]
    methods = finished_methods(results)
    if not shown or not methods:
        return None
    tasks = [results["tasks"][i]["name"] for i in shown]
    stages = len(results["tasks"]) + 1
    fig, axes = plt.subplots(
        2,
        len(methods),
        figsize=(1.8 + (1.3 * len(tasks) + 1.2) * len(methods), 2.4 + 1.1 * stages),
        squeeze=False,
        layout="constrained",
    )
    values = [[[s["loglik"][k][i]["mean"] for i in shown] for k in range(stages)] for _, s in methods]
    changes = [
        [[v - start["loglik"][i] if v is not None else None for v, i in zip(row, shown)] for row in m] for m in values
    ]
    flat = [v for m in values for row in m for v in row if v is not None]
    low, high = min(flat), max(flat)
    span = max(abs(v) for m in changes for row in m for v in row if v is not None) or 1.0
    labels = stage_labels([t["name"] for t in results["tasks"]])
    for col, (name, _) in enumerate(methods):
        for row, (matrix, cmap, vmin, vmax, fmt) in enumerate(
            ((values[col], "magma", low, high, "{:.2f}"), (changes[col], "RdBu", -span, span, "{:+.2f}"))
        ):
            ax = axes[row][col]
            image = _annotated_matrix(ax, matrix, cmap, vmin, vmax, fmt, span if row == 1 else None)
            ax.set_xticks(range(len(tasks)), tasks, rotation=20)
            ax.set_yticks(range(stages), labels if col == 0 else [""] * stages)
            ax.set_title(f"{name}" if row == 0 else f"{name}: change from the start", fontsize=10)
            if col == len(methods) - 1:
                fig.colorbar(image, ax=ax, label="nats/token" if row == 0 else "change, nats/token", shrink=0.9)
    fig.suptitle(
        "Held-out demonstration log-likelihood under the student prompt (higher: the demonstrations are more "
        "likely)\ntop: after each stage; bottom: change from the starting model (blue: more likely)"
    )
    teacher = ", ".join(
        f"{t} {start['loglik_teacher'][i]:.2f}" for t, i in zip(tasks, shown) if start["loglik_teacher"][i] is not None
    )
    return Figure(
        "loglik",
        "Held-out demonstration log-likelihood",
        "Mean per-token log-likelihood of each evaluation item's demonstration, teacher-forced after the "
        "student prompt (no demonstration shown), in nats/token; the continuous measure of learning that "
        "greedy accuracy can hide. For reference, the starting model with the demonstration in its prompt "
        f"(teacher prompt): {teacher}.",
        png(fig),
    )
