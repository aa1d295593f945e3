import json

import pytest
import torch
from toy import KEYS, VALUES, copy_model, greedy_accuracy, toy_records

from selfdistill.config import load_config
from selfdistill.errors import UserError
from selfdistill.models.tiny import tiny_model, tiny_tokenizer
from selfdistill.training.loop import train


def toy_config(tmp_path, **sections):
    base = {
        "model": {"precision": "fp32"},
        "data": {"teacher_template": "plain"},
        "rollout": {"max_new_tokens": 3},
        "loss": {"skip_first_tokens": 0},
        "train": {
            "output_dir": str(tmp_path / "run"),
            "batch_size": 8,
            "micro_batch_size": 4,
            "lr": 3e-3,
            "warmup_ratio": 0.0,
        },
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values) if isinstance(values, dict) else base.__setitem__(name, values)
    return load_config(overrides=base)


def test_sdft_learns_the_mapping_from_the_teacher(tmp_path):
    model, tok = copy_model(steps=150)
    records = toy_records()
    before = greedy_accuracy(model, tok, records)
    teacher_ceiling = greedy_accuracy(model, tok, records, teacher=True)
    assert before <= 0.25 and teacher_ceiling == 1.0
    cfg = toy_config(tmp_path, train={"max_steps": 30})
    result = train(cfg, records=records, model=model, tokenizer=tok, save_final=False)
    after = greedy_accuracy(result.model, tok, records)
    assert after >= before + 0.5, (before, after)
    losses = [m["loss"] for m in result.metrics]
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5


def _tiny_setup():
    tok = tiny_tokenizer(KEYS + VALUES)
    return tiny_model(tok, seed=0), tok


