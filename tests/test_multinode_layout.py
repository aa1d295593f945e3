"""Multi-node filesystem layouts, simulated with 2 processes (gloo) on one machine (tests/layout_worker.py).

- train.output_dir must be one directory that every process sees (checkpoint shards from all
  processes go into one temporary directory that process 0 renames): a relative output_dir with
  a different working directory per process stands for a path that names a different disk on
  each machine, and is refused on every process before anything is written.
- vLLM's first load is written once per machine into a temporary directory and must be complete
  for every process whatever the layout (tested without vLLM: the directory choice and the files).
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from test_distributed import launch as launch_worker

from selfdistill.config import load_config
from selfdistill.models.distributed import Processes
from selfdistill.training.run_directory import check_shared_output_dir

WORKER = Path(__file__).parent / "layout_worker.py"
ROOT = Path(__file__).parent.parent


def launch(out: Path, settings: dict, check: bool = True) -> subprocess.CompletedProcess:
    return launch_worker(out, settings, 2, check=check, worker=WORKER)


def tree(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_one_process_checks_nothing_and_writes_nothing(tmp_path):
    cfg = load_config(overrides={"train": {"output_dir": str(tmp_path / "run")}})
    check_shared_output_dir(cfg, Processes(0, 1, torch.device("cpu")))
    assert tree(tmp_path) == []


@pytest.mark.distributed
@pytest.mark.parametrize("existing", [False, True], ids=["output-dir-missing", "output-dir-exists"])
def test_an_output_dir_not_shared_by_the_nodes_is_refused_on_every_process(tmp_path, existing):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
        if existing:
            (node / "run").mkdir()
    before = [tree(node) for node in nodes]
    proc = launch(tmp_path / "out", {"mode": "train", "cwd": [str(n) for n in nodes], "output_dir": "run"}, False)
    assert proc.returncode != 0
    errors = {f"rank {r}": (tmp_path / "out" / f"error-rank{r}.txt") for r in (0, 1)}
    assert all(f.is_file() for f in errors.values()), proc.stderr[-3000:]
    errors = {rank: f.read_text() for rank, f in errors.items()}
    assert errors["rank 0"] == errors["rank 1"]  # the same words on every process
    message = errors["rank 0"]
    assert message.startswith("train.output_dir run is not one directory shared by all 2 processes")
    assert "each process resolves from its own working directory" in message  # (a relative path)
    assert "shared filesystem" in message and "every node" in message
    assert "process 0 (on " in message and ") found 1 of 2; process 1 (on " in message and ") found 0 of 2" in message
    assert [tree(node) for node in nodes] == before  # nothing written, the probes removed
    assert not (tmp_path / "out" / "world.json").exists()


@pytest.mark.distributed
def test_a_shared_output_dir_passes_the_check_and_trains(tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    run = tmp_path / "shared" / "run"  # absolute: the same directory from both working directories
    launch(tmp_path / "out", {"mode": "train", "cwd": [str(n) for n in nodes], "output_dir": str(run)})
    assert (run / "final" / "model.safetensors").is_file()
    assert (run / "checkpoints" / "step-000001" / "shards" / ".metadata").is_file()
    assert not any(".selfdistill-probe-" in p for p in tree(tmp_path))  # the probes are gone
    assert [tree(node) for node in nodes] == [[], []]
    seconds = json.loads((tmp_path / "out" / "world.json").read_text())["check_seconds"]
    assert [len(s) for s in seconds] == [1, 1]
    assert max(s[0] for s in seconds) < 2.0  # three small collectives and one empty file per process


@pytest.mark.distributed
@pytest.mark.parametrize(
    "settings, writers",
    [
        ({}, [True, False]),  # one machine: rank 0 writes, rank 1 reads its directory
        ({"nodes": True}, [True, True]),  # two torchrun nodes, each with its own disk: one copy each
        ({"unseen": True}, [True, True]),  # same host name, yet rank 1 cannot see rank 0's directory
    ],
    ids=["one-node", "two-nodes", "writer-unseen"],
)
def test_vllm_first_load_is_complete_for_every_process_on_every_layout(tmp_path, settings, writers):
    tmp = [tmp_path / "tmp0", tmp_path / "tmp1"]  # each process its own TMPDIR (a disk local to its machine)
    for directory in tmp:
        directory.mkdir()
    launch(tmp_path / "out", {"mode": "first_load", "tmp": [str(t) for t in tmp], **settings})
    reports = json.loads((tmp_path / "out" / "world.json").read_text())["processes"]
    assert [r["wrote"] for r in reports] == writers
    for report in reports:
        assert report["same_weights"] and report["files"] > 1, report
        assert report["read"] == (report["own"] if report["wrote"] else reports[0]["own"])
    assert not [p for t in tmp for p in tree(t) if "selfdistill-vllm-" in p]  # every temporary directory removed
