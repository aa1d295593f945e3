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
from selfdistill.sampling import Completions, make_sampler, rollout_seed


class OfflineDistill(SDFT):
    teacher_kind = "frozen"
    cache_teacher_scores = True  # fixed targets, frozen teacher: each record is scored once
    samples_student_prompts = False  # the teacher answers its own prompts (once, before training)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.targets: dict[int, list[int]] = {}

    def setup(self, records) -> None:
        path = Path(self.cfg.train.output_dir) / "offline_targets.jsonl"
        wanted = {r.index for r in records}
        if path.is_file():
            stored = {row["index"]: row["ids"] for row in map(json.loads, path.read_text().splitlines())}
            if wanted <= stored.keys():
                self.targets = stored
                return
        seeds = [rollout_seed(self.cfg.train.seed, -1 - r.index, 0) for r in records]
        with self.teacher.scoring(self.model) as teacher, teacher.weights() as teacher_model:
            completions = self._teacher_answers(teacher_model, [r.teacher_ids for r in records], seeds)
        self.targets = {r.index: ids for r, ids in zip(records, completions.ids)}
        write_jsonl(path, [{"index": i, "ids": ids} for i, ids in self.targets.items()])

    def _teacher_answers(self, teacher_model, prompts: list[list[int]], seeds: list[int]) -> Completions:
        """The teacher's answers through the rollout engine (rollout.engine), from the teacher's weights.

        The sampler serves these answers only (training samples nothing), so it is closed after them:
        a vLLM engine's copy of the weights and its KV cache are freed before training starts.
        """
        sampler = make_sampler(
            self.cfg,
            teacher_model,
            stop_token_ids=self.stop_token_ids,
            pad_token_id=self.pad_token_id,
            precision=self.precision,
            max_prompt_tokens=self.cfg.data.max_teacher_prompt_tokens,
        )
        try:
            sampler.sync(teacher_model)  # a shared engine may hold other weights
            return sampler.generate(prompts, seeds, desc="teacher answers (offline)")
        finally:
            sampler.close()

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
            loss, _ = self.supervised_loss(items)  # its log-likelihood is the teacher answers', not the demonstrations'
            return loss, {}
        return super().loss(items)
