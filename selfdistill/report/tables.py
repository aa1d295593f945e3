"""The report's tables and sample outputs, as plain data both the HTML and the Markdown writer render."""

from __future__ import annotations

import json
from pathlib import Path

from selfdistill.continual import layout
from selfdistill.continual.results import matrix_rows

COLUMNS = [
    ("acc", "ACC", "mean final score over all tasks"),
    ("bwt", "BWT", "mean change on earlier tasks from right after learning them to the end (< 0: forgotten)"),
    ("fwt", "FWT", "mean gain on a task from the earlier stages, before training on it"),
    ("forgetting", "Forgetting", "mean drop from a task's best earlier score to its final score"),
    ("prior_final", "Prior score", "prior-capability probe score at the end (fraction correct)"),
    ("prior_change", "Prior change", "prior score at the end minus the starting model's"),
    ("drift_kl_final", "Drift (nats)", "KL(start || final) per token on general prompts"),
]


def fmt(cell: dict | None, signed: bool = False) -> str:
    """'0.512 [0.43, 0.59]' (95% CI across seeds), or '0.512' with one seed, or '-' when undefined."""
    if not cell or cell.get("mean") is None:
        return "-"
    spec = "+.3f" if signed else ".3f"
    text = format(cell["mean"], spec)
    if cell.get("ci95"):
        low, high = cell["ci95"]
        text += f" [{format(low, spec)}, {format(high, spec)}]"
    return text


def metric_rows(results: dict) -> list[list[str]]:
    rows = []
    for name, entry in results["methods"].items():
        s = entry["summary"]
        if s is None:
            rows.append([name, entry["method"]] + ["(not finished)"] + [""] * (len(COLUMNS) - 1))
            continue
        signed = {"bwt", "fwt", "prior_change"}
        rows.append([name, entry["method"]] + [fmt(s[key], key in signed) for key, _, _ in COLUMNS] + [str(s["seeds"])])
    return rows


def metric_header() -> list[str]:
    return ["Method", "Trains with"] + [label for _, label, _ in COLUMNS] + ["Seeds"]


def score_rows(results: dict) -> list[list[str]]:
    """One row per method and stage: each task's score, prior score and drift."""
    tasks = [t["name"] for t in results["tasks"]]
    rows = []
    start = results.get("start")
    if start:
        rows.append(
            ["(starting model)", "start"]
            + [f"{v:.3f}" for v in start["scores"]]
            + [f"{start['prior']:.3f}" if start["prior"] is not None else "-", "0.000"]
        )
    for name, entry in results["methods"].items():
        s = entry["summary"]
        if s is None:
            continue
        for k in range(1, len(tasks) + 1):
            rows.append(
                [name, f"{k}: {tasks[k - 1]}"]
                + [fmt(c) for c in s["R"][k]]
                + [fmt(s["prior"][k]), fmt(s["drift_kl"][k])]
            )
    return rows


def score_header(results: dict) -> list[str]:
    return ["Method", "After stage"] + [t["name"] for t in results["tasks"]] + ["Prior score", "Drift (nats)"]


