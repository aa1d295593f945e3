"""The decode loop: the same tokens as transformers' `generate`, and no work after every row stopped; the
`Sampler` choice (`make_sampler`) and the callers that sample through it (SDFT, offline_distill, diagnose)."""

from __future__ import annotations

import random

import pytest
import torch

from selfdistill import registry
from selfdistill.config import load_config
from selfdistill.data import PromptBuilder, Record
from selfdistill.errors import UserError
from selfdistill.models.tiny import tiny_model, tiny_tokenizer
from selfdistill.sampling import Completions, Sampler, SamplingSettings, make_sampler
from selfdistill.sampling.decode import DecodeSampler, generate

WORDS = [f"w{i}" for i in range(40)]


def _setup(seed: int = 0):
    tokenizer = tiny_tokenizer(WORDS)
    model = tiny_model(tokenizer, hidden_size=64, layers=2, heads=4, seed=seed)
    rng = random.Random(seed)
    word_ids = tokenizer.convert_tokens_to_ids(WORDS)
    # Prompt lengths 2..13, so every batch of 3 needs left padding.
    prompts = [[rng.choice(word_ids) for _ in range(2 + (7 * i) % 12)] for i in range(10)]
    return model, tokenizer, prompts, word_ids


def _both(model, prompts, **kwargs):
    ours = generate(model, prompts, **kwargs)
    reference = generate(model, prompts, use_hf_generate=True, **kwargs)
    return ours, reference


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.8, 0.7)])
def test_decode_loop_gives_the_tokens_transformers_generate_gives(temperature, top_p):
    model, tokenizer, prompts, word_ids = _setup()
    stops = word_ids[:6]  # frequent enough that some rows stop early, some hit the budget
    ours, reference = _both(
        model,
        prompts,
        stop_token_ids=stops,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=12,
        temperature=temperature,
        top_p=top_p,
        seeds=list(range(100, 110)),
        batch_size=3,
    )
    assert ours.ids == reference.ids
    assert ours.finished == reference.finished
    if temperature > 0:
        assert any(ours.finished) and not all(ours.finished)
        assert {len(ids) for ids in ours.ids} != {12}


def test_decode_loop_matches_generate_for_a_lora_model():
    from selfdistill.models.lora import apply_lora

    model, tokenizer, prompts, word_ids = _setup(seed=1)
    model = apply_lora(model, rank=4)
    with torch.no_grad():  # LoRA's B starts at zero; move it so the adapter changes the outputs
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    ours, reference = _both(
        model,
        prompts,
        stop_token_ids=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=8,
        temperature=1.0,
        seeds=list(range(10)),
        batch_size=4,
    )
    assert ours.ids == reference.ids
    assert ours.finished == reference.finished


def test_no_stop_tokens_means_every_completion_runs_to_the_budget():
    """`rollout.ignore_eos`: the end-of-turn token is sampled like any other and decoding goes on.

    transformers' `generate` falls back to the model's own eos token when given none, and pads
    the row after it; the decode loop does not.
    """
    model, tokenizer, prompts, word_ids = _setup(seed=1)
    eos = tokenizer.eos_token_id
    kwargs = dict(
        stop_token_ids=[],
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=8,
        temperature=1.0,
        seeds=list(range(10)),
        batch_size=4,
    )
    ours = generate(model, prompts, **kwargs)
    assert all(len(ids) == 8 for ids in ours.ids) and not any(ours.finished)
    through_eos = [row for row in ours.ids if eos in row[:-1]]
    assert through_eos  # the case this test is about occurs with these seeds
    reference = generate(model, prompts, use_hf_generate=True, **kwargs)
    for mine, theirs in zip(ours.ids, reference.ids):
        cut = mine.index(eos) + 1 if eos in mine else len(mine)
        assert mine[:cut] == theirs[:cut]


def test_decode_loop_stops_once_every_row_has_stopped():
    model, tokenizer, prompts, word_ids = _setup()
    calls = []
    handle = model.get_decoder().register_forward_hook(lambda *args: calls.append(1))
    everything = list(range(len(tokenizer)))  # every token stops: one forward (the prefill) is all it takes
    out = generate(
        model,
        prompts[:4],
        stop_token_ids=everything,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=50,
        temperature=1.0,
        seeds=[1, 2, 3, 4],
        batch_size=4,
    )
    handle.remove()
    assert len(calls) == 1
    assert all(len(ids) == 1 for ids in out.ids) and all(out.finished)


def _config(tmp_path="unused", method="sdft", **rollout):
    return load_config(
        overrides={
            "method": method,
            "model": {"precision": "fp32"},
            "data": {"teacher_template": "plain", "max_teacher_prompt_tokens": 512},
            "rollout": {"max_new_tokens": 5, "temperature": 0.8, "top_p": 0.9, "batch_size": 3, **rollout},
            "loss": {"skip_first_tokens": 0},
            "train": {"seed": 7, "output_dir": str(tmp_path)},
        }
    )


