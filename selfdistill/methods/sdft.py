"""Self-Distillation Fine-Tuning (Shenfeld et al. 2026).

Per step: the student samples its own completion y for each prompt x; the teacher — the same
network with teacher weights, shown x plus the demonstration c — scores the very same tokens y;
the student is trained to match the teacher's next-token distribution at every completion
position (the first `skip_first_tokens` left out, so the student does not learn the teacher's
template phrasing such as "Based on the example…"); then the teacher's weights follow the
student (EMA).

`loss.sft_weight` λ > 0 adds an SFT term: the loss is the SDFT loss (per rollout token) plus λ
times the cross-entropy of the demonstrations (per demonstration token), in the same step, with
one more student forward over the demonstrations; metrics.jsonl logs `divergence` and
`sft_loss` apart. A 1:1 mix of the two is what public reports used to keep self-distillation of
1.7-3B models from drifting.
"""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path

import torch

from selfdistill.distillation.losses import STAT_NAMES, chunked_completion_loss, output_head
from selfdistill.distillation.teacher import Teacher
from selfdistill.methods.base import Method, TrainItem, completion_hidden
from selfdistill.models.distributed import is_sharded
from selfdistill.precision import autocast_context, teacher_precision
from selfdistill.sampling import Sampler, check_engine, make_sampler
from selfdistill.sampling.importance import ImportanceSampling, ratio_sums


