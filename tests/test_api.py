"""The Python API: the README's notebook example runs, imports stay lazy, the commands' defaults and checks
are the API's settings', and the API imports no command-line module."""

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import selfdistill
from selfdistill.models.tiny import save_tiny

REPO = Path(__file__).resolve().parents[1]


def readme_python_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    code = readme_python_example()
    assert '"smollm2-135m"' in code  # the example uses the embedded model; here a tiny one stands in
    words = re.findall(r"\w+|[^\w\s]", " ".join(re.findall(r'"([^"]*)"', code)))
    model_dir = save_tiny(tmp_path / "tiny", extra_words=sorted(set(words)))
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('"smollm2-135m"', repr(str(model_dir))), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "2 steps; last loss" in out and re.search(r"score [\d.]+ over 2", out)
    final = tmp_path / "runs" / "notebook" / "final"
    assert (final / "model.safetensors").is_file()
    assert len((tmp_path / "runs" / "notebook" / "metrics.jsonl").read_text().splitlines()) == 2


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a new interpreter that has only the repository on its path (nothing imported yet)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def test_import_is_lazy_and_help_lists_the_api():
    code = "import sys, selfdistill; print('torch' in sys.modules); help(selfdistill)"
    proc = _fresh_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("False")
    for name in ("Config", "load_config", "train(", "evaluate(", "run_stream(", "diagnose(", "UserError"):
        assert name in proc.stdout, name


def test_train_and_diagnose_are_the_api_calls():
    from selfdistill import api, train

    assert train is api.train
    with pytest.raises(selfdistill.UserError, match="unknown method 'sftt'"):
        selfdistill.train(method="sftt")
    with pytest.raises(selfdistill.UserError, match="unknown option"):
        selfdistill.diagnose("tooluse", limt=3)
    importlib.import_module("selfdistill.diagnosis")  # the package behind it leaves the name to the function
    assert selfdistill.diagnose is api.diagnose
    assert api.train.__doc__ and selfdistill.Config().method == "sdft"


def _option_defaults(*command: str) -> dict:
    """{parameter name: default} of an `sdft` command, e.g. _option_defaults("data", "ceiling")."""
    from typer.main import get_command

    from selfdistill.cli import app

    node = get_command(app)
    for name in command:
        node = node.commands[name]
    return {p.name: p.default for p in node.params}


def test_the_commands_and_the_api_take_their_defaults_from_the_settings():
    import dataclasses
    import inspect

    from selfdistill.continual.settings import CompareSettings, DemoSettings, StreamSettings
    from selfdistill.diagnosis.settings import DiagnoseSettings
    from selfdistill.eval.settings import EvalSettings, EvaluateSettings
    from selfdistill.memory_plan.settings import PlanSettings
    from selfdistill.tasks.settings import CeilingSettings, MakeSettings, ShowSettings
    from selfdistill.training.settings import TrainSettings

    assert EvaluateSettings().precision == "auto" and EvaluateSettings().max_new_tokens == 512
    assert DiagnoseSettings().limit == 8 and CeilingSettings(task="x").limit == 40
    for command, cls in [
        (["eval"], EvalSettings),
        (["diagnose"], DiagnoseSettings),
        (["data", "ceiling"], CeilingSettings),
        (["train"], TrainSettings),
        (["plan"], PlanSettings),
        (["continual"], StreamSettings),
        (["compare"], CompareSettings),
        (["demo"], DemoSettings),
        (["data", "show"], ShowSettings),
        (["data", "make"], MakeSettings),
    ]:
        options = _option_defaults(*command)
        for f in dataclasses.fields(cls):
            if f.name in options and f.default is not dataclasses.MISSING:
                expected = list(f.default) if isinstance(f.default, tuple) else f.default
                assert options[f.name] == expected, (command, f.name)
            assert f.metadata["help"], (cls.__name__, f.name)  # every field is documented
    from selfdistill import api

    assert Path(inspect.signature(api.diagnose).parameters["out"].default) == DiagnoseSettings.out
    assert inspect.signature(api.train).parameters["resume"].default is TrainSettings.resume is False


