"""Rollout: transformers' `model.generate` vs our decode loop, alternating, in one process.

The student prompts of the fixed dataset, sampled at temperature 1 with per-row seeds, stopping
at the end-of-turn token, for several batch sizes (all prompts in one batch). Both sides produce
the same tokens (checked here on every repetition, and in tests/test_rollout.py), so they do the
same work; the time per generated token is what differs. A third side runs our loop with the
output head always as `F.linear` (the model's own head), to show what `W @ h.T` buys at few rows.
"""

from __future__ import annotations

import sys
import time

from benchmarks.common import fixed_student_prompts, median


def rollout_suite(args) -> dict:
    import torch

    from selfdistill.models import load_model
    from selfdistill.sampling import decode as rollout
    from selfdistill.sampling.base import rollout_seed

    torch.set_num_threads(2)
    model, tokenizer = load_model("smollm2-135m", torch.float32)
    rows = []
    times_all = {}
    for size in args.rollout_rows:
        prompts, stop = fixed_student_prompts(size, model, tokenizer)
        seeds = [rollout_seed(0, i, 0) for i in range(size)]
        default_rows = rollout.SMALL_DECODE_ROWS

        def run(side: str):
            rollout.SMALL_DECODE_ROWS = 0 if side == "decode_loop_linear_head" else default_rows
            t0 = time.perf_counter()
            out = rollout.generate(
                model,
                prompts,
                stop_token_ids=stop,
                pad_token_id=tokenizer.pad_token_id,
                max_new_tokens=args.length,
                temperature=1.0,
                seeds=seeds,
                batch_size=size,
                use_hf_generate=side == "transformers_generate",
            )
            seconds = time.perf_counter() - t0
            rollout.SMALL_DECODE_ROWS = default_rows
            return seconds, out

        sides = ["transformers_generate", "decode_loop", "decode_loop_linear_head"]
        run("decode_loop")  # warm-up
        times = {side: [] for side in sides}
        reference = None
        for rep in range(args.reps):
            for side in sides[rep % 3 :] + sides[: rep % 3]:
                seconds, out = run(side)
                if reference is None:
                    reference = out.ids
                if out.ids != reference:
                    raise AssertionError(f"{side} generated different tokens")
                times[side].append(seconds)
        tokens = max(len(ids) for ids in reference)  # decode steps (the batch runs until its longest row stops)
        base = median(times["transformers_generate"])
        for side in sides:
            rows.append(
                {
                    "side": side,
                    "rows": size,
                    "reps": len(times[side]),
                    "decode_steps": tokens,
                    "s_rollout": median(times[side]),
                    "ms_per_step": 1000 * median(times[side]) / tokens,
                    "ms_per_row_token": 1000 * median(times[side]) / tokens / size,
                    "time_ratio": median(times[side]) / base,
                }
            )
        times_all[size] = times
        print(rows[-3:], file=sys.stderr, flush=True)
    return {"suite": "rollout", "baseline": "transformers_generate", "rows": rows, "times": times_all}
