"""The model card (`README.md`) written into a trained model's `final/` directory.

It says what the checkpoint is (method, starting model, data), the settings it was trained
with, its final training metrics and how to load it, with the front matter the Hugging Face Hub
reads, so the directory can be pushed or shared as it is.
"""

from __future__ import annotations

from pathlib import Path

from selfdistill.files import write_atomic
from selfdistill.registry import METHODS

# The settings shown in the card's table (the full configuration is in the run's run.json).
_SETTINGS = (
    ("train.lr", "learning rate"),
    ("train.batch_size", "prompts per optimizer step"),
    ("train.epochs", "epochs"),
    ("train.max_steps", "max steps"),
    ("train.seed", "seed"),
    ("model.precision", "precision"),
    ("model.lora.enabled", "LoRA"),
    ("model.lora.rank", "LoRA rank"),
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
    ("replay.ratio", "replay share of each step"),
    ("replay.data", "replay data"),
    ("anchor.beta", "KL anchor weight"),
)
# Settings that only one method reads: shown for that method alone.
_METHOD_SETTINGS = {"replay": "sft_replay", "anchor": "sft_kl"}
_ON_POLICY = {"sdft", "sft_reinvoke"}  # methods whose rollout / loss / teacher settings matter
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


def render_model_card(cfg, metrics: list[dict] | dict | None = None, records: int | None = None) -> str:
    """The card's Markdown: front matter, summary, settings table, final metrics, loading snippet."""
    config = cfg.to_dict()
    method = config["method"]
    base = config["model"]["name"]
    last = metrics[-1] if isinstance(metrics, list) and metrics else (metrics if isinstance(metrics, dict) else {})
    data = config["data"].get("train") or "records passed in memory"
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", f"tags: [selfdistill, {method}]"]
    if "/" in base and not Path(base).exists():  # a Hub id, not a local path or the embedded alias
        front.append(f"base_model: {base}")
    lines = front + [
        "---",
        "",
        f"# {base}, trained with {method} (selfdistill)",
        "",
        f"**Method**: `{method}` — {METHODS.get(method, '')}",
        "",
        f"**Starting model**: `{base}`",
        "",
        f"**Data**: `{data}`" + (f" ({records} records)" if records is not None else ""),
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    for key, label in _SETTINGS:
        section = key.split(".")[0]
        if section in ("rollout", "loss", "teacher") and method not in _ON_POLICY:
            continue
        if section in _METHOD_SETTINGS and method != _METHOD_SETTINGS[section]:
            continue
        if key == "loss.sft_weight" and method != "sdft":
            continue
        if key == "replay.data" and method == "sft_replay" and _get(config, key) is None:
            lines.append(f"| {label} (`{key}`) | the starting model's answers to the built-in general prompts |")
            continue
        if key.startswith("model.lora.rank") and not config["model"]["lora"]["enabled"]:
            continue
        lines.append(f"| {label} (`{key}`) | {_fmt(_get(config, key))} |")
    lines += ["", "## Final training metrics", ""]
    if last:
        lines += [f"After optimizer step {last.get('step', '?')}:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {_fmt(last[name])} |" for name in _METRICS if name in last]
    else:
        lines.append("No training steps were logged.")
    lines += [
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
    final_dir: str | Path, cfg, metrics: list[dict] | dict | None = None, records: int | None = None
) -> Path:
    """Write `README.md` into `final_dir` (atomically) and return its path."""
    return write_atomic(Path(final_dir) / "README.md", render_model_card(cfg, metrics, records))
