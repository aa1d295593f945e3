"""Shared pieces of the benchmarks: the fixed dataset, medians, the results table."""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
# The parts of a training step that metrics.jsonl times (each `time_*` key), in step order.
SPLIT = [
    "time_rollout",
    "time_weight_sync",
    "time_teacher",
    "time_student_forward",
    "time_student_backward",
    "time_teacher_update",
]
FILLER = (
    "The expedition mapped the northern ridge, logged each sample in the notebook, and returned to camp "
    "before dusk to compare notes with the other team. "
)


def fixed_records(num: int, length: int, tokenizer) -> list[dict]:
    """`num` built-in demo questions, each with a demonstration of exactly `length` tokens.

    Fixed-length demonstrations (and `rollout.ignore_eos` on the SDFT side) make SFT and SDFT
    train on the same number of completion tokens.
    """
    from importlib import resources

    rows = [
        json.loads(l)
        for l in (resources.files("selfdistill") / "resources" / "demo.jsonl").read_text().splitlines()
        if l.strip()
    ]
    out = []
    for i in range(num):
        row = rows[i % len(rows)]
        ids = tokenizer.encode(row["demonstration"] + " " + FILLER * (1 + length // 16), add_special_tokens=False)
        # Re-encode until the decoded text has exactly `length` tokens (decode/encode round trips can merge).
        n = length
        while True:
            text = tokenizer.decode(ids[:n])
            got = len(tokenizer.encode(text, add_special_tokens=False))
            if got == length or n <= 1:
                break
            n += length - got
        out.append({"prompt": row["prompt"], "demonstration": text})
    return out


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def run_json(cmd: list[str], env=None, timeout=1800) -> dict:
    """Run one benchmark side in its own process (so peak memory does not mix) and read its JSON line."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-3000:], "returncode": proc.returncode}
    return json.loads(lines[-1])


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def fixed_student_prompts(num: int, model, tokenizer) -> tuple[list[list[int]], list[int]]:
    """(student prompt ids of `num` fixed records, the ids that end a turn): what the rollout suites sample from."""
    from selfdistill.data import PromptBuilder
    from selfdistill.data.records import Record
    from selfdistill.models import stop_token_ids

    stop = stop_token_ids(model, tokenizer)
    builder = PromptBuilder(tokenizer, "plain", None, 1024, 2048, "error")
    records = [Record(prompt=r["prompt"], demonstration=r["demonstration"]) for r in fixed_records(num, 16, tokenizer)]
    return [e.student_ids for e in builder.encode_all(records)], stop
