"""Supervised fine-tuning: cross-entropy on the demonstration given the student prompt."""

from __future__ import annotations

import torch

from selfdistill.distillation.losses import cross_entropy
from selfdistill.methods.base import Method, TrainItem, demonstration_items
from selfdistill.registry import MethodInfo, Step


class SFT(Method):
    def build_items(self, records, seeds, step):
        return demonstration_items(records), {}

    def per_token_loss(self, token_logp: torch.Tensor) -> torch.Tensor:
        """The loss of one demonstration token from its log-probability (DFT weights it)."""
        return cross_entropy(token_logp)

    def loss(self, items: list[TrainItem]):
        return self.supervised_loss(items, self.per_token_loss)


METHOD = MethodInfo(
    "sft",
    "Supervised fine-tuning: cross-entropy on the demonstration tokens (+ end of turn).",
    SFT,
    "Supervised fine-tuning: trained with cross-entropy on the demonstrations.",
    step=Step(),
)
