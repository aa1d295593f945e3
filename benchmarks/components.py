"""In-process component timings, alternating sides, for when whole training runs are too slow to repeat.

- loss: the chunked SDFT loss (forward + backward) on the embedded model's output head
  (vocabulary 49,152, width 576) at prompts x length positions: full vocabulary with chunks
  of 32 / 256 / 1024 positions vs the teacher's top-20, and the closed-form forward-KL gradient
  (default) vs autograd through the chunk (full_chunk256_autograd).
- precision: the embedded model's student forward+backward, teacher forward and a rollout,
  fp32 vs bf16 autocast; then SDFT on the toy copy task (tests/toy.py) in both precisions, the
  same seeds, to show whether learning changes.
"""

from __future__ import annotations

import sys
import tempfile
import time

from benchmarks.common import ROOT, fixed_records, median


def _alternate(sides: dict, reps: int) -> dict:
    names = list(sides)
    times = {n: [] for n in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            times[name].append(sides[name]())
    return times


def loss_suite(args) -> dict:
    import torch

    from selfdistill.config import LossConfig
    from selfdistill.distillation.losses import chunked_completion_loss, output_head
    from selfdistill.models import load_model

    torch.set_num_threads(2)
    model, _ = load_model("smollm2-135m", torch.float32)
    head = model.get_output_embeddings()
    teacher_head = torch.nn.Linear(head.in_features, head.out_features, bias=False)
    teacher_head.weight.data.copy_(head.weight.data)
    teacher_head.requires_grad_(False)
    n = args.prompts * args.length
    torch.manual_seed(0)
    student = (torch.randn(n, head.in_features) * 2).requires_grad_(True)
    teacher = student.detach() + 0.5 * torch.randn(n, head.in_features)
    tokens = torch.randint(0, head.out_features, (n,))
    weights = torch.ones(n)

    def side(chunk, top_k, closed_form=True):
        def run():
            t0 = time.perf_counter()
            loss, _ = chunked_completion_loss(
                student,
                teacher,
                tokens,
                weights,
                output_head(model),
                teacher_head,
                LossConfig(chunk_size=chunk, top_k=top_k),
                closed_form_gradient=closed_form,
            )
            loss.backward()
            student.grad = None
            head.weight.grad = None
            return time.perf_counter() - t0

        return run

    sides = {
        "full_chunk256": side(256, None),
        "full_chunk32": side(32, None),
        "full_chunk1024": side(1024, None),
        "top20_chunk256": side(256, 20),
        "full_chunk256_autograd": side(256, None, closed_form=False),
    }
    sides["full_chunk256"]()  # warm-up
    times = _alternate(sides, args.reps)
    base = median(times["full_chunk256"])
    rows = [
        {"side": k, "reps": len(v), "positions": n, "s_loss_fwd_bwd": median(v), "time_ratio": median(v) / base}
        for k, v in times.items()
    ]
    return {"suite": "loss", "baseline": "full_chunk256", "rows": rows, "times": times}


def precision_suite(args) -> dict:
    import torch

    from selfdistill.data import PromptBuilder
    from selfdistill.data.records import Record
    from selfdistill.distillation.losses import chunked_token_loss, output_head
    from selfdistill.methods.base import TrainItem, completion_hidden
    from selfdistill.models import load_model
    from selfdistill.sampling import SamplingSettings, make_sampler

    torch.set_num_threads(2)
    model, tokenizer = load_model("smollm2-135m", torch.float32)
    model.config.use_cache = False
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
    pad = tokenizer.pad_token_id

    def student(precision):
        model.train()
        t0 = time.perf_counter()
        hidden, tokens = completion_hidden(model, items, False, pad, precision)
        loss, _ = chunked_token_loss(
            hidden, tokens, torch.ones(tokens.shape[0]), output_head(model), lambda lp: -lp, 256
        )
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def teacher(precision):
        t0 = time.perf_counter()
        with torch.inference_mode():
            completion_hidden(model, items, True, pad, precision)
        return time.perf_counter() - t0

    def rollout(precision):
        t0 = time.perf_counter()
        settings = SamplingSettings(args.length // 4, (), pad, precision=precision)
        make_sampler(model, settings).generate([e.student_ids for e in encoded], list(range(len(encoded))))
        return time.perf_counter() - t0

    rows = []
    for name, fn in (
        ("student fwd+bwd", student),
        ("teacher fwd", teacher),
        (f"rollout {args.length // 4} tokens", rollout),
    ):
        fn("fp32")
        times = _alternate({"fp32": lambda: fn("fp32"), "bf16_autocast": lambda: fn("bf16")}, args.reps)
        f32, b16 = median(times["fp32"]), median(times["bf16_autocast"])
        rows.append({"side": name, "reps": args.reps, "s_fp32": f32, "s_bf16_autocast": b16, "bf16_speedup": f32 / b16})
        print(rows[-1], file=sys.stderr, flush=True)
    return {"suite": "precision", "rows": rows, "toy_learning": toy_learning()}


def toy_learning(steps: int = 30) -> list[dict]:
    """SDFT on the toy copy task (the test suite's setting), fp32 vs bf16 autocast, same seeds."""
    sys.path.insert(0, str(ROOT / "tests"))
    from toy import copy_model, greedy_accuracy, toy_records

    from selfdistill.config import load_config
    from selfdistill.training.loop import train

    out = []
    records = toy_records()
    for precision in ("fp32", "bf16"):
        model, tok = copy_model(steps=150)
        before = greedy_accuracy(model, tok, records)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(
                overrides={
                    "model": {"precision": precision},
                    "data": {"teacher_template": "plain"},
                    "rollout": {"max_new_tokens": 3},
                    "loss": {"skip_first_tokens": 0},
                    "train": {
                        "output_dir": tmp,
                        "batch_size": 8,
                        "micro_batch_size": 4,
                        "lr": 3e-3,
                        "warmup_ratio": 0.0,
                        "max_steps": steps,
                    },
                }
            )
            result = train(cfg, records=records, model=model, tokenizer=tok, save_final=False)
        losses = [m["loss"] for m in result.metrics]
        out.append(
            {
                "precision": precision,
                "accuracy_before": before,
                "accuracy_after": greedy_accuracy(result.model, tok, records),
                "loss_first5": sum(losses[:5]) / 5,
                "loss_last5": sum(losses[-5:]) / 5,
            }
        )
        print(out[-1], file=sys.stderr, flush=True)
    return out
