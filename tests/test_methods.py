import json
import os
import subprocess
import sys

import pytest
import torch
from toy import KEYS, VALUES, copy_model, greedy_accuracy, toy_records

from selfdistill import registry
from selfdistill.config import METHODS, Config, for_method, load_config, settings_of
from selfdistill.data import PromptBuilder, Record
from selfdistill.methods import Method, get_method
from selfdistill.methods.base import completion_hidden, demonstration_items
from selfdistill.methods.build import build_method
from selfdistill.models.card import render_model_card
from selfdistill.models.tiny import save_tiny, tiny_model, tiny_tokenizer
from selfdistill.registry import METHOD_INFO, method_class
from selfdistill.training.loop import train

DOCS = ["k1 v1 k2 v2 k3 v3 .", "k4 v4 k5 v5 k6 v6 .", "k7 v7 k0 v0 ."]


def method_config(tmp_path, method, **sections):
    base = {
        "method": method,
        "model": {"precision": "fp32"},
        "data": {"teacher_template": "plain"},
        "rollout": {"max_new_tokens": 3},
        "loss": {"skip_first_tokens": 0},
        "reinvoke": {"steps": 4, "prompts": None},
        "train": {
            "output_dir": str(tmp_path / method),
            "batch_size": 8,
            "micro_batch_size": 4,
            "lr": 3e-3,
            "warmup_ratio": 0.0,
        },
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return load_config(overrides=for_method(base, method))  # the sections this method has


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_declares_what_the_config_and_the_card_read(name):
    info = METHOD_INFO[name]
    assert info.name == name and get_method(name) is method_class(name) and issubclass(get_method(name), Method)
    assert info.summary and info.card.endswith(".")
    keys = [key for _, _, _, key in settings_of(Config())]
    for own in info.settings:  # each one a section or a key of the config
        assert any(key == own or key.startswith(own + ".") for key in keys), own


def _card_keys(card: str) -> set[str]:
    """The settings in a card's table: the `key` of each row."""
    return {line.split("(`")[1].split("`)")[0] for line in card.splitlines() if line.startswith("| ") and "(`" in line}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_model_card_states_only_what_the_method_reads(name):
    info = METHOD_INFO[name]
    cfg = Config(method=name)
    card = render_model_card(cfg)
    keys = _card_keys(card)
    assert f"**Method**: `{name}` — {info.card}" in card
    for other in METHOD_INFO.values():  # another method's own settings: never; its own: always
        for own in other.settings:
            assert any(k == own or k.startswith(own + ".") for k in keys) == (other.name == name or info.reads(own))
    step = info.step
    samples = step.trains_on in ("rollouts", "teacher answers")
    assert ("rollout.temperature" in keys) == samples and ("rollout.num_rollouts" in keys) == info.on_policy
    # teacher.* rows only where teacher.kind chooses; a fixed teacher is stated from the declaration
    assert {k for k in keys if k.startswith("teacher.")} == (
        {"teacher.kind", "teacher.ema_rate"} if step.teacher == "configured" else set()
    )
    assert ("**Teacher**:" in card) == (step.teacher is not None)
    if step.fixed_teacher:
        assert "**Teacher**: the starting model, frozen" in card
    assert ("without the demonstration" in card) == (step.teacher_sees == "prompt")
    assert ("data.teacher_template" in keys) == (step.teacher_sees == "demonstration")
    assert ("loss.kind" in keys) == (step.matches_teacher and step.teacher_runs(cfg))
    assert ("loss.skip_first_tokens" in keys) == (step.skips_first_tokens and step.teacher_runs(cfg))


def test_the_sft_reinvoke_card_describes_its_frozen_teacher_without_a_demonstration():
    card = render_model_card(Config(method="sft_reinvoke"))
    assert "**Teacher**: the starting model, frozen (never updated); shown the student's prompt, without" in card
    assert "EMA" not in card and "teacher.kind" not in card and "teacher_template" not in card
    assert "skip_first_tokens" not in card  # its recovery phase counts every completion token
    # what the method declares decides, not what the config holds: a teacher-less method shows no teacher
    assert "teacher" not in render_model_card(Config(method="sft")).split("## Settings")[1].split("## Final")[0]


def test_the_card_shows_the_ema_rate_only_for_an_ema_teacher_and_a_teacher_that_does_not_run():
    assert "teacher.ema_rate" not in render_model_card(Config(method="sdft", teacher={"kind": "frozen"}))
    assert "teacher.ema_rate" in render_model_card(Config(method="sdft"))
    off = render_model_card(Config(method="sft_kl", anchor={"beta": 0.0}))
    assert "not run in this configuration (`anchor.beta`)" in off
    divergence = _card_keys(render_model_card(Config(method="offline_distill", offline={"loss": "divergence"})))
    assert {"loss.kind", "loss.skip_first_tokens", "data.teacher_template"} <= divergence


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_method_is_handed_the_parts_its_registry_entry_declares(name, tmp_path):
    """The registry's declaration (read by the card, the planner and the config) is what builds the method's
    parts: a teacher of the declared kind where its step has one, rollouts where it trains on them."""
    step = METHOD_INFO[name].step
    model, tok = copy_model(steps=0)
    cfg = method_config(tmp_path, name)
    method = build_method(cfg, model, tok, PromptBuilder(tok), [tok.eos_token_id], tok.pad_token_id)
    assert isinstance(method, method_class(name)) and method.model is model
    assert (method.teacher is not None) == (step.teacher is not None)
    if step.teacher is not None:
        assert method.teacher.kind == (step.fixed_teacher or cfg.teacher.kind)
    assert (method.rollouts is not None) == (step.trains_on == "rollouts")


class Echo(Method):
    """A method that lives only in this test module: SFT's loss, from the shared pieces."""

    def build_items(self, records, seeds, step):
        return demonstration_items(records), {}

    def loss(self, items):
        return self.supervised_loss(items)


def test_a_new_method_is_its_module_and_one_registry_entry(tmp_path, monkeypatch):
    card_line = "Trained by a method the tests define."
    monkeypatch.setitem(
        registry.METHOD_INFO, "echo", registry.MethodInfo("echo", "A test method.", f"{__name__}:Echo", card_line)
    )
    assert METHODS["echo"] == "A test method."
    model, tok = copy_model(steps=150)
    # model.precision auto: the card says what the run computed in (fp32, for a model on the CPU).
    cfg = method_config(tmp_path, "echo", model={"precision": "auto"}, train={"max_steps": 1})
    result = train(cfg, records=toy_records(), model=model, tokenizer=tok)
    assert [m["step"] for m in result.metrics] == [1] and result.metrics[0]["loss"] > 0
    card = (tmp_path / "echo" / "final" / "README.md").read_text()
    assert f"**Method**: `echo` — {card_line}" in card and "tags: [selfdistill, echo]" in card
    assert "| precision (`model.precision`) | fp32 |" in card


def test_the_model_card_shows_the_precision_the_run_used():
    cfg = Config(method="sft")
    assert "| precision (`model.precision`) | bf16 |" in render_model_card(cfg, precision="bf16")
    assert "| precision (`model.precision`) | auto |" in render_model_card(cfg)  # not known: the config's value


@pytest.mark.parametrize("method", ["sft", "dft", "offline_distill", "cpt", "sdft"])
def test_loss_goes_down_on_a_small_dataset(tmp_path, method):
    model, tok = copy_model(steps=150)
    records = [
        Record(prompt=r.prompt, demonstration=r.demonstration, answer=r.answer, context=d)
        for r, d in zip(toy_records(), DOCS * 3)
    ]
    extra = {"offline": {"loss": "ce"}} if method == "offline_distill" else {}
    cfg = method_config(tmp_path, method, train={"max_steps": 24}, **extra)
    result = train(cfg, records=records, model=model, tokenizer=tok, save_final=False)
    losses = [m["loss"] for m in result.metrics]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.7 * first, (method, losses)


@pytest.mark.parametrize("method", ["sft", "dft"])
def test_sft_and_dft_raise_greedy_accuracy_on_the_copy_task(tmp_path, method):
    model, tok = copy_model(steps=150)
    records = toy_records()
    before = greedy_accuracy(model, tok, records)
    result = train(
        method_config(tmp_path, method, train={"max_steps": 30}),
        records=records,
        model=model,
        tokenizer=tok,
        save_final=False,
    )
    after = greedy_accuracy(result.model, tok, records)
    assert after >= before + 0.5, (before, after)


def test_sft_puts_loss_on_exactly_the_demonstration_and_end_of_turn(tmp_path):
    tok = tiny_tokenizer(KEYS + VALUES)
    model = tiny_model(tok)
    cfg = method_config(tmp_path, "sft")
    builder = PromptBuilder(tok)
    encoded = builder.encode_all([Record(prompt="k1 k2", demonstration="v3 v4")])
    method = build_method(cfg, model, tok, builder, [tok.eos_token_id], tok.pad_token_id)
    (item,), _ = method.build_items(encoded, [0], 0)
    assert item.prompt_ids == encoded[0].student_ids
    assert tok.convert_ids_to_tokens(item.completion) == ["v3", "v4", "<|end|>"]
    _, tokens = completion_hidden(model, [item], False, tok.pad_token_id, "fp32")
    assert tok.convert_ids_to_tokens(tokens.tolist()) == ["v3", "v4", "<|end|>"]  # no prompt token
    loss, _ = method.loss([item])
    logits = model(input_ids=torch.tensor([item.prompt_ids + item.completion])).logits[0]
    p = len(item.prompt_ids)
    expected = torch.nn.functional.cross_entropy(logits[p - 1 : p + 2], torch.tensor(item.completion), reduction="sum")
    assert loss.item() == pytest.approx(expected.item(), abs=1e-4)


def test_dft_weights_tokens_by_their_constant_probability(tmp_path):
    from selfdistill.methods.dft import DFT

    method = DFT.__new__(DFT)
    lp = torch.log(torch.tensor([0.5, 0.1])).requires_grad_(True)
    method.per_token_loss(lp).sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([-0.5, -0.1]))


