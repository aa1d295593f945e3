"""The keeping experiment's tables, from its results.json: one row per method family and learning rate.

    python -m experiments.keeping.tables runs/keeping/results.json

Prints Markdown: the scores after each stage, the end-of-stream frontier values with their 95%
intervals, and each method against SFT at the same learning rate, saying which differences lie
within the noise (overlapping intervals).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _interval(point: dict, digits: int = 2) -> str:
    value, ci = point["value"], point.get("ci95")
    text = f"{value:.{digits}f}"
    return text + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def _overlap(a: dict, b: dict) -> bool:
    (lo_a, hi_a), (lo_b, hi_b) = a["ci95"], b["ci95"]
    return lo_a <= hi_b and lo_b <= hi_a


def _seed(result: dict) -> dict:
    return next(iter(result["seeds"].values()))


def _minutes(result: dict) -> float:
    seed = _seed(result)
    # eval_time_s[0] is the starting model's evaluation, shared by every method.
    return (sum(seed.get("train_time_s") or []) + sum((seed.get("eval_time_s") or [])[1:])) / 60


def _num(value, spec: str) -> str:
    """A number in `spec`, or "–" where the task has no such score (e.g. no lenient grader)."""
    return "–" if value is None else format(value, spec)


def _lr(value: float) -> str:
    return f"{value:.0e}".replace("e-0", "e-")


def tables(results: dict) -> str:
    frontier = results["frontier"]["points"]
    methods = results["methods"]
    order = list(results["frontier"]["groups"])
    tasks = [t["name"] if isinstance(t, dict) else t for t in results["tasks"]]
    start_prior = results["start"]["prior"] if isinstance(results.get("start"), dict) else None
    lines = [
        "Scores after stage 1 (tool calls) / after stage 2 (facts); tool calls strict (16 held-out requests), "
        "facts strict / lenient (10 paraphrased questions); probes and drift after stage 2.",
        "",
        "| method | lr | tool calls 1 / 2 | facts strict / lenient | BWT | probes"
        + (f" (start {start_prior:.2f})" if isinstance(start_prior, float) else "")
        + " | drift, nats/token | held-out log-lik. gain | minutes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for group in order:
        for name in results["frontier"]["groups"][group]["points"]:
            seed, final = _seed(methods[name]), frontier[name]["final"]
            tool = tasks.index("tooluse") if "tooluse" in tasks else 0
            facts = tasks.index("knowledge") if "knowledge" in tasks else 1
            lr = frontier[name]["setting"].get("train.lr")
            lines.append(
                f"| {group} | {_lr(lr)} | {_num(seed['R'][1][tool], '.3f')} / {_num(seed['R'][2][tool], '.3f')} "
                f"| {_num(seed['R'][2][facts], '.2f')} / {_num(seed['lenient'][2][facts], '.2f')} "
                f"| {_num(methods[name]['summary']['bwt']['mean'], '+.3f')} "
                f"| {_interval(final['prior'])} | {_interval(final['drift'])} "
                f"| {_interval(final['loglik_gain'])} | {_minutes(methods[name]):.1f} |"
            )
    lines += [
        "",
        "Against SFT at the same learning rate, end of the stream (95% intervals; '≈': within the noise):",
        "",
    ]
    lines += ["| method | lr | new-task score (both tasks) | probes | drift |", "|---|---|---|---|---|"]
    sft = {
        frontier[n]["setting"].get("train.lr"): frontier[n]["final"]
        for n in results["frontier"]["groups"]["sft"]["points"]
    }
    for group in order:
        if group == "sft":
            continue
        for name in results["frontier"]["groups"][group]["points"]:
            lr = frontier[name]["setting"].get("train.lr")
            final, ref = frontier[name]["final"], sft[lr]
            cells = []
            for key, higher_is_better in (("new_task", True), ("prior", True), ("drift", False)):
                mine, theirs = final[key], ref[key]
                if _overlap(mine, theirs):
                    mark = "≈"
                elif (mine["value"] > theirs["value"]) == higher_is_better:
                    mark = "better"
                else:
                    mark = "worse"
                cells.append(f"{mine['value']:.2f} vs {theirs['value']:.2f} ({mark})")
            lines.append(f"| {group} | {_lr(lr)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    path = Path(argv[0] if argv else "runs/keeping/results.json")
    print(tables(json.loads(path.read_text(encoding="utf-8"))))


if __name__ == "__main__":
    main(sys.argv[1:])
