"""The chunked loss never holds a full [positions, vocab] logit tensor (peak-memory check, untimed).

Each measurement runs in its own process and reads its peak resident memory (ru_maxrss). The
unchunked setting (chunk = all positions) is measured too, so the test shows it can fail.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
N, VOCAB, HIDDEN = 1024, 131_072, 16  # a large vocabulary; one [N, V] float32 tensor is 512 MiB


def _measure(chunk: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.loss_memory", str(N), str(VOCAB), str(HIDDEN), str(chunk)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's convention")
def test_chunked_loss_never_allocates_full_logits():
    full_mb = N * VOCAB * 4 / 2**20
    chunked = _measure(chunk=16)
    assert chunked["grad_finite"]
    assert chunked["loss_rise_mb"] < 0.5 * full_mb, chunked  # far below one full [N, V] tensor
    unchunked = _measure(chunk=N)
    assert unchunked["loss_rise_mb"] > full_mb, unchunked  # the unchunked path does hold whole [N, V] tensors
