"""Teacher forward under torch.no_grad vs torch.inference_mode, alternating, in one process.

The same 8 teacher prompts + fixed completions, the embedded model, fp32. Also the cost of the
frozen-teacher cache (offline_distill): a cache hit replaces one teacher forward by a lookup.
"""

from __future__ import annotations

import sys
import time

from benchmarks.common import fixed_records, median


def teacher_mode_suite(args) -> dict:
    import torch

    from selfdistill.data import PromptBuilder
    from selfdistill.data.records import Record
    from selfdistill.methods.base import TrainItem, completion_hidden
    from selfdistill.models import load_model

    torch.set_num_threads(2)
    model, tokenizer = load_model("smollm2-135m", torch.float32)
    model.eval()
    builder = PromptBuilder(tokenizer, "paper", None, 1024, 2048, "error")
    encoded = builder.encode_all(
        [
            Record(prompt=r["prompt"], demonstration=r["demonstration"])
            for r in fixed_records(args.prompts, args.length, tokenizer)
        ]
    )
    items = [
        TrainItem(
            record_index=e.index,
            prompt_ids=e.student_ids,
            completion=e.demonstration_ids,
            teacher_prompt_ids=e.teacher_ids,
        )
        for e in encoded
    ]

    def forward(mode) -> float:
        t0 = time.perf_counter()
        with mode():
            hidden, _ = completion_hidden(model, items, True, tokenizer.pad_token_id, "fp32")
        if mode is torch.inference_mode:
            hidden = hidden.clone()
        return time.perf_counter() - t0

    forward(torch.no_grad)
    times = {"no_grad": [], "inference_mode": []}
    for rep in range(args.reps * 2):
        for name in ("no_grad", "inference_mode") if rep % 2 == 0 else ("inference_mode", "no_grad"):
            times[name].append(forward(getattr(torch, name)))
    base = median(times["no_grad"])
    rows = [
        {"side": name, "reps": len(t), "s_teacher_forward": median(t), "time_ratio": median(t) / base}
        for name, t in times.items()
    ]
    print(rows, file=sys.stderr)
    return {"suite": "teacher_mode", "baseline": "no_grad", "rows": rows, "times": times}
