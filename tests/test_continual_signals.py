"""A stop signal to `sdft continual` with worker processes reaches every worker, and none outlives the run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_continual_pipeline import write_stream

from selfdistill.continual.layout import stage_dir
from selfdistill.training.checkpoint import latest_checkpoint


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")  # a zombie no longer runs
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads worker processes from /proc")
def test_sigterm_stops_every_worker_with_a_checkpoint_and_leaves_none_running(tmp_path):
    path, config = write_stream(tmp_path, workers=2)
    text = path.read_text().replace("max_steps: 2", "max_steps: 100000")
    path.write_text(text)
    run = Path(config["output_dir"])
    env = {**os.environ, "SELFDISTILL_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen(
        [sys.executable, "-m", "selfdistill.cli", "continual", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = [stage_dir(run, name, 0, 1) / "train" / "metrics.jsonl" for name in ("sdft", "sft-fast")]
    deadline = time.time() + 300
    while not all(m.is_file() and m.read_text().count("\n") >= 1 for m in metrics):  # both are training
        assert parent.poll() is None and time.time() < deadline, parent.stdout.read() if parent.poll() else "timeout"
        time.sleep(0.5)
    workers = _children(parent.pid)
    assert len(workers) >= 2
    parent.send_signal(signal.SIGTERM)
    output, _ = parent.communicate(timeout=300)
    assert parent.returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output and "SIGTERM" in output
    for pid in workers:
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.1)
        assert not _alive(pid), f"worker {pid} outlived the run"
    for m in metrics:  # each worker wrote its stop checkpoint, which a rerun continues from
        assert latest_checkpoint(m.parent) is not None
