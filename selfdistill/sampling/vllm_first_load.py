"""The vLLM engine's first weights (`rollout.engine: vllm`): where they are written, whether they fit,
and the writing itself, as they stream from the trainer's (possibly sharded) model.
"""

from __future__ import annotations

import json
import os
import shutil
import socket

import torch
from safetensors.torch import save_file

from selfdistill.models.lora import is_lora
from selfdistill.models.sharded import merged_weights


def base_config(model):
    """The plain model's config (a LoRA model's base model's): what the engine is built from."""
    return (model.get_base_model() if is_lora(model) else model).config


FIRST_LOAD_MARGIN = 64 * 2**20  # config, index and safetensors headers, with room to spare


def first_load_bytes(model, dtype: torch.dtype) -> int:
    """What the first load writes: every weight of the plain model in `dtype` (LoRA: the merged
    weights, the base weights' shapes), plus `FIRST_LOAD_MARGIN`. Sharded parameters count whole."""
    # The parameters merged_weights streams: all but the LoRA factors (merged into their base weights).
    elements = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    return elements * torch.empty((), dtype=dtype).element_size() + FIRST_LOAD_MARGIN


def first_load_space_problem(parent: str, needed: int) -> str | None:
    """Why the first load would not fit into `parent` (None if it fits): a message naming the setting to change."""
    free = shutil.disk_usage(parent).free
    if free >= needed:
        return None
    return (
        f"rollout.engine=vllm: the engine's first load writes the model in the engine's dtype to {parent}: "
        f"{needed} bytes ({needed / 2**30:.2f} GiB) are needed there and {free} bytes ({free / 2**30:.2f} GiB) "
        "are free. Set rollout.vllm_load_dir to a directory on a disk with more free space (default: the "
        "system's temporary directory, TMPDIR)."
    )


def write_first_load(
    model, directory: str, *, write: bool, dtype: torch.dtype | None = None, shard_bytes: int = 2**30
) -> None:
    """The engine's first weights as a sharded safetensors checkpoint, written as they stream in.

    Every process runs this (under FSDP2 each weight is one all-gather); only `write` processes
    keep and write the tensors, one shard of at most `shard_bytes` at a time, so no process ever
    holds the whole model. A real first load and not vLLM's placeholder ("dummy") weights: those
    also overwrite buffers such as the rotary tables, which a later weight sync does not restore.
    `dtype`: the engine's; each weight is cast to it as it streams (an fp32 trainer and a bf16 engine:
    half the bytes on disk), None keeps the trainer's.
    """
    config = base_config(model)
    shard, size, files, index = {}, 0, [], {}

    def flush():
        nonlocal shard, size
        if shard and write:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
            files.append(name)
            index.update({k: name for k in shard})
        shard, size = {}, 0

    # Cast on each process's shard before the gather (merged_weights): the gather moves the engine's dtype.
    for name, tensor in merged_weights(model, dtype=dtype):
        if write:
            shard[name] = tensor.contiguous()
            size += tensor.numel() * tensor.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    if write:
        config.save_pretrained(directory)
        total = sum(os.path.getsize(os.path.join(directory, f)) for f in files)
        index_file = {"metadata": {"total_size": total}, "weight_map": index}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump(index_file, f)


FIRST_LOAD_MARK = ".selfdistill-first-load"


def _node_key() -> str:
    """Which machine this process is on: torchrun's node (its agent's GROUP_RANK), else the host name.

    All processes of one torchrun agent are its children: one machine, one environment (TMPDIR),
    one view of the disks. LOCAL_RANK is not used: `--virtual-local-rank` sets it to 0 everywhere.
    """
    group = os.environ.get("GROUP_RANK")
    return f"node {group}" if group is not None else f"host {socket.gethostname()}"


def _sees(directory: str, nonce: str) -> bool:
    """Whether `directory` is, for this process, the very directory another process marked with `nonce`."""
    try:
        with open(os.path.join(directory, FIRST_LOAD_MARK)) as f:
            return f.read() == nonce
    except OSError:
        return False


def first_load_directory(own: str, processes: int) -> tuple[str, bool]:
    """Where this process's engine reads its first weights, and whether this process writes them.

    `own` is this process's empty temporary directory. One process, or several: the lowest rank of
    each machine writes into its own directory; every other process of that machine reads that
    directory if it can see it (the writer marks it with a random token, checked here), and
    otherwise writes a copy into its own. So temporary directories may be local to each machine or
    on a shared disk, and machines with the same host name or processes with their own TMPDIR still
    get complete files (at worst one copy per process). Collective: every process calls it.
    """
    if processes <= 1:
        return own, True
    import secrets

    import torch.distributed as dist

    nonce = secrets.token_hex(8)
    with open(os.path.join(own, FIRST_LOAD_MARK), "w") as f:
        f.write(nonce)
    places = [None] * processes
    dist.all_gather_object(places, (_node_key(), own, nonce))
    rank, key = dist.get_rank(), _node_key()
    writer = min(r for r, place in enumerate(places) if place[0] == key)
    if writer == rank:
        return own, True
    _, directory, mark = places[writer]
    return (directory, False) if _sees(directory, mark) else (own, True)
