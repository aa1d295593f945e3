"""Dynamic Fine-Tuning (Wu et al. 2025, arXiv 2508.05629).

The SFT token loss weighted by the token's own probability, held constant:
    loss_t = −sg(p(y_t)) · log p(y_t)
which rescales SFT's gradient so that tokens the model finds very unlikely do not dominate.
"""

from __future__ import annotations

from selfdistill.distillation.losses import probability_weighted_cross_entropy
from selfdistill.methods.sft import SFT
from selfdistill.registry import MethodInfo, Step


class DFT(SFT):
    per_token_loss = staticmethod(probability_weighted_cross_entropy)


METHOD = MethodInfo(
    "dft",
    "Dynamic Fine-Tuning: SFT's token loss weighted by the token's (constant) probability.",
    DFT,
    "Dynamic Fine-Tuning: trained with cross-entropy on the demonstrations, each token's loss weighted by "
    "its probability under the model (held constant).",
    step=Step(),
)
