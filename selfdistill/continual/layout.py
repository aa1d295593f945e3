"""Where everything of a continual run directory lives: the one place its paths are spelled.

The runner writes these files, `results.py` reads them back into results.json and the report
draws from them, so all three take their paths from here:

    RUN/config.json                      the resolved stream config (what `sdft report` reads)
    RUN/results.json, report.html, report.md, report_files/   written by `sdft report`
    RUN/start/                           stage 0, the starting model, shared by every method and seed
        eval/<task>/{examples.jsonl, summary.json}, probes/..., probes.json, drift.json,
        drift_answers.json (the starting model's answers that drift is measured against), done.json
    RUN/methods/<method>/method.json     the method entry, so a changed entry is not mixed with old results
    RUN/methods/<method>/seed-<s>/stage-<k>/
        train/{metrics.jsonl, run.json, checkpoints/, final/}   train()'s output_dir; final/ is the model
        documents.jsonl                  a knowledge task's raw documents, for continued pre-training
        trained.json                     written once training of the stage finished
        eval/..., probes/..., probes.json, drift.json, done.json (as for start)

Inside a stage directory, eval/<task>/ and probes/ hold what `selfdistill.eval.evaluate` writes
into the directory it is given, and train/ what `selfdistill.training.loop.train` writes into its output_dir.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

CONFIG = "config.json"
RESULTS = "results.json"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
REPORT_FILES = "report_files"
START = "start"
METHODS = "methods"
TRAIN = "train"  # in a stage directory: train()'s output_dir
SUMMARY = "summary.json"  # in eval/<task>/: the task's scores, as selfdistill.eval.evaluate writes them
EXAMPLES = "examples.jsonl"  # beside it: each evaluation item's output and score

# What `--overwrite` deletes before a run starts again (the report's figures are replaced by the next report).
OVERWRITTEN = (START, METHODS, CONFIG, RESULTS, REPORT_HTML, REPORT_MD)


def _at(*parts: str) -> Callable[[Path], Path]:
    """The layout entry `parts` below a directory, as a function of that directory."""
    return lambda directory: directory.joinpath(*parts)


config_file = _at(CONFIG)
start_dir = _at(START)


def method_file(out: Path, method: str) -> Path:
    return out / METHODS / method / "method.json"


def stage_dir(out: Path, method: str, seed: int, stage: int) -> Path:
    """Stage `stage` of one method and seed; stage 0 is the starting model's, shared by all."""
    if stage == 0:
        return start_dir(out)
    return out / METHODS / method / f"seed-{seed}" / f"stage-{stage}"


# --- inside a stage directory ---------------------------------------------------------------------


# Each of these takes the stage directory.
done_file = _at("done.json")  # written last: the stage is trained and evaluated
trained_file = _at("trained.json")  # written once the stage's training finished (its model is in final_model)
train_dir = _at(TRAIN)
final_model = _at(TRAIN, "final")
checkpoints_dir = _at(TRAIN, "checkpoints")
train_metrics = _at(TRAIN, "metrics.jsonl")
documents_file = _at("documents.jsonl")
probes_dir = _at("probes")
probes_file = _at("probes.json")
drift_file = _at("drift.json")


def task_eval_dir(stage: Path, task: str) -> Path:
    return stage / "eval" / task


def task_summary(stage: Path, task: str) -> Path:
    return task_eval_dir(stage, task) / SUMMARY


def task_examples(stage: Path, task: str) -> Path:
    return task_eval_dir(stage, task) / EXAMPLES


def drift_answers_file(out: Path) -> Path:
    """The starting model's answers to the drift prompts, which every stage's drift is measured against."""
    return start_dir(out) / "drift_answers.json"
