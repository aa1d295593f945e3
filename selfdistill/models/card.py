"""The model card (`README.md`) written into a trained model's `final/` directory.

It says what the checkpoint is (method, starting model, data, the teacher where there is one), the
settings its method reads (read from the method's registry entry, so a setting the method ignores is
not shown), its final training metrics and how to load it, with the front matter the Hugging Face
Hub reads, so the directory can be pushed or shared as it is.
"""

from __future__ import annotations

from pathlib import Path

from selfdistill.config import settings_of
from selfdistill.files import write_atomic
from selfdistill.models.loading import EMBEDDED_MODELS, portable_model_name
from selfdistill.registry import METHOD_INFO, MethodInfo

# How the card's table names a shared setting (a method's own settings carry their label, `setting(label=)`).
# Which settings it shows is read from the method's registry entry (`_read_settings`): the ones every
# method reads, the ones its declared step reads, and its own.
_LABELS = {
    "train.lr": "learning rate",
    "train.batch_size": "prompts per optimizer step",
    "train.epochs": "epochs",
    "train.max_steps": "max steps",
    "train.seed": "seed",
    "model.precision": "precision",
    "model.lora.enabled": "LoRA",
    "model.lora.rank": "LoRA rank",
    "data.documents": "documents",
    "rollout.temperature": "rollout temperature",
    "rollout.max_new_tokens": "max completion tokens",
    "rollout.num_rollouts": "rollouts per prompt",
    "loss.kind": "divergence",
    "loss.top_k": "top-k",
    "loss.skip_first_tokens": "completion tokens skipped",
    "teacher.kind": "teacher",
    "teacher.ema_rate": "EMA rate",
    "data.teacher_template": "teacher template",
    "loss.sft_weight": "SFT term weight",
}
_EVERY_METHOD = ("train.lr", "train.batch_size", "train.epochs", "train.max_steps", "train.seed", "model.precision")
# What an unset (null) setting means, where "—" would not say.
_WHEN_UNSET = {
    "replay.data": "the starting model's answers to the built-in general prompts",
    "reinvoke.prompts": "the built-in general prompts",
    "data.documents": "the records' `context` fields",
}
# What a fixed teacher is, in words (Step.teacher), and what it is shown (Step.teacher_sees).
_FIXED_TEACHER = {"frozen": "the starting model, frozen (never updated)"}
_TEACHER_SEES = {
    "demonstration": "the prompt with the demonstration (`data.teacher_template`)",
    "prompt": "the student's prompt, without the demonstration",
}
_METRICS = (
    "loss",
    "divergence",
    "sft_loss",
    "anchor_kl",
    "replay_logp",
    "teacher_minus_student_logp",
    "demonstration_logp",
    "completion_length",
    "grad_norm",
)


