"""`results.json`: everything a run measured, gathered from its stage directories.

Built from the files on disk (not from memory), so `sdft report` can rebuild it for a finished
or a partly finished run. The schema is documented in docs/results-schema.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from selfdistill.continual import frontier, layout
from selfdistill.continual.metrics import CI_METHOD, mean_ci, stream_metrics
from selfdistill.errors import UserError
from selfdistill.files import read_json, write_json

FORMAT = "selfdistill-continual-v1"
METRIC_NAMES = (
    "acc",
    "bwt",
    "fwt",
    "forgetting",
    "prior_final",
    "prior_change",
    "drift_kl_final",
    "drift_nll_final",
    "lenient_acc",
    "loglik_final",
    "loglik_gain",
)


# Per-task matrices besides R, each [stage][task], null where a task has no such measure.
MATRICES = ("lenient", "loglik", "loglik_teacher", "loglik_answer")


def stage_values(where: Path, tasks: list[str]) -> dict | None:
    """Scores, probes, drift and the continuous measures of one finished stage; None while it is not finished.

    `where` is a stage directory that `selfdistill.continual.evaluation.StageEvaluation` evaluated; it is
    finished once its done.json (`layout.done_file`) is written, which whoever evaluated it writes last (the
    runner with train_time_s and eval_time_s, read back here). Lists are in the order of `tasks`.
    """
    if not layout.done_file(where).is_file():
        return None
    done = read_json(layout.done_file(where))
    summaries = [read_json(layout.task_summary(where, t)) for t in tasks]
    probes = _read_if_present(layout.probes_file(where))
    drift = _read_if_present(layout.drift_file(where))
    logliks = [s.get("loglik") or {} for s in summaries]
    return {
        "scores": [s["score"] for s in summaries],
        "prior": probes.get("score"),
        "drift_kl": drift.get("kl_nats"),
        "drift_nll": drift.get("nll_nats"),
        "drift_per_prompt": drift.get("kl_per_prompt"),
        "lenient": [(s.get("lenient") or {}).get("score") for s in summaries],
        "loglik": [ll.get("student") for ll in logliks],
        "loglik_teacher": [ll.get("teacher") for ll in logliks],
        "loglik_answer": [ll.get("student_answer") for ll in logliks],
        "loglik_items": [ll.get("items") for ll in logliks],
        "train_time_s": done.get("train_time_s"),
        "eval_time_s": done.get("eval_time_s"),
    }


def _read_if_present(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def _item_change(items: list | None, start_items: list | None) -> dict | None:
    """Mean change per item from the starting model, with a t interval across items (paired: same items)."""
    if not items or not start_items or len(items) != len(start_items):
        return None
    return mean_ci([a - b for a, b in zip(items, start_items)])


def _sequence(out: Path, method: str, seed: int, tasks: list[str], start: dict) -> dict:
    stages = [start]
    for k in range(1, len(tasks) + 1):
        values = stage_values(layout.stage_dir(out, method, seed, k), tasks)
        if values is None:
            break
        stages.append(values)
    complete = len(stages) == len(tasks) + 1
    seq = {
        "complete": complete,
        "stages_done": len(stages) - 1,
        "R": [s["scores"] for s in stages],
        "prior": [s["prior"] for s in stages],
        "prior_delta": [
            None if s["prior"] is None or start["prior"] is None else s["prior"] - start["prior"] for s in stages
        ],
        "drift_kl": [s["drift_kl"] for s in stages],
        "drift_nll": [s["drift_nll"] for s in stages],
        **{key: [s[key] for s in stages] for key in MATRICES},
        # Change of the student-prompt log-likelihood from the start, per stage and task, with a t interval
        # across evaluation items (one seed's measurement noise; null where a task has no demonstrations).
        "loglik_change": [
            [_item_change(a, b) for a, b in zip(s["loglik_items"], start["loglik_items"])] for s in stages
        ],
        # A t interval across the drift prompts: how much drift varies from prompt to prompt (one seed's noise).
        "drift_kl_ci": [mean_ci(s["drift_per_prompt"])["ci95"] if s["drift_per_prompt"] else None for s in stages],
        "train_time_s": [s["train_time_s"] for s in stages[1:]],
        "eval_time_s": [s["eval_time_s"] for s in stages],
        "metrics": None,
    }
    if complete:
        metrics = stream_metrics(seq["R"])
        prior = seq["prior"]
        metrics["prior_final"] = prior[-1]
        metrics["prior_change"] = None if prior[-1] is None or prior[0] is None else prior[-1] - prior[0]
        metrics["drift_kl_final"] = seq["drift_kl"][-1]
        metrics["drift_nll_final"] = seq["drift_nll"][-1]
        metrics["lenient_acc"] = _mean_known(seq["lenient"][-1])
        metrics["loglik_final"] = _mean_known(seq["loglik"][-1])
        start_ll = _mean_known(seq["loglik"][0])
        metrics["loglik_gain"] = (
            None if metrics["loglik_final"] is None or start_ll is None else metrics["loglik_final"] - start_ll
        )
        seq["metrics"] = metrics
    return seq


def _mean_known(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _per_stage_ci(rows: list[list]) -> list:
    """Mean and CI per position, across seeds (rows: one list per seed)."""
    return [mean_ci([r[i] for r in rows]) for i in range(len(rows[0]))] if rows else []


def collect(out_dir: str | Path) -> dict:
    out = Path(out_dir)
    if not out.exists():
        raise UserError(f"{out}: no such directory. Give a run directory written by `sdft continual`, compare or demo.")
    if not out.is_dir():
        raise UserError(f"{out} is a file, not a run directory written by `sdft continual`, compare or demo.")
    if not layout.config_file(out).is_file():
        raise UserError(f"{out} is not a continual run directory (no config.json); run `sdft continual` first.")
    config = read_json(layout.config_file(out))
    tasks = [s["name"] for s in config["stream"]]
    start_dir = layout.start_dir(out)
    start = stage_values(start_dir, tasks)
    results = {
        "format": FORMAT,
        "run_dir": str(out),
        "config": config,
        "ci_method": CI_METHOD,
        "tasks": [
            _task_entry(stage, _read_if_present(layout.task_summary(start_dir, stage["name"])))
            for stage in config["stream"]
        ],
        "methods": {},
        "complete": False,
    }
    if start is None:
        return results
    results["start"] = {
        "scores": start["scores"],
        "prior": start["prior"],
        "eval_time_s": start["eval_time_s"],
        **{key: start[key] for key in MATRICES},
    }
    probes = layout.probes_file(start_dir)
    results["prior_count"] = read_json(probes)["count"] if probes.is_file() else None
    complete = True
    for method in config["methods"]:
        seeds = {str(seed): _sequence(out, method["name"], seed, tasks, start) for seed in config["seeds"]}
        complete &= all(s["complete"] for s in seeds.values())
        results["methods"][method["name"]] = {
            "method": method["method"],
            "overrides": method["overrides"],
            "group": method.get("group") or method["name"],
            "setting": method.get("setting") or {},
            "seeds": seeds,
            "summary": _method_summary(seeds, len(tasks)),
        }
    results["complete"] = complete
    results["frontier"] = frontier.analyse(results)
    return results


def _task_entry(stage: dict, info: dict) -> dict:
    """A task of the stream as results.json lists it; `info` is the starting model's summary of it ({} before)."""
    return {
        "name": stage["name"],
        "builtin": stage.get("task"),
        "grader": info.get("grader", stage.get("grader")),
        "eval_count": info.get("count"),
    }


