"""Graders on hand-written outputs: right, wrong and malformed."""

import json
from pathlib import Path

import pytest

from selfdistill.errors import UserError
from selfdistill.eval import graders
from selfdistill.eval.graders import get

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOOLUSE = SHARED / "data" / "paper-eval" / "tooluse_eval.jsonl"


def test_lookup_by_name_and_unknown_name():
    assert get("exact") is graders.exact
    assert get("toolalpaca_robust") is graders.toolalpaca_robust
    with pytest.raises(UserError, match="Unknown grader 'nope'"):
        get("nope")


def test_exact_normalizes_case_whitespace_punctuation():
    assert get("exact")("  Paris. ", {"answer": "paris"}) == 1.0
    assert get("exact")("Paris, France", {"answer": "paris"}) == 0.0
    assert get("exact")("rome", {"answer": ["Paris", "Rome"]}) == 1.0
    with pytest.raises(UserError, match="gold 'answer'"):
        get("exact")("x", {"prompt": "q"})


def test_contains_matches_whole_words_only():
    grade = get("contains")
    assert grade("The capital is PARIS!", {"answer": "paris"}) == 1.0
    assert grade("I like Parisian food", {"answer": "paris"}) == 0.0
    assert grade("It is New   York.", {"answer": "new york"}) == 1.0
    assert grade("", {"answer": "paris"}) == 0.0


def test_regex_uses_pattern_or_answer():
    assert get("regex")("Answer: 42", {"pattern": r"answer:\s*42\b"}) == 1.0
    assert get("regex")("Answer: 421", {"pattern": r"answer:\s*42\b"}) == 0.0
    assert get("regex")("abc123", {"answer": r"\d{3}"}) == 1.0
    with pytest.raises(UserError, match="bad regular expression"):
        get("regex")("x", {"pattern": "("})


def test_numeric_takes_last_number_with_tolerance():
    grade = get("numeric")
    assert grade("3 + 4 = 7", {"answer": 7}) == 1.0
    assert grade("The total is 1,234.", {"answer": "1234"}) == 1.0
    assert grade("about 3.14", {"answer": 3.14159, "tolerance": 0.01}) == 1.0
    assert grade("about 3.14", {"answer": 3.14159}) == 0.0
    assert grade("-5 degrees", {"answer": -5}) == 1.0
    assert grade("seven", {"answer": 7}) == 0.0


def test_choice_tag_paper_science_grader():
    grade = get("choice_tag")
    record = {"answer": "B"}
    assert grade("<reasoning>\nx\n</reasoning>\n<answer>\nB\n</answer>", record) == 1.0
    assert grade("<answer>C</answer>", record) == 0.0
    assert grade("<answer>B. the second</answer>", record) == 0.0  # the paper compares the whole tag text
    assert grade("The answer is B", record) == 0.0  # no tag
    assert grade("<answer>B", record) == 0.0  # unclosed tag
    assert grade("<answer>...</answer> then <answer> B </answer>", record) == 1.0  # the last tag counts


GOLD = {
    "golden_answer": [
        {"Action": "searchImages", "Action_Input": '{"color": "wild", "page": 1}'},
        {"Action": "getFacts", "Action_Input": '{"limit": 3}'},
    ]
}


def test_toolalpaca_right_wrong_and_malformed():
    right = (
        'Thought: search first\nAction: searchImages\nAction Input: {"color": "wild", "page": 1}\n'
        'Observation: ...\nAction: getFacts\nAction Input: {"limit": 3}'
    )
    for grade in (get("toolalpaca"), get("toolalpaca_robust")):
        assert grade(right, GOLD) == 1.0
        assert grade(right.replace("getFacts", "getFact"), GOLD) == 0.0  # wrong action
        assert grade(right.replace('"limit": 3', '"limit": 4'), GOLD) == 0.0  # wrong argument
        assert grade(right.split("Observation")[0], GOLD) == 0.0  # one call missing
        assert grade(right + "\nAction: getFacts", GOLD) == 0.0  # an extra action
        assert grade(right.replace('{"limit": 3}', "{limit: 3"), GOLD) == 0.0  # malformed JSON
        assert grade("I cannot help with that.", GOLD) == 0.0
    # The order of calls does not matter (multiset of actions, merged inputs).
    swapped = (
        'Action: getFacts\nAction Input: {"limit": 3}\nAction: searchImages\nAction Input: {"page": 1, "color": "wild"}'
    )
    assert get("toolalpaca")(swapped, GOLD) == 1.0


def test_nested_json_arguments_only_the_robust_grader_parses():
    gold = {
        "golden_answer": [
            {"Action": "createEvent", "Action_Input": '{"title": "Party", "where": {"city": "Oslo", "room": 4}}'}
        ]
    }
    output = 'Thought: create it\nAction: createEvent\nAction Input: {"title": "Party", "where": {"city": "Oslo", "room": 4}}\nEnd'
    assert get("toolalpaca_robust")(output, gold) == 1.0
    # The paper's regex stops at the first "}", so the nested object cannot parse: scored wrong.
    assert get("toolalpaca")(output, gold) == 0.0
    assert get("toolalpaca_robust")(output.replace('"room": 4', '"room": 5'), gold) == 0.0


def test_toolalpaca_needs_golden_answer():
    with pytest.raises(UserError, match="golden_answer"):
        get("toolalpaca")("Action: x", {"answer": "x"})


def _output_from_gold(gold: list[dict]) -> str:
    lines = []
    for call in gold:
        lines += [
            f"Thought: I will call {call['Action']}.",
            f"Action: {call['Action']}",
            f"Action Input: {call['Action_Input']}",
            "Observation: ok",
        ]
    return "\n".join(lines)


@pytest.mark.skipif(not TOOLUSE.is_file(), reason="../shared/data/paper-eval is not present")
def test_toolalpaca_on_the_papers_tool_use_eval_set():
    rows = [json.loads(line) for line in TOOLUSE.read_text().splitlines() if line.strip()]
    assert len(rows) == 97
    paper_misses, robust_misses = [], []
    for number, row in enumerate(rows, start=1):
        gold = row["golden_answer"]
        if graders.toolalpaca_robust(_output_from_gold(gold), row) != 1.0:
            robust_misses.append(number)
        if graders.toolalpaca(_output_from_gold(gold), row) != 1.0:
            paper_misses.append(number)
        wrong_action = [dict(gold[0], Action=gold[0]["Action"] + "X")] + gold[1:]
        assert graders.toolalpaca(_output_from_gold(wrong_action), row) == 0.0
        # A wrong argument: change (or add) one key's value in the last call, since later
        # calls' inputs override earlier ones in the merged dict.
        args = json.loads(gold[-1]["Action_Input"] or "{}")
        key = next(iter(args), "extra_argument")
        args[key] = "WRONG-VALUE"
        wrong_arg = gold[:-1] + [dict(gold[-1], Action_Input=json.dumps(args))]
        assert graders.toolalpaca(_output_from_gold(wrong_arg), row) == 0.0
        assert graders.toolalpaca_robust(_output_from_gold(wrong_arg), row) == 0.0
    # Known gold answers that no output can match: line 34 names the action
    # "[Optional]updateUserProfile", which `Action:\s*(\w+)` cannot capture; lines 27 and 34
    # pass an object as an argument value, which the paper's input regex cannot read back.
    assert robust_misses == [34]
    assert paper_misses == [27, 34]