def test_make_sampler_picks_the_decode_loop_for_engine_decode():
    model, tokenizer, prompts, word_ids = _setup()
    cfg = _config()
    assert cfg.rollout.engine == "decode"
    settings = SamplingSettings.for_rollouts(
        cfg, stop_token_ids=word_ids[:6], pad_token_id=tokenizer.pad_token_id, precision="fp32"
    )
    assert settings == SamplingSettings(5, tuple(word_ids[:6]), tokenizer.pad_token_id, 0.8, 0.9, 3, "fp32")
    sampler = make_sampler(model, settings, engine=cfg.rollout.engine, cfg=cfg)
    assert type(sampler) is DecodeSampler and not sampler.copies_weights
    assert sampler.sync(model) == 0.0
    seeds = list(range(100, 110))
    direct = dict(stop_token_ids=word_ids[:6], pad_token_id=tokenizer.pad_token_id, temperature=0.8, top_p=0.9)
    out = sampler.generate(prompts, seeds)
    expected = generate(model, prompts, max_new_tokens=5, seeds=seeds, batch_size=3, **direct)
    assert out.ids == expected.ids and out.finished == expected.finished and out.logprobs is None
    # A call may ask for fewer new tokens than the sampler was built for, never more.
    shorter = sampler.generate(prompts, seeds, max_new_tokens=2)
    assert shorter.ids == generate(model, prompts, max_new_tokens=2, seeds=seeds, batch_size=3, **direct).ids
    with pytest.raises(ValueError, match="a call may ask for 1 to 5"):
        sampler.generate(prompts, seeds, max_new_tokens=6)
    sampler.close()


def test_an_unknown_engine_is_refused_naming_the_registered_ones():
    model, tokenizer, prompts, word_ids = _setup()
    with pytest.raises(UserError, match=r"^Unknown rollout engine 'vlm'; choose one of decode, vllm\.$"):
        make_sampler(model, SamplingSettings(5, (), 0), engine="vlm")


class FakeSampler(Sampler):
    """An engine that answers every prompt with the same tokens and records how it was used."""

    copies_weights = True
    built: list[FakeSampler] = []

    def __init__(self, model, settings, max_prompt_tokens):
        self.model, self.settings, self.max_prompt_tokens = model, settings, max_prompt_tokens
        self.calls, self.closed = [], False
        FakeSampler.built.append(self)

    @classmethod
    def build(cls, model, settings, *, cfg, max_prompt_tokens):
        return cls(model, settings, max_prompt_tokens)

    def generate(self, prompts, seeds, *, desc=None, max_new_tokens=None):
        self.calls.append(("generate", len(prompts), list(seeds)))
        ids = [[7 + k % 3, 8] for k in range(len(prompts))]
        return Completions(ids=ids, finished=[True] * len(ids), logprobs=[[-0.5, -0.25] for _ in ids])

    def sync(self, model):
        self.calls.append(("sync", model))
        return 0.125

    def close(self):
        self.closed = True


@pytest.fixture
def fake_engine(monkeypatch):
    """`rollout.engine: decode` builds the fake sampler: every caller's samples come from it."""
    FakeSampler.built = []
    entry = registry.EngineInfo("decode", "answers with fixed tokens", f"{__name__}:FakeSampler")
    monkeypatch.setitem(registry.ENGINE_INFO, "decode", entry)
    return FakeSampler.built


def _records():
    return [Record(prompt=f"{w} ?", demonstration=f"{w} .", answer=w) for w in WORDS[:3]]


def _method(name, tmp_path):
    from selfdistill.methods.build import build_method

    tokenizer = tiny_tokenizer(WORDS)
    model = tiny_model(tokenizer, hidden_size=64, layers=2, heads=4, seed=0)
    cfg = _config(tmp_path, num_rollouts=2, method=name)
    builder = PromptBuilder.from_config(tokenizer, cfg.data, tokenizer.eos_token_id)
    method = build_method(cfg, model, tokenizer, builder, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    return method, builder.encode_all(_records())


def test_sdft_samples_through_its_sampler_built_once_and_synced_before_every_rollout(tmp_path, fake_engine):
    method, records = _method("sdft", tmp_path)
    assert fake_engine == []  # nothing is built before the first rollout
    seeds = list(range(6))
    for _ in range(2):
        items, stats = method.build_items(records, seeds, step=1)
    (sampler,) = fake_engine
    assert sampler.model is method.model and list(sampler.settings.stop_token_ids) == method.stop_token_ids
    assert [c[0] for c in sampler.calls] == ["sync", "generate"] * 2
    assert sampler.calls[1] == ("generate", 6, seeds)  # num_rollouts completions per record
    assert [i.completion for i in items] == [[7 + k % 3, 8] for k in range(6)]
    assert all(i.extra["sampler_logp"] == [-0.5, -0.25] for i in items)  # for importance sampling
    assert stats["time_weight_sync"] == 0.125 and not sampler.closed


def test_offline_distill_asks_its_sampler_for_the_teacher_answers_then_closes_it(tmp_path, fake_engine):
    method, records = _method("offline_distill", tmp_path)
    method.setup(records, total_steps=1, resuming=False)
    (sampler,) = fake_engine
    assert sampler.model is method.teacher.module  # the frozen teacher's copy answers
    assert sampler.max_prompt_tokens == 512  # sized for teacher prompts
    assert [c[0] for c in sampler.calls] == ["sync", "generate"] and sampler.closed
    assert method.targets == {r.index: [7 + k % 3, 8] for k, r in enumerate(records)}


def test_diagnose_samples_through_the_sampler(fake_engine):
    from selfdistill.diagnosis import core

    tokenizer = tiny_tokenizer(WORDS)
    model = tiny_model(tokenizer, hidden_size=64, layers=2, heads=4, seed=0)
    cfg = _config(num_rollouts=2)
    traces = core.trace(model, tokenizer, _records(), cfg, [tokenizer.eos_token_id])
    (sampler,) = fake_engine
    assert [c[0] for c in sampler.calls] == ["sync", "generate"] and sampler.closed
    ids = [c.token_ids for r in traces for c in r.completions]
    assert ids == [[7 + k % 3, 8] for k in range(6)]
    assert all(len(c.student_logp) == 2 and len(c.divergence) == 2 for r in traces for c in r.completions)
