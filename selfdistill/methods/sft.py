"""Supervised fine-tuning: cross-entropy on the demonstration given the student prompt."""

from __future__ import annotations

from selfdistill.distillation.losses import cross_entropy
from selfdistill.methods.base import Method, TrainItem, demonstration_items
from selfdistill.registry import MethodInfo, Step


class SFT(Method):
    def build_items(self, records, seeds, step):
        return demonstration_items(records), {}

    # The loss of one demonstration token from its log-probability (DFT weights it). The function itself, not
    # a method wrapping it: the chunked loss recognises cross-entropy and DFT's loss, and computes their
    # gradient in closed form (`selfdistill.distillation.losses.chunked_token_loss`).
    per_token_loss = staticmethod(cross_entropy)

    def loss(self, items: list[TrainItem]):
        return self.supervised_loss(items, self.per_token_loss)


METHOD = MethodInfo(
    "sft",
    "Supervised fine-tuning: cross-entropy on the demonstration tokens (+ end of turn).",
    SFT,
    "Supervised fine-tuning: trained with cross-entropy on the demonstrations.",
    step=Step(),
)
