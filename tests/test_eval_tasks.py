"""Resolving --task: files, the paper's eval files (grader guessed), and the built-in task hook."""

import json
from pathlib import Path

import pytest

from selfdistill.errors import UserError
from selfdistill.tasks.resolve import resolve_task

PAPER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "paper-eval"


def test_file_without_demonstrations_and_limit(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) for i in range(5)) + "\n")
    records, grader = resolve_task(str(path), limit=2)
    assert [r.answer for r in records] == ["0", "1"] and grader == "contains"
    assert resolve_task(str(path), grader="exact")[1] == "exact"
    with pytest.raises(UserError, match="--limit"):
        resolve_task(str(path), limit=0)


@pytest.mark.skipif(not PAPER.is_dir(), reason="../shared/data/paper-eval is not present")
def test_paper_eval_files_get_the_papers_graders():
    science, grader = resolve_task(str(PAPER / "science_eval.jsonl"))
    assert len(science) == 507 and grader == "choice_tag" and science[0].answer in "ABCD"
    tools, grader = resolve_task(str(PAPER / "tooluse_eval.jsonl"))
    assert len(tools) == 97 and grader == "toolalpaca" and tools[0].meta["golden_answer"]


def test_builtin_task_name_gives_its_eval_split_and_grader():
    from selfdistill.tasks import get_task, make_task

    name = get_task("science").name
    records, grader = resolve_task(name, limit=3)
    assert grader == "choice_tag" and len(records) == 3
    assert [r.prompt for r in records] == [r.prompt for r in make_task(name, 0).eval[:3]]
    with pytest.raises(UserError, match="Unknown task"):
        resolve_task("no_such_task")
