"""Truncated importance sampling: correcting the loss when another engine sampled the rollouts.

When vLLM samples the completions and the trainer scores them, the two compute slightly
different probabilities for the same tokens (other kernels, other precision), so the samples
are not exactly on-policy for the trainer. With r_t = p_trainer(y_t) / p_sampler(y_t) the ratio
of loss token t, T a sequence's loss tokens and C the cap (`rollout.importance_cap`, 2.0), the
levels (`rollout.importance_sampling`) multiply each loss token's divergence by:

- "capped_token_mean" (the config's default; the SDFT authors' trainer): one weight per sequence,
  the mean of its tokens' capped ratios, w = (1/|T|) Σ_{t∈T} min(C, r_t).
- "sequence": one weight per sequence, the cap of the exponentiated mean log-ratio,
  w = min(C, exp((1/|T|) Σ_{t∈T} (log p_trainer(y_t) − log p_sampler(y_t)))).
- "token": each token its own capped ratio, w_t = min(C, r_t).
- "off" (config only): no weight.

The weight is a constant (no gradient flows through it). The trainer's log-probabilities are
the ones the chunked loss computes anyway for each chunk: for the two per-sequence levels,
chunks are cut at sequence boundaries so a sequence's mean is complete inside its chunk. Only a
sequence longer than one chunk has its mean computed ahead (one extra no-gradient pass through
the output head, for its positions only).

The logged ratios (`ratios`, summed by `ratio_sums`) are before the cap: per token, r_t, for
"capped_token_mean" and "token" (so the clipped fraction is the fraction of loss tokens with
r_t > C); per sequence, exp(mean log-ratio), for "sequence" (the fraction of sequences capped).

With our own decode loop the sampler is the trainer, the weight is 1 and this is not applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

LEVELS = ("capped_token_mean", "sequence", "token")  # `rollout.importance_sampling` less "off"
PER_SEQUENCE = ("capped_token_mean", "sequence")  # one weight per sequence: chunks keep sequences whole


@dataclass
class ImportanceSampling:
    sampler_logp: torch.Tensor  # [N] the sampler's log-probability of each loss token
    sequence_ids: torch.Tensor  # [N] which sequence each position belongs to (contiguous runs)
    cap: float = 2.0
    level: str = field(kw_only=True)  # no default here: the config holds it
    # Filled while the loss runs, before the cap: one ratio per token ("capped_token_mean",
    # "token") or per sequence ("sequence"), see the module docstring.
    ratios: list[torch.Tensor] = field(default_factory=list)
    # Sequences longer than one chunk: their per-sequence mean, computed ahead in `prepare`
    # (the mean log-ratio for "sequence", the mean capped ratio for "capped_token_mean").
    _long_mean: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"importance sampling level must be one of {LEVELS}, not {self.level!r}")

    def chunks(self, chunk_size: int) -> list[slice]:
        """Chunk boundaries: whole sequences packed up to `chunk_size` positions (per token: plain chunks)."""
        n = self.sequence_ids.shape[0]
        if self.level not in PER_SEQUENCE:
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
        """The per-sequence mean of every sequence longer than one chunk (the only extra head work)."""
        self.ratios.clear()
        self._long_mean.clear()
        if self.level not in PER_SEQUENCE:
            return
        for begin, end in _runs(self.sequence_ids):
            if end - begin <= chunk_size:
                continue
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for s in range(begin, end, chunk_size):
                part = slice(s, min(s + chunk_size, end))
                logp = torch.log_softmax(head(hidden[part]).float(), dim=-1)
                trainer = logp.gather(-1, tokens[part][:, None]).squeeze(-1)
                total += self._per_token(trainer - self.sampler_logp[part].to(trainer.device).float()).sum()
            mean = total / (end - begin)
            self._long_mean[int(self.sequence_ids[begin])] = mean
            if self.level == "sequence":  # recorded once, here ("capped_token_mean": per token, in `weights`)
                self.ratios.append(mean.exp().reshape(1).cpu())

    def _per_token(self, log_ratio: torch.Tensor) -> torch.Tensor:
        """What a per-sequence level averages over a sequence's tokens: log r_t, or min(C, r_t)."""
        return log_ratio if self.level == "sequence" else log_ratio.exp().clamp(max=self.cap)

    @torch.no_grad()
    def weights(self, trainer_logp: torch.Tensor, part: slice) -> torch.Tensor:
        """The capped weight of each position of one chunk, from the trainer's log-probs there."""
        log_ratio = trainer_logp.detach().float() - self.sampler_logp[part].to(trainer_logp.device).float()
        if self.level != "sequence":  # per-token ratios, logged before the cap
            self.ratios.append(log_ratio.exp().cpu())
        if self.level == "token":
            return log_ratio.exp().clamp(max=self.cap)
        seq = self.sequence_ids[part].to(log_ratio.device)
        base = int(seq.min())
        local = seq - base
        count = torch.zeros(int(local.max()) + 1, device=log_ratio.device).index_add_(
            0, local, torch.ones_like(log_ratio)
        )
        mean = torch.zeros_like(count).index_add_(0, local, self._per_token(log_ratio)) / count.clamp(min=1)
        record = count > 0
        for sid, long_mean in self._long_mean.items():  # a long sequence's mean, computed in `prepare`
            if 0 <= sid - base < mean.shape[0]:
                mean[sid - base] = long_mean
                record[sid - base] = False
        if self.level == "capped_token_mean":
            return mean[local]
        ratio = mean.exp()
        self.ratios.append(ratio[record].cpu())
        return ratio.clamp(max=self.cap)[local]

    def summary(self) -> dict[str, float]:
        return ratio_summary(self.ratios, self.cap)


def ratio_summary(ratios: list[torch.Tensor], cap: float) -> dict[str, float]:
    """Mean, extremes and clipped fraction of importance ratios (before the cap); empty when none."""
    sums = ratio_sums(ratios, cap)
    count = sums["importance_ratio_mean_count"]
    if count == 0:
        return {}
    return {
        "importance_ratio_mean": sums["importance_ratio_mean_sum"] / count,
        "importance_clipped_fraction": sums["importance_clipped_fraction_sum"] / count,
        "importance_ratio_min": sums["importance_ratio_min"],
        "importance_ratio_max": sums["importance_ratio_max"],
    }


def ratio_sums(ratios: list[torch.Tensor], cap: float) -> dict[str, float]:
    """The ratios' sum, clipped count, count, minimum and maximum, as statistics of a step: sums (and
    min/max) over micro-batches and processes, logged as importance_ratio_mean, importance_clipped_fraction,
    importance_ratio_min and importance_ratio_max (training/statistics.py reads the endings)."""
    joined = torch.cat(ratios) if ratios else torch.zeros(0)
    empty = joined.numel() == 0  # still every key: all processes must send the same ones
    count = float(joined.numel())
    return {
        "importance_ratio_mean_sum": float(joined.sum()),
        "importance_ratio_mean_count": count,
        "importance_clipped_fraction_sum": float((joined > cap).sum()),
        "importance_clipped_fraction_count": count,
        "importance_ratio_min": math.inf if empty else float(joined.min()),
        "importance_ratio_max": -math.inf if empty else float(joined.max()),
    }


def _runs(ids: torch.Tensor) -> list[tuple[int, int]]:
    """[(begin, end)] of the runs of equal consecutive values."""
    values = ids.tolist()
    out, begin = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[begin]:
            out.append((begin, i))
            begin = i
    return out
