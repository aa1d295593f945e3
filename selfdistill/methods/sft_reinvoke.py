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

from selfdistill.data.records import Record, load_records
from selfdistill.methods.base import demonstration_items
from selfdistill.methods.sdft import SDFT


def general_prompts(path: str | None) -> list[str | list]:
    if path:
        return [r.prompt for r in load_records(path, require_demonstration=False, origin="reinvoke.prompts")]
    from selfdistill.data.general import general_prompts as builtin

    return builtin()


class SFTReinvoke(SDFT):
    """Phase 2 is SDFT's on-policy distillation with the initial model as the teacher; phase 1 is SFT."""

    teacher_kind = "frozen"  # the initial model
    samples_student_prompts = False  # rollouts complete the general prompts, not the records'

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sft_steps = 0
        self.general: list[list[int]] = []

    @classmethod
    def check_inputs(cls, cfg) -> None:
        if cfg.reinvoke.prompts:
            general_prompts(cfg.reinvoke.prompts)

    def total_steps(self, steps: int) -> int:
        self.sft_steps = steps
        return steps + self.cfg.reinvoke.steps

    def setup(self, records) -> None:
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
        return self.rollouts(prompts, prompts, [-1] * len(prompts), seeds, 0)

    def loss(self, items):
        if items and items[0].teacher_prompt_ids is None:  # phase 1
            return self.supervised_loss(items)
        return super().loss(items)

    def after_step(self) -> None:
        """The initial model stays as it is."""