def _method_summary(seeds: dict, stages: int) -> dict | None:
    """Mean and interval across the method's finished seeds of every metric and matrix; None before any finished."""
    finished = [s for s in seeds.values() if s["complete"]]
    if not finished:
        return None
    summary = {name: mean_ci([s["metrics"][name] for s in finished]) for name in METRIC_NAMES}
    summary["R"] = [_per_stage_ci([s["R"][k] for s in finished]) for k in range(stages + 1)]
    for key in MATRICES:
        summary[key] = [_per_stage_ci([s[key][k] for s in finished]) for k in range(stages + 1)]
    for key in ("prior", "prior_delta", "drift_kl", "drift_nll"):
        summary[key] = _per_stage_ci([s[key] for s in finished])
    summary["seeds"] = len(finished)
    return summary


def write_results(out_dir: str | Path) -> dict:
    results = collect(out_dir)
    write_json(Path(out_dir) / layout.RESULTS, results)
    return results


def _num(value, spec: str = ".3f", width: int = 9) -> str:
    return f"{format(value, spec):>{width}}" if value is not None else f"{'-':>{width}}"


def summary_table(results: dict) -> str:
    """Plain text: the finding, then per method each task's score after each stage with prior score and drift,
    the held-out demonstration log-likelihood, the lenient scores, the grids and the point-by-point comparison."""
    tasks = [t["name"] for t in results["tasks"]]
    methods = results["methods"]
    w = max([14] + [len(n) + 2 for n in methods])
    frontier_data = results.get("frontier") or {}
    lines = []
    found = frontier_data.get("finding") or {}
    if found.get("headline"):
        lines += _wrap("Finding: " + found["headline"]) + [""]
    header = f"{'method':<{w}}{'after':<16}" + "".join(f"{t[:12]:>13}" for t in tasks) + f"{'prior':>9}{'drift':>9}"
    lines += [header, "-" * len(header)]
    start = results.get("start")
    if start:
        lines.append(
            f"{'(start)':<{w}}{'stage 0':<16}"
            + "".join(f"{v:>13.3f}" for v in start["scores"])
            + _num(start["prior"])
            + _num(0.0)
        )
    for name, entry in methods.items():
        s = entry["summary"]
        if s is None:
            lines.append(f"{name:<{w}}(not finished)")
            continue
        for k in range(1, len(tasks) + 1):
            stage = f"{k} {tasks[k - 1]}"[:15]
            lines.append(
                f"{name:<{w}}{stage:<16}"
                + "".join(f"{c['mean']:>13.3f}" for c in s["R"][k])
                + _num(s["prior"][k]["mean"])
                + _num(s["drift_kl"][k]["mean"])
            )
        parts = []
        for key, label in (("acc", "ACC"), ("bwt", "BWT"), ("fwt", "FWT"), ("forgetting", "Forgetting")):
            v = s[key]["mean"]
            parts.append(f"{label} {v:+.3f}" if v is not None else f"{label} -")
        lines.append(f"{'':<{w}}" + "  ".join(parts))
    lines.append(
        "scores: fraction correct (0-1); prior: prior-capability probe score; drift: KL from the starting "
        "model, nats/token"
    )
    lines += _loglik_block(results, tasks, w)
    lines += _lenient_block(results, tasks, w)
    groups = frontier_data.get("groups") or {}
    if any(g["grid"] for g in groups.values()):
        lines += [
            "",
            "Grids: "
            + "; ".join(f"{g}: {frontier.grid_text(info)}" for g, info in groups.items())
            + (" (the same for every method)" if frontier_data.get("same_grid") else ""),
        ]
    if found.get("details"):
        lines += [
            "",
            "Point by point, at the end of the stream (95% intervals; 'within the noise': the intervals overlap):",
        ]
        lines += [f"  {d}" for d in found["details"]]
    return "\n".join(lines)


