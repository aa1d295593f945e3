"""Per-step seconds and page faults of one training run: how many steps a run needs to settle.

    python -m benchmarks.warmup '{"method": "sft", "steps": 6, "prompts": 32, "length": 64}'

Runs `benchmarks.worker` in this process with every step kept, and counts the minor page faults
between optimizer steps (memory the process takes from the system afresh). On a CPU the first
steps fault gigabytes of activations in page by page while the allocator's free lists grow; once
they stop, the step time is what a long run pays per step. `benchmarks.run --warmup` leaves that
many steps out. Prints one JSON line.
"""

from __future__ import annotations

import json
import resource
import sys


def main(spec: dict) -> dict:
    import torch

    from benchmarks.worker import main as run_worker

    faults: list[int] = []
    step = torch.optim.AdamW.step
    last = [resource.getrusage(resource.RUSAGE_SELF).ru_minflt]

    def counted_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        now = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        faults.append(now - last[0])
        last[0] = now
        return result

    torch.optim.AdamW.step = counted_step
    try:
        result = run_worker(dict(spec, warmup=0))
    finally:
        torch.optim.AdamW.step = step
    return {
        "spec": spec,
        "time_step": [round(t, 3) for t in result["per_step"]["time_step"]],
        "page_faults_per_step": faults,
        "page_size": resource.getpagesize(),
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
