import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "distributed_worker.py"


def run(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SELFDISTILL_PROGRESS": "0"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.distributed
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    run([sys.executable, str(WORKER), str(tmp_path / "one")], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    run(torchrun + [str(WORKER), str(tmp_path / "two")], tmp_path)
    one = json.loads((tmp_path / "one" / "world.json").read_text())
    two = json.loads((tmp_path / "two" / "world.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4, abs=1e-6)
    for part in ("final/model.safetensors", "checkpoints/step-000003/teacher.safetensors"):
        a = load_file(str(tmp_path / "one" / part))
        b = load_file(str(tmp_path / "two" / part))
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4)
