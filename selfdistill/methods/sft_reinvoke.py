"""SFT + re-invoke: supervised fine-tuning, then recovering prior skills by on-policy distillation.

Phase 1 (the steps the data and epochs call for) is plain SFT on the demonstrations. Phase 2
(`reinvoke.steps` more steps) distils the *initial* model back into the student on general
prompts: the student samples its answer to a general prompt, the initial model (no
demonstration, same prompt) scores those tokens, and the student matches its distributions
(the divergence settings of `loss.*`). This is the recipe of Lu & Thinking Machines (2025) for
undoing the forgetting SFT causes; both phases run in one loop, one optimizer and one schedule.

General prompts are `reinvoke.prompts` (JSONL with `prompt`) or, by default, the built-in
general prompts (none of which is an evaluation probe or drift prompt, so the probes measure
what phase 2 recovered rather than what it trained on); each phase-2 position picks one by its
seed (with replacement).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from selfdistill.config import Config, Section
from selfdistill.data.records import Record, load_records
from selfdistill.methods.base import demonstration_items
from selfdistill.methods.sdft import distillation_loss
from selfdistill.methods.sft import SFT
from selfdistill.options import setting
from selfdistill.registry import MethodInfo, Step


@dataclass
class ReinvokeSettings(Section):
    key: ClassVar[str] = "reinvoke"

    steps: int = setting(10, "sft_reinvoke: optimizer steps of the second (recovery) phase.", "recovery steps")
    prompts: str | None = setting(
        None,
        "sft_reinvoke: general prompts (.jsonl with 'prompt'); default: the built-in general prompts (the replay set; "
        "none of them is an evaluation probe or drift prompt).",
    )

    def check(self) -> None:
        self._require(self.steps >= 0, "steps", "must be >= 0")


@dataclass
class SFTReinvokeConfig(Config):
    reinvoke: ReinvokeSettings = field(default_factory=ReinvokeSettings)


def general_prompts(path: str | None) -> list[str | list]:
    if path:
        return [r.prompt for r in load_records(path, require_demonstration=False, origin="reinvoke.prompts")]
    from selfdistill.data.general import general_prompts as builtin

    return builtin()


class SFTReinvoke(SFT):
    """Phase 1 is SFT; phase 2 distils the starting model (the frozen teacher handed in) into the
    student's rollouts (handed in) of general prompts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sft_steps = 0
        self.general: list[list[int]] = []

    @classmethod
    def check_inputs(cls, cfg) -> None:
        if cfg.reinvoke.prompts:
            general_prompts(cfg.reinvoke.prompts)

    def total_steps(self, steps: int, examples: list) -> int:
        return steps + self.cfg.reinvoke.steps

    def setup(self, records, *, total_steps: int, resuming: bool) -> None:
        self.sft_steps = total_steps - self.cfg.reinvoke.steps
        if self.cfg.reinvoke.steps:
            self.general = [
                self.builder.student_ids(Record(prompt=p, demonstration=""))
                for p in general_prompts(self.cfg.reinvoke.prompts)
            ]

    def build_items(self, records, seeds, step):
        if step < self.sft_steps:
            return demonstration_items(records), {}
        n = self.cfg.rollout.num_rollouts
        prompts = [self.general[seeds[k * n] % len(self.general)] for k in range(len(records))]
        # The initial model is shown the same prompt as the student: no demonstration.
        return self.rollouts.sample(self.model, prompts, prompts, [-1] * len(prompts), seeds, 0)

    def loss(self, items):
        if items and items[0].teacher_prompt_ids is None:  # phase 1
            return self.supervised_loss(items)
        return distillation_loss(self.teacher, self.model, items, self.cfg)


METHOD = MethodInfo(
    "sft_reinvoke",
    "SFT, then on-policy distillation from the initial model on general prompts to recover old skills.",
    SFTReinvoke,
    "SFT, then on-policy distillation from the starting model on general prompts to recover earlier skills.",
    config=SFTReinvokeConfig,
    # The second phase's step: the student's samples of general prompts, scored by the starting model.
    step=Step(
        trains_on="rollouts",
        teacher="frozen",
        teacher_sees="prompt",
        matches_teacher=True,
        second_phase="reinvoke.steps",
    ),
)
