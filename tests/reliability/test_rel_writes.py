"""A write that fails (full disk) anywhere leaves the previous checkpoint intact, ends with a clear
message, and the same command with --resume then finishes the run; a second signal stops at once."""

import json
import os
import signal

import pytest
from reltools import train_tiny

from selfdistill.training.checkpoint import checkpoint_dirs
from selfdistill.training.faults import ENV
from selfdistill.training.loop import TrainingStopped
from selfdistill.training.stop_signals import StopFlag


@pytest.mark.parametrize(
    "fault, what, kept",
    [
        ("checkpoint_rename:4:enospc", "the checkpoint of step 4", "step-000002"),
        ("metrics:3:enospc", "metrics.jsonl", "step-000002"),
        ("final::enospc", "the final model", "step-000006"),
    ],
)
def test_a_full_disk_keeps_the_last_checkpoint_and_says_so(tmp_path, monkeypatch, caplog, fault, what, kept):
    out = tmp_path / "run"
    monkeypatch.setenv(ENV, fault)
    with pytest.raises(TrainingStopped) as stopped:
        train_tiny(out)
    message = str(stopped.value)
    assert f"Could not write {what} in {out}: No space left on device" in message
    assert f"{kept}, is intact" in message and "free disk space" in message and "--resume" in message
    assert checkpoint_dirs(out)[-1].name == kept
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written leftovers
    assert not (out / "final").exists() and not (out / ".final.tmp").exists()
    monkeypatch.delenv(ENV)
    with caplog.at_level("INFO", logger="selfdistill.training.loop"):
        result = train_tiny(out, resume=True)
    assert f"resumed from {out / 'checkpoints' / kept}" in caplog.text  # the kept checkpoint loads
    assert result.final_dir == out / "final" and (out / "final" / "model.safetensors").is_file()
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_a_second_signal_stops_at_once():
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT"  # the first one only asks the loop to checkpoint and stop
        with pytest.raises(TrainingStopped, match="second signal"):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
