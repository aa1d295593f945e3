"""Do two run directories hold the same numbers? For checking that a change to the code left results alone.

    python scripts/same_numbers.py RUN_A RUN_B

Compares every JSON and JSONL file the two directories share (results, summaries, metrics,
examples, probes, drift; model weights and the report's files are left out) value by value, to
the last digit, ignoring what is measured rather than computed: wall-clock times, throughput,
dates; a path inside the run directory counts as the same path in the other. Prints each difference and the number of values compared; exits 1 if any
value differs or a file is missing on one side.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

# Keys whose values are measurements of the machine or the moment, not results.
IGNORED_KEY = re.compile(
    r"^(time_.*|.*_time_s|.*_seconds|seconds|tokens_per_s|.*minutes.*|written|created|date|started|finished)$"
)
SKIPPED_PARTS = {"final", "report_files", "checkpoints"}


def files(root: Path) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.suffix in (".json", ".jsonl") and not SKIPPED_PARTS & set(p.relative_to(root).parts)
    }


def load(path: Path) -> list:
    text = path.read_text()
    return (
        [json.loads(line) for line in text.splitlines() if line.strip()]
        if path.suffix == ".jsonl"
        else [json.loads(text)]
    )


def compare(a, b, where: str, out: list[str], roots: tuple[str, str] = ("", "")) -> int:
    """Number of leaf values compared; differences are appended to `out`."""
    if isinstance(a, dict) and isinstance(b, dict):
        count = 0
        for key in sorted(set(a) | set(b)):
            if IGNORED_KEY.match(str(key)):
                continue
            if key not in a or key not in b:
                out.append(f"{where}.{key}: only in {'B' if key not in a else 'A'}")
                continue
            count += compare(a[key], b[key], f"{where}.{key}", out, roots)
        return count
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: {len(a)} vs {len(b)} entries")
            return 0
        return sum(compare(x, y, f"{where}[{i}]", out, roots) for i, (x, y) in enumerate(zip(a, b)))
    if isinstance(a, str) and isinstance(b, str) and all(roots):  # the run directories' own paths
        a, b = a.replace(roots[0], "RUN"), b.replace(roots[1], "RUN")
    same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    if not same:
        out.append(f"{where}: {a!r} vs {b!r}")
    return 1


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    a, b = Path(argv[0]), Path(argv[1])
    names_a, names_b = files(a), files(b)
    differences = [f"{name}: only in {a if name in names_a else b}" for name in sorted(names_a ^ names_b)]
    values = 0
    for name in sorted(names_a & names_b):
        values += compare(load(a / name), load(b / name), name, differences, (str(a.resolve()), str(b.resolve())))
    for line in differences:
        print(line)
    print(f"{len(names_a & names_b)} files, {values} values compared, {len(differences)} differences")
    return 1 if differences else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
