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


def save_full_model(model, state_dict: dict, tokenizer, directory: str | Path) -> None:
    """Like `save_model`, for a sharded model whose whole weights were gathered into `state_dict`.

    A plain (unsharded) copy is built on the CPU from the model's config, loaded with the gathered
    weights and saved, so `final/` is the same directory a one-process run writes.
    """
    from transformers import AutoModelForCausalLM

    if is_lora(model):
        from peft import get_peft_model

        base = AutoModelForCausalLM.from_config(model.get_base_model().config)
        plain = get_peft_model(base, copy.deepcopy(model.peft_config["default"]))
    else:
        plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(state_dict)
    plain.generation_config = copy.deepcopy(model.generation_config)
    save_model(plain, tokenizer, directory)
