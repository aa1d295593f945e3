"""The teacher-ceiling diagnostic on a tiny model, and its scoring rules."""

import json
import math

import pytest
import torch

from selfdistill.data.records import Record
from selfdistill.errors import UserError
from selfdistill.eval.ceiling import demonstration_loglik, measure, score, table
from selfdistill.models.tiny import tiny_model, tiny_tokenizer, words_of
from selfdistill.tasks import Metric


def exact(output, record):
    return float(output.strip() == str(record["answer"]))


def test_score_uses_answer_field_and_best_alternative():
    record = Record(
        prompt="Who?", demonstration="Ada Byron.", answer="Ada Byron", meta={"answers": ["Ada Byron", "Byron"]}
    )
    contains = lambda out, rec: float(rec["answer"] in out)  # noqa: E731
    assert score("It was Byron.", record, Metric("strict", "contains"), contains) == 0.0
    assert score("It was Byron.", record, Metric("lenient", "contains", "answers"), contains) == 1.0
    assert score("Nobody.", record, Metric("lenient", "contains", "answers"), contains) == 0.0


def make_tiny(records):
    text = " ".join(r.prompt + " " + r.demonstration for r in records)
    tok = tiny_tokenizer(sorted(set(words_of(text))))
    return tiny_model(tok, seed=1), tok


def test_measure_reports_student_and_each_template():
    records = [Record(prompt=f"what is {w} ?", demonstration=w, answer=w) for w in ["red", "blue", "green"]]
    model, tok = make_tiny(records)
    results = measure(
        model,
        tok,
        records,
        (Metric("accuracy", "exact"),),
        templates=("paper", "plain"),
        max_new_tokens=4,
        precision="fp32",
        grader_lookup={"exact": exact}.get,
    )
    assert [r.prompt for r in results] == ["student", "teacher:paper", "teacher:plain"]
    for r in results:
        assert len(r.outputs) == 3 and 0.0 <= r.scores["accuracy"] <= 1.0
        assert r.loglik < 0 and r.first_token_loglik < 0
    rows = table(results).splitlines()
    assert len(rows) == 5 and rows[2].startswith("| student |") and "+0.000" in rows[2]


def test_demonstration_loglik_matches_a_direct_computation():
    records = [Record(prompt="what is red ?", demonstration="red", answer="red")]
    model, tok = make_tiny(records)
    prompt, demo = [4, 7, 8, 9], [10, 2]
    mean, first = demonstration_loglik(model, [prompt], [demo], "fp32")
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([prompt + demo])).logits[0].log_softmax(-1)
    expected = [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(demo)]
    assert mean == pytest.approx(sum(expected) / 2, abs=1e-5)
    assert first == pytest.approx(expected[0], abs=1e-5)
    assert math.isfinite(mean)


def test_custom_templates_are_named_by_position():
    records = [Record(prompt="what is red ?", demonstration="red", answer="red")]
    model, tok = make_tiny(records)
    results = measure(
        model,
        tok,
        records,
        (Metric("accuracy", "exact"),),
        templates=("plain", "{question} is {demonstration}"),
        max_new_tokens=2,
        precision="fp32",
        loglik=False,
        grader_lookup={"exact": exact}.get,
    )
    assert [r.prompt for r in results] == ["student", "teacher:plain", "teacher:custom2"]
    assert results[2].loglik is None and "| teacher:custom2 |" in table(results)


def _ceiling_cli(*args):
    from typer.testing import CliRunner

    from selfdistill.cli import app

    return CliRunner().invoke(app, ["data", "ceiling", *args, "--max-new-tokens", "2", "--precision", "fp32"])


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_ceiling_on_a_file_guesses_the_grader_as_eval_does(tmp_path):
    from selfdistill.models.tiny import save_tiny

    rows = [{"prompt": f"what is {w} ?", "demonstration": w, "answer": w} for w in ["red", "blue"]]
    data = _write(tmp_path / "colors.jsonl", rows)
    model_dir = save_tiny(tmp_path / "model", ["what", "is", "red", "blue", "?"])
    result = _ceiling_cli(str(data), "--model", str(model_dir), "--template", "plain")
    assert result.exit_code == 0, result.output
    head = next(line for line in result.output.splitlines() if line.startswith("| prompt |"))
    assert head.startswith("| prompt | contains |")  # `sdft eval` guesses `contains` for plain answers
    assert "| student |" in result.output and "| teacher:plain |" in result.output
    # Without answers there is nothing to grade: the log-likelihood gain is measured alone.
    bare = _write(tmp_path / "bare.jsonl", [{k: v for k, v in r.items() if k != "answer"} for r in rows])
    result = _ceiling_cli(str(bare), "--model", str(model_dir), "--template", "plain")
    assert result.exit_code == 0, result.output
    assert "| prompt | demo loglik (nats/token) |" in result.output


def test_ceiling_checks_the_guessed_graders_field_before_loading_the_model(tmp_path):
    rows = [
        {"prompt": "what is red ?", "demonstration": "red", "answer": "red"},
        {"prompt": "what is blue ?", "demonstration": "blue"},
    ]
    data = _write(tmp_path / "colors.jsonl", rows)
    result = _ceiling_cli(str(data), "--model", str(tmp_path / "no-such-model"))
    assert isinstance(result.exception, UserError), result.output
    assert str(result.exception).startswith(f"{data} line 2: no 'answer' field")
    assert "grader 'contains' (guessed from the file, as no --grader was given)" in str(result.exception)


def test_ceiling_guesses_toolalpaca_from_golden_answer_and_needs_something_to_measure():
    from selfdistill.eval.ceiling import _file_metrics
    from selfdistill.tasks.settings import CeilingSettings

    calls = [{"Action": "getWeather", "Action_Input": "{}"}]
    tool_records = [Record(prompt="q", demonstration="d", meta={"golden_answer": calls}, source="t.jsonl line 1")]
    metrics = _file_metrics("t.jsonl", tool_records, CeilingSettings(task="t.jsonl"))
    assert [m.grader for m in metrics] == ["toolalpaca"]
    bare = [Record(prompt="q", demonstration="d", source="b.jsonl line 1")]
    assert _file_metrics("b.jsonl", bare, CeilingSettings(task="b.jsonl")) == ()
    with pytest.raises(UserError, match="nothing to measure"):
        _file_metrics("b.jsonl", bare, CeilingSettings(task="b.jsonl", loglik=False))
