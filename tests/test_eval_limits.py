"""What `sdft eval` checks before it generates (prompts against the model's context, the field the grader
reads), that --limit limits every suite, and that probe and lm-eval results are written, not printed."""

import json
import logging
import re
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from selfdistill.cli import app
from selfdistill.data.prompts import PromptBuilder
from selfdistill.data.records import Record
from selfdistill.errors import UserError
from selfdistill.eval import run as run_mod
from selfdistill.eval.evaluate import answer_budgets, context_length, evaluate
from selfdistill.eval.settings import EvalSettings
from selfdistill.models.tiny import save_tiny, tiny_model, tiny_tokenizer
from selfdistill.sampling import decode as decode_mod  # the loop evaluation's default engine runs

CONTEXT = 40


@pytest.fixture
def short_context():
    """A tiny model whose config allows CONTEXT positions (a real model's 8,192, scaled down)."""
    tok = tiny_tokenizer(["a", "b", "?"])
    model = tiny_model(tok)
    model.config.max_position_embeddings = CONTEXT
    return model, tok


def _tokens(tok, text: str) -> int:
    return len(PromptBuilder(tok).student_ids(Record(prompt=text, demonstration="")))


def _prompt_tokens(tok, words: int) -> int:
    return _tokens(tok, "a " * words)


def _words_for(tok, tokens: int) -> int:
    """How many words make a prompt of exactly `tokens` tokens under the chat template."""
    return tokens - _prompt_tokens(tok, 0)


def _must_not_run(*args, **kwargs):
    raise AssertionError("ran before the check")


def test_a_prompt_that_fills_the_context_is_refused_before_anything_is_generated(short_context, monkeypatch):
    model, tok = short_context
    records = [
        Record(prompt="a ?", demonstration="", answer="a", source="t.jsonl line 1"),
        Record(prompt="a " * 60, demonstration="", answer="a", source="t.jsonl line 2"),
        Record(prompt="b " * 70, demonstration="", answer="a", source="t.jsonl line 3"),
    ]
    monkeypatch.setattr(decode_mod, "generate", _must_not_run)
    with pytest.raises(UserError) as info:
        evaluate(model, tok, records, lambda o, r: 0.0, max_new_tokens=4)
    message = str(info.value)
    tokens = _prompt_tokens(tok, 60)
    assert message.startswith("t.jsonl line 2, field 'prompt': ")
    assert f"has {tokens} tokens" in message and f"context is {CONTEXT} positions (max_position_embeddings)" in message
    assert "1 more prompts are too long" in message
    # A record given without a source is named by its index (as in examples.jsonl).
    with pytest.raises(UserError, match=r"^record 0, field 'prompt'"):
        evaluate(model, tok, [Record(prompt="a " * 60, demonstration="", answer="a")], lambda o, r: 0.0)


def test_a_prompt_near_the_context_gets_a_cut_budget_and_one_warning(short_context, monkeypatch, caplog, tmp_path):
    model, tok = short_context
    near = _words_for(tok, CONTEXT - 3)  # leaves 3 of the 8 new tokens asked for
    records = [
        Record(prompt="a ?", demonstration="", answer="a", source="t line 1"),
        Record(prompt="a " * near, demonstration="", answer="a", source="t line 2"),
    ]
    calls = []
    real = decode_mod.generate

    def spy(model, prompts, **kwargs):
        calls.append(([len(p) for p in prompts], kwargs["max_new_tokens"]))
        return real(model, prompts, **kwargs)

    monkeypatch.setattr(decode_mod, "generate", spy)
    with caplog.at_level(logging.WARNING, logger="selfdistill.eval.evaluate"):
        summary = evaluate(model, tok, records, lambda o, r: 0.0, max_new_tokens=8, out_dir=tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "1 of 2 prompts leave fewer than the 8 new tokens" in warnings[0] and "as few as 3 tokens" in warnings[0]
    # The short prompt keeps its 8 tokens; the long one gets what the context leaves; nothing runs past it.
    assert sorted(calls, key=lambda c: -c[1]) == [([_tokens(tok, "a ?")], 8), ([CONTEXT - 3], 3)]
    assert summary["context_cut"] == 1 and summary["count"] == 2
    rows = [json.loads(line) for line in (tmp_path / "examples.jsonl").read_text().splitlines()]
    assert "context_budget" not in rows[0] and rows[1]["context_budget"] == 3


def test_the_context_comes_from_the_config_and_a_config_without_one_is_not_checked():
    assert context_length(SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8192))) == (
        8192,
        "max_position_embeddings",
    )
    assert context_length(SimpleNamespace(config=SimpleNamespace(n_positions=1024))) == (1024, "n_positions")
    unknown = SimpleNamespace(config=SimpleNamespace(hidden_size=64))
    assert context_length(unknown) is None
    assert answer_budgets(unknown, [[1] * 50_000], ["x"], 512) == [512]
    # At the boundary: a prompt of context - 1 tokens leaves one new token; one of `context` tokens none.
    known = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=40))
    assert answer_budgets(known, [[1] * 10, [1] * 39], ["x", "y"], 8) == [8, 1]
    with pytest.raises(UserError, match="^y, field 'prompt': the prompt has 40 tokens"):
        answer_budgets(known, [[1] * 10, [1] * 40], ["x", "y"], 8)


