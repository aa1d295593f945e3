"""Simulates several machines' filesystem layouts on one machine; run by tests/test_multinode_layout.py under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 layout_worker.py OUT_DIR SETTINGS_JSON

SETTINGS_JSON:
  {"mode": "train", "cwd": [DIR per rank], "output_dir": PATH}
      Each process works in its own directory, so a relative train.output_dir names a different
      directory on each (as the same path does on disks local to each machine), and trains one
      step. A UserError is printed as "rank R: UserError: MESSAGE", written to OUT_DIR/error-rankR.txt,
      and exits with status 2.
      Rank 0 writes OUT_DIR/world.json: the seconds the shared-directory check took per process.
  {"mode": "first_load", "tmp": [DIR per rank], "nodes": bool, "unseen": bool}
      The vLLM engine's first load without vLLM: each process has its own TMPDIR; "nodes": every
      process is its own torchrun node (GROUP_RANK = its rank); "unseen": rank 1 cannot see the
      other processes' temporary directories (a disk local to a machine whose host name it shares).
      Rank 0 writes OUT_DIR/world.json: per process, where it read, whether it wrote, and whether the
      weights there are the model's.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402
from toy import KEYS, VALUES, toy_records  # noqa: E402

from selfdistill.config import load_config  # noqa: E402
from selfdistill.errors import UserError  # noqa: E402
from selfdistill.models.tiny import tiny_model, tiny_tokenizer  # noqa: E402


def gathered(value) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def train_mode(out: Path, settings: dict) -> None:
    import selfdistill.training.run_directory as run_directory
    from selfdistill.training.loop import train

    rank = int(os.environ["RANK"])
    os.chdir(settings["cwd"][rank])
    seconds = []
    real_check = run_directory.check_shared_output_dir

    def timed_check(cfg, procs):  # train's setup imports it from the module when it runs
        start = time.perf_counter()
        try:
            return real_check(cfg, procs)
        finally:
            seconds.append(time.perf_counter() - start)

    run_directory.check_shared_output_dir = timed_check
    tok = tiny_tokenizer(KEYS + VALUES)
    overrides = {
        "method": "sft",
        "model": {"precision": "fp32"},
        "train": {"output_dir": settings["output_dir"], "batch_size": 4, "micro_batch_size": 2, "max_steps": 1},
    }
    try:
        train(load_config(overrides=overrides), records=toy_records(), model=tiny_model(tok, seed=0), tokenizer=tok)
    except UserError as exc:
        # Also in a file: torchrun stops the other processes as soon as one exits, so a rank's line
        # on stderr can be lost, while the file is written before this process exits.
        (out / f"error-rank{rank}.txt").write_text(str(exc))
        print(f"rank {rank}: UserError: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    times = gathered(seconds)
    if rank == 0:
        (out / "world.json").write_text(json.dumps({"check_seconds": times}))


def first_load_mode(out: Path, settings: dict) -> None:
    import tempfile

    from safetensors.torch import load_file

    import selfdistill.sampling.vllm_first_load as vllm_rollout
    from selfdistill.models.distributed import setup_processes, shard_model

    rank = int(os.environ["RANK"])
    if settings.get("nodes"):
        os.environ["GROUP_RANK"] = str(rank)
    else:
        os.environ.pop("GROUP_RANK", None)  # the host name decides: the same for every process here
    tempfile.tempdir = settings["tmp"][rank]
    if settings.get("unseen") and rank == 1:
        vllm_rollout._sees = lambda directory, nonce: False
    procs = setup_processes()
    tok = tiny_tokenizer(KEYS + VALUES)
    whole = {k: v.detach() for k, v in tiny_model(tok, seed=0).named_parameters()}  # what the engine loads
    model = shard_model(tiny_model(tok, seed=0), procs)
    with tempfile.TemporaryDirectory(prefix="selfdistill-vllm-") as own:
        directory, write = vllm_rollout.first_load_directory(own, procs.world)
        vllm_rollout.write_first_load(model, directory, write=write, shard_bytes=2**14)  # several files
        dist.barrier()
        index = json.loads((Path(directory) / "model.safetensors.index.json").read_text())
        read = {}
        for name in sorted(set(index["weight_map"].values())):
            read.update(load_file(str(Path(directory) / name)))
        same = read.keys() == whole.keys() and all(torch.equal(read[k], whole[k]) for k in whole)
        report = {"own": own, "read": directory, "wrote": write, "files": len(set(index["weight_map"].values()))}
        report["same_weights"] = same and (Path(directory) / "config.json").is_file()
        dist.barrier()  # every process has read before the writers remove their directories
    reports = gathered(report)
    if rank == 0:
        (out / "world.json").write_text(json.dumps({"processes": reports}))


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    options = json.loads(sys.argv[2])
    {"train": train_mode, "first_load": first_load_mode}[options["mode"]](out_dir, options)
