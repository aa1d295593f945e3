"""The model card (`README.md`) written into a trained model's `final/` directory.

It says what the checkpoint is (method, starting model, data), the settings it was trained
with, its final training metrics and how to load it, with the front matter the Hugging Face Hub
reads, so the directory can be pushed or shared as it is.
"""

from __future__ import annotations

from pathlib import Path

from selfdistill.files import write_atomic
from selfdistill.models.loading import EMBEDDED_MODELS, portable_model_name
from selfdistill.registry import METHOD_INFO, MethodInfo

# The settings shown in the card's table (the full configuration is in the run's run.json). A
# setting that the registry names as some methods' own (MethodInfo.settings) is shown for those
# methods only; rollout, loss and teacher settings only for methods that sample from the student.
_SETTINGS = (
    ("train.lr", "learning rate"),
    ("train.batch_size", "prompts per optimizer step"),
    ("train.epochs", "epochs"),
    ("train.max_steps", "max steps"),
    ("train.seed", "seed"),
    ("model.precision", "precision"),
    ("model.lora.enabled", "LoRA"),
    ("model.lora.rank", "LoRA rank"),
    ("data.documents", "documents"),
    ("rollout.temperature", "rollout temperature"),
    ("rollout.max_new_tokens", "max completion tokens"),
    ("rollout.num_rollouts", "rollouts per prompt"),
    ("loss.kind", "divergence"),
    ("loss.top_k", "top-k"),
    ("loss.skip_first_tokens", "completion tokens skipped"),
    ("teacher.kind", "teacher"),
    ("teacher.ema_rate", "EMA rate"),
    ("data.teacher_template", "teacher template"),
    ("loss.sft_weight", "SFT term weight"),
    ("offline.loss", "loss on the teacher's answers"),
    ("reinvoke.steps", "recovery steps"),
    ("replay.ratio", "replay share of each step"),
    ("replay.data", "replay data"),
    ("anchor.beta", "KL anchor weight"),
)
_ON_POLICY_SECTIONS = ("rollout", "loss", "teacher")
# What an unset (null) setting means, where "—" would not say.
_WHEN_UNSET = {
    "replay.data": "the starting model's answers to the built-in general prompts",
    "data.documents": "the records' `context` fields",
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


def _shown(key: str, info: MethodInfo, config: dict) -> bool:
    """Whether the card's table has a row for `key` when training with the method `info`."""
    if key.split(".")[0] in _ON_POLICY_SECTIONS and not info.on_policy and not info.reads(key):
        return False
    if any(other.reads(key) for other in METHOD_INFO.values()) and not info.reads(key):
        return False  # another method's own setting
    return key != "model.lora.rank" or config["model"]["lora"]["enabled"]


def _settings_rows(config: dict, info: MethodInfo, precision: str | None) -> list[str]:
    """The settings table: `precision` (what the run computed in) replaces model.precision's 'auto'."""
    used = {"model.precision": precision} if precision else {}
    rows = ["| setting | value |", "|---|---|"]
    for key, label in _SETTINGS:
        if not _shown(key, info, config):
            continue
        value = used.get(key, _get(config, key))
        text = _WHEN_UNSET[key] if value is None and key in _WHEN_UNSET else _fmt(value)
        rows.append(f"| {label} (`{key}`) | {text} |")
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
        "## Settings",
        "",
        *_settings_rows(config, info, precision),
        "",
        "## Final training metrics",
        "",
        *_metrics_rows(metrics),
        "",
        "## Loading",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("PATH/TO/final")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/final")',
        "```",
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
