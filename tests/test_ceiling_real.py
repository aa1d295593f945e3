"""The teacher ceiling of the embedded model on the knowledge task (a few records)."""

import pytest

from selfdistill.eval.ceiling import measure
from selfdistill.tasks import get_task, make_task


@pytest.mark.slow
def test_embedded_model_copies_facts_from_the_demonstration():
    import torch

    from selfdistill.models import load_model, stop_token_ids

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    records = make_task("knowledge", 0, 40).eval[:6]
    contains = lambda out, rec: float(str(rec["answer"]).lower() in out.lower())  # noqa: E731 - stand-in for the eval grader
    student, teacher = measure(
        model,
        tok,
        records,
        get_task("knowledge").metrics,
        templates=("plain",),
        max_new_tokens=24,
        stop_token_ids=stop_token_ids(model, tok),
        grader_lookup=lambda name: contains,
    )
    # fictional facts: unknown without the demonstration, copied with it
    assert student.scores["strict"] <= 1 / 6
    assert teacher.scores["strict"] >= 4 / 6
    assert teacher.loglik - student.loglik > 0.5  # nats per demonstration token
