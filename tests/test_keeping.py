"""The methods that try to learn without forgetting: sft_replay, sft_kl and SDFT + SFT (loss.sft_weight).

Each must learn the toy mapping; each reduces to its parent at its knob's zero; the replay share
and the replay set are what the settings say; a stopped run resumes exactly. (Every configuration
learning in one and in two processes, full and LoRA, is tests/test_learning.py.)
"""

import json
import re
import shutil

import pytest
import torch
from test_methods import method_config
from toy import VALUES, copy_model, greedy_accuracy, toy_records

from selfdistill.config import load_config
from selfdistill.errors import UserError
from selfdistill.training.loop import train


def config(tmp_path, method, **sections):
    """test_methods' toy settings, writing to tmp_path/run, replaying the toy's general prompts."""
    train = {"output_dir": str(tmp_path / "run"), **sections.pop("train", {})}
    replay = {"data": str(general_file(tmp_path)), "max_new_tokens": 3, **sections.pop("replay", {})}
    return method_config(tmp_path, method, train=train, replay=replay, **sections)


def general_file(tmp_path):
    """Replay prompts of the toy vocabulary that are not the task's keys: the values themselves."""
    path = tmp_path / "general.jsonl"
    if not path.exists():
        tmp_path.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"prompt": v}) + "\n" for v in VALUES))
    return path


def run(cfg, steps=None, **kwargs):
    model, tok = copy_model(steps=150)
    return train(cfg, records=toy_records(), model=model, tokenizer=tok, save_final=False, **kwargs), tok


@pytest.mark.parametrize(
    "method,sections",
    [
        ("sft_replay", {"replay": {"ratio": 0.25}}),
        ("sft_kl", {"anchor": {"beta": 0.5}}),
        ("sdft", {"loss": {"sft_weight": 1.0}}),
    ],
    ids=["sft_replay", "sft_kl", "sdft+sft"],
)
def test_each_keeping_method_learns_the_toy_mapping(tmp_path, method, sections):
    model, tok = copy_model(steps=150)
    records = toy_records()
    before = greedy_accuracy(model, tok, records)
    assert before <= 0.25
    result = train(
        config(tmp_path, method, train={"max_steps": 40}, **sections),
        records=records,
        model=model,
        tokenizer=tok,
        save_final=False,
    )
    after = greedy_accuracy(result.model, tok, records)
    assert after >= 0.75, (method, before, after)
    losses = [m["loss"] for m in result.metrics]
    assert sum(losses[-3:]) < 0.5 * sum(losses[:3]), losses


def test_sft_kl_with_beta_zero_is_sft(tmp_path):
    sft, _ = run(config(tmp_path / "sft", "sft", train={"max_steps": 3}))
    kl, _ = run(config(tmp_path / "kl", "sft_kl", anchor={"beta": 0.0}, train={"max_steps": 3}))
    assert [m["loss"] for m in kl.metrics] == pytest.approx([m["loss"] for m in sft.metrics], rel=1e-6, abs=1e-7)
    assert sft.metrics[-1]["loss"] < sft.metrics[0]["loss"]  # both learned
    for name, value in sft.model.state_dict().items():
        torch.testing.assert_close(kl.model.state_dict()[name], value, atol=1e-6, rtol=1e-6)


def test_sft_kl_keeps_the_model_closer_to_where_it_started(tmp_path):
    """The anchor does what it is for: after the same steps, the KL from the starting model is smaller."""
    from selfdistill.data import PromptBuilder
    from selfdistill.distillation.losses import divergence

    def kl_from_start(model, start, tok):
        builder = PromptBuilder(tok, template="plain")
        rows = [builder.encode_messages(builder.student_messages(r)) for r in toy_records()]
        ids = torch.tensor(rows)  # the toy prompts all have the same length
        with torch.no_grad():
            return float(divergence(model(input_ids=ids).logits[:, -1], start(input_ids=ids).logits[:, -1]).mean())

    start, tok = copy_model(steps=150)
    outcomes = {}
    for beta in (0.0, 2.0):
        result, _ = run(config(tmp_path / str(beta), "sft_kl", anchor={"beta": beta}, train={"max_steps": 40}))
        outcomes[beta] = (kl_from_start(result.model, start, tok), greedy_accuracy(result.model, tok, toy_records()))
    (kl_free, acc_free), (kl_anchored, acc_anchored) = outcomes[0.0], outcomes[2.0]
    assert acc_free >= 0.75 and acc_anchored >= 0.75, outcomes  # both learned the mapping
    assert kl_anchored < 0.7 * kl_free, outcomes