def _wrap(text: str, width: int = 100) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)


def matrix_rows(results: dict, key: str, change: bool = False) -> tuple[list[int], list[tuple]]:
    """A per-task matrix of results.json (`loglik`, `lenient`) as table rows, for the summary and the report.

    Returns the tasks shown (those measured at the start) and rows `(method, stage, cells)`: the starting
    model as `(None, 0, ...)`, for `loglik` the starting model under the teacher prompt as `(None, None, ...)`,
    then each method after each stage `k` as `(name, k, ...)`. Cells have 3 decimals ("-" where not measured),
    with the change from the start in brackets when `change`.
    """
    start = results.get("start") or {}
    shown = [i for i, v in enumerate(start.get(key) or []) if v is not None]
    if not shown:
        return [], []

    def cell(v, i):
        if v is None:
            return "-"
        return f"{v:.3f} ({v - start[key][i]:+.3f})" if change else f"{v:.3f}"

    rows = [(None, 0, [f"{start[key][i]:.3f}" for i in shown])]
    if key == "loglik":
        teacher = start["loglik_teacher"]
        rows.append((None, None, ["-" if teacher[i] is None else f"{teacher[i]:.3f}" for i in shown]))
    stages = len(results["tasks"])
    for name, entry in results["methods"].items():
        s = entry["summary"]
        if s is not None:
            rows += [(name, k, [cell(s[key][k][i]["mean"], i) for i in shown]) for k in range(1, stages + 1)]
    return shown, rows


def _matrix_block(results: dict, tasks: list[str], w: int, key: str, title: str, width: int) -> list[str]:
    shown, rows = matrix_rows(results, key, change=key == "loglik")
    if not shown:
        return []
    lines = ["", title, f"{'method':<{w}}{'after':<16}" + "".join(f"{tasks[i][: width - 1]:>{width}}" for i in shown)]
    for method, stage, cells in rows:
        after = "stage 0" if stage == 0 else "teacher prompt" if stage is None else f"{stage} {tasks[stage - 1]}"[:15]
        lines.append(f"{method or '(start)':<{w}}{after:<16}" + "".join(f"{c:>{width}}" for c in cells))
    return lines


def _loglik_block(results: dict, tasks: list[str], w: int) -> list[str]:
    title = "Held-out demonstration log-likelihood, nats/token (student prompt; change from the start in brackets):"
    return _matrix_block(results, tasks, w, "loglik", title, 19)


def _lenient_block(results: dict, tasks: list[str], w: int) -> list[str]:
    title = (
        "Lenient / partial scores (knowledge: any accepted form of the answer; tool calls: the right action "
        "with wrong arguments counts 0.5):"
    )
    return _matrix_block(results, tasks, w, "lenient", title, 13)


def dump(results: dict) -> str:
    return json.dumps(results, indent=2)
