"""Supervised fine-tuning: cross-entropy on the demonstration given the student prompt."""

from __future__ import annotations

import torch

from selfdistill.methods.base import Method, TrainItem, completion_hidden


class SFT(Method):
    name = "sft"

    def build_items(self, records, seeds, step):
        items = [
            TrainItem(record_index=r.index, prompt_ids=r.student_ids, completion=r.demonstration_ids) for r in records
        ]
        return items, {}

    def per_token_loss(self, token_logp: torch.Tensor) -> torch.Tensor:
        return -token_logp

    def loss(self, items: list[TrainItem]):
        hidden, tokens = completion_hidden(self.model, items, False, self.pad_token_id, self.precision)
        loss, logp_sum = self.token_loss(hidden, tokens, self.per_token_loss)
        return loss, {"demonstration_logp": float(logp_sum)}
