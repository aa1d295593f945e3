"""Task evaluation: pass@k, the confidence interval, result files and the CLI (tiny models)."""

import json
import math

import pytest
import typer
from typer.testing import CliRunner

from selfdistill.data.records import Record
from selfdistill.errors import UserError
from selfdistill.eval.evaluate import evaluate, pass_at_k, wilson_interval
from selfdistill.models.tiny import save_tiny, tiny_model, tiny_tokenizer


def test_pass_at_k_hand_computed():
    # n=5, c=2, k=1: 1 - C(3,1)/C(5,1) = 1 - 3/5
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # n=10, c=3, k=5: 1 - C(7,5)/C(10,5) = 1 - 21/252
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # fewer than k wrong samples: some k-subset always has a right one
    assert pass_at_k(200, 13, 100) == pytest.approx(1 - math.comb(187, 100) / math.comb(200, 100))
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_wilson_interval_hand_computed():
    low, high = wilson_interval(0.5, 100)
    assert low == pytest.approx(0.40383, abs=1e-4) and high == pytest.approx(0.59617, abs=1e-4)
    low, high = wilson_interval(0.0, 10)
    assert low == 0.0 and high == pytest.approx(0.27754, abs=1e-4)


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer(["red", "blue", "green", "color", "sky", "grass", "?"])
    return tiny_model(tok), tok


def _records():
    return [
        Record(prompt=f"what color is the {w} ?", demonstration="", answer=a, source=f"t line {i + 1}")
        for i, (w, a) in enumerate([("sky", "blue"), ("grass", "green"), ("sky", "blue"), ("grass", "x")])
    ]


def test_greedy_evaluation_writes_examples_and_summary(tiny, tmp_path):
    model, tok = tiny
    seen = []

    def grader(output, record):
        seen.append(record)
        return 1.0 if record["answer"] == "blue" else 0.0

    summary = evaluate(model, tok, _records(), grader, max_new_tokens=4, batch_size=3, out_dir=tmp_path)
    assert summary["count"] == 4 and summary["score"] == 0.5
    assert summary["ci95"] == pytest.approx(list(wilson_interval(0.5, 4)))
    assert seen[0]["answer"] == "blue" and seen[0]["prompt"] == "what color is the sky ?"
    lines = [json.loads(x) for x in (tmp_path / "examples.jsonl").read_text().splitlines()]
    assert [x["score"] for x in lines] == [1.0, 0.0, 1.0, 0.0]
    assert all(isinstance(x["output"], str) for x in lines)
    assert lines[0]["source"] == "t line 1"
    assert json.loads((tmp_path / "summary.json").read_text())["score"] == 0.5
    # Greedy outputs are deterministic: the same prompt gives the same output.
    assert lines[0]["output"] == lines[2]["output"]


def test_sampling_reports_pass_at_k_and_ignores_batch_size(tiny, tmp_path):
    model, tok = tiny
    # Score 1 when the output has an even number of characters: varies between samples.
    grader = lambda output, record: float(len(output) % 2 == 0)  # noqa: E731
    a = evaluate(
        model,
        tok,
        _records(),
        grader,
        n_samples=4,
        temperature=1.0,
        max_new_tokens=5,
        batch_size=16,
        ks=[1, 2, 4],
        out_dir=tmp_path / "a",
    )
    b = evaluate(
        model,
        tok,
        _records(),
        grader,
        n_samples=4,
        temperature=1.0,
        max_new_tokens=5,
        batch_size=3,
        ks=[1, 2, 4],
        out_dir=tmp_path / "b",
    )
    assert a["score"] == b["score"] and a["pass_at_k"] == b["pass_at_k"]
    rows = [json.loads(x) for x in (tmp_path / "a" / "examples.jsonl").read_text().splitlines()]
    assert all(len(r["output"]) == 4 and len(r["scores"]) == 4 for r in rows)
    expected = {k: sum(pass_at_k(4, int(sum(r["scores"])), k) for r in rows) / 4 for k in (1, 2, 4)}
    assert a["pass_at_k"] == pytest.approx({str(k): v for k, v in expected.items()})
    assert a["pass_at_k"]["1"] == pytest.approx(a["score"])  # pass@1 is the mean sample score for 0/1 scores


def test_sampling_needs_temperature(tiny):
    model, tok = tiny
    with pytest.raises(UserError, match="temperature"):
        evaluate(model, tok, _records(), lambda o, r: 0.0, n_samples=2)


def _app():
    from selfdistill.commands.eval import register

    app = typer.Typer()

    @app.callback()
    def _root():  # a callback keeps `eval` a sub-command, as in the full `sdft` app
        pass

    register(app)
    return app


def test_cli_eval_task_file(tmp_path):
    model_dir = save_tiny(tmp_path / "model", ["paris", "capital", "france", "?"])
    task = tmp_path / "task.jsonl"
    task.write_text(
        "\n".join(
            json.dumps({"prompt": "what is the capital of france ?", "answer": a}) for a in ["paris", "rome", "oslo"]
        )
        + "\n"
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        _app(),
        [
            "eval",
            "--model",
            str(model_dir),
            "--task",
            str(task),
            "--grader",
            "contains",
            "--max-new-tokens",
            "3",
            "--precision",
            "fp32",
            "--out",
            str(out),
            "--limit",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "task" / "summary.json").read_text())
    assert summary["count"] == 2 and summary["grader"] == "contains" and 0.0 <= summary["score"] <= 1.0
    assert len((out / "task" / "examples.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "results.json").read_text())["task"]["count"] == 2


def test_cli_user_errors(tmp_path):
    result = CliRunner().invoke(_app(), ["eval", "--model", "x", "--out", str(tmp_path)])
    assert isinstance(result.exception, UserError) and "Nothing to do" in str(result.exception)
    result = CliRunner().invoke(
        _app(), ["eval", "--model", "x", "--task", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)]
    )
    assert isinstance(result.exception, UserError) and "file not found" in str(result.exception)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "answer": "a"}\n{"answer": "b"}\n')
    result = CliRunner().invoke(_app(), ["eval", "--model", "x", "--task", str(bad), "--out", str(tmp_path)])
    assert isinstance(result.exception, UserError) and "line 2" in str(result.exception)


def test_cli_probes_relative_to_base(tmp_path):
    model_dir = save_tiny(tmp_path / "model", ["paris", "capital", "france", "?"])
    out = tmp_path / "out"
    result = CliRunner().invoke(
        _app(),
        [
            "eval",
            "--model",
            str(model_dir),
            "--probes",
            "--base",
            str(model_dir),
            "--limit",
            "2",
            "--probe-tokens",
            "3",
            "--drift-tokens",
            "2",
            "--precision",
            "fp32",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "results.json").read_text())["probes"]
    assert report["absolute"]["general"]["count"] == 2
    assert report["relative"]["general"]["score"] == 0.0  # the checkpoint is its own base
    assert report["drift"]["kl_nats"] == pytest.approx(0.0, abs=1e-5)
    assert report["drift"]["prompts"] == 2  # --limit 2 limits the drift prompts too
    assert (out / "probes" / "base" / "drift_answers.json").is_file()
