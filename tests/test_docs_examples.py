"""The Python examples of docs/ run as written: each code block is executed, with tiny models standing in
for the names the surrounding text gives them (`model`, `tok`, `records`, ...)."""

from __future__ import annotations

import dataclasses
import re
import sys
import types
from pathlib import Path

import pytest

import selfdistill
from selfdistill import registry
from selfdistill.data import Record
from selfdistill.errors import UserError
from selfdistill.models.tiny import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


def python_blocks(document: str) -> list[str]:
    text = (REPO / "docs" / document).read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def tiny(words=("A", "B", "C", "D", "answer")):
    tok = tiny_tokenizer(list(words))
    return tiny_model(tok), tok


def test_evaluation_example_runs(tmp_path, monkeypatch):
    (block,) = python_blocks("evaluation.md")
    monkeypatch.chdir(tmp_path)
    model, tok = tiny()
    records = [Record(prompt="Pick A or B", demonstration="<answer>A</answer>", answer="A")] * 2
    names = {"model": model, "tok": tok, "records": records, "base_model": model}
    exec(compile(block, "docs/evaluation.md", "exec"), names)
    assert names["summary"]["count"] == 2 and (tmp_path / "runs" / "e" / "summary.json").is_file()
    assert 0.0 <= names["probes"]["score"] <= 1.0 and names["probes"]["count"] > 0
    assert names["distance"]["kl_nats"] == pytest.approx(0.0, abs=1e-6)  # the same model as the base


def test_rollout_engines_example_runs(monkeypatch):
    module_block, entry_block, use_block = python_blocks("rollout-engines.md")
    # 1. The module: executed as selfdistill.sampling.greedy would be.
    module = types.ModuleType("docs_greedy")
    exec(compile(module_block, "docs/rollout-engines.md", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "docs_greedy", module)
    # 2. The registry entry, pointed at that module.
    entry = eval(compile(entry_block, "docs/rollout-engines.md", "eval"), {"EngineInfo": registry.EngineInfo})
    assert entry.name == "greedy"
    monkeypatch.setitem(registry.ENGINE_INFO, "greedy", dataclasses.replace(entry, target="docs_greedy:GreedySampler"))
    # 3. A run's config naming it, and a sampler built from it.
    model, tokenizer = tiny()
    names = {
        "cfg": selfdistill.Config(rollout={"max_new_tokens": 3, "engine": "greedy"}),
        "model": model,
        "tokenizer": tokenizer,
        "pad": tokenizer.pad_token_id,
        "prompts": [[1, 2, 3], [4, 5]],
        "seeds": [0, 1],
    }
    exec(compile(use_block, "docs/rollout-engines.md", "exec"), names)
    completions = names["completions"]
    assert type(names["sampler"]) is module.GreedySampler and names["sampler"].settings.temperature == 0.0
    assert len(completions.ids) == 2 and all(1 <= len(ids) <= 3 for ids in completions.ids)


def test_adding_a_method_example_is_a_whole_method(tmp_path, monkeypatch):
    """The module of docs/adding-a-method.md, saved as a module and registered, is a method with its own
    setting, a teacher and a logged statistic: it trains, refuses a bad setting, and shows in the card."""
    (block,) = python_blocks("adding-a-method.md")
    (tmp_path / "docs_echo.py").write_text(block, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "docs_echo", raising=False)
    import docs_echo

    monkeypatch.setitem(registry.METHOD_INFO, "echo", docs_echo.METHOD)  # what register(METHOD) does
    model, tok = tiny(("k1", "k2", "v1", "v2"))
    settings = {
        "model": {"precision": "fp32"},
        "train": {
            "max_steps": 3,
            "batch_size": 2,
            "micro_batch_size": 2,
            "lr": 1e-2,
            "output_dir": str(tmp_path / "r"),
        },
    }
    cfg = selfdistill.Config(method="echo", echo={"weight": 0.5}, **settings)
    assert type(cfg) is docs_echo.EchoConfig and cfg.echo.weight == 0.5
    records = [{"prompt": "k1", "demonstration": "v1"}, {"prompt": "k2", "demonstration": "v2"}]
    result = selfdistill.train(cfg, records=records, model=model, tokenizer=tok)
    assert result.method.teacher.kind == "frozen"  # the teacher its step declares, handed in
    losses, start = [m["loss"] for m in result.metrics], [m["start_logp"] for m in result.metrics]
    assert losses[-1] < losses[0]  # it learned
    # The frozen starting model scores the same demonstrations each step: the same per-token mean.
    assert start[0] < 0 and start == pytest.approx([start[0]] * 3, rel=1e-5)
    card = (tmp_path / "r" / "final" / "README.md").read_text()
    assert "**Method**: `echo`" in card and "echo.weight" in card
    # Its setting is checked where it is built, and refused for a method that does not have it.
    with pytest.raises(UserError, match=r"^Config value echo\.weight: must be >= 0, got -1\.0\.$"):
        selfdistill.Config(method="echo", echo={"weight": -1})
    with pytest.raises(UserError, match="Config key echo: settings of method echo; method 'sft' has no echo section"):
        selfdistill.Config(method="sft", echo={"weight": 1.0})
    # A statistic whose name does not say how it is combined is refused when the step runs.
    build_items = docs_echo.Echo.build_items
    monkeypatch.setattr(docs_echo.Echo, "build_items", lambda *args: (build_items(*args)[0], {"n": 1.0}))
    with pytest.raises(ValueError, match="statistic 'n' does not say how it is combined"):
        selfdistill.train(
            dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(tmp_path / "s"))),
            records=records,
            model=tiny(("k1", "k2", "v1", "v2"))[0],
            tokenizer=tok,
        )