def _cli_error(args: list[str]) -> str:
    from typer.testing import CliRunner

    from selfdistill.cli import app

    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, selfdistill.UserError), result.output
    return str(result.exception)


def _api_error(call, *args, **kwargs) -> str:
    with pytest.raises(selfdistill.UserError) as info:
        call(*args, **kwargs)
    return str(info.value)


def test_the_api_and_the_cli_reject_a_bad_option_with_the_same_message(tmp_path):
    from test_diagnose import write_task

    model_dir, data = write_task(tmp_path)
    out = tmp_path / "out"
    same = [
        (
            _api_error(selfdistill.evaluate, str(model_dir), str(data), precision="fp16", out=out),
            _cli_error(["eval", "--model", str(model_dir), "--task", str(data), "--precision", "fp16"]),
            "--precision must be one of auto, fp32, bf16, got 'fp16'.",
        ),
        (
            _api_error(selfdistill.diagnose, str(data), limit=0, out=out),
            _cli_error(["diagnose", str(data), "--limit", "0", "--out", str(out)]),
            "--limit must be at least 1, got 0.",
        ),
        (
            _api_error(selfdistill.diagnose, str(data), temperature=-1, out=out),
            _cli_error(["diagnose", str(data), "--temperature", "-1", "--out", str(out)]),
            "rollout.temperature",  # a training setting: the Config's own check
        ),
        (
            _api_error(selfdistill.plan, None, processes=0),
            _cli_error(["plan", "--processes", "0"]),
            "--processes must be at least 1, got 0.",
        ),
    ]
    for from_api, from_cli, expected in same:
        assert from_api == from_cli and expected in from_api
    assert not out.exists()


def test_the_api_imports_no_command_line_module():
    api_source = (REPO / "selfdistill" / "api.py").read_text(encoding="utf-8")
    imported = sorted(set(re.findall(r"^\s*from (selfdistill[\w.]*) import", api_source, re.M)))
    assert "selfdistill.diagnosis.run" in imported and "selfdistill.eval.run" in imported
    code = (
        "import importlib, sys\n"
        f"for name in ['selfdistill.api', *{imported!r}]: importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('selfdistill') and "
        "(m in ('selfdistill.cli', 'selfdistill.commands') or m.startswith('selfdistill.commands.'))))"
    )
    proc = _fresh_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_run_stream_from_a_mapping(tmp_path):
    from test_continual_pipeline import write_stream

    _, config = write_stream(
        tmp_path,
        methods=["sft"],
        eval={"max_new_tokens": 2, "batch_size": 8, "samples": 1, "probes": False, "drift": False},
    )
    for stage in config["stream"]:
        stage["train"], stage["eval"] = str(tmp_path / stage["train"]), str(tmp_path / stage["eval"])
    lines = []
    results = selfdistill.run_stream(config, echo=lines.append)
    assert results["complete"] and list(results["methods"]) == ["sft"]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["methods"]["sft"]["seeds"]["0"]["R"]
    assert any("stage 2/2 beta: training (sft)" in line for line in lines)


def test_every_exported_name_resolves():
    assert set(selfdistill.__all__) - {"__version__"} == set(selfdistill._EXPORTS)
    for name in selfdistill.__all__:
        assert getattr(selfdistill, name) is not None
    with pytest.raises(AttributeError):
        getattr(selfdistill, "no_such_name")  # noqa: B009  (the lookup itself must fail)


def test_diagnose_call_matches_the_command(tmp_path):
    from test_diagnose import write_task

    model_dir, data = write_task(tmp_path)
    report = selfdistill.diagnose(
        str(data),
        model=str(model_dir),
        grader="contains",
        limit=2,
        max_new_tokens=3,
        precision="fp32",
        template="plain",
        ceiling=False,
        out=tmp_path / "out",
    )
    assert report == json.loads((tmp_path / "out" / "diagnose.json").read_text())
    assert report["settings"]["records"] == 2 and report["settings"]["template"] == "plain"
    assert report["settings"]["num_rollouts"] == 1  # the command's default, taken from the config