def test_resume_gives_the_same_weights_and_teacher_as_a_straight_run(tmp_path):
    records = toy_records()
    common = dict(
        train={"max_steps": 4, "batch_size": 4, "lr": 1e-3, "warmup_ratio": 0.25}, rollout={"max_new_tokens": 4}
    )
    model, tok = _tiny_setup()
    straight_cfg = toy_config(tmp_path / "a", **common)
    straight = train(straight_cfg, records=records, model=model, tokenizer=tok, save_final=False)

    model, tok = _tiny_setup()
    cfg_half = toy_config(tmp_path / "b", train={**common["train"], "save_every": 2}, rollout=common["rollout"])
    first = train(cfg_half, records=records, model=model, tokenizer=tok, save_final=False)
    assert first.steps == 4
    ckpts = sorted((tmp_path / "b" / "run" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-000002", "step-000004"]
    # Throw away the final checkpoint: the run now looks as if it had died after step 2.
    import shutil

    shutil.rmtree(ckpts[-1])
    model, tok = _tiny_setup()  # a fresh process would start from the initial weights
    resumed = train(cfg_half, records=records, model=model, tokenizer=tok, resume=True, save_final=False)
    assert [m["step"] for m in resumed.metrics] == [3, 4]
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, atol=1e-6, rtol=1e-5)
    # The teacher lives in the checkpoint too: compare the saved teachers.
    from safetensors.torch import load_file

    t_straight = load_file(str(tmp_path / "a" / "run" / "checkpoints" / "step-000004" / "teacher.safetensors"))
    t_resumed = load_file(str(tmp_path / "b" / "run" / "checkpoints" / "step-000004" / "teacher.safetensors"))
    for name, value in t_straight.items():
        torch.testing.assert_close(t_resumed[name], value, atol=1e-6, rtol=1e-5)
    lines = (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4]


def test_checkpoint_loads_with_transformers_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = _tiny_setup()
    cfg = toy_config(tmp_path, train={"max_steps": 1, "batch_size": 2})
    result = train(cfg, records=toy_records(), model=model, tokenizer=tok)
    for directory in (result.final_dir, tmp_path / "run" / "checkpoints" / "step-000001"):
        loaded = AutoModelForCausalLM.from_pretrained(directory)
        loaded_tok = AutoTokenizer.from_pretrained(directory)
        for name, value in result.model.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[name], value)
        ids = loaded_tok.apply_chat_template(
            [{"role": "user", "content": "k1"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = loaded.generate(**ids, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == ids["input_ids"].shape[1] + 3 or loaded_tok.eos_token_id in out[0].tolist()


def test_metrics_file_has_the_documented_fields(tmp_path):
    model, tok = _tiny_setup()
    cfg = toy_config(tmp_path, train={"max_steps": 2, "batch_size": 4})
    train(cfg, records=toy_records(), model=model, tokenizer=tok, save_final=False)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for field in (
        "loss",
        "divergence",
        "teacher_minus_student_logp",
        "completion_length",
        "clipped_ratio",
        "teacher_entropy",
        "lr",
        "tokens_per_s",
        "time_rollout",
        "time_teacher",
        "time_student_forward",
        "time_student_backward",
        "time_teacher_update",
        "grad_norm",
    ):
        assert field in rows[0], field
    assert rows[0]["completion_length"] <= 3 and 0 <= rows[0]["clipped_ratio"] <= 1
    assert rows[0]["loss"] == pytest.approx(rows[0]["divergence"])  # forward KL: the loss is the divergence


def test_lora_training_moves_only_the_adapter(tmp_path):
    model, tok = _tiny_setup()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = toy_config(
        tmp_path,
        train={"max_steps": 2, "batch_size": 4, "lr": 1e-2},
        model={"precision": "fp32", "lora": {"enabled": True, "rank": 4, "alpha": 8}},
    )
    result = train(cfg, records=toy_records(), model=model, tokenizer=tok)
    assert (result.final_dir / "adapter" / "adapter_model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(result.final_dir)
    changed = [k for k, v in merged.state_dict().items() if not torch.allclose(v, base[k])]
    assert changed and all("proj" in k for k in changed)


def test_output_dir_holding_another_run_is_refused(tmp_path):
    model, tok = _tiny_setup()
    train(
        toy_config(tmp_path, train={"max_steps": 1, "batch_size": 2}),
        records=toy_records(),
        model=model,
        tokenizer=tok,
        save_final=False,
    )
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(UserError, match="different run"):
        train(
            toy_config(tmp_path, train={"max_steps": 1, "batch_size": 2, "lr": 5e-4}),
            records=toy_records(),
            model=model,
            tokenizer=tok,
        )
    with pytest.raises(UserError, match="--resume"):
        train(
            toy_config(tmp_path, train={"max_steps": 1, "batch_size": 2}),
            records=toy_records(),
            model=model,
            tokenizer=tok,
        )
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


@pytest.mark.parametrize("method", ["sdft", "sft"])
def test_activation_checkpointing_trains_to_the_same_weights(tmp_path, method):
    records = toy_records()
    results = []
    for checkpointing in (False, True):
        model, tok = _tiny_setup()
        cfg = toy_config(
            tmp_path / str(checkpointing),
            method=method,
            train={"max_steps": 3, "batch_size": 4, "lr": 1e-3, "activation_checkpointing": checkpointing},
        )
        results.append(train(cfg, records=records, model=model, tokenizer=tok, save_final=False))
        assert any(getattr(m, "gradient_checkpointing", False) for m in results[-1].model.modules()) == checkpointing
    plain, recomputed = (dict(r.model.named_parameters()) for r in results)
    initial = dict(_tiny_setup()[0].named_parameters())
    assert any(not torch.equal(plain[n], initial[n]) for n in plain)  # training did move the weights
    for name, value in plain.items():
        torch.testing.assert_close(recomputed[name], value, rtol=1e-4, atol=1e-5)


def _direct_demonstration_logp(model, tok, records) -> float:
    """Mean log p(demonstration token | student prompt) over all the records' tokens, computed plainly."""
    from selfdistill.data.prompts import PromptBuilder

    builder = PromptBuilder(tok, template="plain", end_of_turn_id=tok.eos_token_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for record in records:
            encoded = builder.encode(record)
            ids = torch.tensor([encoded.student_ids + encoded.demonstration_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            start = len(encoded.student_ids)
            for j, token in enumerate(encoded.demonstration_ids):
                total += float(logp[start - 1 + j, token])
                count += 1
    return total / count


@pytest.mark.parametrize("method", ["sdft", "sft"])
def test_demonstration_logp_of_a_step_is_that_of_the_model_before_it(tmp_path, method):
    # SDFT never scores the demonstrations in its loss; it measures them with one extra forward. The
    # value is the same quantity SFT's loss gives, so both methods agree with a direct computation.
    records = toy_records()
    model, tok = _tiny_setup()
    expected = _direct_demonstration_logp(model, tok, records)
    cfg = toy_config(
        tmp_path,
        method=method,
        train={"max_steps": 3, "batch_size": len(records), "micro_batch_size": 3, "demonstration_logp_every": 2},
    )
    result = train(cfg, records=records, model=model, tokenizer=tok, save_final=False)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["demonstration_logp"] == pytest.approx(expected, abs=1e-5)
    if method == "sdft":  # measured before steps 1 and 3 only (every 2 steps)
        assert ["demonstration_logp" in r for r in rows] == [True, False, True]
        assert rows[2]["demonstration_logp"] != pytest.approx(expected, abs=1e-4)  # the weights moved
    assert result.steps == 3


def test_a_run_whose_every_step_has_a_zero_gradient_fails_naming_its_settings(tmp_path, monkeypatch, caplog):
    """Loss tokens but no gradient at any step: counted in metrics.jsonl, warned once, and the run fails (status 1)."""
    from selfdistill.errors import RunFailed
    from selfdistill.methods.sft import SFT

    real_loss = SFT.loss

    def cut_off(self, items):  # a loss the trainable weights do not reach: the gradient is exactly 0
        loss, stats = real_loss(self, items)
        return loss * 0.0, stats

    monkeypatch.setattr(SFT, "loss", cut_off)
    model, tok = _tiny_setup()
    cfg = toy_config(tmp_path, method="sft", train={"max_steps": 3})
    with caplog.at_level("WARNING", logger="selfdistill.training.loop"), pytest.raises(RunFailed) as failed:
        train(cfg, records=toy_records(), model=model, tokenizer=tok)
    assert "Nothing was trained" in str(failed.value) and "method=sft, model.lora.enabled=False" in str(failed.value)
    assert sum("gradient of exactly 0" in r.getMessage() for r in caplog.records) == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["zero_grad_steps"] for r in rows] == [1, 2, 3]
    assert all(r["loss_tokens"] > 0 and r["grad_norm"] == 0.0 for r in rows)
    assert not (tmp_path / "run" / "final").exists()


def test_one_zero_gradient_step_is_counted_but_the_run_goes_on(tmp_path, monkeypatch):
    from selfdistill.methods.sft import SFT

    real_loss = SFT.loss
    calls = []

    def first_step_cut_off(self, items):
        calls.append(1)
        loss, stats = real_loss(self, items)
        return (loss * 0.0 if len(calls) <= 2 else loss), stats  # 2 micro-batches per step

    monkeypatch.setattr(SFT, "loss", first_step_cut_off)
    model, tok = _tiny_setup()
    cfg = toy_config(tmp_path, method="sft", train={"max_steps": 3})
    result = train(cfg, records=toy_records(), model=model, tokenizer=tok, save_final=False)
    assert [m["zero_grad_steps"] for m in result.metrics] == [1, 1, 1]
    assert [m["grad_norm"] > 0 for m in result.metrics] == [False, True, True]


def test_a_run_directory_written_with_every_methods_sections_is_resumed(tmp_path):
    """run.json files of earlier versions recorded the sections of every method (replay, anchor, ...) for any
    method; such a directory still holds the same run of sft, and --resume continues it."""
    model, tok = copy_model(steps=0)
    records = toy_records()
    cfg = toy_config(tmp_path, method="sft", train={"max_steps": 2, "save_every": 1})
    first = train(cfg, records=records, model=model, tokenizer=tok, save_final=False)
    run_file = tmp_path / "run" / "run.json"
    recorded = json.loads(run_file.read_text())
    recorded["config"]["replay"] = {"ratio": 0.25, "data": None, "max_new_tokens": 128}
    recorded["config"]["anchor"] = {"beta": 0.1}
    run_file.write_text(json.dumps(recorded))
    resumed = train(cfg, records=records, model=copy_model(steps=0)[0], tokenizer=tok, resume=True, save_final=False)
    assert [m["step"] for m in first.metrics] == [1, 2] and resumed.steps == 2
    # A different setting of its own is still a different run.
    recorded["config"]["train"]["lr"] = 1.0
    run_file.write_text(json.dumps(recorded))
    with pytest.raises(UserError, match="already holds a different run"):
        train(cfg, records=records, model=copy_model(steps=0)[0], tokenizer=tok, resume=True, save_final=False)
