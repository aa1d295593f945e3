"""A learner's history as text: the `sdft learn status` tables and an exported version's model card.

Both read the plain data of `Learner.status()`, so what is printed, exported and returned by
`status --json` is the same.
"""

from __future__ import annotations

from pathlib import Path

from selfdistill.files import write_atomic
from selfdistill.models.card import loading_section


def format_number(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def versions_table(status: dict) -> list[str]:
    rounds = {r["number"]: r for r in status["rounds"]}
    lines = ["| version | parent | round | kind | served | decision |", "|---|---|---|---|---|---|"]
    for v in status["versions"]:
        served = "**yes**" if v["number"] == status["current_version"] else ""
        decision = (rounds.get(v["round"]) or {}).get("decision") or {}
        lines.append(
            f"| v{v['number']} | {'' if v['parent'] is None else 'v' + str(v['parent'])} | {v['round'] or ''} | "
            f"{v['kind']} | {served} | {decision.get('summary', 'base model' if v['kind'] == 'base' else '')} |"
        )
    return lines


def rounds_table(status: dict) -> list[str]:
    lines = ["| round | from | stage | outcome | decision |", "|---|---|---|---|---|"]
    for r in status["rounds"]:
        summary = (r["decision"] or {}).get("summary", "")
        lines.append(f"| {r['number']} | v{r['parent_version']} | {r['stage']} | {r['outcome'] or ''} | {summary} |")
    return lines


def matrix_table(status: dict) -> list[str]:
    """Scores on every task's held-out records, per round: the served version and the candidate."""
    tasks = status["matrix"]["tasks"]
    lines = [
        "| round | model | " + " | ".join(tasks) + " | probes | drift from base |",
        "|---|---|" + "---|" * (len(tasks) + 2),
    ]
    for row in status["matrix"]["rows"]:
        label = (
            f"v{row['version']} (served)" if row["model"] == "current" else f"candidate ({row['outcome'] or 'open'})"
        )
        cells = " | ".join(format_number(s) for s in row["scores"])
        lines.append(
            f"| {row['round']} | {label} | {cells} | {format_number(row['probes'])} | {format_number(row['drift_from_base'], 4)} |"
        )
    return lines


def status_text(status: dict) -> str:
    pending = ", ".join(f"{name} {t['pending']}" for name, t in status["tasks"].items() if t["pending"]) or "none"
    lines = [
        f"learner {status['workspace']} (database {status['database']})",
        f"base model {status['base_model']}, method {status['method']}; serving v{status['current_version']}",
        f"pending demonstrations: {pending}",
        "",
        "versions:",
        *versions_table(status),
        "",
        "rounds:",
        *rounds_table(status),
    ]
    if status["matrix"]["rows"]:
        lines += ["", "held-out scores per round:", *matrix_table(status)]
    if status["last_decision"]:
        lines += ["", "last decision: " + status["last_decision"]["summary"]]
        lines += [f"  {reason}" for reason in status["last_decision"]["reasons"]]
    return "\n".join(lines)


def lineage(status: dict, version: int) -> list[dict]:
    """The versions from the base model to `version`, oldest first."""
    by_number = {v["number"]: v for v in status["versions"]}
    chain = []
    number = version
    while number is not None:
        chain.append(by_number[number])
        number = by_number[number]["parent"]
    return chain[::-1]


def history_card(status: dict, version: int) -> str:
    rounds = {r["number"]: r for r in status["rounds"]}
    chain = lineage(status, version)
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [selfdistill, {status['method']}, continual-learning]",
        "---",
        "",
        f"# {status['base_model']}, version {version} of a selfdistill learner",
        "",
        f"Trained with `{status['method']}` over {len(chain) - 1} promoted rounds, each gated against "
        "forgetting on the held-out records of every earlier task, prior-capability probes and drift.",
        "",
        "## Learning history",
        "",
        "| version | round | trained on | data (sha256) | decision |",
        "|---|---|---|---|---|",
    ]
    for v in chain:
        if v["round"] is None:
            lines.append(f"| v{v['number']} | – | base model `{status['base_model']}` | – | – |")
            continue
        r = rounds[v["round"]]
        tasks = ", ".join(
            f"{name} ({t['score']:.3f})"
            for name, t in r["metrics"]["candidate"]["tasks"].items()
            if t.get("score") is not None
        )
        lines.append(
            f"| v{v['number']} | {v['round']} | {tasks} | `{r['data_digest'][:16]}` | {r['decision']['summary']} |"
        )
    last = rounds[chain[-1]["round"]] if chain[-1]["round"] is not None else None
    if last is not None:
        lines += ["", "## Gate checks of the round that produced it", ""]
        lines += [f"- {reason}" for reason in last["decision"]["reasons"]]
    lines += ["", *loading_section("PATH/TO/THIS/DIRECTORY"), ""]
    return "\n".join(lines)


def write_history_card(directory: Path, status: dict, version: int) -> Path:
    return write_atomic(Path(directory) / "README.md", history_card(status, version))
