"""Probe checkers on passing and failing outputs, the suite's integrity, drift and the report."""

import json

import pytest
import torch

from selfdistill.eval import drift as drift_mod
from selfdistill.eval.probes import CHECKERS, check_item, load_suite, probe_report, relative, run_probes
from selfdistill.models.tiny import tiny_model, tiny_tokenizer

CATEGORIES = ["factual", "arithmetic", "commonsense", "instruction"]


def _item(*checks):
    return {"id": "t", "check": list(checks)}


@pytest.mark.parametrize(
    "check, passing, failing",
    [
        ({"type": "answer", "any": ["Paris"]}, "It is Paris.", "It is Parisian."),
        ({"type": "number", "value": 42}, "6 * 7 = 42", "41"),
        ({"type": "max_words", "n": 3}, "one two three", "one two three four"),
        ({"type": "min_words", "n": 3}, "one two three", "one two"),
        ({"type": "lowercase"}, "all quiet here.", "Not quiet"),
        ({"type": "uppercase"}, "LOUD NOISES!", "LOUD noises"),
        ({"type": "json", "keys": ["name"]}, '```json\n{"name": "Ana", "age": 3}\n```', '{"nom": "Ana"}'),
        ({"type": "json"}, '{"a": 1}', 'Here is JSON: {"a": 1}'),
        ({"type": "bullets", "n": 2}, "- apples\n- pears", "- apples\n- pears\n- plums"),
        ({"type": "include", "words": ["coffee", "bread"]}, "Coffee and bread.", "Coffee only."),
        ({"type": "exclude", "words": ["water"]}, "The sea is blue.", "The sea is water."),
        ({"type": "starts_with", "text": "Yes"}, "yes, it is.", "Well, yes."),
        ({"type": "ends_with", "text": "The end."}, "It rained. The end.", "The end. It rained."),
        ({"type": "no_commas"}, "No commas here.", "One, two."),
        ({"type": "quoted"}, '"Paris"', "Paris"),
        ({"type": "title"}, "<<Snow>>\nWhite flakes", "Snow\nWhite flakes"),
        ({"type": "paragraphs", "n": 2}, "One.\n\nTwo.", "One.\nTwo."),
    ],
)
def test_checkers_pass_and_fail(check, passing, failing):
    assert check_item(passing, _item(check)) == 1.0
    assert check_item(failing, _item(check)) == 0.0


def test_empty_output_passes_no_check():
    for name in CHECKERS:
        if name == "min_words":
            continue
        check = {"type": name, "any": ["x"], "value": 1, "n": 1, "words": ["x"], "text": "x", "keys": []}
        assert check_item("", _item(check)) == 0.0, name


def test_all_checks_must_pass():
    item = _item({"type": "lowercase"}, {"type": "include", "words": ["sky"]})
    assert check_item("the sky is blue", item) == 1.0
    assert check_item("the sea is blue", item) == 0.0
    assert check_item("The sky is blue", item) == 0.0


def test_suite_size_categories_and_checks():
    items = load_suite()
    assert len(items) >= 150
    assert len({i["id"] for i in items}) == len(items)
    counts = {
        c: sum(i["category"] == c for i in items) for c in ("factual", "arithmetic", "commonsense", "instruction")
    }
    assert all(n >= 25 for n in counts.values()), counts
    for item in items:
        assert item["check"] and all(c["type"] in CHECKERS for c in item["check"]), item["id"]
    # The arithmetic answers are right.
    import re

    ops = {
        "+": lambda a, b: a + b,
        "-": lambda a, b: a - b,
        "times": lambda a, b: a * b,
        "divided by": lambda a, b: a / b,
    }
    for item in (i for i in items if i["category"] == "arithmetic"):
        a, op, b = re.match(r"What is (\d+) (\+|-|times|divided by) (\d+)\?", item["prompt"]).groups()
        assert ops[op](int(a), int(b)) == item["check"][0]["value"], item["id"]


