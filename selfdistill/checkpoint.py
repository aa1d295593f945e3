"""Checkpoints: a loadable model directory plus everything needed to continue exactly.

Layout of `OUTPUT_DIR/checkpoints/step-000123/`:
  config.json, model.safetensors, tokenizer files  (AutoModelForCausalLM.from_pretrained reads it;
                                                    a LoRA run stores adapter_config.json + adapter_model.safetensors)
  teacher.safetensors                               (the SDFT teacher, unless it is the student itself)
  trainer_state.pt                                  (optimizer, scheduler, RNG; read with weights_only=True)
  state.json                                        (step, total steps, run fingerprint)

A checkpoint is written to a temporary directory, flushed to disk (fsync) and renamed into place,
so a directory named `step-*` is always complete; leftovers of an interrupted write (`.tmp-*`,
`.old-*`) are ignored and cleaned up by the next save. Older checkpoints are pruned only after
the new one is in place.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from selfdistill.errors import UserError
from selfdistill.faults import fault
from selfdistill.models.lora import is_lora

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


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(output_dir: Path, step: int, model, tokenizer, method, optimizer, scheduler, extra: dict,
                    keep_last: int = 2) -> Path:
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    root = inside(output_dir, "checkpoints")
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        fault("checkpoint_model", step)
        method.save_state(tmp)
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "python_rng": list(random.getstate()[1]),
            },
            tmp / "trainer_state.pt",
        )
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
        fsync_tree(tmp)
        fault("checkpoint_rename", step)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fault("checkpoint_prune", step)
    for old in checkpoint_dirs(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for pattern in (".tmp-*", ".old-*"):
        for leftover in root.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def load_checkpoint(directory: Path, model, method, optimizer, scheduler) -> dict:
    """Restore weights, teacher, optimizer, scheduler and RNG in place; returns state.json.

    A checkpoint that cannot be read (damaged on disk, or not written by this tool) is a UserError
    naming it: nothing is loaded through pickle, so a planted file cannot run code.
    """
    directory = Path(directory)
    try:
        return _load_checkpoint(directory, model, method, optimizer, scheduler)
    except Exception as exc:  # noqa: BLE001 - damaged files surface as many types (safetensors, pickle, json)
        raise UserError(
            f"Checkpoint {directory} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"Move it out of {directory.parent} to resume from the previous checkpoint, or pass --overwrite to start again."
        ) from None


def _load_checkpoint(directory: Path, model, method, optimizer, scheduler) -> dict:
    if is_lora(model):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(directory / "adapter_model.safetensors")))
    else:
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(directory, dtype=next(model.parameters()).dtype, use_safetensors=True)
        model.load_state_dict(saved.state_dict())
        del saved
    method.load_state(directory)
    state = torch.load(directory / "trainer_state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate((3, tuple(state["python_rng"]), None))
    return json.loads((directory / "state.json").read_text())
