"""Settings for runs on GPUs and several nodes that can be checked without either: TF32 (model.tf32), the
hub download by one process per node, the shard-group size (distributed.shard_size)."""

import pytest
import torch
import torch.distributed as dist

from selfdistill.errors import UserError
from selfdistill.models.distributed import Processes, shard_group_size
from selfdistill.models.loading import fetch_once_per_node
from selfdistill.precision import set_fp32_matmuls


def test_tf32_is_set_for_cuda_devices_only():
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        set_fp32_matmuls("cuda:0", True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_fp32_matmuls("cuda:0", False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        set_fp32_matmuls("cpu", True)  # a CPU run leaves the process's setting alone
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield Processes(0, 1, torch.device("cpu"), sharded=True)
    dist.destroy_process_group()


@pytest.mark.parametrize("local_rank, downloads", [("0", 1), ("1", 0)])
def test_only_the_first_process_of_a_node_downloads(one_process_group, monkeypatch, local_rank, downloads):
    """LOCAL_RANK 0 downloads; every process then loads from the node's local copy, looked up without
    asking the hub (local_files_only), not from the hub id."""
    import huggingface_hub

    calls = []

    def snapshot(name, **kwargs):
        calls.append(kwargs)
        return "/cache/some-model/snapshot"

    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    assert fetch_once_per_node("some-org/some-model", one_process_group) == "/cache/some-model/snapshot"
    assert [c.get("local_files_only", False) for c in calls] == [False] * downloads + [True]
    assert all("*.safetensors" in c["allow_patterns"] and "*.json" in c["allow_patterns"] for c in calls)


def test_a_failed_download_is_one_clear_error(one_process_group, monkeypatch):
    import huggingface_hub

    def offline(name, **kwargs):
        raise OSError("no network")

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match="model.name some-org/some-model: could not download it from the hub"):
        fetch_once_per_node("some-org/some-model", one_process_group)


def test_local_models_and_plain_processes_download_nothing(one_process_group, monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("downloaded"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert fetch_once_per_node(str(tmp_path / "model"), one_process_group) == str(tmp_path / "model")
    assert fetch_once_per_node("some-org/some-model", Processes(0, 1, torch.device("cpu"))) == "some-org/some-model"


def test_shard_group_size(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert shard_group_size(0, 16) == 8  # one node's processes: hybrid sharding over 2 nodes
    assert shard_group_size(0, 4) == 4  # never more than all processes
    assert shard_group_size(16, 16) == 16  # flat sharding across nodes, when asked for
    with pytest.raises(UserError, match="distributed.shard_size 3 must divide the number of processes, 16"):
        shard_group_size(3, 16)
