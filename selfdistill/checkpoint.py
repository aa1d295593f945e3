"""Checkpoints: a loadable model directory plus everything needed to continue exactly.

Layout of `OUTPUT_DIR/checkpoints/step-000123/`:
  config.json, model.safetensors, tokenizer files  (AutoModelForCausalLM.from_pretrained reads it;
                                                    a LoRA run stores adapter_config.json + adapter_model.safetensors)
  teacher.safetensors                               (the SDFT teacher, unless it is the student itself)
  trainer_state.pt                                  (optimizer, scheduler, RNG; read with weights_only=True)
  state.json                                        (step, total steps, run fingerprint)

A checkpoint is written to a temporary directory and renamed into place, so a directory named
`step-*` is always complete; leftovers of an interrupted write are ignored and cleaned up.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from selfdistill.models.lora import is_lora

PREFIX = "step-"


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(output_dir: Path, step: int, model, tokenizer, method, optimizer, scheduler, extra: dict,
                    keep_last: int = 2) -> Path:
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
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
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def load_checkpoint(directory: Path, model, method, optimizer, scheduler) -> dict:
    """Restore weights, teacher, optimizer, scheduler and RNG in place; returns state.json."""
    directory = Path(directory)
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
