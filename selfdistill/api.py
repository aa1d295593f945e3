"""The Python API: each `sdft` command as one call, with the command's defaults.

    import selfdistill
    cfg = selfdistill.Config(method="sft", train={"max_steps": 8})      # or selfdistill.load_config("c.yaml")
    result = selfdistill.train(cfg, records=[{"prompt": "...", "demonstration": "..."}])
    scores = selfdistill.evaluate(result.final_dir, "eval.jsonl")       # as `sdft eval --task`
    results = selfdistill.run_stream("stream.yaml")                     # as `sdft continual`
    report = selfdistill.diagnose("tooluse", limit=4)                   # as `sdft diagnose`
    memory = selfdistill.plan("qwen7b.yaml", processes=8)               # as `sdft plan`

Bad input raises selfdistill.UserError with the same message the command prints.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from selfdistill.errors import UserError


def _config(config: Any, overrides: dict) -> Any:
    """A validated Config from a Config, a YAML path, a mapping or nothing, with `overrides` merged over it."""
    from selfdistill.config import Config, load_config, merge

    if isinstance(config, Config):
        return load_config(overrides=merge(config.to_dict(), overrides)) if overrides else config
    if isinstance(config, (str, Path)):
        return load_config(config, overrides or None)
    if config is None or isinstance(config, dict):
        return load_config(overrides=merge(config or {}, overrides))
    raise UserError(f"config: expected a Config, a YAML file path or a mapping, got {type(config).__name__}.")


def _records(records: Any, require_demonstration: bool = True):
    """Records from a file/dataset source, a list of mappings, or Records (None stays None)."""
    from selfdistill.data.records import Record, load_records, records_from_rows

    if records is None or (isinstance(records, list) and all(isinstance(r, Record) for r in records)):
        return records
    if isinstance(records, (str, Path)):
        return load_records(records, require_demonstration=require_demonstration)
    return records_from_rows(list(records), "records", require_demonstration=require_demonstration)


def command_defaults(command) -> dict:
    """A typer command's option defaults by parameter name: the API reads its defaults from the CLI."""
    defaults = {}
    for name, parameter in inspect.signature(command).parameters.items():
        value = parameter.default
        defaults[name] = getattr(value, "default", value)  # typer's OptionInfo/ArgumentInfo carry .default
    return defaults


