"""Self-Distillation Fine-Tuning (Shenfeld et al. 2026).

Per step: the student samples its own completion y for each prompt x; the teacher — the same
network with teacher weights, shown x plus the demonstration c — scores the very same tokens y;
the student is trained to match the teacher's next-token distribution at every completion
position (the first `skip_first_tokens` left out, so the student does not learn the teacher's
template phrasing such as "Based on the example…"); then the teacher's weights follow the
student (EMA).

`loss.sft_weight` λ > 0 adds an SFT term: the loss is the SDFT loss (per rollout token) plus λ
times the cross-entropy of the demonstrations (per demonstration token), in the same step, with
one more student forward over the demonstrations; metrics.jsonl logs `divergence` and
`sft_loss` apart. A 1:1 mix of the two is what public reports used to keep self-distillation of
1.7-3B models from drifting.
"""

from __future__ import annotations

import time

import torch

from selfdistill.distillation.losses import STAT_NAMES, chunked_completion_loss, output_head
from selfdistill.methods.base import Method, TrainItem, completion_hidden
from selfdistill.methods.scoring import TeacherScoring
from selfdistill.registry import MethodInfo, Step
from selfdistill.sampling.importance import ImportanceSampling, ratio_sums


class SDFT(Method):
    """The student's rollouts (`self.rollouts`) scored by the teacher (`self.teacher`), both handed in."""

    def build_items(self, records, seeds, step):
        items, stats = self.rollouts.sample(
            self.model,
            [r.student_ids for r in records],
            [r.teacher_ids for r in records],
            [r.index for r in records],
            seeds,
            self.cfg.loss.skip_first_tokens,
        )
        if self.cfg.loss.sft_weight:  # the SFT term logs the demonstrations' log-likelihood itself
            self._attach_demonstrations(items, records)
            return items, stats
        return items, {**stats, **self.demonstration_logp(records, step)}

    def _attach_demonstrations(self, items: list[TrainItem], records) -> None:
        """SDFT + λ·SFT: each rollout carries its record's demonstration and the SFT term's scale.

        The loop divides the step's loss by its rollout tokens R (across processes); the SFT term
        is to be λ times the cross-entropy per demonstration token, over the D demonstration tokens
        of the step's records. With n rollouts per record each demonstration rides on n items, so
        every item's cross-entropy sum is scaled by λ · R / (D · n).
        """
        n = self.cfg.rollout.num_rollouts
        rollout_tokens, demonstration_tokens = self.sum_across(
            [float(sum(i.loss_tokens for i in items)), float(sum(len(r.demonstration_ids) for r in records))]
        )
        scale = self.cfg.loss.sft_weight * rollout_tokens / max(demonstration_tokens, 1.0) / n
        for k, item in enumerate(items):
            item.extra["demonstration"] = records[k // n].demonstration_ids
            item.extra["sft_scale"] = scale

    def _sft_term(self, items: list[TrainItem]) -> tuple[torch.Tensor, dict]:
        """λ-scaled cross-entropy on the items' demonstrations: one more student forward, on those tokens."""
        start = time.perf_counter()
        n = self.cfg.rollout.num_rollouts
        demonstrations = [TrainItem(i.record_index, i.prompt_ids, i.extra["demonstration"]) for i in items]
        hidden, tokens = completion_hidden(self.model, demonstrations, False, self.pad_token_id, self.precision)
        ce, logp_sum = self.token_loss(hidden, tokens)
        count = tokens.shape[0] / n
        stats = {
            "sft_loss_sum": -float(logp_sum) / n,
            "sft_loss_count": count,
            "demonstration_logp_sum": float(logp_sum) / n,
            "demonstration_logp_count": count,
            "time_sft_forward": time.perf_counter() - start,
        }
        return ce * items[0].extra["sft_scale"], stats

    def loss(self, items: list[TrainItem]):
        loss, stats = distillation_loss(self.teacher, self.model, items, self.cfg)
        if items and "demonstration" in items[0].extra:  # SDFT + λ·SFT
            sft, sft_stats = self._sft_term(items)
            loss = loss + sft
            stats.update(sft_stats)
        return loss, stats

    def after_step(self) -> None:
        self.teacher.update(self.model)


def distillation_loss(teacher: TeacherScoring, student, items: list[TrainItem], cfg) -> tuple[torch.Tensor, dict]:
    """Σ over the items' loss tokens of the divergence between the teacher's and the student's next-token
    distributions (cfg.loss), corrected by truncated importance sampling where another engine sampled
    the items (cfg.rollout); and its statistics."""
    # Items without loss tokens are not dropped: under FSDP2 every process runs the same forwards.
    with teacher.scored(student, items) as (teacher_hidden, student_hidden, tokens, teacher_head, timings):
        weights = torch.ones(tokens.shape[0], device=student_hidden.device)
        importance = importance_sampling(cfg.rollout, items)
        loss, sums = chunked_completion_loss(
            student_hidden,
            teacher_hidden,
            tokens,
            weights,
            output_head(student),
            teacher_head,
            cfg.loss,
            importance,
        )
    stats = {**{f"{name}_sum": value for name, value in zip(STAT_NAMES, sums.tolist())}, **timings}
    if importance is not None:
        stats.update(ratio_sums(importance.ratios, importance.cap))
    return loss, stats


def importance_sampling(rollout, items: list[TrainItem]) -> ImportanceSampling | None:
    """Truncated importance weights (rollout.importance_sampling), when another engine sampled the items
    (never for our decode loop, whose numbers are the trainer's)."""
    if rollout.importance_sampling == "off" or not items or any("sampler_logp" not in i.extra for i in items):
        return None
    sampler = [lp for i in items for lp in i.extra["sampler_logp"][i.loss_start :]]
    sequence = [k for k, i in enumerate(items) for _ in range(i.loss_tokens)]
    return ImportanceSampling(
        torch.tensor(sampler, dtype=torch.float32),
        torch.tensor(sequence),
        cap=rollout.importance_cap,
        level=rollout.importance_sampling,
    )


METHOD = MethodInfo(
    "sdft",
    "Self-Distillation Fine-Tuning: the student's own samples, scored by the demonstration-conditioned teacher.",
    SDFT,
    "Self-Distillation Fine-Tuning: trained on its own sampled answers, toward the next-token distributions "
    "of a teacher (the same network, shown the demonstration).",
    settings=("loss.sft_weight",),
    step=Step(
        trains_on="rollouts",
        teacher="configured",
        teacher_sees="demonstration",
        matches_teacher=True,
        skips_first_tokens=True,
        demonstration_forward="loss.sft_weight",
    ),
)
