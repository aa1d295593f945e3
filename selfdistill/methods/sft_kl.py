"""SFT anchored to the starting model: cross-entropy on the demonstration plus β · KL(start ‖ student).

At every demonstration token the student pays, besides SFT's cross-entropy, `anchor.beta` times
the KL divergence from the starting model's next-token distribution (shown the same prompt) to
its own, over the full vocabulary, chunked like the other losses. The starting model is the
frozen teacher of the other methods: a frozen copy for full fine-tuning, the adapter switched
off for LoRA (no second copy).

Why this direction, KL(start ‖ student) = Σ_v p_start (log p_start − log p_student): it is the
loss of distilling the starting model into the student, and together with the cross-entropy it
is the cross-entropy against the mixture of the demonstrated token and the starting model's
distribution (weights 1 and β): the student is asked to keep all of the mass the starting model
spreads over other tokens while it learns the demonstrated one (as in Learning without
Forgetting). Its gradient in the logits, β (p_student − p_start), is bounded. The reverse
direction, KL(student ‖ start), is mode-seeking: it only penalises mass the starting model
lacks, and at a demonstrated token the starting model finds unlikely it pushes straight against
the cross-entropy, with a gradient that grows as p_start → 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from selfdistill.config import Config, Section
from selfdistill.distillation.losses import chunked_anchored_loss, output_head
from selfdistill.methods.base import TrainItem
from selfdistill.methods.sft import SFT
from selfdistill.options import setting
from selfdistill.registry import MethodInfo, Step


@dataclass
class AnchorSettings(Section):
    key: ClassVar[str] = "anchor"

    beta: float = setting(
        0.1,
        "sft_kl: weight β of the anchor: loss = cross-entropy + β · KL(starting model ‖ student) on the "
        "demonstration's tokens, over the full vocabulary. 0: plain SFT.",
        "KL anchor weight",
    )

    def check(self) -> None:
        self._require(self.beta >= 0 and math.isfinite(self.beta), "beta", "must be a finite number >= 0")


@dataclass
class SFTKLConfig(Config):
    anchor: AnchorSettings = field(default_factory=AnchorSettings)


class SFTKL(SFT):
    """SFT plus the anchor to the starting model (the frozen teacher handed in), scored alongside the student."""

    def build_items(self, records, seeds, step):
        # The starting model is shown what the student is shown: the prompt, no demonstration.
        items = [
            TrainItem(r.index, r.student_ids, r.demonstration_ids, teacher_prompt_ids=r.student_ids) for r in records
        ]
        return items, {}

    def loss(self, items: list[TrainItem]):
        beta = self.cfg.anchor.beta
        if beta == 0:  # plain SFT: the starting model is not run
            return self.supervised_loss(items)
        with self.teacher.scored(self.model, items) as (anchor_hidden, hidden, tokens, anchor_head, timings):
            loss, sums = chunked_anchored_loss(
                hidden,
                anchor_hidden,
                tokens,
                torch.ones(tokens.shape[0], device=hidden.device),
                output_head(self.model),
                anchor_head,
                beta,
                self.cfg.loss.chunk_size,
            )
        logp_sum, kl_sum = sums.tolist()
        return loss, {"demonstration_logp_sum": logp_sum, "anchor_kl_sum": kl_sum, **timings}


METHOD = MethodInfo(
    "sft_kl",
    "SFT anchored to the starting model: cross-entropy + anchor.beta x KL(starting model || student) per token.",
    SFTKL,
    "SFT anchored to the starting model: trained with cross-entropy on the demonstrations plus a KL penalty "
    "toward the starting model's next-token distributions.",
    config=SFTKLConfig,
    step=Step(teacher="frozen", teacher_sees="prompt", teacher_runs_if="anchor.beta"),
)
