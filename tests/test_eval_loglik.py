"""Held-out demonstration log-likelihood against a direct computation, and the partial tool-call score."""

import json

import pytest
import torch

from selfdistill.data.records import Record
from selfdistill.eval.graders import toolalpaca_partial
from selfdistill.eval.loglik import answer_token_positions, heldout_loglik
from selfdistill.models.tiny import tiny_model, tiny_tokenizer, words_of

RECORDS = [
    Record(
        prompt="Who won the Velmor Prize ?", demonstration="The Velmor Prize was won by Ada Byron .", answer="Ada Byron"
    ),
    Record(prompt="Where is the Salt Guild ?", demonstration="The Salt Guild is based in Oslo .", answer="Oslo"),
    Record(prompt="No demonstration here ?", demonstration="", answer="x"),
]


def _tiny():
    text = " ".join(r.prompt + " " + r.demonstration for r in RECORDS)
    tok = tiny_tokenizer(sorted(set(words_of(text))))
    return tiny_model(tok, seed=3), tok


def _direct(model, tok, messages, demo_text, stop):
    """log p of each demonstration token, from one forward pass over chat prompt + demonstration ids."""
    prompt = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    demo = tok.encode(demo_text, add_special_tokens=False) + [stop]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + demo])).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    return [logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(demo)]


def test_heldout_loglik_matches_a_direct_computation():
    model, tok = _tiny()
    stop = tok.convert_tokens_to_ids("<|end|>")
    result = heldout_loglik(model, tok, RECORDS, template="plain", stop_token_id=stop)
    # The record without a demonstration is left out.
    assert result["count"] == 2 and len(result["items"]) == 2
    students, teachers, answers = [], [], []
    for record in RECORDS[:2]:
        lp = _direct(model, tok, [{"role": "user", "content": record.prompt}], record.demonstration, stop)
        students.append(lp)
        teacher_turn = (
            f"{record.prompt}\n\nThis is an example for a response to the question:\n{record.demonstration}"
            "\n\nNow answer with a response of your own."
        )
        teachers.append(_direct(model, tok, [{"role": "user", "content": teacher_turn}], record.demonstration, stop))
        # The answer's tokens, found by hand: the demonstration's last words before " .".
        words = record.demonstration.split()
        n = len(record.answer.split())
        answers.append(lp[len(words) - 1 - n : len(words) - 1])
    per_item = [sum(lp) / len(lp) for lp in students]
    assert result["items"] == pytest.approx(per_item, abs=1e-4)
    assert result["student"] == pytest.approx(sum(per_item) / 2, abs=1e-5)
    assert result["teacher"] == pytest.approx(sum(sum(lp) / len(lp) for lp in teachers) / 2, abs=1e-5)
    assert result["student_first"] == pytest.approx((students[0][0] + students[1][0]) / 2, abs=1e-5)
    assert result["answer_count"] == 2
    assert result["student_answer"] == pytest.approx(sum(sum(a) / len(a) for a in answers) / 2, abs=1e-5)
    assert result["tokens"] == sum(len(lp) for lp in students)


def test_nothing_to_measure_without_demonstrations():
    model, tok = _tiny()
    assert heldout_loglik(model, tok, RECORDS[2:], template="plain") is None


def test_answer_tokens_are_found_by_character_offsets():
    text = "The Prize was won by Ada Byron."
    # Offsets of a tokenisation that merges the space into the next token (as BPE tokenizers do).
    pieces = ["The", " Prize", " was", " won", " by", " Ada", " By", "ron", "."]
    offsets, at = [], 0
    for piece in pieces:
        offsets.append((at, at + len(piece)))
        at += len(piece)
    assert answer_token_positions(text, "Ada Byron", offsets) == [5, 6, 7]
    assert answer_token_positions(text, "Oslo", offsets) == []
    assert answer_token_positions(text, None, offsets) == []


def test_partial_tool_call_score():
    gold = {"golden_answer": [{"Action": "getForecast", "Action_Input": json.dumps({"city": "Oslo", "day": "Monday"})}]}
    right = 'Action: getForecast\nAction Input: {"city": "Oslo", "day": "Monday"}'
    wrong_args = 'Action: getForecast\nAction Input: {"city": "Lima", "day": "Monday"}'
    wrong_action = 'Action: getAirQuality\nAction Input: {"city": "Oslo"}'
    assert toolalpaca_partial(right, gold) == 1.0
    assert toolalpaca_partial(wrong_args, gold) == 0.5
    assert toolalpaca_partial("Action: getForecast", gold) == 0.5
    assert toolalpaca_partial(wrong_action, gold) == 0.0
    assert toolalpaca_partial("I cannot help.", gold) == 0.0
