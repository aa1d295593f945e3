"""A method's teacher, as a part handed to it: the teacher's weights, the precision its forward runs
in, and scoring a micro-batch's completions with it and with the student.

Built once per run by `selfdistill.methods.build.build_method` for every method whose registry
entry declares a teacher (SDFT: `teacher.kind`; sft_kl, offline_distill, sft_reinvoke: the frozen
starting model), before the student is sharded, since the teacher starts as a copy of it.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from selfdistill.distillation.teacher import Teacher
from selfdistill.methods.base import TrainItem, completion_hidden
from selfdistill.models.distributed import is_sharded
from selfdistill.precision import autocast_context, teacher_precision


class TeacherScoring:
    """The teacher of a run and how a loss reaches its hidden states and head.

    `precision` is the teacher forward's (teacher.precision: it runs without gradient, so it may
    differ from the student's `student_precision`). `cache_scores` reuses a frozen teacher's hidden
    states for completions it already scored (offline_distill's fixed targets come back every
    epoch); on-policy samples rarely repeat, so SDFT does not cache.
    """

    def __init__(
        self, teacher: Teacher, precision: str, student_precision: str, pad_token_id: int, cache_scores: bool = False
    ):
        self.teacher = teacher
        self.precision = precision
        self.student_precision = student_precision
        self.pad_token_id = pad_token_id
        self.cache: dict | None = {} if cache_scores else None

    @classmethod
    def build(
        cls, cfg, student, kind: str, student_precision: str, device, pad_token_id: int, cache_scores: bool = False
    ) -> TeacherScoring:
        """The teacher of kind `kind` for `cfg` (teacher.ema_rate, teacher.precision), copied from `student`."""
        precision = teacher_precision(cfg.teacher.precision, cfg.model.precision, student_precision, device)
        # A frozen copy never changes, so it may be stored in the precision it computes in.
        frozen_dtype = torch.bfloat16 if precision == "bf16" else None
        teacher = Teacher(student, kind, cfg.teacher.ema_rate, frozen_dtype)
        return cls(teacher, precision, student_precision, pad_token_id, cache_scores)

    @property
    def kind(self) -> str:
        return self.teacher.kind

    @property
    def module(self):
        """The teacher's own copy (what a sharded checkpoint holds), or None (live, LoRA-frozen)."""
        return self.teacher.module

    @contextlib.contextmanager
    def scored(self, student, items: list[TrainItem]):
        """(teacher hidden, student hidden, tokens, teacher head, timings) at the items' loss positions.

        The loss must run inside this block: the teacher's head is applied chunk by chunk inside
        it, while the teacher's weights are in use (under FSDP2 they are freed when scoring ends).
        The student's forward runs outside `teacher.weights()`: for a LoRA-frozen teacher that is
        where the adapter is switched off, and a student computed there would have nothing to
        train. `timings` gains the student's seconds when the block ends.
        """
        start = time.perf_counter()
        with self.teacher.scoring(student) as teacher:
            with teacher.weights() as teacher_model:
                teacher_hidden = self._teacher_hidden(teacher_model, items)
            timings = {"time_teacher": time.perf_counter() - start}
            start = time.perf_counter()
            student_hidden, tokens = completion_hidden(student, items, False, self.pad_token_id, self.student_precision)
            yield teacher_hidden, student_hidden, tokens, self._head(teacher), timings
        timings["time_student_forward"] = time.perf_counter() - start

    @contextlib.contextmanager
    def weights(self, student):
        """The teacher's model, for forwards of its own (offline_distill's answers), inside the block."""
        with self.teacher.scoring(student) as view, view.weights() as model:
            yield model

    def _head(self, teacher):
        """The teacher's output head, run in the teacher's precision where that differs from the student's.

        A bf16 teacher under an fp32 student projects its hidden states to the vocabulary in bf16 too:
        at every completion position that product is as large as the student's own head.
        """
        head = teacher.head
        if self.precision == self.student_precision:
            return head

        def project(hidden: torch.Tensor) -> torch.Tensor:
            with autocast_context(hidden.device, self.precision):
                return head(hidden)

        return project

    def _teacher_hidden(self, teacher_model, items: list[TrainItem]) -> torch.Tensor:
        """The teacher's final hidden states at the items' loss positions (from the cache where allowed)."""
        # Not under FSDP2: a cache hit on one process and a miss on another would run different collectives.
        cached = self.cache is not None and self.kind == "frozen" and not is_sharded(teacher_model)
        keys = [_cache_key(i) for i in items] if cached else None
        missing = [i for i, k in zip(items, keys) if k not in self.cache] if cached else items
        if missing:
            with torch.no_grad():
                hidden, _ = completion_hidden(teacher_model, missing, True, self.pad_token_id, self.precision)
            if not cached:
                return hidden
            for item, part in zip(missing, hidden.split([i.loss_tokens for i in missing])):
                self.cache[_cache_key(item)] = part
        return torch.cat([self.cache[k] for k in keys])

    def update(self, student) -> None:
        """After an optimizer step: the EMA teacher follows the student (frozen and live: nothing)."""
        self.teacher.update(student)

    def shard(self, shard_fn) -> None:
        """Shard the teacher's copy with `shard_fn(module, precision=...)`, in the precision it computes in."""
        self.teacher.shard(lambda module: shard_fn(module, precision=self.precision))

    def save(self, directory: Path) -> None:
        self.teacher.save(Path(directory) / "teacher.safetensors")

    def load(self, directory: Path) -> None:
        path = Path(directory) / "teacher.safetensors"
        if self.teacher.module is not None:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: the checkpoint has no teacher weights")
            self.teacher.load(path)


def _cache_key(item: TrainItem) -> tuple:
    """What a frozen teacher's hidden states for an item depend on."""
    return (item.record_index, item.loss_start, tuple(item.completion), tuple(item.teacher_prompt_ids))
