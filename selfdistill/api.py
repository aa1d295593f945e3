"""The Python API: each `sdft` command as one call, with the command's defaults.

    import selfdistill
    cfg = selfdistill.Config(method="sft", train={"max_steps": 8})      # or selfdistill.load_config("c.yaml")
    result = selfdistill.train(cfg, records=[{"prompt": "...", "demonstration": "..."}])
    scores = selfdistill.evaluate(result.final_dir, "eval.jsonl")       # as `sdft eval --task`
    results = selfdistill.run_stream("stream.yaml")                     # as `sdft continual`
    report = selfdistill.diagnose("tooluse", limit=4)                   # as `sdft diagnose`
    memory = selfdistill.plan("qwen7b.yaml", processes=8)               # as `sdft plan`

Bad input raises selfdistill.UserError with the same message the command prints.

The options of each command beyond a training config are a settings dataclass, every field documented
and checked when built, next to the code that runs it (selfdistill.training.settings,
selfdistill.eval.settings, selfdistill.diagnosis.settings, selfdistill.tasks.settings,
selfdistill.continual.settings, selfdistill.memory_plan.settings). These functions and the `sdft`
commands (a thin layer over them) take their defaults, help and checks from those settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfdistill.data.records import records_from
from selfdistill.errors import UserError
from selfdistill.options import given_options
from selfdistill.training.settings import TrainSettings


def _settings(config: Any, overrides: dict, kind: type, from_path, from_mapping, what: str) -> Any:
    """Validated settings of class `kind` from an instance, a YAML path, a mapping or nothing, with
    `overrides` merged over it; `from_path(path, overrides)` and `from_mapping(data)` build them."""
    from selfdistill.config import merge

    if isinstance(config, kind):
        return from_mapping(merge(config.to_dict(), overrides)) if overrides else config
    if isinstance(config, (str, Path)):
        return from_path(config, overrides or None)
    if config is None or isinstance(config, dict):
        return from_mapping(merge(config or {}, overrides))
    raise UserError(f"{what}: expected a {kind.__name__}, a YAML file path or a mapping, got {type(config).__name__}.")


def _config(config: Any, overrides: dict) -> Any:
    """A validated Config from a Config, a YAML path, a mapping or nothing, with `overrides` merged over it."""
    from selfdistill.config import Config, load_config

    return _settings(config, overrides, Config, load_config, lambda data: load_config(overrides=data), "config")


def train(
    config: Any = None,
    *,
    records: Any = None,
    model=None,
    tokenizer=None,
    resume: bool = TrainSettings.resume,
    overwrite: bool = TrainSettings.overwrite,
    **overrides,
):
    """Train as `sdft train`: `config` is a Config, a YAML path or a mapping; keyword sections override it,
    e.g. train(cfg, train={"lr": 1e-4}). `records` (a list of {"prompt", "demonstration", ...}, Records or a
    data source) replaces data.train; `model`/`tokenizer` train an in-memory model. Returns a TrainResult
    (output_dir, steps, final_dir, metrics, model, tokenizer)."""
    from selfdistill.progress import quiet_third_party_bars
    from selfdistill.training.loop import train as run_training
    from selfdistill.training.run_directory import check_resume

    cfg = _config(config, overrides)
    records = records_from(records, "train(records=...)")
    check_resume(cfg, resume, overwrite)
    quiet_third_party_bars()
    return run_training(cfg, records=records, model=model, tokenizer=tokenizer, resume=resume, overwrite=overwrite)


def evaluate(
    model,
    task,
    *,
    tokenizer=None,
    grader: str | None = None,
    limit: int | None = None,
    out: str | Path | None = None,
    **options,
) -> dict:
    """Score a model on a task as `sdft eval --task`: `model` is a name/directory/.gguf file or a loaded
    model (with `tokenizer`); `task` a .jsonl file, a built-in task name or a list of records (with
    `answer`). Options: those of selfdistill.eval.settings.EvaluateSettings (n_samples, temperature,
    max_new_tokens, batch_size, precision, seed), with their defaults (the command's). With `out`,
    examples.jsonl and summary.json are written there. Returns the summary."""
    from selfdistill.eval.run import evaluate_task
    from selfdistill.eval.settings import EvaluateSettings
    from selfdistill.progress import quiet_third_party_bars

    given_options(EvaluateSettings, "evaluate()", options, exclude={"grader", "limit"})
    settings = EvaluateSettings(grader=grader, limit=limit, **options)
    if not isinstance(task, (str, Path)):
        task = records_from(task, "evaluate(task=...)", require_demonstration=False)
    quiet_third_party_bars()
    return evaluate_task(model, task, settings, tokenizer=tokenizer, out=out)


def run_stream(config: Any, *, overwrite: bool = False, echo=print, **overrides) -> dict:
    """Run a continual-learning stream as `sdft continual`: `config` is a YAML path, a mapping or a
    ContinualConfig; keyword overrides are merged over it (e.g. seeds=[0, 1]). Resumable like the command.
    Writes results.json and the reports; returns results.json's content."""
    from selfdistill.continual.config import ContinualConfig, load_continual_config, parse_config
    from selfdistill.continual.runner import Runner
    from selfdistill.progress import quiet_third_party_bars
    from selfdistill.report import write_report

    def from_mapping(data: dict) -> ContinualConfig:
        return parse_config(data, "stream config")

    cfg = _settings(config, overrides, ContinualConfig, load_continual_config, from_mapping, "run_stream()")
    quiet_third_party_bars()
    Runner(cfg, overwrite=overwrite, echo=echo).run()
    return write_report(cfg.output_dir)["data"]


def diagnose(
    task: str | None = None,
    *,
    config: str | Path | None = None,
    overrides: list[str] | tuple = (),
    out: str | Path = "runs/diagnose",
    **options,
) -> dict:
    """Per-token teacher vs student numbers, the teacher ceiling and advice, as `sdft diagnose`: `task` is a
    built-in task or a data source; `config` a training YAML; `overrides` `section.key=value` strings; other
    options are those of selfdistill.diagnosis.settings.DiagnoseSettings, with their defaults (the command's):
    model, template, split, format, grader, limit, rollouts_per_record, temperature, max_new_tokens,
    divergence, beta, top_k, skip_first_tokens, precision, seed, task_seed, ceiling, batch_size.
    Writes diagnose.json and diagnose.html under `out`; returns diagnose.json's content."""
    from selfdistill.diagnosis.run import diagnose as run_diagnosis
    from selfdistill.diagnosis.settings import DiagnoseSettings
    from selfdistill.progress import quiet_third_party_bars

    given_options(DiagnoseSettings, "diagnose()", options, exclude={"task", "config", "overrides", "out"})
    settings = DiagnoseSettings(
        task=task, config=Path(config) if config else None, overrides=tuple(overrides), out=Path(out), **options
    )
    quiet_third_party_bars()
    return run_diagnosis(settings).data


def plan(
    config: Any = None, *, processes: int, gpu_memory: float | None = None, hardware: dict | None = None, **overrides
):
    """Memory per process for training `config` under torchrun with `processes` processes, as `sdft plan`:
    `config` is a Config, a YAML path or a mapping; keyword sections override it (e.g. model={"name": ...}).
    `gpu_memory` (GiB per process) adds the verdict (`.fits`, `.verdict()`). `hardware`: the command's link
    and GPU options by name (gpus_per_node, intra_node_bandwidth, inter_node_bandwidth, gpu_tflops, mfu) for
    the communication and compute times. No GPU, weights or network needed.
    Returns a `selfdistill.memory_plan.MemoryPlan` (bytes per figure; `.table()` is the command's text,
    `.to_dict()` its JSON)."""
    from selfdistill.memory_plan import plan as memory_plan
    from selfdistill.memory_plan.settings import Hardware, PlanSettings

    settings = PlanSettings(processes=processes, gpu_memory=gpu_memory)
    return memory_plan(
        _config(config, overrides), settings.processes, settings.gpu_memory, hardware=Hardware(**(hardware or {}))
    )
