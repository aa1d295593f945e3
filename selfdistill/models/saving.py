"""Saving a model so that `AutoModelForCausalLM.from_pretrained` (and vLLM, lm-eval) read it."""

from __future__ import annotations

import copy
from pathlib import Path

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