def test_offline_distill_asks_the_teacher_once_per_record_and_reuses_it(tmp_path, monkeypatch):
    import selfdistill.sampling.decode as offline  # the decode loop the teacher's answers run

    calls = []
    real = offline.generate

    def counting(model, prompts, **kwargs):
        calls.append(len(prompts))
        return real(model, prompts, **kwargs)

    monkeypatch.setattr(offline, "generate", counting)
    model, tok = copy_model(steps=150)
    records = toy_records()
    cfg = method_config(
        tmp_path,
        "offline_distill",
        train={"max_steps": 6, "batch_size": 4, "save_every": 3},
        offline={"loss": "divergence"},
    )
    result = train(cfg, records=records, model=model, tokenizer=tok, save_final=False)
    assert calls == [len(records)]  # one generation call, one answer per record, over 6 steps
    targets = [json.loads(l) for l in (tmp_path / "offline_distill" / "offline_targets.jsonl").read_text().splitlines()]
    assert sorted(t["index"] for t in targets) == list(range(len(records)))
    # The teacher copies the demonstration, so its stored answers are the demonstrated values.
    assert sum(tok.convert_ids_to_tokens(t["ids"])[0] == records[t["index"]].answer for t in targets) >= 6
    # resuming reuses the stored answers instead of asking the teacher again
    import shutil

    shutil.rmtree(tmp_path / "offline_distill" / "checkpoints" / "step-000006")
    calls.clear()
    train(cfg, records=records, model=copy_model(steps=150)[0], tokenizer=tok, resume=True, save_final=False)
    assert calls == []
    assert all(m["finite"] for m in result.metrics)