def train(
    config: Any = None,
    *,
    records: Any = None,
    model=None,
    tokenizer=None,
    resume: bool = False,
    overwrite: bool = False,
    **overrides,
):
    """Train as `sdft train`: `config` is a Config, a YAML path or a mapping; keyword sections override it,
    e.g. train(cfg, train={"lr": 1e-4}). `records` (a list of {"prompt", "demonstration", ...}, Records or a
    data source) replaces data.train; `model`/`tokenizer` train an in-memory model. Returns a TrainResult
    (output_dir, steps, final_dir, metrics, model, tokenizer)."""
    from selfdistill.progress import quiet_third_party_bars
    from selfdistill.train import train as run_training

    cfg = _config(config, overrides)
    quiet_third_party_bars()
    return run_training(
        cfg, records=_records(records), model=model, tokenizer=tokenizer, resume=resume, overwrite=overwrite
    )


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
    `answer`). Options (defaults as the command's): max_new_tokens, batch_size, precision, temperature,
    n_samples, seed. With `out`, examples.jsonl and summary.json are written there. Returns the summary."""
    import torch

    from selfdistill.eval import graders
    from selfdistill.eval.cli import eval_command
    from selfdistill.eval.evaluate import evaluate as run_evaluation
    from selfdistill.eval.tasks import guess_grader, resolve_task
    from selfdistill.precision import PRECISIONS, resolve_precision

    names = ("max_new_tokens", "batch_size", "precision", "temperature", "n_samples", "seed")
    defaults = command_defaults(eval_command)
    settings = {name: defaults[name] for name in names}
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise UserError(f"evaluate(): unknown option(s) {', '.join(unknown)}; valid: {', '.join(names)}.")
    settings.update(options)
    if settings["precision"] not in PRECISIONS:
        raise UserError(f"evaluate(): precision must be one of {', '.join(PRECISIONS)}, got {settings['precision']!r}.")
    if isinstance(task, (str, Path)):
        records, grader_name = resolve_task(str(task), grader, limit, settings["seed"])
        label = Path(str(task)).stem
    else:
        records = _records(task, require_demonstration=False)[:limit]
        grader_name, label = grader or guess_grader(records), "records"
    grade = graders.get(grader_name)
    if isinstance(model, (str, Path)):
        from selfdistill.models import load_model

        model, tokenizer = load_model(str(model), torch.float32)
    elif tokenizer is None:
        raise UserError("evaluate(): a loaded model needs its tokenizer (tokenizer=...).")
    settings["precision"] = resolve_precision(settings["precision"], next(model.parameters()).device)
    from selfdistill.progress import quiet_third_party_bars

    quiet_third_party_bars()
    summary = run_evaluation(model, tokenizer, records, grade, out_dir=out, desc=f"eval {label}", **settings)
    summary.update({"task": str(task) if isinstance(task, (str, Path)) else label, "grader": grader_name})
    if out is not None:
        from selfdistill.files import write_json

        write_json(Path(out) / "summary.json", summary)
    return summary


def run_stream(config: Any, *, overwrite: bool = False, echo=print, **overrides) -> dict:
    """Run a continual-learning stream as `sdft continual`: `config` is a YAML path, a mapping or a
    ContinualConfig; keyword overrides are merged over it (e.g. seeds=[0, 1]). Resumable like the command.
    Writes results.json and the reports; returns results.json's content."""
    from selfdistill.config import merge
    from selfdistill.continual.config import ContinualConfig, load_continual_config, parse_config
    from selfdistill.continual.runner import Runner
    from selfdistill.progress import quiet_third_party_bars
    from selfdistill.report import write_report

    if isinstance(config, ContinualConfig):
        cfg = parse_config(merge(config.to_dict(), overrides), "stream config") if overrides else config
    elif isinstance(config, (str, Path)):
        cfg = load_continual_config(config, overrides)
    elif isinstance(config, dict):
        cfg = parse_config(merge(config, overrides), "stream config")
    else:
        raise UserError(
            f"run_stream(): expected a YAML path, a mapping or a ContinualConfig, got {type(config).__name__}."
        )
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
    options are the command's (model, template, limit, rollouts_per_record, temperature, max_new_tokens,
    divergence, beta, top_k, skip_first_tokens, precision, seed, task_seed, ceiling, batch_size, split,
    format, grader). Writes diagnose.json and diagnose.html under `out`; returns diagnose.json's content."""
    from selfdistill.diagnose.cli import diagnose_command
    from selfdistill.files import read_json

    settings = command_defaults(diagnose_command)
    hidden = {"task_arg", "task", "config", "set_", "out"}
    unknown = sorted(set(options) - (set(settings) - hidden))
    if unknown:
        raise UserError(
            f"diagnose(): unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(set(settings) - hidden))}."
        )
    settings.update(
        options, task_arg=task, task=None, config=Path(config) if config else None, set_=list(overrides), out=Path(out)
    )
    if isinstance(settings["grader"], str):
        settings["grader"] = [settings["grader"]]
    from selfdistill.progress import quiet_third_party_bars

    quiet_third_party_bars()
    diagnose_command(**settings)
    return read_json(Path(out) / "diagnose.json")


def plan(config: Any = None, *, processes: int, **overrides):
    """Memory per process for training `config` under torchrun with `processes` processes, as `sdft plan`:
    `config` is a Config, a YAML path or a mapping; keyword sections override it (e.g. model={"name": ...}).
    No GPU, weights or network needed. Returns a `selfdistill.memory_plan.MemoryPlan` (bytes per figure;
    `.table()` is the command's text, `.to_dict()` its JSON)."""
    from selfdistill.memory_plan import plan as memory_plan

    return memory_plan(_config(config, overrides), processes)