def _eval(*args):
    return CliRunner().invoke(app, ["eval", "--precision", "fp32", *args])


def _short_context_model(tmp_path):
    model_dir = save_tiny(tmp_path / "model", ["a", "b", "?"])
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


def test_cli_eval_refuses_a_prompt_past_the_context_and_writes_nothing(tmp_path):
    model_dir = _short_context_model(tmp_path)
    task = tmp_path / "task.jsonl"
    task.write_text(
        json.dumps({"prompt": "a ?", "answer": "a"}) + "\n" + json.dumps({"prompt": "a " * 80, "answer": "a"})
    )
    out = tmp_path / "out"
    result = _eval("--model", str(model_dir), "--task", str(task), "--out", str(out))
    assert isinstance(result.exception, UserError), result.output
    assert f"{task} line 2, field 'prompt'" in str(result.exception)
    assert f"context is {CONTEXT} positions" in str(result.exception)
    assert not out.exists()


def test_a_missing_gold_field_names_the_grader_and_the_line_before_the_model_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(run_mod, "load_fp32", _must_not_run)
    task = tmp_path / "task.jsonl"
    rows = [{"prompt": "q1", "answer": "a"}, {"prompt": "q2"}, {"prompt": "q3"}]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    result = _eval("--model", "never-loaded", "--task", str(task), "--out", str(out))
    message = str(result.exception)
    assert isinstance(result.exception, UserError), result.output
    assert message.startswith(f"{task} line 2: no 'answer' field")
    assert "grader 'contains' (guessed from the task, as no --grader was given)" in message
    assert "(2 of 3 records have none)" in message
    result = _eval("--model", "never-loaded", "--task", str(task), "--grader", "toolalpaca", "--out", str(out))
    assert isinstance(result.exception, UserError), result.output
    assert "line 2: no 'golden_answer' or 'answer' field" in str(result.exception)
    assert "grader 'toolalpaca' (chosen with --grader)" in str(result.exception)
    assert not out.exists()


def test_limit_limits_drift_prompts_and_probes_are_written_not_printed(tmp_path):
    model_dir = save_tiny(tmp_path / "model", ["a", "b", "?"])
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--probes", "--base", str(model_dir), "--probe-tokens", "2"]
    result = _eval(*args, "--drift-tokens", "2", "--limit", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    report_path = out / "probes" / "report.json"
    report = json.loads(report_path.read_text())
    assert report["drift"]["prompts"] == 2 and report["absolute"]["general"]["count"] == 2
    stored = json.loads((out / "probes" / "base" / "drift_answers.json").read_text())
    assert len(stored["prompts"]) == 2
    # One summary line naming the report, and no JSON on the terminal.
    lines = re.findall(r"probes: .*", result.output)  # (the output holds stderr's progress bars too)
    assert len(lines) == 1 and lines[0].endswith(f"report in {report_path}")
    assert re.search(
        r"general \d\.\d{4} over 2 \(\+0\.0000 vs base\); drift KL \d\.\d{4} nats/token over 2 prompts", lines[0]
    )
    assert '"absolute"' not in result.output and "{" not in result.output
    # Another limit against the same base is measured on its own prompts, not the stored two.
    result = _eval(*args, "--drift-tokens", "2", "--limit", "3", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads(report_path.read_text())["drift"]["prompts"] == 3


def test_limit_must_be_positive(tmp_path):
    result = _eval("--model", "x", "--probes", "--limit", "0", "--out", str(tmp_path / "out"))
    assert isinstance(result.exception, UserError) and "--limit must be at least 1, got 0" in str(result.exception)


def test_lm_eval_results_are_written_and_summed_up_in_one_line(tmp_path, monkeypatch):
    scores = {"arc_easy": {"acc,none": 0.25, "acc_stderr,none": 0.1, "documents": 4}, "piqa": {"acc,none": 0.5}}
    monkeypatch.setattr(run_mod, "_lm_eval", lambda settings: scores)
    lines = []
    settings = EvalSettings(model="m", lm_eval_tasks="arc_easy,piqa", limit=4, out=tmp_path / "out")
    run_mod.run_evaluations(settings, echo=lines.append)
    assert json.loads((tmp_path / "out" / "lm_eval.json").read_text()) == scores
    assert lines == [
        f"lm-eval: arc_easy acc,none 0.2500; piqa acc,none 0.5000; all metrics in {tmp_path / 'out' / 'lm_eval.json'}"
    ]
