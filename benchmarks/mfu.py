"""Model-FLOPs utilization of the student forward + backward on this machine.

Peak: the best FLOP/s of fp32 2048x2048 matrix products (2 threads) measured here, now.
Achieved: student forward + backward FLOPs (6 x non-embedding params x tokens, + the output
head at loss positions: 6 x vocab x width x positions — forward and two backward products, each
run once since the chunked loss works out its gradients in the forward pass — + attention: 6 x layers x seq^2 x width per sequence... counted as 2*2*L*s^2*d forward, x3)
over the measured student forward + backward time of an SFT step.
"""

from __future__ import annotations

import sys
import time

from benchmarks.common import median


def matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    import torch

    torch.set_num_threads(2)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best


def student_flops(tokens_per_seq: list[int], loss_positions: int) -> float:
    """Forward + backward FLOPs of the embedded model over these sequences (+ the chunked head)."""
    from selfdistill.models import load_model

    model, _ = load_model("smollm2-135m")
    cfg = model.config
    embed = model.get_input_embeddings().weight.numel()
    non_embedding = sum(p.numel() for p in model.parameters()) - embed
    dense = 6 * non_embedding * sum(tokens_per_seq)
    attention = 3 * sum(4 * cfg.num_hidden_layers * s * s * cfg.hidden_size for s in tokens_per_seq)
    head = 6 * cfg.vocab_size * cfg.hidden_size * loss_positions  # forward and two backward products
    return dense + attention + head


def mfu_suite(args) -> dict:
    """Alternates peak matmul measurements with timed student forward+backward passes (SFT loss)."""
    import torch

    from benchmarks.common import fixed_records
    from selfdistill.data import PromptBuilder
    from selfdistill.data.records import Record
    from selfdistill.distillation.losses import chunked_token_loss, output_head
    from selfdistill.methods.base import TrainItem, completion_hidden
    from selfdistill.models import load_model

    torch.set_num_threads(2)
    model, tokenizer = load_model("smollm2-135m", torch.float32)
    model.train()
    model.config.use_cache = False
    builder = PromptBuilder(tokenizer, "paper", None, 1024, 2048, "error")
    records = [
        Record(prompt=r["prompt"], demonstration=r["demonstration"])
        for r in fixed_records(args.prompts, args.length, tokenizer)
    ]
    encoded = builder.encode_all(records)
    items = [TrainItem(record_index=e.index, prompt_ids=e.student_ids, completion=e.demonstration_ids) for e in encoded]
    seq = [len(i.prompt_ids) + len(i.completion) for i in items]
    padded = [max(seq)] * len(seq)  # right-padded batch: every row runs at the longest length
    positions = sum(len(i.completion) for i in items)
    flops = student_flops(padded, positions)

    def student_pass() -> float:
        t0 = time.perf_counter()
        hidden, tokens = completion_hidden(model, items, False, tokenizer.pad_token_id, "fp32")
        loss, _ = chunked_token_loss(
            hidden, tokens, torch.ones(tokens.shape[0]), output_head(model), lambda lp: -lp, 256
        )
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    student_pass()  # warm-up
    peaks, times = [], []
    for _ in range(args.reps):
        peaks.append(matmul_peak())
        times.append(student_pass())
    peak, seconds = median(peaks), median(times)
    row = {
        "side": "student fwd+bwd (SFT loss, fp32)",
        "sequences": len(items),
        "padded_len": max(seq),
        "loss_positions": positions,
        "gflop": flops / 1e9,
        "seconds": seconds,
        "achieved_gflops": flops / seconds / 1e9,
        "peak_matmul_gflops": peak / 1e9,
        "mfu": flops / seconds / peak,
    }
    print(row, file=sys.stderr)
    return {"suite": "mfu", "rows": [row], "peaks": peaks, "times": times}
