"""Loss memory vs completion length: the embedded model's vocabulary (49,152) and width (576)."""

from __future__ import annotations

import os
import sys

from benchmarks.common import ROOT, run_json


def memory_suite() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rows = []
    for n in (128, 1024):
        for chunk, label in ((64, "chunked 64"), (n, "unchunked (chunk = N)")):
            result = run_json(
                [sys.executable, "-m", "benchmarks.loss_memory", str(n), "49152", "576", str(chunk)], env=env
            )
            result["side"] = f"N={n}, {label}"
            rows.append(result)
            print(result, file=sys.stderr, flush=True)
    return {"suite": "memory", "rows": rows}
