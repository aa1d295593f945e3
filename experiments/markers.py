"""How many evaluation outputs of each sweep job contain given strings: what training changed in the outputs.

    python -m experiments.markers runs/sweep tooluse "Thought:" "Action:" "Question:" "Example"

Scores say whether a task was learned; this says what moved instead (for example, a student that
picks up the scaffolding of the teacher's prompt rather than the demonstrated format). Reads the
per-example evaluation files of the starting model and of every finished job on TASK, prints a
Markdown table: one row per job, the count of outputs containing each string, out of N.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def count_markers(examples: Path, markers: list[str]) -> tuple[list[int], int]:
    outputs = [json.loads(line)["output"] for line in examples.read_text().splitlines() if line.strip()]
    return [sum(marker in output for output in outputs) for marker in markers], len(outputs)


def marker_table(out: Path, task: str, markers: list[str]) -> str:
    rows = [("starting model", out / "start" / task / "start" / "eval" / task / "examples.jsonl")]
    for run in sorted((out / "runs" / task).glob("*")):
        rows += [(run.name, f) for f in sorted(run.glob(f"methods/*/seed-*/stage-1/eval/{task}/examples.jsonl"))]
    lines = ["| job | outputs | " + " | ".join(f"`{m}`" for m in markers) + " |", "|---|---|" + "---|" * len(markers)]
    for name, examples in rows:
        if examples.is_file():
            counts, total = count_markers(examples, markers)
            lines.append(f"| {name} | {total} | " + " | ".join(str(c) for c in counts) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the sweep's --out folder")
    parser.add_argument("task")
    parser.add_argument("markers", nargs="+")
    args = parser.parse_args()
    print(marker_table(Path(args.out), args.task, args.markers))


if __name__ == "__main__":
    main()
