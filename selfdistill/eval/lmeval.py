"""lm-evaluation-harness adapter (optional extra `lmeval`): named lm-eval tasks on an in-memory
model or a checkpoint, through lm-eval's `HFLM` wrapper.

The in-memory path matters for continual learning: the runner evaluates the current weights
without saving them first. Seeds are pinned (python, numpy, torch, few-shot sampling) so a
rerun gives the same numbers; `limit` evaluates the first N documents of each task. Scores
are returned as reported by lm-eval, per task and metric (e.g. `acc,none` and `acc_norm,none`
both, so acc and acc_norm cannot be confused).
"""

from __future__ import annotations

import logging

from selfdistill.errors import UserError

log = logging.getLogger(__name__)


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(
            "lm-eval tasks need the lm-eval package: pip install lm-eval "
            "(or, in a selfdistill checkout, pip install -e '.[lmeval]'; make env installs it)"
        ) from None
    return lm_eval, HFLM, TaskManager


def run_lm_eval(
    model,
    tokenizer=None,
    tasks: list[str] | None = None,
    *,
    limit: int | float | None = None,
    apply_chat_template: bool = False,
    num_fewshot: int | None = None,
    seed: int = 0,
    include_path: str | None = None,
    builtin_tasks: bool = True,
    batch_size: int = 8,
    max_length: int | None = None,
) -> dict:
    """{task: {metric: value}} for lm-eval `tasks` on `model` (a loaded model, or a path / hub id).

    `builtin_tasks=False` indexes only `include_path` (indexing lm-eval's thousands of built-in
    task files takes minutes on a slow machine).
    """
    lm_eval, HFLM, TaskManager = _require_lm_eval()
    if not tasks:
        raise UserError("Name at least one lm-eval task.")
    if isinstance(model, str):
        from selfdistill.models import load_model

        model, tokenizer = load_model(model)
    if tokenizer is None:
        raise UserError("run_lm_eval needs the tokenizer of an in-memory model.")
    kwargs = {"max_length": max_length} if max_length else {}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)
    manager = TaskManager(include_path=include_path, include_defaults=builtin_tasks or not include_path)
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            limit=limit,
            num_fewshot=num_fewshot,
            task_manager=manager,
            apply_chat_template=apply_chat_template,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            log_samples=False,
            bootstrap_iters=0,
        )
    except KeyError as exc:
        raise UserError(f"lm-eval does not know the task {exc}; check the name or --lm-eval-include.") from None
    scores = {}
    for task, metrics in results["results"].items():
        scores[task] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
        counts = results.get("n-samples", {}).get(task)
        if counts:
            scores[task]["documents"] = counts.get("effective")
    return scores
