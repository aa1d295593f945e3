"""Writes the data of the equal-learning-rate facts comparison (train.jsonl, eval.jsonl beside this file).

    python -m experiments.facts_equal_lr.make_data

Training: the 24 facts of the built-in `knowledge` task (data seed 0, size 24). Evaluation: the
same 24 questions (did the method learn what it was shown?) followed by the task's 10 held-out
paraphrases (does it answer the fact asked another way?), 34 items. The files are committed, so
this only needs rerunning if the generator changes.
"""

from __future__ import annotations

from pathlib import Path

from selfdistill.files import write_jsonl
from selfdistill.tasks import make_task

HERE = Path(__file__).parent


def main() -> None:
    data = make_task("knowledge", 0, 24)
    write_jsonl(HERE / "train.jsonl", [r.to_dict() for r in data.train])
    write_jsonl(HERE / "eval.jsonl", [r.to_dict() for r in data.train + data.eval])


if __name__ == "__main__":
    main()