def _get(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data.get(part, {}) if isinstance(data, dict) else {}
    return None if data == {} else data


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def _read_settings(cfg, info: MethodInfo) -> list[str]:
    """The settings a run of the method `info` with `cfg` reads, as the registry declares them, in table order."""
    keys = list(_EVERY_METHOD) + ["model.lora.enabled"] + (["model.lora.rank"] if cfg.model.lora.enabled else [])
    step = info.step
    if step is not None:
        if step.trains_on in ("rollouts", "teacher answers"):  # the student's samples, or the teacher's answers
            keys += ["rollout.temperature", "rollout.max_new_tokens"]
        if step.trains_on == "rollouts":
            keys.append("rollout.num_rollouts")
        runs = step.teacher_runs(cfg)
        if step.matches_teacher and runs:
            keys += ["loss.kind", "loss.top_k"] + (["loss.skip_first_tokens"] if step.skips_first_tokens else [])
        if step.teacher == "configured":
            keys += ["teacher.kind"] + (["teacher.ema_rate"] if cfg.teacher.kind == "ema" else [])
        if step.teacher_sees == "demonstration" and (runs or step.trains_on == "teacher answers"):
            keys.append("data.teacher_template")
    for own in info.settings:  # keys of shared sections only this method reads
        keys += [key for key in _LABELS if key == own or key.startswith(own + ".")]
    keys += [key for key in _labels_of(cfg) if key.split(".")[0] in info.own_sections]  # its own sections
    return list(dict.fromkeys(keys))


def _labels_of(cfg) -> dict[str, str]:
    """key -> label of every setting of `cfg`: _LABELS, or the label its field declares, or the key itself."""
    return {key: _LABELS.get(key) or f.metadata.get("label") or key for _, f, _, key in settings_of(cfg)}


def _teacher_line(cfg, info: MethodInfo) -> list[str]:
    """The teacher, stated from the method's declaration: what it is and what it is shown."""
    step = info.step
    if step is None or step.teacher is None:
        return []
    if step.fixed_teacher:
        what = _FIXED_TEACHER.get(step.fixed_teacher, step.fixed_teacher)
    else:
        what = f"the same network, weights as `teacher.kind` {cfg.teacher.kind} says"
    line = f"**Teacher**: {what}; shown {_TEACHER_SEES[step.teacher_sees]}"
    if not step.teacher_runs(cfg):
        line += f"; not run in this configuration (`{step.teacher_runs_if}`)"
    return [line + ".", ""]


def _settings_rows(cfg, info: MethodInfo, precision: str | None) -> list[str]:
    """The settings table: `precision` (what the run computed in) replaces model.precision's 'auto'."""
    config = cfg.to_dict()
    used = {"model.precision": precision} if precision else {}
    rows = ["| setting | value |", "|---|---|"]
    labels = _labels_of(cfg)
    for key in _read_settings(cfg, info):
        value = used.get(key, _get(config, key))
        text = _WHEN_UNSET[key] if value is None and key in _WHEN_UNSET else _fmt(value)
        rows.append(f"| {labels[key]} (`{key}`) | {text} |")
    return rows


def _metrics_rows(metrics: list[dict] | dict | None) -> list[str]:
    last = metrics[-1] if isinstance(metrics, list) and metrics else (metrics if isinstance(metrics, dict) else {})
    if not last:
        return ["No training steps were logged."]
    rows = [f"After optimizer step {last.get('step', '?')}:", "", "| metric | value |", "|---|---|"]
    return rows + [f"| {name} | {_fmt(last[name])} |" for name in _METRICS if name in last]


def _provenance(base: str) -> str:
    if base not in EMBEDDED_MODELS:
        return ""
    package, filename, _ = EMBEDDED_MODELS[base]
    return (
        f" (selfdistill's embedded model: `{portable_model_name(base)}` as the Q4_1 GGUF file {filename} shipped in"
        f" the `{package}` package, dequantized to float; its weights differ from the Hub's by that rounding)"
    )


def loading_section(path: str) -> list[str]:
    """A card's "Loading" section: the two transformers lines that load the directory at `path`."""
    return [
        "## Loading",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{path}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{path}")',
        "```",
    ]


def render_model_card(
    cfg, metrics: list[dict] | dict | None = None, records: int | None = None, precision: str | None = None
) -> str:
    """The card's Markdown: front matter, summary, settings table, final metrics, loading snippet.

    `precision`: the precision the run computed in ('fp32' or 'bf16'); unset, the config's value is shown.
    """
    config = cfg.to_dict()
    method = config["method"]
    info = METHOD_INFO[method]
    base = config["model"]["name"]
    data = config["data"].get("train") or "records passed in memory"
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", f"tags: [selfdistill, {method}]"]
    original = portable_model_name(base)
    if "/" in original and not Path(original).exists():  # a Hub id, not a local path
        front.append(f"base_model: {original}")
    lines = front + [
        "---",
        "",
        f"# {base}, trained with {method} (selfdistill)",
        "",
        f"**Method**: `{method}` — {info.card}",
        "",
        f"**Starting model**: `{base}`" + _provenance(base),
        "",
        f"**Data**: `{data}`" + (f" ({records} records)" if records is not None else ""),
        "",
        *_teacher_line(cfg, info),
        "## Settings",
        "",
        *_settings_rows(cfg, info, precision),
        "",
        "## Final training metrics",
        "",
        *_metrics_rows(metrics),
        "",
        *loading_section("PATH/TO/final"),
        "",
    ]
    if config["model"]["lora"]["enabled"]:
        lines += ["The weights are merged; the LoRA adapter alone is in `adapter/`.", ""]
    return "\n".join(lines)


def write_model_card(
    final_dir: str | Path,
    cfg,
    metrics: list[dict] | dict | None = None,
    records: int | None = None,
    precision: str | None = None,
) -> Path:
    """Write `README.md` into `final_dir` (atomically) and return its path."""
    return write_atomic(Path(final_dir) / "README.md", render_model_card(cfg, metrics, records, precision))
