"""Rollout engines are registered like methods: one `EngineInfo` entry makes a toy engine (the decode loop,
recording its calls) a valid `rollout.engine`, and every caller generates through it: evaluation, drift's
base answers, sft_replay's replay answers and SDFT's rollouts."""

from __future__ import annotations

import json

import pytest
from test_methods import method_config
from toy import VALUES, copy_model, toy_records

from selfdistill import registry
from selfdistill.config import Config, load_config
from selfdistill.errors import UserError
from selfdistill.eval.evaluate import evaluate
from selfdistill.sampling import SamplingSettings
from selfdistill.sampling.decode import DecodeSampler
from selfdistill.training.loop import train


class ToySampler(DecodeSampler):
    """The decode loop as an engine of its own, recording every sampler built and every call."""

    built: list[ToySampler] = []

    def __init__(self, model, settings):
        super().__init__(model, settings)
        self.calls: list[tuple] = []
        ToySampler.built.append(self)

    def generate(self, prompts, seeds, *, desc=None, max_new_tokens=None):
        self.calls.append(("generate", len(prompts), max_new_tokens))
        return super().generate(prompts, seeds, desc=desc, max_new_tokens=max_new_tokens)

    def sync(self, model):
        self.calls.append(("sync",))
        return super().sync(model)


def _register(monkeypatch) -> list[ToySampler]:
    ToySampler.built = []
    entry = registry.EngineInfo("toy", "the decode loop, recording its calls", f"{__name__}:ToySampler")
    monkeypatch.setitem(registry.ENGINE_INFO, "toy", entry)
    return ToySampler.built


@pytest.fixture
def toy_engine(monkeypatch) -> list[ToySampler]:
    return _register(monkeypatch)


def test_a_registered_engine_is_a_valid_setting_and_an_unknown_one_is_refused_naming_the_choices(monkeypatch):
    from selfdistill.eval.settings import EvaluateSettings

    with pytest.raises(UserError, match=r"rollout\.engine: unknown .*'toy'; choose one of decode, vllm\."):
        Config(rollout={"engine": "toy"})
    _register(monkeypatch)
    assert Config(rollout={"engine": "toy"}).rollout.engine == "toy"
    assert load_config(overrides=["rollout.engine=toy"]).rollout.engine == "toy"
    with pytest.raises(UserError, match=r"rollout\.engine: unknown .*'unknown'; choose one of decode, vllm, toy\."):
        load_config(overrides=["rollout.engine=unknown"])
    # `sdft eval --engine` (and selfdistill.evaluate's engine=) take the same choices.
    assert EvaluateSettings(engine="toy").engine == "toy"
    with pytest.raises(UserError, match=r"^--engine: unknown .*'unknown'; choose one of decode, vllm, toy\."):
        EvaluateSettings(engine="unknown")


def _exact(output: str, row: dict) -> float:
    return float(output.strip() == row["answer"])


def test_evaluation_and_drift_generate_through_the_engine_they_are_given(toy_engine):
    from selfdistill.eval.drift import base_answers

    model, tok = copy_model(steps=150)
    records = toy_records()
    examples: list[dict] = []
    summary = evaluate(model, tok, records, _exact, max_new_tokens=3, engine="toy", examples=examples)
    (sampler,) = toy_engine
    assert sampler.calls == [("sync",), ("generate", len(records), 3)] and sampler.model is model
    assert sampler.settings.temperature == 0 and sampler.settings.max_new_tokens == 3
    # The same loop behind another name: the same greedy numbers and outputs as the default engine.
    decoded = []
    assert evaluate(model, tok, records, _exact, max_new_tokens=3, examples=decoded) == summary
    assert decoded == examples and len(toy_engine) == 1
    answers = base_answers(model, tok, prompts=["k1", "k2"], max_new_tokens=4, engine="toy")
    assert toy_engine[1].calls == [("sync",), ("generate", 2, 4)]
    assert answers == base_answers(model, tok, prompts=["k1", "k2"], max_new_tokens=4)


def _replay_config(tmp_path, engine: str):
    general = tmp_path / "general.jsonl"
    tmp_path.mkdir(parents=True, exist_ok=True)
    general.write_text("".join(json.dumps({"prompt": v}) + "\n" for v in VALUES))
    return method_config(
        tmp_path,
        "sft_replay",
        rollout={"engine": engine},
        replay={"ratio": 0.25, "data": str(general), "max_new_tokens": 3},
        train={"max_steps": 2},
    )


def test_sft_replay_answers_with_the_runs_engine(tmp_path, toy_engine):
    model, tok = copy_model(steps=150)
    train(_replay_config(tmp_path / "toy", "toy"), records=toy_records(), model=model, tokenizer=tok, save_final=False)
    (sampler,) = toy_engine
    # 2 steps x 2 replay slots: one greedy call for the 4 prompts drawn, then the engine is done.
    assert sampler.calls == [("sync",), ("generate", 4, None)]
    settings = sampler.settings
    assert (settings.temperature, settings.max_new_tokens, settings.stop_token_ids) == (0.0, 3, (tok.eos_token_id,))
    model, tok = copy_model(steps=150)
    train(
        _replay_config(tmp_path / "decode", "decode"),
        records=toy_records(),
        model=model,
        tokenizer=tok,
        save_final=False,
    )
    toy, decode = ((tmp_path / run / "sft_replay" / "replay.jsonl").read_text() for run in ("toy", "decode"))
    assert toy == decode and len(toy.splitlines()) == 4  # the same loop: the same answers


def test_sdft_rolls_out_with_the_runs_engine(tmp_path, toy_engine):
    model, tok = copy_model(steps=150)
    cfg = method_config(tmp_path, "sdft", rollout={"engine": "toy"}, train={"max_steps": 2})
    result = train(cfg, records=toy_records(), model=model, tokenizer=tok, save_final=False)
    (sampler,) = toy_engine  # built once, at the first rollout, synced before every one
    assert sampler.calls == [("sync",), ("generate", 8, None)] * 2
    expected = SamplingSettings.for_rollouts(
        cfg, stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, precision="fp32"
    )
    assert sampler.settings == expected
    assert [m["step"] for m in result.metrics] == [1, 2] and "time_weight_sync" not in result.metrics[0]


def test_sdft_plan_traces_an_engine_that_samples_with_the_trainers_model(tmp_path, toy_engine):
    """`sdft plan` asks the engine, not its name: the toy engine holds no GPU share of its own
    (`Sampler.gpu_memory` is None), so its rollout is traced as it samples, and plans as the decode loop."""
    from test_plan import TINY, tiny_config

    from selfdistill.memory_plan import plan

    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(TINY))
    decode = plan(tiny_config(tmp_path / "tiny"), processes=2, gpu_memory=4.0)
    data = tiny_config(tmp_path / "tiny").to_dict()
    data["rollout"]["engine"] = "toy"
    toy = plan(load_config(overrides=data), processes=2, gpu_memory=4.0)
    (sampler,) = toy_engine
    assert sampler.calls == [("generate", decode.rollout_rows, None)]
    assert toy.fits and (toy.rollout_engine, toy.engine_dtype, toy.engine_share) == ("toy", None, 0)
    assert (toy.rollout_peak, toy.needed) == (decode.rollout_peak, decode.needed)
    assert toy.rows() == decode.rows()  # the same table
