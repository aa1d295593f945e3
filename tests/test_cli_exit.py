"""Exit statuses of `sdft`: bad input 2, a failed run 1, a deliberate stop 128 + signal; and
`sdft eval` checks its input before writing anything."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from selfdistill import cli
from selfdistill.errors import RunFailed, RunStopped, UserError
from selfdistill.models.tiny import save_tiny

REPO = Path(__file__).resolve().parents[1]


def _raising(exc):
    def app():
        raise exc

    return app


@pytest.mark.parametrize(
    "exc, status",
    [
        (UserError("bad field"), 2),
        (RunFailed("disk full"), 1),
        (RunStopped("Stopped by SIGTERM", signal.SIGTERM), 143),
        (RunStopped("Stopped by SIGINT", signal.SIGINT), 130),
        (KeyboardInterrupt(), 130),
    ],
)
def test_each_outcome_has_its_own_exit_status_and_no_traceback(monkeypatch, capsys, exc, status):
    monkeypatch.setattr(cli, "app", _raising(exc))
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == status
    err = capsys.readouterr().err
    stop = isinstance(exc, (RunStopped, KeyboardInterrupt))  # asked for: not reported as an error
    assert err.startswith("Stopped by " if stop else "error: ") and "Traceback" not in err


def _sdft(args, tmp_path, **env):
    return subprocess.run(
        [sys.executable, "-m", "selfdistill.cli", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env},
        timeout=600,
    )


def test_a_sigterm_during_training_and_bad_input_exit_differently(tmp_path):
    model = save_tiny(tmp_path / "tiny", extra_words=["a", "b"])
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": "a", "demonstration": "b"}) + "\n" for _ in range(4)))
    args = [
        "train",
        "--method",
        "sft",
        "--model",
        str(model),
        "--data",
        str(data),
        "-o",
        str(tmp_path / "run"),
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "-s",
        "model.precision=fp32",
        "-s",
        "train.micro_batch_size=2",
    ]
    stopped = _sdft(args, tmp_path, SELFDISTILL_FAULT="optimizer_step:1:sigterm")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    bad = _sdft([*args[:-4], "-s", "train.lr=-1"], tmp_path)
    assert bad.returncode == 2 and "train.lr" in bad.stderr


def test_sdft_eval_with_bad_input_leaves_no_output_directory(tmp_path):
    from typer.testing import CliRunner

    model = save_tiny(tmp_path / "tiny", extra_words=["a", "b"])
    bad_task = tmp_path / "bad.jsonl"
    bad_task.write_text('{"prompt": "q", "answer": "a"}\n{"answer": "b"}\n')
    good_task = tmp_path / "good.jsonl"
    good_task.write_text('{"prompt": "q", "answer": "a"}\n')
    for name, args in {
        "bad task file": ["--task", str(bad_task)],
        "unknown built-in task": ["--task", "no-such-task"],
        "unknown grader": ["--task", str(good_task), "--grader", "nope"],
        "bad precision": ["--task", str(good_task), "--precision", "fp16"],
    }.items():
        out = tmp_path / "out"
        result = CliRunner().invoke(cli.app, ["eval", "--model", str(model), "--out", str(out), *args])
        assert isinstance(result.exception, UserError), (name, result.output)
        assert not out.exists(), name
