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
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from selfdistill.config import Config, Section
from selfdistill.files import write_jsonl
from selfdistill.methods.base import Method, TrainItem
from selfdistill.methods.sdft import distillation_loss
from selfdistill.options import setting
from selfdistill.registry import MethodInfo, Step
from selfdistill.sampling import Completions, SamplingSettings, rollout_seed, sampling_from


@dataclass
class OfflineSettings(Section):
    key: ClassVar[str] = "offline"

    loss: Literal["ce", "divergence"] = setting(
        "ce",
        "offline_distill: 'ce' (cross-entropy on the teacher's answers) or 'divergence' (match its distributions).",
        "loss on the teacher's answers",
    )


@dataclass
class OfflineDistillConfig(Config):
    offline: OfflineSettings = field(default_factory=OfflineSettings)


class OfflineDistill(Method):
    """Trains on the frozen teacher's answers (generated in `setup`), by cross-entropy or by its distributions."""

    cache_teacher_scores = True  # fixed targets, frozen teacher: each record is scored once

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.targets: dict[int, list[int]] = {}

    def setup(self, records, *, total_steps: int, resuming: bool) -> None:
        path = Path(self.cfg.train.output_dir) / "offline_targets.jsonl"
        wanted = {r.index for r in records}
        if path.is_file():
            stored = {row["index"]: row["ids"] for row in map(json.loads, path.read_text().splitlines())}
            if wanted <= stored.keys():
                self.targets = stored
                return
        seeds = [rollout_seed(self.cfg.train.seed, -1 - r.index, 0) for r in records]
        with self.teacher.weights(self.model) as teacher_model:
            completions = self._teacher_answers(teacher_model, [r.teacher_ids for r in records], seeds)
        self.targets = {r.index: ids for r, ids in zip(records, completions.ids)}
        write_jsonl(path, [{"index": i, "ids": ids} for i, ids in self.targets.items()])

    def _teacher_answers(self, teacher_model, prompts: list[list[int]], seeds: list[int]) -> Completions:
        """The teacher's answers through the rollout engine (rollout.engine), from the teacher's weights.

        The sampler serves these answers only (training samples nothing), so it is closed after them:
        a vLLM engine's copy of the weights and its KV cache are freed before training starts.
        """
        settings = SamplingSettings.for_rollouts(
            self.cfg, stop_token_ids=self.stop_token_ids, pad_token_id=self.pad_token_id, precision=self.precision
        )
        engine, longest = self.cfg.rollout.engine, self.cfg.data.max_teacher_prompt_tokens
        # Synced before generating (a shared engine may hold other weights), closed after.
        with sampling_from(teacher_model, settings, engine=engine, cfg=self.cfg, max_prompt_tokens=longest) as sampler:
            return sampler.generate(prompts, seeds, desc="teacher answers (offline)")

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
        lengths = [float(len(i.completion)) for i in items]
        stats = {"completion_length_sum": sum(lengths), "completion_length_count": float(len(items))}
        return items, {**stats, **self.demonstration_logp(records, step)}  # it trains on teacher answers

    def loss(self, items):
        if self.cfg.offline.loss == "ce":
            loss, _ = self.supervised_loss(items)  # its log-likelihood is the teacher answers', not the demonstrations'
            return loss, {}
        return distillation_loss(self.teacher, self.model, items, self.cfg)


METHOD = MethodInfo(
    "offline_distill",
    "The demonstration-conditioned teacher answers once before training; the student learns those answers.",
    OfflineDistill,
    "Offline distillation: the starting model, shown each demonstration, answered once before training, "
    "and the model was trained on those answers.",
    config=OfflineDistillConfig,
    step=Step(
        trains_on="teacher answers",
        teacher="frozen",
        teacher_sees="demonstration",
        teacher_runs_if="offline.loss=divergence",
        matches_teacher=True,
        skips_first_tokens=True,
    ),
)