def test_sdft_with_sft_weight_zero_is_sdft_and_the_sft_term_is_logged_apart(tmp_path):
    plain, _ = run(config(tmp_path / "a", "sdft", train={"max_steps": 3}))
    zero, _ = run(config(tmp_path / "b", "sdft", loss={"sft_weight": 0.0}, train={"max_steps": 3}))
    assert [m["loss"] for m in zero.metrics] == pytest.approx([m["loss"] for m in plain.metrics], rel=1e-6, abs=1e-7)
    assert plain.metrics[-1]["loss"] < plain.metrics[0]["loss"]
    assert "sft_loss" not in plain.metrics[0]

    # With λ > 0: loss = divergence (per rollout token) + λ · sft_loss (per demonstration token);
    # two rollouts per prompt must not count a demonstration twice.
    sft, _ = run(config(tmp_path / "c", "sft", train={"max_steps": 1}))
    for rollouts in (1, 2):
        hybrid, _ = run(
            config(
                tmp_path / f"d{rollouts}",
                "sdft",
                loss={"sft_weight": 0.7},
                rollout={"num_rollouts": rollouts},
                train={"max_steps": 3},
            )
        )
        for m in hybrid.metrics:
            assert m["loss"] == pytest.approx(m["divergence"] + 0.7 * m["sft_loss"], rel=1e-5)
            assert m["demonstration_logp"] == pytest.approx(-m["sft_loss"], rel=1e-6)
        # Before any update the SFT term is SFT's own loss on the same records.
        assert hybrid.metrics[0]["sft_loss"] == pytest.approx(sft.metrics[0]["loss"], rel=1e-5)
        assert hybrid.metrics[-1]["sft_loss"] < hybrid.metrics[0]["sft_loss"]


def test_replay_steps_hold_the_configured_share(tmp_path):
    for batch, ratio, expected in ((8, 0.25, 2), (4, 0.5, 2), (8, 0.1, 1)):
        out = tmp_path / f"{batch}-{ratio}"
        result, _ = run(
            config(out, "sft_replay", replay={"ratio": ratio}, train={"max_steps": 4, "batch_size": batch, "lr": 1e-3})
        )
        assert [m["replay_examples"] for m in result.metrics] == [expected] * 4
        assert all(m["replay_logp"] < 0 and m["demonstration_logp"] < 0 for m in result.metrics)


def test_replay_leaves_every_training_record_once_per_pass(tmp_path):
    """The replay slots take the place of new data: epochs still count passes over the records."""
    cfg = config(tmp_path, "sft_replay", replay={"ratio": 0.25}, train={"batch_size": 4, "epochs": 2.0})
    result, _ = run(cfg)
    assert result.steps == 6  # 2 passes over 8 records at 3 records a step

    from selfdistill.methods.sft_replay import SFTReplay, replay_slots

    assert replay_slots(8, 0.25) == [False, False, False, True, False, False, False, True]
    method = SFTReplay.__new__(SFTReplay)
    method.cfg, method.slots = cfg, replay_slots(4, 0.25)
    method.replay = [f"r{k}" for k in range(5)]
    records = list(range(8))
    seen = [x for step in range(6) for x in method.step_examples(records, list(range(4 * step, 4 * step + 4)), step)]
    task = [x for x in seen if isinstance(x, int)]
    assert len(task) == 18 and sorted(task[:8]) == records and sorted(task[8:16]) == records
    assert [x for x in seen[3::4]] == [x for x in seen if isinstance(x, str)]  # the last slot of each step


def test_replay_set_is_generated_once_cached_and_resumed(tmp_path, monkeypatch):
    from selfdistill.methods.sft_replay import SFTReplay

    cfg = config(tmp_path, "sft_replay", replay={"ratio": 0.25}, train={"max_steps": 4, "save_every": 2})
    first, _ = run(cfg)
    start = copy_model(steps=150)[0].state_dict()
    moved = max(float((value - start[name]).abs().max()) for name, value in first.model.state_dict().items())
    assert moved > 1e-3  # the straight run trained
    rows = [json.loads(line) for line in (tmp_path / "run" / "replay.jsonl").read_text().splitlines()]
    # As many prompts as the run draws (4 steps x 2), capped at the 8 prompts of the file.
    assert len(rows) == 8 and {r["prompt"] for r in rows} == set(VALUES)
    assert all(r["answer_ids"] and isinstance(r["answer"], str) for r in rows)

    # The same run stopped after step 2: the resumed run reads the answers instead of writing them again.
    cfg2 = config(tmp_path / "b", "sft_replay", replay={"ratio": 0.25}, train={"max_steps": 4, "save_every": 2})
    run(cfg2)
    shutil.rmtree(tmp_path / "b" / "run" / "checkpoints" / "step-000004")
    monkeypatch.setattr(SFTReplay, "_generate", lambda *a: pytest.fail("the replay answers were generated again"))
    resumed, _ = run(cfg2, resume=True)
    assert [m["step"] for m in resumed.metrics] == [3, 4]
    assert [m["loss"] for m in resumed.metrics] == pytest.approx([m["loss"] for m in first.metrics[2:]], rel=1e-6)
    for name, value in first.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, atol=1e-6, rtol=1e-6)


