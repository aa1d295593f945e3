"""The settings of the `sdft data` commands (show, make, ceiling), with their defaults and checks
(see selfdistill.options)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from selfdistill.options import as_tuples, check_choice, check_output_dir, check_types, setting
from selfdistill.precision import PRECISIONS

TASK_HELP = "A built-in task (`sdft data list`)."
SEED_HELP = "Generator seed: the same seed gives identical records."
SIZE_HELP = "Training records (default: the task's)."


@dataclass(frozen=True, kw_only=True)
class ShowSettings:
    """Which records of a built-in task `sdft data show` prints."""

    task: str = setting(help=TASK_HELP)
    seed: int = setting(0, SEED_HELP)
    size: int | None = setting(None, SIZE_HELP)
    count: int = setting(2, "Records to print from each split.")

    def __post_init__(self) -> None:
        check_types(self)


@dataclass(frozen=True, kw_only=True)
class MakeSettings:
    """Which built-in task `sdft data make` writes as JSONL files, and where."""

    task: str = setting(help=TASK_HELP)
    out: Path = setting(help="Directory for the JSONL files.")
    seed: int = setting(0, SEED_HELP)
    size: int | None = setting(None, SIZE_HELP)

    def __post_init__(self) -> None:
        check_types(self)
        check_output_dir("--out", Path(self.out))


@dataclass(frozen=True, kw_only=True)
class CeilingSettings:
    """What `sdft data ceiling` measures: a model's greedy accuracy without the demonstration (student) and
    with it (teacher, per template), and the demonstration log-likelihood gain."""

    task: str = setting(help="A built-in task, or a data file/directory/hf:NAME.")
    model: str = setting("smollm2-135m", "Model: alias, hub id, directory or .gguf file.")
    template: tuple[str, ...] = setting(
        (),
        "Teacher template(s): paper, plain, task (the task's own) or a custom one; "
        "default: paper, plain and the task's own.",
    )
    split: str = setting("eval", "Split to measure (built-in tasks: eval, ood; files: the split to load).")
    limit: int = setting(40, "Records to measure (the first N of the split).")
    seed: int = setting(0, "Generator seed (built-in tasks).")
    size: int | None = setting(None, "Task size (built-in tasks; default: the task's).")
    format: str = setting(
        "auto", "Row format of a data file: auto, records, paper-tooluse, paper-science, huatuo, messages."
    )
    grader: tuple[str, ...] = setting(
        (),
        "Grader(s) for a data file (e.g. toolalpaca, choice_tag); default: guessed from the records as "
        "`sdft eval` guesses it (none when no record has an answer: log-likelihood only).",
    )
    max_new_tokens: int = setting(96, "Greedy generation budget per answer.")
    # auto, as for every command: bf16 only where the device computes it fast. Greedy teacher outputs
    # of a small model can flip between precisions (SmolLM2-135M's first-token distribution is flat).
    precision: str = setting("auto", "auto (chosen from the device at run time), fp32 or bf16.")
    batch_size: int = setting(8, "Prompts generated together.")
    loglik: bool = setting(True, "Also measure the demonstration log-likelihood gain.")
    outputs: Path | None = setting(None, "Write every prompt's outputs and scores to this JSONL file.")

    def __post_init__(self) -> None:
        check_types(self)
        as_tuples(self, "template", "grader")
        check_choice("--precision", self.precision, PRECISIONS)
