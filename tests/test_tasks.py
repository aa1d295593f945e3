"""Built-in task generators: determinism, disjoint splits, valid records, gold answers that grade 1.0."""

import json

import pytest

from selfdistill.data.records import record_from_row
from selfdistill.errors import UserError
from selfdistill.eval.ceiling import score
from selfdistill.tasks import eval_size, get_task, list_tasks, make_task

TASKS = ["tooluse", "tooluse_hinted", "knowledge", "science"]


def dump(data):
    return {
        split: [json.dumps(r.to_dict(), sort_keys=True) for r in records] for split, records in data.splits().items()
    }


def test_registry_lists_the_tasks():
    assert [t.name for t in list_tasks()] == TASKS
    assert get_task("tooluse").graders == ["toolalpaca", "toolalpaca_partial"]  # headline, then partial credit
    assert get_task("science").graders == ["choice_tag"]
    assert [m.name for m in get_task("knowledge").metrics] == ["strict", "lenient"]
    with pytest.raises(UserError, match="Unknown task 'nope'.*tooluse"):
        get_task("nope")
    with pytest.raises(UserError, match="size must be at least 1"):
        make_task("science", 0, 0)


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_identical_different_seed_different(task):
    a, b, c = make_task(task, 3, 40), make_task(task, 3, 40), make_task(task, 4, 40)
    assert dump(a) == dump(b)
    assert a.documents == b.documents
    assert set(dump(a)["train"]).isdisjoint(dump(c)["train"]) or dump(a)["train"] != dump(c)["train"]
    # different seeds give mostly different items, not a reordering of the same ones
    assert len(set(dump(a)["eval"]) & set(dump(c)["eval"])) < len(a.eval) // 2


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("size", [1, 40, 300])
def test_sizes_and_disjoint_splits(task, size):
    data = make_task(task, 0, size)
    assert len(data.train) == size
    assert len(data.eval) == eval_size(size)
    questions = {split: {json.dumps(r.prompt) for r in records} for split, records in data.splits().items()}
    assert len(questions["train"]) == size  # no duplicate training prompts
    for split, qs in questions.items():
        if split != "train":
            assert qs.isdisjoint(questions["train"]), split
    if "ood" in questions:
        assert questions["ood"].isdisjoint(questions["eval"])


def test_tooluse_eval_apis_never_seen_in_training():
    data = make_task("tooluse", 0, 400)
    train_apis = {r.meta["api"] for r in data.train}
    eval_apis = {r.meta["api"] for r in data.eval}
    assert eval_apis and train_apis.isdisjoint(eval_apis)
    for r in data.train + data.eval:
        assert f"Name: {r.meta['api']}" in r.prompt
        assert f"Question: {r.meta['instruction']}\n" in r.prompt
        call = r.meta["golden_answer"][0]
        assert f"Action: {call['Action']}\nAction Input: {call['Action_Input']}" in r.demonstration
        # every argument can be read from the request
        for value in json.loads(call["Action_Input"]).values():
            assert value in r.meta["instruction"]


def test_tooluse_hinted_shows_the_format_for_another_api_but_not_the_answer():
    plain, hinted = make_task("tooluse", 0, 60), make_task("tooluse_hinted", 0, 60)
    for r in hinted.train + hinted.eval:
        call = r.meta["golden_answer"][0]
        head, hint = r.prompt.split("Example of the format, for a different API and request:\n")
        hint = hint.split("\n\nQuestion: ")[0]
        # the hint is a complete call in the demonstration's layout, for a function of another domain
        assert hint.startswith("Question: ") and "\nThought: " in hint and "\nAction Input: {" in hint
        hinted_action = hint.split("\nAction: ")[1].split("\n")[0]
        assert hinted_action != call["Action"] and f"{hinted_action}:" not in head
        assert r.meta["task"] == "tooluse_hinted"
    assert all("Example of the format" not in r.prompt for r in plain.train)


def test_knowledge_world_documents_contexts_and_ood():
    data = make_task("knowledge", 1, 60)
    assert len(data.documents) >= 20
    ood = data.extra["ood"]
    assert len(ood) == eval_size(60)
    assert {r.meta["kind"] for r in ood} == {"indirect", "two-hop"}
    corpus = " ".join(data.documents)
    for r in data.train + data.eval + ood:
        assert r.answer in r.context and r.answer in r.demonstration
        assert r.answer in r.meta["answers"]
        assert r.context in corpus or all(part in corpus for part in r.context.split(". "))
    # the same facts are asked in training and evaluation, in another phrasing
    train_by_demo = {r.demonstration: r.prompt for r in data.train}
    for r in data.eval:
        assert r.demonstration in train_by_demo and train_by_demo[r.demonstration] != r.prompt
    # dated after the model's training cutoff
    assert all(any(str(y) in d for y in (2026, 2027, 2028, 2029)) for d in data.documents if "founded" in d)


def test_science_items_in_paper_format():
    data = make_task("science", 2, 60)
    letters = [r.answer for r in data.train]
    assert set(letters) == set("ABCD")
    for r in data.train + data.eval:
        assert [m["role"] for m in r.prompt] == ["system", "user"]
        assert "<answer>" in r.prompt[0]["content"]
        options = r.prompt[1]["content"].split("\n\n")[1].splitlines()
        assert [o[:2] for o in options] == ["A:", "B:", "C:", "D:"]
        assert r.demonstration.endswith(f"<answer>\n{r.answer}\n</answer>")


def test_science_molar_mass_reasoning_is_right():
    from selfdistill.tasks.science import molar_mass

    assert molar_mass({"C": 2, "H": 6, "O": 1}) == pytest.approx(46.069, abs=1e-3)
    data = make_task("science", 0, 200)
    for r in data.train:
        if r.meta["kind"] == "molar_mass":
            options = dict(line.split(": ") for line in r.prompt[1]["content"].split("\n\n")[1].splitlines())
            assert options[r.answer] in r.demonstration


@pytest.mark.parametrize("task", TASKS)
def test_every_record_validates_and_gold_scores_one(task):
    from selfdistill.eval import graders

    spec = get_task(task)
    data = make_task(task, 5, 80)
    for split, records in data.splits().items():
        for r in records:
            again = record_from_row(json.loads(json.dumps(r.to_dict())), "roundtrip")
            assert again.to_dict() == r.to_dict()
            for metric in spec.metrics:
                assert score(r.demonstration, r, metric, graders.get(metric.grader)) == 1.0, (split, metric, r)
    # and a wrong answer scores 0
    r = data.eval[0]
    assert all(score("I do not know.", r, m, graders.get(m.grader)) == 0.0 for m in spec.metrics)
