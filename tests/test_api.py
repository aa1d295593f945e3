"""The Python API: the README's notebook example runs, imports stay lazy, defaults are the CLI's."""

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


def test_import_is_lazy_and_help_lists_the_api():
    code = "import sys, selfdistill; print('torch' in sys.modules); help(selfdistill)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("False")
    for name in ("Config", "load_config", "train(", "evaluate(", "run_stream(", "diagnose(", "UserError"):
        assert name in proc.stdout, name


def test_train_and_diagnose_are_both_the_api_call_and_the_module():
    import selfdistill.train as train_module
    from selfdistill import api, train

    assert train is train_module and callable(train) and hasattr(train_module, "TrainResult")
    with pytest.raises(selfdistill.UserError, match="unknown method 'sftt'"):
        selfdistill.train(method="sftt")
    with pytest.raises(selfdistill.UserError, match="unknown option"):
        selfdistill.diagnose("tooluse", limt=3)
    assert callable(selfdistill.diagnose) and hasattr(selfdistill.diagnose, "cli")
    assert api.train.__doc__ and selfdistill.Config().method == "sdft"


def test_api_defaults_are_the_commands():
    from selfdistill.api import command_defaults
    from selfdistill.diagnose.cli import diagnose_command
    from selfdistill.eval.cli import eval_command

    assert command_defaults(eval_command)["precision"] == "auto"
    assert command_defaults(eval_command)["max_new_tokens"] == 512
    assert command_defaults(diagnose_command)["limit"] == 8


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