class SDFT(Method):
    samples_student_prompts = True

    teacher_kind: str | None = None  # subclasses may fix the teacher (e.g. frozen)
    # Reuse a frozen teacher's hidden states for completions it already scored (offline_distill:
    # the same fixed targets come back every epoch). Off for on-policy SDFT: samples rarely repeat.
    cache_teacher_scores = False
    # loss.sft_weight > 0: the SFT term's factor, set for every step by `_attach_demonstrations`.
    _sft_scale = 1.0

    def __init__(self, cfg, model, tokenizer, builder, stop_token_ids, pad_token_id, records=None):
        super().__init__(cfg, model, tokenizer, builder, stop_token_ids, pad_token_id, records)
        # The teacher's forward runs without gradient, so it may compute in another precision than
        # the student's (teacher.precision). The teacher starts from the in-memory student (for
        # `frozen`, its weights now); a frozen copy never changes, so it may be stored in that precision.
        self.teacher_precision = teacher_precision(
            cfg.teacher.precision, cfg.model.precision, self.precision, self.compute_device
        )
        frozen_dtype = torch.bfloat16 if self.teacher_precision == "bf16" else None
        self.teacher = Teacher(model, self.teacher_kind or cfg.teacher.kind, cfg.teacher.ema_rate, frozen_dtype)
        check_engine(cfg)  # fail before training starts, with how to install the rollout engine
        self._sampler: Sampler | None = None  # built at the first rollout (see `rollout_sampler`)

    def rollouts(
        self,
        student_prompts: list[list[int]],
        teacher_prompts: list[list[int]],
        indices: list[int],
        seeds: list[int],
        skip_first: int,
    ) -> tuple[list[TrainItem], dict]:
        """Sample the student's completions (num_rollouts per prompt) and pair them with the teacher prompts."""
        n = self.cfg.rollout.num_rollouts
        prompts = [p for p in student_prompts for _ in range(n)]
        start = time.perf_counter()
        sampler = self.rollout_sampler()
        # Before every rollout: the weights moved since the last one (an optimizer step), and an engine
        # reused from an earlier task or a resumed run has never seen them.
        sync_time = sampler.sync(self.model)
        completions = sampler.generate(prompts, seeds)
        extra_stats = {"time_weight_sync": sync_time} if sampler.copies_weights else {}
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
        stats = {
            **extra_stats,
            "time_rollout": time.perf_counter() - start - sync_time,
            "completion_tokens": sum(len(i.completion) for i in items),
            "clipped": sum(not i.finished for i in items),
            "sequences": len(items),
        }
        return items, stats

    def rollout_sampler(self) -> Sampler:
        """The student's sampler (rollout.engine), built once, at the first rollout: a run that never
        samples (offline_distill's training, sft_reinvoke's SFT phase) builds no engine."""
        if self._sampler is None:
            stop = [] if self.cfg.rollout.ignore_eos else self.stop_token_ids
            self._sampler = make_sampler(
                self.cfg, self.model, stop_token_ids=stop, pad_token_id=self.pad_token_id, precision=self.precision
            )
        return self._sampler

    def build_items(self, records, seeds, step):
        items, stats = self.rollouts(
            [r.student_ids for r in records],
            [r.teacher_ids for r in records],
            [r.index for r in records],
            seeds,
            self.cfg.loss.skip_first_tokens,
        )
        if self.cfg.loss.sft_weight:  # the SFT term logs the demonstrations' log-likelihood itself
            self._attach_demonstrations(items, records)
            return items, stats
        return items, {**stats, **self.demonstration_logp(records, step)}

    def _attach_demonstrations(self, items: list[TrainItem], records) -> None:
        """SDFT + λ·SFT: each rollout carries its record's demonstration, and the SFT term's scale is set.

        The loop divides the step's loss by its rollout tokens R (across processes); the SFT term
        is to be λ times the cross-entropy per demonstration token, over the D demonstration tokens
        of the step's records. With n rollouts per record each demonstration rides on n items, so
        every item's cross-entropy sum is scaled by λ · R / (D · n).
        """
        n = self.cfg.rollout.num_rollouts
        for k, item in enumerate(items):
            item.extra["demonstration"] = records[k // n].demonstration_ids
        rollout_tokens, demonstration_tokens = self.sum_across(
            [float(sum(i.loss_tokens for i in items)), float(sum(len(r.demonstration_ids) for r in records))]
        )
        self._sft_scale = self.cfg.loss.sft_weight * rollout_tokens / max(demonstration_tokens, 1.0) / n

    def _sft_term(self, items: list[TrainItem]) -> tuple[torch.Tensor, dict]:
        """λ-scaled cross-entropy on the items' demonstrations: one more student forward, on those tokens."""
        start = time.perf_counter()
        n = self.cfg.rollout.num_rollouts
        demonstrations = [TrainItem(i.record_index, i.prompt_ids, i.extra["demonstration"]) for i in items]
        hidden, tokens = completion_hidden(self.model, demonstrations, False, self.pad_token_id, self.precision)
        ce, logp_sum = self.token_loss(hidden, tokens)
        count = tokens.shape[0] / n
        stats = {
            "sft_loss_sum": -float(logp_sum) / n,
            "sft_loss_count": count,
            "demonstration_logp_sum": float(logp_sum) / n,
            "demonstration_logp_count": count,
            "time_sft_forward": time.perf_counter() - start,
        }
        return ce * self._sft_scale, stats

    @contextlib.contextmanager
    def scored(self, items: list[TrainItem]):
        """(teacher hidden, student hidden, tokens, teacher head, timings) at the items' loss positions.

        The loss must run inside this block: the teacher's head is applied chunk by chunk inside
        it, while the teacher's weights are in use (under FSDP2 they are freed when scoring ends).
        The student's forward runs outside `teacher.weights()`: for a LoRA-frozen teacher that is
        where the adapter is switched off, and a student computed there would have nothing to
        train. `timings` gains the student's seconds when the block ends.
        """
        start = time.perf_counter()
        with self.teacher.scoring(self.model) as teacher:
            with teacher.weights() as teacher_model:
                teacher_hidden = self._teacher_hidden(teacher_model, items)
            timings = {"time_teacher": time.perf_counter() - start}
            start = time.perf_counter()
            student_hidden, tokens = completion_hidden(self.model, items, False, self.pad_token_id, self.precision)
            yield teacher_hidden, student_hidden, tokens, self._teacher_head(teacher), timings
        timings["time_student_forward"] = time.perf_counter() - start

    def _teacher_head(self, teacher):
        """The teacher's output head, run in the teacher's precision where that differs from the student's.

        A bf16 teacher under an fp32 student projects its hidden states to the vocabulary in bf16 too:
        at every completion position that product is as large as the student's own head.
        """
        head = teacher.head
        if self.teacher_precision == self.precision:
            return head

        def project(hidden: torch.Tensor) -> torch.Tensor:
            with autocast_context(hidden.device, self.teacher_precision):
                return head(hidden)

        return project

    def loss(self, items: list[TrainItem]):
        # Items without loss tokens are not dropped: under FSDP2 every process runs the same forwards.
        with self.scored(items) as (teacher_hidden, student_hidden, tokens, teacher_head, timings):
            weights = torch.ones(tokens.shape[0], device=student_hidden.device)
            importance = self._importance_sampling(items)
            loss, sums = chunked_completion_loss(
                student_hidden,
                teacher_hidden,
                tokens,
                weights,
                output_head(self.model),
                teacher_head,
                self.cfg.loss,
                importance,
            )
        stats = {**dict(zip(STAT_NAMES, sums.tolist())), **timings}
        if importance is not None:
            stats.update(ratio_sums(importance.ratios, importance.cap))
        if items and "demonstration" in items[0].extra:  # SDFT + λ·SFT
            sft, sft_stats = self._sft_term(items)
            loss = loss + sft
            stats.update(sft_stats)
        return loss, stats

    def _importance_sampling(self, items: list[TrainItem]) -> ImportanceSampling | None:
        """Truncated importance weights, when another engine sampled the items (never for our decode loop)."""
        level = self.cfg.rollout.importance_sampling
        if level == "off" or not items or any("sampler_logp" not in i.extra for i in items):
            return None
        sampler = [lp for i in items for lp in i.extra["sampler_logp"][i.loss_start :]]
        sequence = [k for k, i in enumerate(items) for _ in range(i.loss_tokens)]
        return ImportanceSampling(
            torch.tensor(sampler, dtype=torch.float32),
            torch.tensor(sequence),
            cap=self.cfg.rollout.importance_cap,
            level=level,
        )

    def _teacher_hidden(self, teacher_model, items: list[TrainItem]) -> torch.Tensor:
        """The teacher's final hidden states at the items' loss positions (from the cache where allowed)."""
        cache = getattr(self, "_teacher_cache", None)
        # Not under FSDP2: a cache hit on one process and a miss on another would run different collectives.
        if self.cache_teacher_scores and self.teacher.kind == "frozen" and not is_sharded(teacher_model):
            if cache is None:
                cache = self._teacher_cache = {}
            keys = [(i.record_index, i.loss_start, tuple(i.completion), tuple(i.teacher_prompt_ids)) for i in items]
            missing = [i for i, k in zip(items, keys) if k not in cache]
        else:
            keys, missing = None, items
        if missing:
            with torch.no_grad():
                hidden, _ = completion_hidden(teacher_model, missing, True, self.pad_token_id, self.teacher_precision)
            if keys is None:
                return hidden
            for item, part in zip(missing, hidden.split([i.loss_tokens for i in missing])):
                cache[(item.record_index, item.loss_start, tuple(item.completion), tuple(item.teacher_prompt_ids))] = (
                    part
                )
        return torch.cat([cache[k] for k in keys])

    def after_step(self) -> None:
        self.teacher.update(self.model)

    def shard(self, shard_fn) -> None:
        self.teacher.shard(functools.partial(shard_fn, precision=self.teacher_precision))

    def checkpointed_module(self):
        return self.teacher.module

    def save_state(self, directory: Path) -> None:
        self.teacher.save(Path(directory) / "teacher.safetensors")

    def load_state(self, directory: Path) -> None:
        path = Path(directory) / "teacher.safetensors"
        if self.teacher.module is not None:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: the checkpoint has no teacher weights")
            self.teacher.load(path)
