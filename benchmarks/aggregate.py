"""Tables from the raw per-run files (benchmarks/results/raw/*.json), for suites cut short.

    python -m benchmarks.aggregate   -> prints the table, writes benchmarks/results/aggregate.json
Groups runs by side (selfdistill method / TRL, lengths, batch, precision, loss settings), takes
medians over the runs of a side, and the ratios SDFT/SFT and ours/TRL where both are present.
"""

from __future__ import annotations

import json

from benchmarks.common import RESULTS, median, table
from benchmarks.run import summarize


def main() -> None:
    groups: dict[str, list[dict]] = {}
    for path in sorted((RESULTS / "raw").glob("*.json")):
        run = json.loads(path.read_text())
        spec = run["spec"]
        runner = "trl" if path.stem.endswith("-trl") else "selfdistill"
        key = (
            f"{runner} {spec['method']} p{spec.get('prompts')} L{spec.get('length')} steps{spec.get('steps')} "
            f"{spec.get('precision', 'fp32')} chunk{spec.get('chunk', 256)} top{spec.get('top_k')}"
        )
        groups.setdefault(key, []).append(summarize(run) | {"file": path.name})
    rows = []
    for key, runs in groups.items():
        row = {"side": key, "runs": len(runs)}
        for field in (
            "s_per_example",
            "examples_per_s",
            "tokens_per_s",
            "peak_rss_mb",
            "s_rollout",
            "s_teacher",
            "s_student_forward",
            "s_student_backward",
            "s_teacher_update",
            "loss_tokens",
        ):
            row[field] = median([r.get(field) for r in runs])
        row["files"] = [r["file"] for r in runs]
        rows.append(row)
    print(
        table(
            rows,
            [
                "side",
                "runs",
                "s_per_example",
                "examples_per_s",
                "peak_rss_mb",
                "s_rollout",
                "s_teacher",
                "s_student_forward",
                "s_student_backward",
                "s_teacher_update",
                "loss_tokens",
            ],
        )
    )
    (RESULTS / "aggregate.json").write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