def _examples(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _prompt_text(prompt) -> str:
    if isinstance(prompt, list):  # chat messages: the last user turn is the question
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        prompt = users[-1] if users else json.dumps(prompt)
    return str(prompt)


def samples(results: dict, out_dir: str | Path, per_task: int) -> list[dict]:
    """Per task: a few evaluation items with the starting model's output and each method's, after
    the stage that trained on the task and at the end of the stream (first seed)."""
    out = Path(out_dir)
    tasks = [t["name"] for t in results["tasks"]]
    seed = results["config"]["seeds"][0]
    n = len(tasks)
    shown = []
    for i, task in enumerate(tasks):
        start = _examples(layout.task_examples(layout.start_dir(out), task))[:per_task]
        items = []
        for j, example in enumerate(start):
            outputs = [("starting model", example["output"], example["score"])]
            for name in results["methods"]:
                for k, when in ((i + 1, f"after learning {task}"), (n, "at the end")):
                    if k == i + 1 and k == n and when == "at the end":
                        continue
                    rows = _examples(layout.task_examples(layout.stage_dir(out, name, seed, k), task))
                    if j < len(rows):
                        outputs.append((f"{name}, {when} (stage {k})", rows[j]["output"], rows[j]["score"]))
            items.append(
                {"prompt": _prompt_text(example["prompt"]), "answer": example.get("answer"), "outputs": outputs}
            )
        shown.append({"task": task, "items": items})
    return shown


def clip(text, limit: int = 600) -> str:
    """Head and tail of a long text: a prompt's question is usually at its end."""
    if text is None:
        return "(no single gold string: graded against the record's own gold fields, e.g. tool calls)"
    text = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
    if len(text) <= limit:
        return text
    head, tail = limit * 2 // 5, limit * 3 // 5
    return text[:head] + f" … [{len(text) - head - tail} characters left out] … " + text[-tail:]


# --- frontier, demonstration log-likelihood and lenient scores ------------------------------------


def finding(results: dict) -> dict:
    return (results.get("frontier") or {}).get("finding") or {"headline": "", "details": []}


def grids(results: dict) -> str:
    from selfdistill.continual.frontier import grid_text

    data = results.get("frontier") or {}
    groups = data.get("groups") or {}
    if not any(g["grid"] for g in groups.values()):
        return ""
    same = (
        " The grid is the same for every method."
        if data.get("same_grid")
        else " The grids differ between methods: only settings both ran are compared."
    )
    return (
        "Grids: " + "; ".join(f"{g} ({info['method']}): {grid_text(info)}" for g, info in groups.items()) + "." + same
    )


def _interval(cell: dict, signed: bool = False) -> str:
    if not cell or cell.get("value") is None:
        return "-"
    spec = "+.3f" if signed else ".3f"
    text = format(cell["value"], spec)
    if cell.get("ci95"):
        text += f" [{format(cell['ci95'][0], spec)}, {format(cell['ci95'][1], spec)}]"
    return text


def frontier_header() -> list[str]:
    return ["Method", "Setting", "New-task score (ACC)", "Prior score", "Drift (nats)", "Demo log-lik. gain (nats)"]


def frontier_rows(results: dict) -> list[list[str]]:
    """One row per grid point, grouped by method, at the end of the stream, with 95% intervals."""
    data = results.get("frontier") or {}
    rows = []
    for group, info in (data.get("groups") or {}).items():
        for name in info["points"]:
            point = (data.get("points") or {}).get(name)
            if point is None:
                rows.append([group, name, "(not finished)", "", "", ""])
                continue
            final = point["final"]
            rows.append(
                [
                    group,
                    point["label"],
                    _interval(final["new_task"]),
                    _interval(final["prior"]),
                    _interval(final["drift"]),
                    _interval(final["loglik_gain"], signed=True),
                ]
            )
    return rows


def _matrix_rows(results: dict, key: str, change: bool) -> tuple[list[int], list[list[str]]]:
    shown, rows = matrix_rows(results, key, change)
    tasks = [t["name"] for t in results["tasks"]]
    labelled = []
    for method, stage, cells in rows:
        if method is None:
            label = "(starting model)" if stage == 0 else "(starting model, teacher prompt)"
            labelled.append([label, "start"] + cells)
        else:
            labelled.append([method, f"{stage}: {tasks[stage - 1]}"] + cells)
    return shown, labelled


def loglik_table(results: dict) -> tuple[list[str], list[list[str]]]:
    shown, rows = _matrix_rows(results, "loglik", change=True)
    return ["Method", "After stage"] + [results["tasks"][i]["name"] for i in shown], rows


def lenient_table(results: dict) -> tuple[list[str], list[list[str]]]:
    shown, rows = _matrix_rows(results, "lenient", change=False)
    return ["Method", "After stage"] + [results["tasks"][i]["name"] for i in shown], rows


LOGLIK_LEGEND = (
    "Mean per-token log-likelihood (nats/token) of each evaluation item's demonstration, teacher-forced "
    "after the student prompt, averaged over items; in brackets the change from the starting model "
    "(> 0: the held-out demonstrations became more likely). The teacher-prompt row shows the starting "
    "model with the demonstration in its prompt, for reference."
)
LENIENT_LEGEND = (
    "Lenient or partial scores of the same outputs: knowledge counts any accepted form of the answer "
    "(e.g. the surname, the year); tool calls count the right action with wrong arguments as 0.5."
)
FRONTIER_LEGEND = (
    "At the end of the stream, per grid point: the mean score over the stream's tasks, the prior-"
    "capability probe score, drift from the starting model, and the mean change of the held-out "
    "demonstration log-likelihood. Brackets: 95% intervals (one seed: Wilson over evaluation items "
    "for scores, t across drift prompts for drift, t across evaluation items for the log-likelihood "
    "change; several seeds: t across seeds)."
)
