"""A method with its parts: built once from the config, as the method's registry entry declares them,
and handed in (the training loop, `sdft plan` and the tests build methods here)."""

from __future__ import annotations

from selfdistill.methods.base import Method, compute_precision
from selfdistill.methods.rollouts import Rollouts
from selfdistill.methods.scoring import TeacherScoring
from selfdistill.registry import METHOD_INFO, method_class


def build_method(
    cfg,
    model,
    tokenizer,
    builder,
    stop_token_ids: list[int],
    pad_token_id: int,
    records=None,
    *,
    procs=None,
    shard=None,
) -> Method:
    """The method `cfg.method`, given the student `model`.

    Its teacher (where its step declares one: teacher.kind, or the method's fixed kind) is copied
    from the student here, before sharding; with `shard` (`shard(module, precision=...)`, under
    torchrun) the student and the teacher are then sharded, each in the precision it computes in,
    and the method holds the sharded student as `method.model`. Its rollouts (where it trains on
    the student's samples) are built too; their engine starts at the first sample.
    """
    cls, step = method_class(cfg.method), METHOD_INFO[cfg.method].step
    device, precision = compute_precision(cfg, model)
    teacher = None
    if step is not None and step.teacher is not None:
        kind = step.fixed_teacher or cfg.teacher.kind
        teacher = TeacherScoring.build(cfg, model, kind, precision, device, pad_token_id, cls.cache_teacher_scores)
    rollouts = None
    if step is not None and step.trains_on == "rollouts":
        rollouts = Rollouts(cfg, stop_token_ids, pad_token_id, precision)
    if shard is not None:
        model = shard(model, precision=precision)
        if teacher is not None:
            teacher.shard(shard)
    return cls(
        cfg,
        model,
        tokenizer,
        builder,
        stop_token_ids,
        pad_token_id,
        records,
        procs=procs,
        teacher=teacher,
        rollouts=rollouts,
    )
