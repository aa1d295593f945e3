"""The student's rollouts, as a part handed to a method: its sampler (rollout.engine), built at the
first rollout, and pairing each sampled completion with the prompt its teacher is shown."""

from __future__ import annotations

import time

from selfdistill.methods.base import TrainItem
from selfdistill.sampling import Sampler, SamplingSettings, check_engine, make_sampler


class Rollouts:
    """Samples `rollout.num_rollouts` completions per prompt from the student through rollout.engine.

    The sampler is built at the first rollout, so a run that never samples (sft_reinvoke's SFT
    phase, a resumed run that has finished) builds no engine.
    """

    def __init__(self, cfg, stop_token_ids: list[int], pad_token_id: int, precision: str):
        check_engine(cfg)  # fail before training starts, with how to install the rollout engine
        self.cfg = cfg
        # rollout.ignore_eos: fixed-length rollouts (for benchmarks), no stop token.
        stops = [] if cfg.rollout.ignore_eos else list(stop_token_ids)
        self.settings = SamplingSettings.for_rollouts(
            cfg, stop_token_ids=stops, pad_token_id=pad_token_id, precision=precision
        )
        self.sampler: Sampler | None = None

    def _sampler(self, model) -> Sampler:
        if self.sampler is None:
            self.sampler = make_sampler(model, self.settings, engine=self.cfg.rollout.engine, cfg=self.cfg)
        return self.sampler

    def sample(
        self,
        model,
        student_prompts: list[list[int]],
        teacher_prompts: list[list[int]],
        indices: list[int],
        seeds: list[int],
        skip_first: int,
    ) -> tuple[list[TrainItem], dict]:
        """The student's completions of `student_prompts` (num_rollouts each), as items whose teacher sees
        `teacher_prompts`, with the first `skip_first` tokens out of the loss; and the rollout's statistics."""
        n = self.cfg.rollout.num_rollouts
        prompts = [p for p in student_prompts for _ in range(n)]
        start = time.perf_counter()
        sampler = self._sampler(model)
        # Before every rollout: the weights moved since the last one (an optimizer step), and an engine
        # reused from an earlier task or a resumed run has never seen them.
        sync_time = sampler.sync(model)
        completions = sampler.generate(prompts, seeds)
        items = [
            TrainItem(
                record_index=indices[k // n],
                prompt_ids=student_prompts[k // n],
                completion=ids,
                loss_start=skip_first,
                teacher_prompt_ids=teacher_prompts[k // n],
                finished=finished,
                extra={} if completions.logprobs is None else {"sampler_logp": completions.logprobs[k]},
            )
            for k, (ids, finished) in enumerate(zip(completions.ids, completions.finished))
        ]
        count = float(len(items))
        stats = {
            "time_rollout": time.perf_counter() - start - sync_time,
            "completion_length_sum": float(sum(len(i.completion) for i in items)),
            "completion_length_count": count,
            "clipped_ratio_sum": float(sum(not i.finished for i in items)),
            "clipped_ratio_count": count,
        }
        if sampler.copies_weights:
            stats["time_weight_sync"] = sync_time
        return items, stats
