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


def test_rollout_engines_example_runs():
    block = python_blocks("rollout-engines.md")[-1]
    model, tokenizer = tiny()
    names = {
        "cfg": selfdistill.Config(rollout={"max_new_tokens": 3}),
        "model": model,
        "tokenizer": tokenizer,
        "pad": tokenizer.pad_token_id,
        "prompts": [[1, 2, 3], [4, 5]],
        "seeds": [0, 1],
    }
    exec(compile(block, "docs/rollout-engines.md", "exec"), names)
    completions = names["completions"]
    assert len(completions.ids) == 2 and all(1 <= len(ids) <= 3 for ids in completions.ids)


def test_adding_a_method_examples_run(tmp_path, monkeypatch):
    method_block, entry_block, section_block = python_blocks("adding-a-method.md")
    # 1. The module: executed as selfdistill.methods.echo would be.
    module = types.ModuleType("docs_echo")
    exec(compile(method_block, "docs/adding-a-method.md", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "docs_echo", module)
    # 2. The registry entry, pointed at that module.
    names = {"MethodInfo": registry.MethodInfo, "Step": registry.Step}
    (entry,) = eval(compile(entry_block, "docs/adding-a-method.md", "eval"), names)
    assert entry.name == "echo" and not entry.on_policy and entry.step == registry.Step()
    monkeypatch.setitem(registry.METHOD_INFO, "echo", dataclasses.replace(entry, target="docs_echo:Echo"))
    model, tok = tiny(("k1", "k2", "v1", "v2"))
    cfg = selfdistill.Config(
        method="echo",
        model={"precision": "fp32"},
        train={"max_steps": 2, "batch_size": 2, "micro_batch_size": 2, "lr": 1e-3, "output_dir": str(tmp_path / "r")},
    )
    records = [{"prompt": "k1", "demonstration": "v1"}, {"prompt": "k2", "demonstration": "v2"}]
    result = selfdistill.train(cfg, records=records, model=model, tokenizer=tok)
    assert [m["step"] for m in result.metrics] == [1, 2] and result.metrics[-1]["loss"] < result.metrics[0]["loss"]
    # 3. The config section, with the imports the text names; its check gives the message the text quotes.
    from dataclasses import dataclass
    from typing import ClassVar

    from selfdistill.config import Section
    from selfdistill.options import setting

    config_module = types.ModuleType("docs_echo_config")  # a module, as the section's types are read from one
    config_module.__dict__.update(dataclass=dataclass, ClassVar=ClassVar, Section=Section, setting=setting)
    monkeypatch.setitem(sys.modules, "docs_echo_config", config_module)
    exec(compile(section_block, "docs/adding-a-method.md", "exec"), config_module.__dict__)
    assert config_module.EchoConfig().weight == 1.0
    with pytest.raises(UserError, match=r"^Config value echo\.weight: must be >= 0, got -1\.0\.$"):
        config_module.EchoConfig(weight=-1)
