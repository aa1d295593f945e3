"""The settings of `selfdistill.diagnose` and `sdft diagnose`, with their defaults and checks (see selfdistill.options).

Most of them are training settings (rollout, loss, precision, seed) given as options: they override
the training config (`config`, then `overrides`), and the Config built from all three checks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from selfdistill.config import Config, LossKind, choices, load_config, merge, parse_overrides
from selfdistill.options import as_tuples, check_at_least, check_output_dir, check_types, setting

# Diagnose-only default: training's 1024-token completions would make a quick look slow on a CPU,
# and the first tokens are where small models differ most (on SmolLM2-135M the teacher's first-token
# distribution is flat, top token ~8%, so greedy answers flip on small changes).
DEFAULT_MAX_NEW_TOKENS = 128
DIVERGENCES = choices(LossKind)

# Options that override a training setting: field -> the config key.
CONFIG_KEYS = {
    "model": "model.name",
    "rollouts_per_record": "rollout.num_rollouts",
    "temperature": "rollout.temperature",
    "max_new_tokens": "rollout.max_new_tokens",
    "batch_size": "rollout.batch_size",
    "divergence": "loss.kind",
    "beta": "loss.beta",
    "top_k": "loss.top_k",
    "skip_first_tokens": "loss.skip_first_tokens",
    "precision": "model.precision",
    "seed": "train.seed",
}


@dataclass(frozen=True, kw_only=True)
class DiagnoseSettings:
    """What `sdft diagnose` measures and how; an option left at None takes the training config's value."""

    task: str | None = setting(
        None,
        "A built-in task (tooluse, knowledge, science) or a data file / dataset directory / hf:NAME "
        "(as `sdft data ceiling`).",
    )
    config: Path | None = setting(
        None,
        "A `sdft train` YAML config: take the model, data, template, rollout and loss settings from it "
        "(options below override it).",
    )
    overrides: tuple[str, ...] = setting((), "Override any config setting: section.key=value (repeatable).")
    model: str | None = setting(
        None, "Model: alias, hub id, directory or .gguf file (default: the config's, else smollm2-135m)."
    )
    template: str | None = setting(
        None,
        "Teacher template: paper, plain, task (the built-in task's own) or your own with {question} and "
        "{demonstration} (default: the config's, else the task's own, else paper).",
    )
    split: str | None = setting(None, "Split to diagnose (default: train).")
    format: str = setting(
        "auto", "Row format of a data file: auto, records, paper-tooluse, paper-science, huatuo, messages."
    )
    grader: tuple[str, ...] = setting(
        (), "Grader(s) for the ceiling (default: the task's; for a file, guessed from its fields)."
    )
    limit: int = setting(8, "Records to diagnose (the first N of the split).")
    rollouts_per_record: int | None = setting(
        None, "Completions sampled per record (default: rollout.num_rollouts, 1)."
    )
    temperature: float | None = setting(None, "Sampling temperature (default: rollout.temperature, 1.0).")
    max_new_tokens: int | None = setting(
        None,
        f"Longest completion (default: the config's rollout.max_new_tokens, else {DEFAULT_MAX_NEW_TOKENS}).",
    )
    divergence: str | None = setting(
        None,
        f"{', '.join(DIVERGENCES[:-1])} or {DIVERGENCES[-1]} (sampled_kl is shown as the reverse KL it "
        "estimates) (default: loss.kind, forward_kl).",
    )
    beta: float | None = setting(None, "JSD teacher weight (default: loss.beta, 0.5).")
    top_k: int | None = setting(
        None, "Divergence over the teacher's top-k tokens only (default: loss.top_k, full vocabulary)."
    )
    skip_first_tokens: int | None = setting(
        None, "First completion tokens training leaves out of the loss (default: loss.skip_first_tokens, 3)."
    )
    precision: str | None = setting(
        None, "auto (fp32 on CPUs, bf16 on GPUs), fp32 or bf16 (default: model.precision, auto)."
    )
    seed: int | None = setting(None, "Sampling seed (default: train.seed, 42).")
    task_seed: int = setting(0, "Generator seed of a built-in task.")
    ceiling: bool = setting(True, "Also measure the teacher ceiling (greedy).")
    batch_size: int | None = setting(None, "Prompts generated together (default: rollout.batch_size).")
    out: Path = setting(Path("runs/diagnose"), "Directory for diagnose.json and diagnose.html.")

    def __post_init__(self) -> None:
        check_types(self)
        as_tuples(self, "overrides", "grader")
        # Rejected by name before the (slow) model load; the training settings by the Config they build.
        check_at_least("--limit", self.limit, 1)
        check_output_dir("--out", Path(self.out))
        self.training_config()

    def training_config(self, template: str | None = None) -> Config:
        """The training config diagnosed: the config file, then `overrides`, then the options (and `template`)."""
        options: dict = {"data": {"teacher_template": template}} if template is not None else {}
        for name, key in CONFIG_KEYS.items():
            if getattr(self, name) is not None:
                section, field = key.split(".")
                options.setdefault(section, {})[field] = getattr(self, name)
        given = self.config is not None or any(s.startswith("rollout.max_new_tokens=") for s in self.overrides)
        if self.max_new_tokens is None and not given:
            options.setdefault("rollout", {})["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        return load_config(self.config, merge(parse_overrides(list(self.overrides)), options))

    def set_template(self) -> str | None:
        """The teacher template given with `overrides` (data.teacher_template=...), if any."""
        return parse_overrides(list(self.overrides)).get("data", {}).get("teacher_template")
