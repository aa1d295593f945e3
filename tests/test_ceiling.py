"""The teacher-ceiling diagnostic on a tiny model, and its scoring rules."""

import math

import pytest
import torch

from selfdistill.data.records import Record
from selfdistill.models.tiny import tiny_model, tiny_tokenizer, words_of
from selfdistill.tasks import Metric
from selfdistill.tasks.ceiling import demonstration_loglik, measure, score, table


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
