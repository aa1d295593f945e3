"""Peak resident memory of the chunked full-vocabulary loss (forward + backward), in its own process.

    python -m benchmarks.loss_memory N VOCAB HIDDEN CHUNK   -> one JSON line
Reports the rise of peak RSS over what the inputs already took, so the number is the loss's own.
"""

from __future__ import annotations

import json
import resource
import sys


def measure(n: int, vocab: int, hidden: int, chunk: int, seed: int = 0) -> dict:
    import torch

    from selfdistill.config import LossConfig
    from selfdistill.distillation.losses import chunked_completion_loss

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    teacher_head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    student = torch.randn(n, hidden, requires_grad=True)
    teacher = torch.randn(n, hidden)
    tokens = torch.randint(0, vocab, (n,))
    weights = torch.ones(n)
    # Warm-up on two positions, so allocator and library start-up costs land in the baseline.
    warm, _ = chunked_completion_loss(
        student[:2], teacher[:2], tokens[:2], weights[:2], head, teacher_head, LossConfig(chunk_size=chunk)
    )
    warm.backward()
    head.weight.grad = None
    student.grad = None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    loss, _ = chunked_completion_loss(
        student, teacher, tokens, weights, head, teacher_head, LossConfig(chunk_size=chunk)
    )
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "n": n,
        "vocab": vocab,
        "hidden": hidden,
        "chunk": chunk,
        "baseline_mb": before,
        "peak_mb": peak,
        "loss_rise_mb": peak - before,
        "full_logits_mb": n * vocab * 4 / 2**20,
        "grad_finite": bool(torch.isfinite(student.grad).all()),
    }


if __name__ == "__main__":
    print(json.dumps(measure(*map(int, sys.argv[1:5]))))
