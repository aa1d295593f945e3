import json
import os
import subprocess
import sys

import pytest


def sdft(*args, cwd=None, timeout=900):
    env = {**os.environ, "SELFDISTILL_PROGRESS": "0"}
    return subprocess.run(
        [sys.executable, "-m", "selfdistill.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def test_train_help_lists_every_setting():
    proc = sdft("train", "--help")
    assert proc.returncode == 0
    for key in (
        "loss.kind",
        "teacher.ema_rate",
        "data.teacher_template",
        "rollout.temperature",
        "train.micro_batch_size",
    ):
        assert key in proc.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", "train.lrr=1"], "Did you mean 'train.lr'"),
        (["--set", "teacher.ema_rate=1.5"], "teacher.ema_rate: must lie in [0, 1]"),
        (["--set", "loss.top_k=0"], "loss.top_k"),
        (["--method", "nope"], "unknown method 'nope'"),
        (["--data", "missing.jsonl", "--model", "missing-dir/"], "not found"),
    ],
)
def test_bad_options_give_one_message_and_exit_2(tmp_path, args, needle):
    proc = sdft("train", *args, "-o", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


def test_invalid_yaml_names_the_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  lr: [1,\n")
    proc = sdft("train", str(config), cwd=tmp_path)
    assert proc.returncode == 2 and str(config) in proc.stderr and "line" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_sdft_train_on_the_embedded_model_from_the_cli(tmp_path, embedded_model_name):
    proc = sdft(
        "train",
        "--data",
        "builtin:demo",
        "--model",
        embedded_model_name,
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "-s",
        "rollout.max_new_tokens=8",
        "-s",
        "train.micro_batch_size=2",
        "-o",
        str(tmp_path / "run"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["finite"] and r["loss"] >= 0 and r["completion_length"] <= 8 for r in rows)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert "model:" in proc.stdout
