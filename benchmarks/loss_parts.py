"""Time each part of one chunk of the SDFT loss against SFT's, with the embedded model's output head.

    python -m benchmarks.loss_parts            # 256 positions (loss.chunk_size), one thread
    python -m benchmarks.loss_parts 256 2      # the same on two threads

Prints milliseconds per part: the matrix products (the student's head and its two gradient
products, which SFT's cross-entropy has too; the teacher's head in bf16) and the passes over
[positions × vocabulary] tensors that the divergence adds (a second log-softmax, exp, the KL sum,
the entropy statistic), and the head's gradient summed into a buffer as a separate product or by
`addmm_`. Then one whole closed-form chunk (`_forward_kl_chunk_closed_form`, the
default SDFT path, teacher head in bf16) against the computation it replaced (kept below as
`_chunk_before`, for this comparison only), alternated, with the ratio of each pair. Compare parts
within one run: the machine's load moves them all.
"""

from __future__ import annotations

import statistics
import sys
import time


def _seconds(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _chunk_before(student_hidden, teacher_hidden, tokens, weights, student_head, teacher_head):
    """The closed-form chunk before the fused row passes: log-softmax, exp, KL and entropy each a pass
    over [positions × vocabulary] (reference for the timing only)."""
    import torch

    weight = student_head.module.weight
    with torch.no_grad():
        hidden = student_hidden.detach()
        student_logp = torch.log_softmax(student_head(hidden).float(), dim=-1)
        teacher_logp = torch.log_softmax(teacher_head(teacher_hidden).float(), dim=-1)
        teacher_p = teacher_logp.exp()
        per_token = torch.where(teacher_p > 0, teacher_p * (teacher_logp - student_logp), 0.0).sum(-1)
        s_tok = student_logp.gather(-1, tokens[:, None]).squeeze(-1)
        t_tok = teacher_logp.gather(-1, tokens[:, None]).squeeze(-1)
        entropy = -(teacher_p * teacher_logp).sum(-1)
        stats = torch.stack([(per_token * weights).sum(), ((t_tok - s_tok) * weights).sum(), (entropy * weights).sum()])
        grad_logits = (student_logp.exp_() - teacher_p).mul_(weights[:, None].float()).to(weight.dtype)
        grads = [(grad_logits @ weight).to(hidden.dtype)]
        if weight.requires_grad:
            grads.append(grad_logits.T @ hidden.to(weight.dtype))
    return (per_token * weights).sum(), stats, grads


def _whole_chunks(model, hidden, teacher_hidden, pairs: int = 4) -> dict[str, float]:
    """Milliseconds of one closed-form chunk, before and now, alternated `pairs` times after a warm-up."""
    import torch

    from selfdistill.distillation.losses import _forward_kl_chunk_closed_form, output_head
    from selfdistill.precision import autocast_context

    student_head, plain_head = output_head(model), output_head(model)

    def teacher_head(h):
        with autocast_context(h.device, "bf16"):
            return plain_head(h)

    tokens = torch.randint(0, model.config.vocab_size, (hidden.shape[0],))
    inputs = (hidden, teacher_hidden, tokens, torch.ones(hidden.shape[0]), student_head, teacher_head)
    head_buffer = torch.zeros_like(model.lm_head.weight)  # what _GradientsInForward sums the head's gradient in
    times = {"before": [], "now": []}
    for i in range(pairs + 1):
        for name, fn in (("before", _chunk_before), ("now", _forward_kl_chunk_closed_form)):
            start = time.perf_counter()
            head_gradient = fn(*inputs)[2][1]
            if callable(head_gradient):
                head_gradient(head_buffer)
            else:
                head_buffer += head_gradient
            if i:  # the first pair is warm-up
                times[name].append(time.perf_counter() - start)
    ratios = [now / before for before, now in zip(times["before"], times["now"])]
    return {
        "closed-form chunk, before": round(statistics.median(times["before"]) * 1000, 1),
        "closed-form chunk, now": round(statistics.median(times["now"]) * 1000, 1),
        "now / before (median of pairs)": round(statistics.median(ratios), 3),
    }


def main(positions: int = 256, threads: int = 1) -> dict[str, float]:
    import torch

    from selfdistill.models import load_model
    from selfdistill.precision import autocast_context

    torch.set_num_threads(threads)
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
    buffer = torch.zeros_like(weight)
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
        "  and added to a buffer": lambda: buffer.add_(grad.T @ hidden),
        "  summed into it by addmm_": lambda: buffer.addmm_(grad.T, hidden),
    }
    times = {name: round(_seconds(fn) * 1000, 1) for name, fn in parts.items()}
    return {**times, **_whole_chunks(model, hidden, teacher_hidden)}


if __name__ == "__main__":
    for name, value in main(*(int(a) for a in sys.argv[1:])).items():
        print(f"{name:32s} {value:8.1f} ms" if "/" not in name else f"{name:32s} {value:8.3f}")
