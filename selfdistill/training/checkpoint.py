"""Checkpoints: a loadable model directory plus everything needed to continue exactly.

Layout of `OUTPUT_DIR/checkpoints/step-000123/` written by one process:
  config.json, model.safetensors, tokenizer files  (AutoModelForCausalLM.from_pretrained reads it;
                                                    a LoRA run stores adapter_config.json + adapter_model.safetensors)
  teacher.safetensors                               (the SDFT teacher, unless it is the student itself)
  trainer_state.pt                                  (optimizer, scheduler, CPU/CUDA/Python RNG; weights_only=True)
  state.json                                        (step, total steps, number of processes)

Written by N processes under FSDP2 (each process writes only its own shards):
  shards/                                           (torch.distributed.checkpoint: student, AdamW state, teacher;
                                                     LoRA: only the adapter, the base weights never change)
  rng/rank-00000.pt ...                             (each process's RNG states)
  trainer_state.pt, state.json                      (scheduler; step, number of processes)
Such a checkpoint resumes with the same number of processes; another number (or a plain process)
is refused with a message: each process's random state and its share of the data would not carry
over. (The sharded tensors themselves could be resharded by torch.distributed.checkpoint.)
`final/` is always one consolidated Hugging Face directory.

A checkpoint is written to a temporary directory, flushed to disk (fsync) and renamed into place,
so a directory named `step-*` is always complete; leftovers of an interrupted write (`.tmp-*`,
`.old-*`) are ignored and cleaned up by the next save. Older checkpoints are pruned only after
the new one is in place.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from selfdistill.errors import UserError
from selfdistill.files import fsync_dir, write_atomic, write_json
from selfdistill.models.distributed import Processes, barrier, load_sharded, save_sharded
from selfdistill.models.lora import is_lora
from selfdistill.training.faults import fault

PREFIX = "step-"
_NAME = re.compile(r"step-(\d+)")


def inside(root: Path, *parts: str) -> Path:
    """root/parts, refusing any name that would point outside root (`..`, absolute paths)."""
    root = Path(root)
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise UserError(f"Refusing to write {path}: it is outside the run directory {root}.")
    return path


def fsync_tree(directory: Path) -> None:
    """Flush every file under `directory`, and the directories themselves, to disk."""
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished directory into place; an existing one is moved aside first, never deleted before."""
    aside = None
    if final.exists():
        aside = final.with_name(f".old-{final.name}-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.fullmatch(p.name) and p.is_dir() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def rng_state() -> dict:
    """This process's random generators: CPU, every CUDA device, Python."""
    return {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": list(random.getstate()[1]),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    cuda = state.get("cuda_rng") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate((3, tuple(state["python_rng"]), None))


def _tensor_file(path: Path, value) -> None:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    write_atomic(path, buffer.getvalue())


def save_checkpoint(
    output_dir: Path,
    step: int,
    model,
    tokenizer,
    method,
    optimizer,
    scheduler,
    extra: dict,
    keep_last: int = 2,
    procs: Processes | None = None,
) -> Path:
    """Write the checkpoint of `step` (every process calls this under FSDP2), then prune old ones."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    procs = procs or Processes(0, 1, torch.device("cpu"))
    root = inside(output_dir, "checkpoints")
    final = root / f"{PREFIX}{step:06d}"
    # Every process must find the same temporary directory, so its name carries no process id.
    tmp = root / f".tmp-{PREFIX}{step:06d}" if procs.sharded else root / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
    try:
        if procs.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier(procs)
        if procs.sharded:
            _write_shards(tmp, step, model, tokenizer, method, optimizer, procs)
        else:
            _write_whole(tmp, step, model, tokenizer, method, optimizer)
        barrier(procs)
        if procs.is_main:
            trainer = {"scheduler": scheduler.state_dict()}
            if not procs.sharded:  # (sharded: the optimizer is in shards/, each process's RNG in rng/)
                trainer.update(optimizer=optimizer.state_dict(), **rng_state())
            _tensor_file(tmp / "trainer_state.pt", trainer)
            write_json(tmp / "state.json", {"step": step, "world_size": procs.world, "sharded": procs.sharded, **extra})
            fsync_tree(tmp)
            fault("checkpoint_rename", step)
            replace_dir(tmp, final)
    except BaseException:
        if procs.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if procs.is_main:
        fault("checkpoint_prune", step)
        for old in checkpoint_dirs(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for pattern in (".tmp-*", ".old-*"):
            for leftover in root.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)
    barrier(procs)
    return final


def _write_whole(tmp: Path, step: int, model, tokenizer, method, optimizer) -> None:
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    fault("checkpoint_model", step)
    method.save_state(tmp)


def _write_shards(tmp: Path, step: int, model, tokenizer, method, optimizer, procs: Processes) -> None:
    save_sharded(tmp / "shards", model, optimizer, method.checkpointed_module(), is_lora(model))
    fault("checkpoint_model", step)
    _tensor_file(tmp / "rng" / f"rank-{procs.rank:05d}.pt", rng_state())
    if procs.is_main:
        tokenizer.save_pretrained(tmp)


def load_checkpoint(directory: Path, model, method, optimizer, scheduler, procs: Processes | None = None) -> dict:
    """Restore weights, teacher, optimizer, scheduler and RNG in place; returns state.json.

    A checkpoint that cannot be read (damaged on disk, or not written by this tool) is a UserError
    naming it: nothing is loaded through pickle, so a planted file cannot run code.
    """
    directory = Path(directory)
    procs = procs or Processes(0, 1, torch.device("cpu"))
    _check_world_size(directory, procs)
    try:
        state = json.loads((directory / "state.json").read_text())
        trainer = torch.load(directory / "trainer_state.pt", weights_only=True)
        if procs.sharded:
            _load_shards(directory, model, method, optimizer, procs)
        else:
            _load_whole(directory, model, method)
            optimizer.load_state_dict(trainer["optimizer"])
            set_rng_state(trainer)
        scheduler.load_state_dict(trainer["scheduler"])
        return state
    except Exception as exc:  # noqa: BLE001 - damaged files surface as many types (safetensors, pickle, json)
        raise UserError(
            f"Checkpoint {directory} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"Move it out of {directory.parent} to resume from the previous checkpoint, or pass --overwrite to start again."
        ) from None


def _launch_words(world: int, sharded: bool) -> str:
    return f"{world} process(es) under torchrun" if sharded else "one process without torchrun"


def _check_world_size(directory: Path, procs: Processes) -> None:
    """A sharded checkpoint resumes only with the number of processes that wrote it (a plain one: plainly)."""
    try:
        state = json.loads((directory / "state.json").read_text())
        saved, sharded = state.get("world_size", 1), state.get("sharded", False)
    except (OSError, ValueError, AttributeError):
        return  # a damaged state.json is reported by the load itself
    if (saved, sharded) == (procs.world, procs.sharded):
        return
    launch = f"torchrun --nproc_per_node {saved}" if sharded else "a plain process (no torchrun)"
    raise UserError(
        f"Checkpoint {directory} was written by {_launch_words(saved, sharded)} and this run has "
        f"{_launch_words(procs.world, procs.sharded)}. "
        f"Resume the same way ({launch}), or pass --overwrite to start again."
    )


def _load_whole(directory: Path, model, method) -> None:
    if is_lora(model):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(directory / "adapter_model.safetensors")))
    else:
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(
            directory, dtype=next(model.parameters()).dtype, use_safetensors=True
        )
        model.load_state_dict(saved.state_dict())
        del saved
    method.load_state(directory)


def _load_shards(directory: Path, model, method, optimizer, procs: Processes) -> None:
    load_sharded(directory / "shards", model, optimizer, method.checkpointed_module(), is_lora(model))
    set_rng_state(torch.load(directory / "rng" / f"rank-{procs.rank:05d}.pt", weights_only=True))