def test_replay_generation_continues_where_a_stopped_start_left_off(tmp_path, monkeypatch):
    from selfdistill.methods import sft_replay

    cfg = config(tmp_path, "sft_replay", replay={"ratio": 0.25}, train={"max_steps": 2})
    run(cfg)
    path = tmp_path / "run" / "replay.jsonl"
    full = path.read_text().splitlines()
    assert len(full) == 4  # 2 steps x 2 replay examples
    path.write_text(full[0] + "\n" + full[1][:20])  # killed while writing the second answer
    cfg = config(tmp_path, "sft_replay", replay={"ratio": 0.25}, train={"max_steps": 2})
    # With checkpoints on disk the starting model is gone: the missing answers cannot be written.
    with pytest.raises(UserError, match="replay answers are incomplete"):
        run(cfg, resume=True)
    # Killed while answering (before any checkpoint): the run continues from the last answer written.
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    (tmp_path / "run" / "metrics.jsonl").unlink()

    counted = {}
    original = sft_replay.SFTReplay._generate

    def counting(self, missing, *args):
        counted["missing"] = len(missing)
        return original(self, missing, *args)

    monkeypatch.setattr(sft_replay.SFTReplay, "_generate", counting)
    run(cfg, resume=True)
    assert counted["missing"] == 3
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    assert {r["index"]: r["answer_ids"] for r in rows} == {
        json.loads(l)["index"]: json.loads(l)["answer_ids"] for l in full
    }


def test_the_default_replay_set_is_the_built_in_general_prompts(tmp_path):
    from selfdistill.data.general import general_prompts

    cfg = config(tmp_path, "sft_replay", replay={"ratio": 0.25, "data": None}, train={"max_steps": 2})
    run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "replay.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["prompt"] for r in rows} <= set(general_prompts())


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def test_replay_prompts_never_repeat_a_probe_or_a_drift_prompt():
    from selfdistill.data.general import general_prompts
    from selfdistill.eval.drift import drift_prompts
    from selfdistill.eval.probes import load_suite

    replay = [_normalise(p) for p in general_prompts()]
    held = [_normalise(item["prompt"]) for item in load_suite("general")] + [_normalise(p) for p in drift_prompts()]
    assert len(replay) >= 100 and len(set(replay)) == len(replay)
    assert not set(replay) & set(held)

    def five_grams(text):
        words = text.split()
        return {tuple(words[i : i + 5]) for i in range(len(words) - 4)}

    held_grams = set().union(*(five_grams(t) for t in held))
    assert [p for p in replay if five_grams(p) & held_grams] == []


def test_sft_reinvoke_recovers_on_the_general_prompts_not_on_the_probes():
    from selfdistill.data.general import general_prompts
    from selfdistill.methods.sft_reinvoke import general_prompts as reinvoke_prompts

    assert reinvoke_prompts(None) == general_prompts()


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"method": "sft", "loss": {"sft_weight": 0.5}}, "loss.sft_weight"),
        ({"method": "sdft", "loss": {"sft_weight": -1.0}}, "loss.sft_weight"),
        ({"method": "sft_replay", "replay": {"ratio": 1.0}}, "replay.ratio"),
        ({"method": "sft_kl", "anchor": {"beta": -0.1}}, "anchor.beta"),
    ],
)
def test_bad_keeping_settings_name_the_key(overrides, key):
    with pytest.raises(UserError, match=re.escape(key)):
        load_config(overrides=overrides)


def test_a_replay_share_that_rounds_to_nothing_is_refused_when_the_config_is_built(tmp_path):
    with pytest.raises(UserError, match=r"replay.ratio: 0.05 of train.batch_size 4 is 0 replay examples"):
        config(tmp_path, "sft_replay", replay={"ratio": 0.05}, train={"max_steps": 2, "batch_size": 4})
    config(tmp_path, "sft", replay={"ratio": 0.05}, train={"max_steps": 2, "batch_size": 4})  # other methods: unused