def test_relative_is_model_minus_base():
    model = {
        "general": {"score": 0.5, "count": 10, "categories": {"factual": {"score": 0.2}}},
        "humaneval": {"pass_at_1": 0.1},
    }
    base = {
        "general": {"score": 0.75, "count": 10, "categories": {"factual": {"score": 0.1}}},
        "humaneval": {"pass_at_1": 0.3},
    }
    delta = relative(model, base)
    assert delta["general"]["score"] == pytest.approx(-0.25)
    assert delta["general"]["categories"]["factual"]["score"] == pytest.approx(0.1)
    assert delta["humaneval"]["pass_at_1"] == pytest.approx(-0.2)
    assert "count" not in delta["general"]


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer(["sky", "blue", "tea", "cup", "why", "is", "how", "make", "?", "."])
    return tiny_model(tok, seed=1), tok


PROMPTS = ["why is the sky blue ?", "how make tea ?", "cup of tea ."]


def _perturbed(model, scale):
    import copy

    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return other


def test_drift_is_zero_for_base_and_grows_with_perturbation(tiny, tmp_path):
    model, tok = tiny
    answers = drift_mod.base_answers(model, tok, prompts=PROMPTS, max_new_tokens=8, top_k=16, base_name="tiny")
    assert len(answers["items"]) == 3 and all(len(i["answer_ids"]) >= 1 for i in answers["items"])
    path = tmp_path / "answers.json"
    drift_mod.save_base_answers(answers, path)
    assert drift_mod.load_base_answers(path, "tiny") == answers
    assert drift_mod.load_base_answers(path, "another-base") is None

    same = drift_mod.drift(answers, model, tok)
    assert same["kl_nats"] == pytest.approx(0.0, abs=1e-5)
    exact_same = drift_mod.drift(answers, model, tok, base_model=model)
    assert exact_same["kl_nats"] == pytest.approx(0.0, abs=1e-6)
    # The NLL of the greedy answers is the base model's own: positive, below log(vocab).
    assert 0 < same["nll_nats"] < torch.log(torch.tensor(float(len(tok)))).item()

    small = drift_mod.drift(answers, _perturbed(model, 0.01), tok)
    large = drift_mod.drift(answers, _perturbed(model, 0.1), tok)
    assert 0 < small["kl_nats"] < large["kl_nats"]
    assert large["nll_nats"] > same["nll_nats"]
    # The top-k + rest bucket KL is a lower bound of the full-vocabulary KL.
    full = drift_mod.drift(answers, _perturbed(model, 0.1), tok, base_model=model)
    assert large["kl_nats"] <= full["kl_nats"] + 1e-6
    assert large["tokens"] == sum(len(i["answer_ids"]) for i in answers["items"])


def test_drift_prompts_resource():
    prompts = drift_mod.drift_prompts()
    assert len(prompts) >= 30 and len(set(prompts)) == len(prompts)


def test_run_probes_and_report_with_base(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    result = run_probes(model, tok, limit=8, max_new_tokens=4, out_dir=tmp_path / "p")
    # a small limit still covers every category (two items each), not the first 8 factual questions
    assert result["count"] == 8
    assert {name: c["count"] for name, c in result["categories"].items()} == {c: 2 for c in CATEGORIES}
    in_memory = run_probes(model, tok, limit=8, max_new_tokens=4)  # no files: categories all the same
    assert in_memory["categories"] == result["categories"]
    rows = [json.loads(x) for x in (tmp_path / "p" / "examples.jsonl").read_text().splitlines()]
    assert result["categories"]["factual"]["score"] == 0.0  # a random tiny model knows no capitals
    assert len(rows) == 8

    # The report: base and model are the same weights here, so deltas and drift are zero.
    monkeypatch.setattr(drift_mod, "drift_prompts", lambda: PROMPTS)
    loads = []

    def load(name):
        loads.append(name)
        return model, tok

    report = probe_report(
        "ckpt", "base", out_dir=tmp_path / "r", load=load, limit=3, precision="fp32", max_new_tokens=4, drift_tokens=4
    )
    assert report["relative"]["general"]["score"] == 0.0
    assert report["drift"]["kl_nats"] == pytest.approx(0.0, abs=1e-5)
    assert (tmp_path / "r" / "base" / "drift_answers.json").is_file()
    assert json.loads((tmp_path / "r" / "report.json").read_text())["base"]["model"] == "base"
    # A second checkpoint against the same base reuses the stored base scores and answers.
    loads.clear()
    probe_report(
        "ckpt2", "base", out_dir=tmp_path / "r", load=load, limit=3, precision="fp32", max_new_tokens=4, drift_tokens=4
    )
    assert loads == ["ckpt2"]
