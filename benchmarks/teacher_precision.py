"""The teacher's forward in fp32 vs bf16 under an fp32 student: its time and its effect on the SDFT loss.

    python -m benchmarks.teacher_precision --prompts 32 --length 64 --reps 3

The embedded SmolLM2-135M; each of `prompts` fixed records is scored as an SDFT step scores a
rollout (its demonstration stands in for the student's completion): the teacher's forward over
query + demonstration-in-context + completion, without gradient. Sides alternate within one process:
fp32, bf16 autocast over the fp32 weights (what an EMA teacher does), and a bf16 copy of the weights
(what a frozen teacher stores). Then the SDFT loss (the config's default divergence) and its
gradient with respect to the student's hidden states, with the fp32 and the bf16 teacher (its
forward and its output head in bf16, as SDFT runs it): the
relative change of the loss and the cosine between the two gradients. Writes
benchmarks/results/teacher_precision.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

from benchmarks.common import RESULTS, fixed_records, median


def _items(args, tokenizer):
    from selfdistill.data import PromptBuilder
    from selfdistill.data.records import Record
    from selfdistill.methods.base import TrainItem

    builder = PromptBuilder(tokenizer, "paper", None, 1024, 2048, "error")
    records = [
        Record(prompt=r["prompt"], demonstration=r["demonstration"])
        for r in fixed_records(args.prompts, args.length, tokenizer)
    ]
    return [
        TrainItem(
            record_index=e.index,
            prompt_ids=e.student_ids,
            completion=e.demonstration_ids,
            teacher_prompt_ids=e.teacher_ids,
        )
        for e in builder.encode_all(records)
    ]


def _loss_effect(model, items, pad, teacher_hidden: dict) -> dict:
    import torch

    from selfdistill.config import LossConfig
    from selfdistill.distillation.losses import chunked_completion_loss, output_head
    from selfdistill.methods.base import completion_hidden
    from selfdistill.precision import autocast_context

    head = output_head(model)

    def bf16_head(hidden):  # the teacher's head in bf16 too, as SDFT runs a bf16 teacher
        with autocast_context(hidden.device, "bf16"):
            return head(hidden)

    result = {}
    for name, hidden in teacher_hidden.items():
        student, tokens = completion_hidden(model, items, False, pad, "fp32")
        student = student.detach().requires_grad_(True)
        teacher_head = head if name == "fp32" else bf16_head
        loss, _ = chunked_completion_loss(
            student, hidden, tokens, torch.ones(tokens.shape[0]), head, teacher_head, LossConfig()
        )
        loss.backward()
        result[name] = (loss.item() / tokens.shape[0], student.grad.flatten().clone())
    (l32, g32), (l16, g16) = result["fp32"], result["bf16"]
    return {
        "loss_per_token_fp32_teacher": l32,
        "loss_per_token_bf16_teacher": l16,
        "loss_relative_change": abs(l16 - l32) / abs(l32),
        "gradient_cosine": torch.nn.functional.cosine_similarity(g32, g16, dim=0).item(),
        "gradient_relative_norm_change": ((g16 - g32).norm() / g32.norm()).item(),
    }


def main(argv=None) -> dict:
    import torch

    from selfdistill.methods.base import completion_hidden
    from selfdistill.models import load_model
    from selfdistill.precision import cpu_has_bf16_instructions

    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model, tokenizer = load_model("smollm2-135m", torch.float32)
    model.eval().requires_grad_(False)
    bf16_copy = copy.deepcopy(model).to(torch.bfloat16)
    items = _items(args, tokenizer)
    pad = tokenizer.pad_token_id
    sides = {"fp32": (model, "fp32"), "bf16_autocast": (model, "bf16"), "bf16_weights": (bf16_copy, "bf16")}
    hidden, times = {}, {name: [] for name in sides}
    for rep in range(args.reps + 1):  # the first round is warm-up
        names = list(sides)[rep % 3 :] + list(sides)[: rep % 3]
        for name in names:
            start = time.perf_counter()
            with torch.no_grad():
                hidden[name], _ = completion_hidden(*sides[name][:1], items, True, pad, sides[name][1])
            if rep:
                times[name].append(time.perf_counter() - start)
    model.requires_grad_(True)
    result = {
        "prompts": args.prompts,
        "length": args.length,
        "teacher_tokens": sum(len(i.teacher_prompt_ids) + len(i.completion) for i in items),
        "cpu_has_bf16_instructions": cpu_has_bf16_instructions(),
        "seconds": {name: median(t) for name, t in times.items()},
        "speedup_vs_fp32": {name: median(times["fp32"]) / median(t) for name, t in times.items()},
        **_loss_effect(model, items, pad, {"fp32": hidden["fp32"], "bf16": hidden["bf16_autocast"].float()}),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "teacher_precision.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1), file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
