"""`sdft diagnose`: why SDFT does (not) learn a task, before spending compute on training it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from selfdistill.config import LossKind, choices
from selfdistill.errors import UserError
from selfdistill.precision import PRECISIONS

# Diagnose-only default: training's 1024-token completions would make a quick look slow on a CPU,
# and the first tokens are where small models differ most (on SmolLM2-135M the teacher's first-token
# distribution is flat, top token ~8%, so greedy answers flip on small changes).
DEFAULT_MAX_NEW_TOKENS = 128
DIVERGENCES = choices(LossKind)


def _check_options(
    limit, rollouts, temperature, max_new_tokens, divergence, top_k, precision, beta, skip_first
) -> None:
    """Reject a bad option by its name, before the (slow) model load."""
    if limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}.")
    if rollouts is not None and rollouts < 1:
        raise UserError(f"--rollouts-per-record must be at least 1, got {rollouts}.")
    if temperature is not None and temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 is greedy), got {temperature}.")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}.")
    if divergence is not None and divergence not in DIVERGENCES:
        raise UserError(f"--divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}.")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k must be a positive number of tokens, got {top_k}.")
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if beta is not None and not 0.0 <= beta <= 1.0:
        raise UserError(f"--beta must lie in [0, 1], got {beta}.")
    if skip_first is not None and skip_first < 0:
        raise UserError(f"--skip-first-tokens must be >= 0, got {skip_first}.")


def _records(name: str | None, cfg, split: str | None, format: str, graders: list[str], seed: int):
    """(records, metrics, the task's own template or None, label) for a built-in task, a data source or data.train."""
    from selfdistill.data.records import load_records
    from selfdistill.tasks import Metric, get_task, list_tasks, make_task
    from selfdistill.tasks.loaders import load_dataset_records

    if name in {spec.name for spec in list_tasks()}:
        spec = get_task(name)
        splits = make_task(name, seed).splits()
        split = split or "train"  # SDFT trains on the train split: diagnose what it will see
        if split not in splits:
            raise UserError(f"Task {name!r} has no split {split!r}; it has {', '.join(splits)}.")
        metrics = tuple(Metric(g, g) for g in graders) or spec.metrics
        return splits[split], metrics, spec.teacher_template, f"{name} ({split})"
    if name is not None:
        records = load_dataset_records(name, format=format, split=split or "train")
        label = name
    elif cfg.data.train:
        # Exactly how `sdft train` reads its data.
        records = load_records(cfg.data.train, cfg.data.columns, cfg.data.split)
        label = cfg.data.train
    else:
        raise UserError("No task: give a built-in task (e.g. tooluse), a data file, or --config with data.train set.")
    if not records:
        raise UserError(f"{label}: no records.")
    if graders:
        metrics = tuple(Metric(g, g) for g in graders)
    elif any(r.answer is not None for r in records):
        from selfdistill.eval.tasks import guess_grader

        grader = guess_grader(records)
        metrics = (Metric(grader, grader),)
    else:
        metrics = ()  # nothing to grade against: the ceiling shows the demonstration log-likelihood only
    return records, metrics, None, label


def _template(option: str | None, config_file: Path | None, task_template: str | None) -> tuple[str, str]:
    """(template, where it came from): --template (or --set data.teacher_template), then the config file's,
    then the task's own, then the default. A config file's template wins over the task's own because
    the config is what the user will train with."""
    from selfdistill.config import DataConfig, read_yaml

    if option is not None:
        if option == "task":
            if task_template is None:
                raise UserError(
                    "--template task: only built-in tasks have their own template; use paper, plain or your own."
                )
            return task_template, "the task's own (--template task)"
        return option, "option"
    if config_file is not None:
        data = read_yaml(config_file)
        if isinstance(data, dict) and isinstance(data.get("data"), dict) and "teacher_template" in data["data"]:
            return data["data"]["teacher_template"], f"{config_file}"
    if task_template is not None:
        return task_template, "the task's own"
    return DataConfig().teacher_template, "the default"


def diagnose_command(
    task_arg: Optional[str] = typer.Argument(
        None,
        metavar="[TASK]",
        help="A built-in task (tooluse, knowledge, science) "
        "or a data file / dataset directory / hf:NAME (as `sdft data ceiling`).",
    ),
    task: Optional[str] = typer.Option(None, "--task", help="The same as TASK, as an option."),
    model: Optional[str] = typer.Option(
        None,
        "--model",
        help="Model: alias, hub id, directory or .gguf file (default: the config's, else smollm2-135m).",
    ),
    template: Optional[str] = typer.Option(
        None,
        "--template",
        help="Teacher template: paper, plain, task (the built-in "
        "task's own) or your own with {question} and {demonstration} (default: the "
        "config's, else the task's own, else paper).",
    ),
    config: Optional[Path] = typer.Option(
        None,
        "--config",
        help="A `sdft train` YAML config: take the model, data, "
        "template, rollout and loss settings from it (options below override it).",
    ),
    set_: list[str] = typer.Option(
        [], "--set", "-s", help="Override any config setting: section.key=value (repeatable)."
    ),
    split: Optional[str] = typer.Option(None, "--split", help="Split to diagnose (default: train)."),
    format: str = typer.Option(
        "auto",
        "--format",
        help="Row format of a data file: auto, records, paper-tooluse, paper-science, huatuo, messages.",
    ),
    grader: list[str] = typer.Option(
        [], "--grader", help="Grader(s) for the ceiling (default: the task's; for a file, guessed from its fields)."
    ),
    limit: int = typer.Option(8, "--limit", help="Records to diagnose (the first N of the split)."),
    rollouts_per_record: Optional[int] = typer.Option(
        None, "--rollouts-per-record", help="Completions sampled per record (default: rollout.num_rollouts, 1)."
    ),
    temperature: Optional[float] = typer.Option(
        None, "--temperature", help="Sampling temperature (default: rollout.temperature, 1.0)."
    ),
    max_new_tokens: Optional[int] = typer.Option(
        None,
        "--max-new-tokens",
        help=f"Longest completion (default: the config's rollout.max_new_tokens, else {DEFAULT_MAX_NEW_TOKENS}).",
    ),
    divergence: Optional[str] = typer.Option(
        None,
        "--divergence",
        help="forward_kl, reverse_kl, jsd or sampled_kl "
        "(shown as the reverse KL it estimates) (default: loss.kind, forward_kl).",
    ),
    beta: Optional[float] = typer.Option(None, "--beta", help="JSD teacher weight (default: loss.beta, 0.5)."),
    top_k: Optional[int] = typer.Option(
        None, "--top-k", help="Divergence over the teacher's top-k tokens only (default: loss.top_k, full vocabulary)."
    ),
    skip_first_tokens: Optional[int] = typer.Option(
        None,
        "--skip-first-tokens",
        help="First completion tokens training leaves out of the loss (default: loss.skip_first_tokens, 3).",
    ),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="auto (fp32 on CPUs, bf16 on GPUs), fp32 or bf16 (default: model.precision, auto)."
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed (default: train.seed, 42)."),
    task_seed: int = typer.Option(0, "--task-seed", help="Generator seed of a built-in task."),
    ceiling: bool = typer.Option(True, "--ceiling/--no-ceiling", help="Also measure the teacher ceiling (greedy)."),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help="Prompts generated together (default: rollout.batch_size)."
    ),
    out: Path = typer.Option(Path("runs/diagnose"), "--out", help="Directory for diagnose.json and diagnose.html."),
) -> None:
    """Per-token teacher vs student numbers on the student's own samples, the teacher ceiling, and advice."""
    from selfdistill.config import load_config, merge, parse_overrides

    _check_options(
        limit, rollouts_per_record, temperature, max_new_tokens, divergence, top_k, precision, beta, skip_first_tokens
    )
    if task_arg and task and task_arg != task:
        raise UserError(f"Two tasks given: {task_arg!r} and --task {task!r}; give one.")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory.")
    name = task_arg or task
    base = load_config(config, set_)  # the user's training settings (or the defaults), validated
    records, metrics, task_template, label = _records(name, base, split, format, grader, task_seed)
    set_template = parse_overrides(set_).get("data", {}).get("teacher_template")
    chosen_template, template_source = _template(
        template if template is not None else set_template, config, task_template
    )
    overrides = {"data": {"teacher_template": chosen_template}}
    for key, value in (
        ("model.name", model),
        ("rollout.num_rollouts", rollouts_per_record),
        ("rollout.temperature", temperature),
        ("rollout.max_new_tokens", max_new_tokens),
        ("rollout.batch_size", batch_size),
        ("loss.kind", divergence),
        ("loss.beta", beta),
        ("loss.top_k", top_k),
        ("loss.skip_first_tokens", skip_first_tokens),
        ("model.precision", precision),
        ("train.seed", seed),
    ):
        if value is not None:
            section, field = key.split(".")
            overrides.setdefault(section, {})[field] = value
    if max_new_tokens is None and config is None and not any(s.startswith("rollout.max_new_tokens=") for s in set_):
        overrides.setdefault("rollout", {})["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
    cfg = load_config(config, merge(parse_overrides(set_), overrides))  # file, then --set, then the options
    records = records[:limit]
    run(cfg, records, metrics, label=label, template_source=template_source, ceiling=ceiling, out=out)


def run(cfg, records, metrics, *, label: str, template_source: str, ceiling: bool, out: Path) -> dict:
    """Load the model, measure, write the outputs and print the summary; returns diagnose.json's content."""
    from selfdistill.data.prompts import TEACHER_TEMPLATES
    from selfdistill.diagnose import core, report
    from selfdistill.diagnose import summary as summary_module
    from selfdistill.models import load_model, stop_token_id
    from selfdistill.tasks import ceiling as ceiling_module

    model, tokenizer = load_model(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    stop = stop_token_id(model, tokenizer)
    template = cfg.data.teacher_template
    ceiling_rows, greedy = None, {}
    if ceiling:
        results = ceiling_module.measure(
            model,
            tokenizer,
            records,
            metrics,
            templates=(template,),
            max_new_tokens=cfg.rollout.max_new_tokens,
            precision=cfg.model.precision,
            batch_size=cfg.rollout.batch_size,
            stop_token_ids=[stop],
            loglik=True,
            system_prompt=cfg.data.system_prompt,
        )
        ceiling_rows = summary_module.ceiling_rows(results)
        greedy = {i: {r.prompt: r.outputs[i] for r in results} for i in range(len(records))}
    traces = core.trace(model, tokenizer, records, cfg, stop)
    summary = summary_module.summarize(traces, cfg.loss.skip_first_tokens)
    advice = summary_module.advice(summary, ceiling_rows, cfg.rollout.temperature)
    divergence = cfg.loss.kind + (
        "" if cfg.loss.top_k is None else f", top-{cfg.loss.top_k}" + (" + tail" if cfg.loss.add_tail else "")
    )
    if cfg.loss.kind == "jsd":
        divergence += f", beta {cfg.loss.beta}"
    if cfg.loss.kind == "sampled_kl":
        divergence += " (shown as the reverse KL it estimates)"
    settings = {
        "model": cfg.model.name,
        "task": label,
        "records": len(records),
        "template": template if template in TEACHER_TEMPLATES else f"custom: {template!r}",
        "template_source": template_source,
        "system_prompt": cfg.data.system_prompt,
        "num_rollouts": cfg.rollout.num_rollouts,
        "temperature": cfg.rollout.temperature,
        "top_p": cfg.rollout.top_p,
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "divergence": divergence,
        "loss_kind": cfg.loss.kind,
        "beta": cfg.loss.beta,
        "top_k": cfg.loss.top_k,
        "add_tail": cfg.loss.add_tail,
        "skip_first_tokens": cfg.loss.skip_first_tokens,
        "precision": cfg.model.precision,
        "seed": cfg.train.seed,
        "metrics": [m.name for m in metrics],
    }
    data = report.to_json(settings, summary, ceiling_rows, advice, traces, greedy)
    json_path, html_path = report.write(out, data, traces)
    _print(data, json_path, html_path)
    return data


def _print(data: dict, json_path: Path, html_path: Path) -> None:
    from selfdistill.diagnose.report import ceiling_table_rows, summary_lines

    s = data["settings"]
    # A custom template's text is long; it is in diagnose.json.
    template = "custom" if s["template"].startswith("custom:") else s["template"]
    typer.echo(
        f"{s['task']}: {s['records']} records x {s['num_rollouts']} rollouts, {s['model']}, template {template} "
        f"({s['template_source']}), temperature {s['temperature']:g}, max_new_tokens {s['max_new_tokens']}, "
        f"{s['divergence']}, {s['precision']}, seed {s['seed']}"
    )
    if data["ceiling"]:
        header, rows = ceiling_table_rows(data["ceiling"])
        typer.echo("teacher ceiling (greedy):")
        typer.echo("  " + " | ".join(header))
        for row in rows:
            typer.echo("  " + " | ".join(row))
    typer.echo("along the student's own samples:")
    for key, value in summary_lines(data["summary"]):
        typer.echo(f"  {key}: {value}")
    if data["advice"]:
        typer.echo("advice:")
        for item in data["advice"]:
            typer.echo(f"  - {item}")
    typer.echo(f"data: {json_path}")
    typer.echo(f"HTML: {html_path}")


def register(app: typer.Typer) -> None:
    app.command("diagnose")(diagnose_command)
