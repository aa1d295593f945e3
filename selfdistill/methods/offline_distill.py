"""Offline distillation: the teacher answers once, the student learns those fixed answers.

Before training, the frozen initial model — shown each query with its demonstration through the
teacher template, exactly as SDFT's teacher — generates one response per record. The student
is then trained on those responses given the student prompt, either with cross-entropy
(`offline.loss: ce`) or by matching the teacher's distributions on them (`offline.loss:
divergence`, with the same divergence settings as SDFT). Comparing it with SDFT shows what
on-policy sampling adds. The responses are stored in the run directory
(`offline_targets.jsonl`) and reused on resume.
"""

from __future__ import annotations

import json
from pathlib import Path

from selfdistill.files import write_jsonl
from selfdistill.methods.base import TrainItem
from selfdistill.methods.sdft import SDFT
from selfdistill.methods.sft import SFT
from selfdistill.rollout import generate, rollout_seed


class OfflineDistill(SDFT):
    name = "offline_distill"
    teacher_kind = "frozen"
    per_token_loss = SFT.per_token_loss  # for offline.loss = ce
    cache_teacher_scores = True  # fixed targets, frozen teacher: each record is scored once
    samples_student_prompts = False  # the teacher answers its own prompts, with our decode loop

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.targets: dict[int, list[int]] = {}
        self.teacher_generations = 0  # how many responses the teacher was asked for (once per record)

    def setup(self, records) -> None:
        path = Path(self.cfg.train.output_dir) / "offline_targets.jsonl"
        wanted = {r.index for r in records}
        if path.is_file():
            stored = {row["index"]: row["ids"] for row in map(json.loads, path.read_text().splitlines())}
            if wanted <= stored.keys():
                self.targets = stored
                return
        rollouts = self.cfg.rollout
        with self.teacher.scoring(self.model) as teacher, teacher.weights() as teacher_model:
            completions = generate(
                teacher_model,
                [r.teacher_ids for r in records],
                stop_token_ids=self.stop_token_id,
                pad_token_id=self.pad_token_id,
                max_new_tokens=rollouts.max_new_tokens,
                temperature=rollouts.temperature,
                top_p=rollouts.top_p,
                seeds=[rollout_seed(self.cfg.train.seed, -1 - r.index, 0) for r in records],
                batch_size=rollouts.batch_size,
                precision=self.precision,
                desc="teacher answers (offline)",
            )
        self.teacher_generations += len(records)
        self.targets = {r.index: ids for r, ids in zip(records, completions.ids)}
        write_jsonl(path, [{"index": i, "ids": ids} for i, ids in self.targets.items()])

    def build_items(self, records, seeds, step):
        divergence = self.cfg.offline.loss == "divergence"
        items = [
            TrainItem(
                record_index=r.index,
                prompt_ids=r.student_ids,
                completion=self.targets[r.index],
                loss_start=self.cfg.loss.skip_first_tokens if divergence else 0,
                teacher_prompt_ids=r.teacher_ids if divergence else None,
            )
            for r in records
        ]
        stats = {"completion_tokens": sum(len(i.completion) for i in items), "sequences": len(items)}
        return items, {**stats, **self.demonstration_logp(records, step)}  # it trains on teacher answers

    def loss(self, items):
        if self.cfg.offline.loss == "ce":
            loss, stats = SFT.loss(self, items)
            stats.pop("demonstration_logp")  # the teacher answers' likelihood here, not the demonstrations'
            return loss, stats
        return super().loss(items)
