"""`sdft data`: list, show, make (reproducible files) and ceiling's input errors."""

import json

from typer.testing import CliRunner

from selfdistill.cli import app

runner = CliRunner()


def test_list_and_show():
    result = runner.invoke(app, ["data", "list"])
    assert result.exit_code == 0
    for name, grader in [("tooluse", "toolalpaca"), ("knowledge", "contains"), ("science", "choice_tag")]:
        assert name in result.output and grader in result.output
    result = runner.invoke(app, ["data", "show", "knowledge", "--size", "12", "--count", "1"])
    assert result.exit_code == 0
    assert "== train: 12 records" in result.output and "== ood: 10 records" in result.output
    assert "== documents:" in result.output


def test_make_writes_identical_files_for_a_seed(tmp_path):
    for out, seed in [("a", "1"), ("b", "1"), ("c", "2")]:
        result = runner.invoke(
            app, ["data", "make", "knowledge", "--seed", seed, "--size", "30", "--out", str(tmp_path / out)]
        )
        assert result.exit_code == 0, result.output
    files = ["train.jsonl", "eval.jsonl", "ood.jsonl", "documents.jsonl"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    rows = [json.loads(line) for line in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and {"prompt", "demonstration", "context", "answer", "answers"} <= set(rows[0])
    # the written files load back as records
    from selfdistill.data.records import load_records

    assert len(load_records(tmp_path / "a" / "eval.jsonl")) == 10


def test_make_and_ceiling_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["data", "make", "science", "--out", str(tmp_path / "file")])
    assert result.exit_code != 0 and "not a directory" in str(result.exception)
    result = runner.invoke(app, ["data", "show", "nope"])
    assert "Unknown task 'nope'" in str(result.exception)
    result = runner.invoke(app, ["data", "ceiling", str(tmp_path / "file")])  # read (its grader guessed), not refused
    assert f"{tmp_path / 'file'} line 1, column 1: malformed JSON" in str(result.exception)
