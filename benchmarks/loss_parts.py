"""Time each part of one chunk of the SDFT loss against SFT's, with the embedded model's output head.

    python -m benchmarks.loss_parts            # 256 positions (loss.chunk_size), one thread

Prints milliseconds per part: the matrix products (the student's head and its two gradient
products, which SFT's cross-entropy has too; the teacher's head in bf16) and the passes over
[positions × vocabulary] tensors that the divergence adds (a second log-softmax, exp, the KL sum,
the entropy statistic). Compare parts within one run: the machine's load moves them all.
"""

from __future__ import annotations

import sys
import time


def _seconds(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(positions: int = 256) -> dict[str, float]:
    import torch

    from selfdistill.models import load_model
    from selfdistill.precision import autocast_context

    torch.set_num_threads(1)
    model, _ = load_model("smollm2-135m", torch.float32)
    weight = model.lm_head.weight.detach()
    torch.manual_seed(0)
    hidden, teacher_hidden = torch.randn(positions, weight.shape[1]), torch.randn(positions, weight.shape[1])

    def teacher_head():
        with autocast_context(teacher_hidden.device, "bf16"):
            return (teacher_hidden @ weight.T).float()

    student_logp = torch.log_softmax(hidden @ weight.T, -1)
    teacher_logp = torch.log_softmax(teacher_head(), -1)
    teacher_p = teacher_logp.exp()
    grad = student_logp.exp() - teacher_p
    parts = {
        "student head (fp32)": lambda: hidden @ weight.T,
        "teacher head (bf16 autocast)": teacher_head,
        "log_softmax": lambda: torch.log_softmax(student_logp, -1),
        "exp": lambda: teacher_logp.exp(),
        "KL sum (where, product, sum)": lambda: torch.where(
            teacher_p > 0, teacher_p * (teacher_logp - student_logp), 0.0
        ).sum(-1),
        "entropy statistic": lambda: -(teacher_p * teacher_logp).sum(-1),
        "gradient of the logits": lambda: student_logp.exp() - teacher_p,
        "gradient product, hidden": lambda: grad @ weight,
        "gradient product, head": lambda: grad.T @ hidden,
    }
    return {name: round(_seconds(fn) * 1000, 1) for name, fn in parts.items()}


if __name__ == "__main__":
    for name, ms in main(*(int(a) for a in sys.argv[1:])).items():
        print(f"{name:32s} {ms:8.1f} ms")
