"""Time the chunked loss's forward + backward at N positions with the embedded model's head (one process).

    python -m benchmarks.loss_time 2048 kl   # SDFT: full-vocabulary forward KL, chunk 256
    python -m benchmarks.loss_time 2048 ce   # SFT: cross-entropy, chunk 256

Prints one JSON line: the seconds of 4 repetitions (the first is warm-up) and the peak RSS. Run it
from two checkouts (e.g. a `git worktree` of an older commit, with PYTHONPATH set to each) and
alternate them to compare implementations of the loss.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def main(positions: int, kind: str) -> dict:
    import torch

    from selfdistill.config import LossConfig
    from selfdistill.distillation.losses import chunked_completion_loss, chunked_token_loss, cross_entropy, output_head
    from selfdistill.models import load_model

    torch.set_num_threads(2)
    model, _ = load_model("smollm2-135m", torch.float32)
    head = output_head(model)
    torch.manual_seed(0)
    width = model.config.hidden_size
    times = []
    for _ in range(4):
        hidden = torch.randn(positions, width).requires_grad_()
        teacher_hidden = torch.randn(positions, width)
        tokens = torch.randint(0, model.config.vocab_size, (positions,))
        weights = torch.ones(positions)
        start = time.perf_counter()
        if kind == "kl":
            loss, _ = chunked_completion_loss(
                hidden, teacher_hidden, tokens, weights, head, head, LossConfig(chunk_size=256)
            )
        else:
            loss, _ = chunked_token_loss(hidden, tokens, weights, head, cross_entropy, 256)
        loss.backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return {
        "positions": positions,
        "kind": kind,
        "times": times,
        "median_after_warmup": sorted(times[1:])[1],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), sys.argv[2])))
