"""Rollout: vLLM (fp32, bf16) vs our decode loop (fp32, bf16 autocast), alternating, in one process.

Runs in the vLLM environment (`scripts/setup_vllm_env.sh`):

    .venv-vllm/bin/python -m benchmarks.run vllm_rollout --reps 3 --length 64 --rollout-rows 8 32

The student prompts of the fixed dataset, sampled at temperature 1 with per-row seeds, every
row generating exactly `--length` tokens (no stop token), so every side does the same work.
Each vLLM side has its own engine, synced from the same weights before every repetition (the
sync is timed apart and not part of the rollout time).
"""

from __future__ import annotations

import sys
import time

from benchmarks.common import fixed_student_prompts, median

SIDES = ["decode_loop_fp32", "decode_loop_bf16", "vllm_fp32", "vllm_bf16"]


def vllm_rollout_suite(args) -> dict:
    import torch

    from selfdistill.models import load_model
    from selfdistill.sampling import decode as rollout
    from selfdistill.sampling.base import rollout_seed
    from selfdistill.sampling.vllm_engine import VLLMEngine as VLLMRollout

    torch.set_num_threads(2)
    model, tokenizer = load_model("smollm2-135m", torch.float32)
    engines = {
        "vllm_fp32": VLLMRollout(model, precision="fp32", max_model_len=1024 + args.length),
        "vllm_bf16": VLLMRollout(model, precision="bf16", max_model_len=1024 + args.length),
    }
    rows, times_all, sync_times = [], {}, {name: [] for name in engines}
    for size in args.rollout_rows:
        prompts, _ = fixed_student_prompts(size, model, tokenizer)  # no stop token here
        seeds = [rollout_seed(0, i, 0) for i in range(size)]

        def run(side: str) -> tuple[float, list[list[int]]]:
            if side in engines:
                sync_times[side].append(engines[side].sync(model))
                t0 = time.perf_counter()
                out = engines[side].generate(
                    prompts, stop_token_ids=[], max_new_tokens=args.length, temperature=1.0, seeds=seeds
                )
            else:
                t0 = time.perf_counter()
                out = rollout.generate(
                    model,
                    prompts,
                    stop_token_ids=[],
                    pad_token_id=tokenizer.pad_token_id,
                    max_new_tokens=args.length,
                    temperature=1.0,
                    seeds=seeds,
                    batch_size=size,
                    precision="bf16" if side.endswith("bf16") else "fp32",
                )
            return time.perf_counter() - t0, out.ids

        for side in SIDES:  # warm-up (first engine calls, autocast kernels)
            run(side)
        times = {side: [] for side in SIDES}
        for rep in range(args.reps):
            for side in SIDES[rep % len(SIDES) :] + SIDES[: rep % len(SIDES)]:
                seconds, ids = run(side)
                assert all(len(r) == args.length for r in ids), side
                times[side].append(seconds)
        base = median(times["decode_loop_fp32"])
        generated = size * args.length
        for side in SIDES:
            rows.append(
                {
                    "side": side,
                    "rows": size,
                    "reps": len(times[side]),
                    "tokens": generated,
                    "s_rollout": median(times[side]),
                    "tokens_per_s": generated / median(times[side]),
                    "speedup_vs_decode_fp32": base / median(times[side]),
                }
            )
        times_all[size] = times
        print(rows[-len(SIDES) :], file=sys.stderr, flush=True)
    return {
        "suite": "vllm_rollout",
        "baseline": "decode_loop_fp32",
        "rows": rows,
        "times": times_all,
        "sync_s": {name: median(values) for name, values in sync_times.items()},
    }