def test_the_keeping_methods_run_in_the_continual_runner_and_its_report(tmp_path):
    """Each keeping method over a grid, in a stream of two tasks: results, frontier and report name them."""
    from test_continual_pipeline import write_stream

    from selfdistill.continual.config import load_continual_config
    from selfdistill.continual.runner import Runner
    from selfdistill.report import write_report

    methods = [
        {"name": "replay", "method": "sft_replay", "overrides": {"replay": {"ratio": 0.25, "max_new_tokens": 3}}},
        {"name": "kl", "method": "sft_kl", "overrides": {"anchor": {"beta": 1.0}}},
        {
            "name": "sdft+sft",
            "method": "sdft",
            "overrides": {"loss": {"sft_weight": 1.0}, "teacher": {"kind": "frozen"}},
        },
        {"name": "sft", "method": "sft"},
    ]
    path, _ = write_stream(tmp_path, methods=methods, grid={"train.lr": [1e-3, 3e-3]})
    Runner(load_continual_config(path)).run()
    out = tmp_path / "run"
    paths = write_report(out)
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and set(results["frontier"]["groups"]) == {"replay", "kl", "sdft+sft", "sft"}
    assert results["frontier"]["same_grid"]
    for name, entry in results["methods"].items():
        assert entry["seeds"]["0"]["drift_kl"][2] > 0, name  # every sequence moved the weights
    replay_run = out / "methods" / "replay@lr=1e-3" / "seed-0" / "stage-1" / "train"
    assert len((replay_run / "replay.jsonl").read_text().splitlines()) == 2  # 2 steps x 1 replay example
    metrics = [json.loads(line) for line in (replay_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["replay_examples"] for m in metrics] == [1, 1]
    html = paths["html"].read_text()
    assert all(name in html for name in ("replay@lr=1e-3", "kl@lr=3e-3", "sdft+sft@lr=1e-3"))

    # The experiment's tables: a row per method and rate; each keeping method against SFT at its rate.
    from experiments.keeping.tables import tables

    scores, against = tables(results).split("Against SFT")
    assert scores.count("| replay | 1e-3 |") == 1 and scores.count("| sft | 3e-3 |") == 1
    assert "| sft |" not in against and against.count("| kl |") == 2
    assert all(row.count(" vs ") == 3 for row in against.splitlines() if row.startswith("| kl |"))


@pytest.mark.parametrize(
    "method,sections",
    [("sft_kl", {"anchor": {"beta": 0.5}}), ("sdft", {"loss": {"sft_weight": 0.5}})],
    ids=["sft_kl", "sdft+sft"],
)
def test_a_stopped_keeping_run_resumes_exactly(tmp_path, method, sections):
    straight, _ = run(config(tmp_path / "a", method, train={"max_steps": 4}, **sections))
    stopped = config(tmp_path / "b", method, train={"max_steps": 4, "save_every": 2}, **sections)
    run(stopped)
    shutil.rmtree(tmp_path / "b" / "run" / "checkpoints" / "step-000004")  # as if killed after step 2
    resumed, _ = run(stopped, resume=True)
    assert [m["step"] for m in resumed.metrics] == [3, 4]
    assert straight.metrics[-1]["loss"] < straight.metrics[0]["loss"]  # the run learned
    assert [m["loss"] for m in resumed.metrics] == pytest.approx([m["loss"] for m in straight.metrics[2:]], rel=1e-6)
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, atol=1e-6, rtol=1e-6)


def test_the_frontier_tells_up_to_36_methods_apart():
    """The keeping experiment draws 9 method lines: no two may share both colour and marker."""
    from selfdistill.report.frontier_plots import MARKERS
    from selfdistill.report.plots import COLORS

    assert len({(COLORS[g % len(COLORS)], MARKERS[g % len(MARKERS)]) for g in range(36)}) == 36


def test_the_keeping_experiment_is_the_demo_plus_the_keeping_methods():
    """Its sft and sdft runs are the demo's own: same stream, base settings, grid and evaluation."""
    from pathlib import Path

    from selfdistill.continual.config import load_continual_config
    from selfdistill.continual.settings import demo_config_path

    demo = load_continual_config(demo_config_path(False))
    keeping = load_continual_config(Path(__file__).parents[1] / "experiments" / "keeping" / "config.yaml")
    assert keeping.stream == demo.stream and keeping.base == demo.base and keeping.eval == demo.eval
    by_name = {m.name: m for m in keeping.methods}
    for method in demo.methods:
        assert by_name[method.name].method == method.method and by_name[method.name].overrides == method.overrides
    families = {m.group: m for m in keeping.methods}
    assert {m.method for m in families.values()} == {"sdft", "sft", "sft_replay", "sft_kl"}
    assert all(sorted(m.setting["train.lr"] for m in keeping.methods if m.group == g) == [1e-4, 3e-4] for g in families)
