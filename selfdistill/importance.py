"""Truncated importance sampling: correcting the loss when another engine sampled the rollouts.

When vLLM samples the completions and the trainer scores them, the two compute slightly
different probabilities for the same tokens (other kernels, other precision), so the samples
are not exactly on-policy for the trainer. As the SDFT authors do, each sequence's loss is
weighted by

    w = min(C, exp(mean over its loss tokens of log p_trainer − log p_sampler)),   C = 2.0,

or, per token, w_t = min(C, p_trainer(y_t) / p_sampler(y_t)). The weight is a constant (no
gradient flows through it). The trainer's log-probabilities are the ones the chunked loss
computes anyway for each chunk: chunks are cut at sequence boundaries so a sequence's mean is
complete inside its chunk. Only a sequence longer than one chunk has its log-probabilities
computed ahead (one extra no-gradient pass through the output head, for its positions only).

With our own decode loop the sampler is the trainer, the weight is 1 and this is not applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

LEVELS = ("sequence", "token")


@dataclass
class ImportanceSampling:
    sampler_logp: torch.Tensor  # [N] the sampler's log-probability of each loss token
    sequence_ids: torch.Tensor  # [N] which sequence each position belongs to (contiguous runs)
    cap: float = 2.0
    level: str = "sequence"
    # Filled while the loss runs: one ratio per sequence (or per token), before the cap.
    ratios: list[torch.Tensor] = field(default_factory=list)
    _long_mean: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"importance sampling level must be one of {LEVELS}, not {self.level!r}")

    def chunks(self, chunk_size: int) -> list[slice]:
        """Chunk boundaries: whole sequences packed up to `chunk_size` positions (per token: plain chunks)."""
        n = self.sequence_ids.shape[0]
        if self.level == "token":
            return [slice(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
        out: list[slice] = []
        start = None
        for begin, end in _runs(self.sequence_ids):
            if end - begin > chunk_size:  # a long sequence: its own chunks, its mean computed ahead
                if start is not None:
                    out.append(slice(start, begin))
                    start = None
                out.extend(slice(s, min(s + chunk_size, end)) for s in range(begin, end, chunk_size))
                continue
            if start is not None and end - start > chunk_size:
                out.append(slice(start, begin))
                start = None
            if start is None:
                start = begin
        if start is not None:
            out.append(slice(start, n))
        return out

    @torch.no_grad()
    def prepare(self, hidden: torch.Tensor, tokens: torch.Tensor, head, chunk_size: int) -> None:
        """Mean log-ratio of every sequence longer than one chunk (the only extra head work)."""
        self.ratios.clear()
        self._long_mean.clear()
        if self.level != "sequence":
            return
        for begin, end in _runs(self.sequence_ids):
            if end - begin <= chunk_size:
                continue
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for s in range(begin, end, chunk_size):
                part = slice(s, min(s + chunk_size, end))
                logp = torch.log_softmax(head(hidden[part]).float(), dim=-1)
                trainer = logp.gather(-1, tokens[part][:, None]).squeeze(-1)
                total += (trainer - self.sampler_logp[part].to(trainer.device)).sum()
            self._long_mean[int(self.sequence_ids[begin])] = total / (end - begin)
            self.ratios.append((total / (end - begin)).exp().reshape(1).cpu())

    @torch.no_grad()
    def weights(self, trainer_logp: torch.Tensor, part: slice) -> torch.Tensor:
        """The capped weight of each position of one chunk, from the trainer's log-probs there."""
        log_ratio = trainer_logp.detach().float() - self.sampler_logp[part].to(trainer_logp.device).float()
        if self.level == "token":
            ratio = log_ratio.exp()
            self.ratios.append(ratio.cpu())
            return ratio.clamp(max=self.cap)
        seq = self.sequence_ids[part].to(log_ratio.device)
        base = int(seq.min())
        local = seq - base
        count = torch.zeros(int(local.max()) + 1, device=log_ratio.device).index_add_(
            0, local, torch.ones_like(log_ratio)
        )
        mean = torch.zeros_like(count).index_add_(0, local, log_ratio) / count.clamp(min=1)
        record = count > 0
        for sid, long_mean in self._long_mean.items():  # recorded once, in `prepare`
            if 0 <= sid - base < mean.shape[0]:
                mean[sid - base] = long_mean
                record[sid - base] = False
        ratio = mean.exp()
        self.ratios.append(ratio[record].cpu())
        return ratio.clamp(max=self.cap)[local]

    def summary(self) -> dict[str, float]:
        return ratio_summary(self.ratios, self.cap)


def ratio_summary(ratios: list[torch.Tensor], cap: float) -> dict[str, float]:
    """Mean, extremes and clipped fraction of importance ratios (before the cap); empty when none."""
    return finish_ratio_stats(ratio_sums(ratios, cap))


def ratio_sums(ratios: list[torch.Tensor], cap: float) -> dict[str, float]:
    """The ratios' sum, count, clipped count, minimum and maximum: what adds up (or min/max-es) over
    micro-batches and processes. The loop combines `*_min` / `*_max` keys by min / max, the rest by sum."""
    joined = torch.cat(ratios) if ratios else torch.zeros(0)
    empty = joined.numel() == 0  # still every key: all processes must send the same ones
    return {
        "importance_ratio_sum": float(joined.sum()),
        "importance_ratio_count": float(joined.numel()),
        "importance_clipped_count": float((joined > cap).sum()),
        "importance_ratio_min": math.inf if empty else float(joined.min()),
        "importance_ratio_max": -math.inf if empty else float(joined.max()),
    }


def finish_ratio_stats(stats: dict[str, float]) -> dict[str, float]:
    """Turns the combined sums of `ratio_sums` into the logged mean and clipped fraction (in place)."""
    if "importance_ratio_count" not in stats:
        return stats
    count = stats.pop("importance_ratio_count")
    total, clipped = stats.pop("importance_ratio_sum"), stats.pop("importance_clipped_count")
    if count == 0:  # no loss tokens anywhere this step
        stats.pop("importance_ratio_min", None), stats.pop("importance_ratio_max", None)
        return stats
    stats["importance_ratio_mean"] = total / count
    stats["importance_clipped_fraction"] = clipped / count
    return stats


def _runs(ids: torch.Tensor) -> list[tuple[int, int]]:
    """[(begin, end)] of the runs of equal consecutive values."""
    values = ids.tolist()
    out, begin = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[begin]:
            out.append((begin, i))
            begin = i
    return out