def test_sft_reinvoke_runs_both_phases(tmp_path):
    model, tok = copy_model(steps=150)
    prompts = tmp_path / "general.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": k}) + "\n" for k in KEYS))
    cfg = method_config(
        tmp_path,
        "sft_reinvoke",
        train={"max_steps": 3, "batch_size": 4},
        reinvoke={"steps": 2, "prompts": str(prompts)},
    )
    result = train(cfg, records=toy_records(), model=model, tokenizer=tok, save_final=False)
    assert [m["step"] for m in result.metrics] == [1, 2, 3, 4, 5]
    assert all("demonstration_logp" in m for m in result.metrics[:3])  # phase 1: SFT
    assert all("divergence" in m and "completion_length" in m for m in result.metrics[3:])  # phase 2: distillation


def test_cpt_trains_on_document_pieces(tmp_path):
    model, tok = copy_model(steps=150)
    docs = tmp_path / "docs.txt"
    docs.write_text("\n\n".join(DOCS))
    cfg = method_config(
        tmp_path, "cpt", train={"max_steps": 2, "batch_size": 3}, data={"documents": str(docs), "max_prompt_tokens": 5}
    )
    result = train(cfg, records=toy_records(), model=model, tokenizer=tok, save_final=False)
    # Documents of 7, 7 and 5 tokens + end of text, cut into 6 pieces of at most 5 tokens that overlap by one:
    # 2 steps of 3 pieces see every piece once, and every token after a document's first is predicted once.
    assert sum(m["loss_tokens"] for m in result.metrics) == 7 + 7 + 5


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_from_the_cli(tmp_path, method):
    model_dir = save_tiny(tmp_path / "tiny", KEYS + VALUES)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r.to_dict() | {"context": d}) + "\n" for r, d in zip(toy_records(), DOCS * 3)))
    prompts = tmp_path / "general.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": k}) + "\n" for k in KEYS))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SELFDISTILL_PROGRESS": "0"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "selfdistill.cli",
            "train",
            "--method",
            method,
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--max-steps",
            "1",
            "--batch-size",
            "2",
            "-o",
            str(tmp_path / "run"),
            "-s",
            "rollout.max_new_tokens=3",
            "-s",
            "model.precision=fp32",
        ]
        # Its own settings, for the method that has them (another method refuses them).
        + (["-s", "reinvoke.steps=1", "-s", f"reinvoke.prompts={prompts}"] if method == "sft_reinvoke" else []),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == ([1, 2] if method == "sft_reinvoke" else [1])
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_help_lists_every_method_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "selfdistill.cli", "train", "--help"], capture_output=True, text=True)
    for name in METHODS:
        assert f"{name}:" in proc.stdout


