"""What `sdft diagnose` and `selfdistill.diagnose` run: the records, template and config from the settings,
then the ceiling and the per-token trace, written as diagnose.json and diagnose.html."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from selfdistill.diagnosis.settings import DiagnoseSettings
from selfdistill.errors import UserError


class Diagnosis(NamedTuple):
    data: dict  # diagnose.json's content
    json_path: Path
    html_path: Path


def diagnose(settings: DiagnoseSettings) -> Diagnosis:
    """Read the task, choose the template, build the config, measure and write the outputs."""
    base = settings.training_config()  # the user's training settings, for the data it names
    records, metrics, task_template, label = task_records(
        settings.task, base, settings.split, settings.format, list(settings.grader), settings.task_seed
    )
    option = settings.template if settings.template is not None else settings.set_template()
    template, template_source = choose_template(option, settings.config, task_template)
    cfg = settings.training_config(template)  # file, then --set, then the options
    return run(
        cfg,
        records[: settings.limit],
        metrics,
        label=label,
        template_source=template_source,
        ceiling=settings.ceiling,
        out=Path(settings.out),
    )


def task_records(name: str | None, cfg, split: str | None, format: str, graders: list[str], seed: int):
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
        records = load_records(cfg.data.train, cfg.data.columns, cfg.data.split, origin="data.train")
        label = cfg.data.train
    else:
        raise UserError("No task: give a built-in task (e.g. tooluse), a data file, or --config with data.train set.")
    if not records:
        raise UserError(f"{label}: no records.")
    if graders:
        metrics = tuple(Metric(g, g) for g in graders)
    elif any(r.answer is not None for r in records):
        from selfdistill.tasks.resolve import guess_grader

        grader = guess_grader(records)
        metrics = (Metric(grader, grader),)
    else:
        metrics = ()  # nothing to grade against: the ceiling shows the demonstration log-likelihood only
    return records, metrics, None, label


def choose_template(option: str | None, config_file: Path | None, task_template: str | None) -> tuple[str, str]:
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


def run(cfg, records, metrics, *, label: str, template_source: str, ceiling: bool, out: Path) -> Diagnosis:
    """Load the model, measure, write diagnose.json and diagnose.html."""
    from selfdistill.diagnosis import core, report
    from selfdistill.diagnosis import summary as summary_module
    from selfdistill.models import load_model, stop_token_ids

    model, tokenizer = load_model(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    stop = stop_token_ids(model, tokenizer)
    ceiling_rows, greedy = _ceiling(model, tokenizer, records, metrics, cfg, stop) if ceiling else (None, {})
    traces = core.trace(model, tokenizer, records, cfg, stop)
    summary = summary_module.summarize(traces, cfg.loss.skip_first_tokens)
    advice = summary_module.advice(summary, ceiling_rows, cfg.rollout.temperature)
    settings = _settings_row(cfg, label, len(records), template_source, metrics)
    data = report.to_json(settings, summary, ceiling_rows, advice, traces, greedy)
    json_path, html_path = report.write(out, data, traces)
    return Diagnosis(data, json_path, html_path)


def _ceiling(model, tokenizer, records, metrics, cfg, stop: list[int]) -> tuple[list, dict]:
    """(the ceiling's rows, greedy outputs {record index: {prompt: output}}) with the config's template."""
    from selfdistill.diagnosis import summary as summary_module
    from selfdistill.eval import ceiling as ceiling_module

    results = ceiling_module.measure(
        model,
        tokenizer,
        records,
        metrics,
        templates=(cfg.data.teacher_template,),
        max_new_tokens=cfg.rollout.max_new_tokens,
        precision=cfg.model.precision,
        batch_size=cfg.rollout.batch_size,
        stop_token_ids=stop,
        loglik=True,
        system_prompt=cfg.data.system_prompt,
    )
    greedy = {i: {r.prompt: r.outputs[i] for r in results} for i in range(len(records))}
    return summary_module.ceiling_rows(results), greedy


def _divergence_label(loss) -> str:
    """The divergence as the report names it, e.g. 'jsd, top-20 + tail, beta 0.5'."""
    label = loss.kind + ("" if loss.top_k is None else f", top-{loss.top_k}" + (" + tail" if loss.add_tail else ""))
    if loss.kind == "jsd":
        label += f", beta {loss.beta}"
    if loss.kind == "sampled_kl":
        label += " (shown as the reverse KL it estimates)"
    return label


def _settings_row(cfg, label: str, records: int, template_source: str, metrics) -> dict:
    """The settings diagnose.json records."""
    from selfdistill.data.prompts import TEACHER_TEMPLATES

    template = cfg.data.teacher_template
    return {
        "model": cfg.model.name,
        "task": label,
        "records": records,
        "template": template if template in TEACHER_TEMPLATES else f"custom: {template!r}",
        "template_source": template_source,
        "system_prompt": cfg.data.system_prompt,
        "num_rollouts": cfg.rollout.num_rollouts,
        "temperature": cfg.rollout.temperature,
        "top_p": cfg.rollout.top_p,
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "divergence": _divergence_label(cfg.loss),
        "loss_kind": cfg.loss.kind,
        "beta": cfg.loss.beta,
        "top_k": cfg.loss.top_k,
        "add_tail": cfg.loss.add_tail,
        "skip_first_tokens": cfg.loss.skip_first_tokens,
        "precision": cfg.model.precision,
        "seed": cfg.train.seed,
        "metrics": [m.name for m in metrics],
    }
