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

import torch

from selfdistill.distillation.losses import chunked_anchored_loss, output_head
from selfdistill.methods.base import TrainItem
from selfdistill.methods.sdft import SDFT


class SFTKL(SDFT):
    """SDFT's teacher machinery (a frozen starting model, scored alongside the student) with its own loss."""

    teacher_kind = "frozen"  # the starting model
    samples_student_prompts = False  # no rollouts: it trains on the demonstrations

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
        with self.scored(items) as (anchor_hidden, hidden, tokens, anchor_head, timings):
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
        return loss, {"demonstration_logp": logp_sum, "anchor_kl": kl_sum, **timings}

    def after_step(self) -> None:
        """The starting model stays as it is."""