def test_offline_distill_scores_each_fixed_target_once_with_the_same_losses(tmp_path, monkeypatch):
    import selfdistill.methods.base as base
    import selfdistill.methods.scoring as scoring_module
    from selfdistill.methods.offline_distill import OfflineDistill

    scored = []
    real = base.completion_hidden

    def counting(model, items, use_teacher_prompt, *args):
        if use_teacher_prompt:
            scored.extend(i.record_index for i in items)
        return real(model, items, use_teacher_prompt, *args)

    monkeypatch.setattr(scoring_module, "completion_hidden", counting)
    model, tok = copy_model(steps=150)
    records = toy_records()
    steps = 2 * len(records) // 4 + 1  # more than two epochs
    runs = {}
    for cached in (True, False):
        monkeypatch.setattr(OfflineDistill, "cache_teacher_scores", cached)
        scored.clear()
        cfg = method_config(
            tmp_path / str(cached),
            "offline_distill",
            offline={"loss": "divergence"},
            train={"max_steps": steps, "batch_size": 4},
        )
        runs[cached] = (
            train(cfg, records=records, model=copy_model(steps=150)[0], tokenizer=tok, save_final=False),
            list(scored),
        )
    cached_run, cached_scored = runs[True]
    plain_run, plain_scored = runs[False]
    assert sorted(cached_scored) == list(range(len(records)))  # each record's target scored once
    assert len(plain_scored) == 4 * steps  # without the cache: every item of every step
    for a, b in zip(cached_run.metrics, plain_run.metrics):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
