"""The lm-evaluation-harness adapter, offline: a local task YAML over a tiny JSONL dataset."""

from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from selfdistill.errors import UserError  # noqa: E402
from selfdistill.eval.lmeval import run_lm_eval  # noqa: E402
from selfdistill.models.tiny import tiny_model, tiny_tokenizer  # noqa: E402

TASKS = Path(__file__).parent / "data" / "lmeval"


def test_local_task_on_an_in_memory_model(monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])  # the YAML names its data file relative to the repository
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tok = tiny_tokenizer(["the", "sky", "is", "blue", "green", "grass", "sea", "red", "fire"])
    model = tiny_model(tok)
    first = run_lm_eval(
        model, tok, ["sdft_tiny_mc"], include_path=str(TASKS), builtin_tasks=False, limit=3, seed=1, batch_size=2
    )
    assert first["sdft_tiny_mc"]["documents"] == 3
    # The same accuracy by hand: the choice with the higher log-probability after the question.
    import json

    import torch

    rows = [json.loads(x) for x in (TASKS / "tiny_mc.jsonl").read_text().splitlines()][:3]
    right = 0
    for row in rows:
        context = tok(row["question"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = model(torch.tensor([context])).logits[0, -1].log_softmax(-1)
        choice_ids = [tok.convert_tokens_to_ids(c) for c in row["choices"]]
        right += int(max(range(2), key=lambda i: logprobs[choice_ids[i]].item()) == row["label"])
    assert first["sdft_tiny_mc"]["acc,none"] == pytest.approx(right / 3)


def test_unknown_task_is_a_user_error(monkeypatch):
    tok = tiny_tokenizer()
    with pytest.raises(UserError):
        run_lm_eval(tiny_model(tok), tok, ["no_such_task_xyz"], include_path=str(TASKS), builtin_tasks=False, limit=1)
