"""Saving a model so that `AutoModelForCausalLM.from_pretrained` (and vLLM, lm-eval) read it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from selfdistill.files import write_atomic
from selfdistill.models.lora import is_lora


def save_model(model, tokenizer, directory: str | Path) -> None:
    """safetensors weights + config + tokenizer. A LoRA model is saved merged, with its adapter beside it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if is_lora(model):
        model.save_pretrained(directory / "adapter", safe_serialization=True)
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(directory, safe_serialization=True)
    else:
        model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def record_base_model(directory: str | Path, base_model: str) -> None:
    """Name `base_model` as the base of the LoRA adapter in `directory/adapter/`, if there is one.

    PEFT records the directory the base was loaded from, which for a hub id is a local cache path and for the
    embedded model the converted copy under SELFDISTILL_CACHE: neither exists on another machine, so
    `AutoPeftModelForCausalLM.from_pretrained(adapter)` would fail there.
    """
    path = Path(directory) / "adapter" / "adapter_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_model
    write_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
