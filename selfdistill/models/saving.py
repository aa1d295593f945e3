"""Saving a model so that `AutoModelForCausalLM.from_pretrained` (and vLLM, lm-eval) read it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from selfdistill.files import write_atomic
from selfdistill.models.lora import is_lora


def save_model(model, tokenizer, directory: str | Path, dtype: torch.dtype | None = None) -> None:
    """safetensors weights + config + tokenizer. A LoRA model is saved merged, with its adapter beside it.

    `dtype`: the floating weights' dtype in the files, config.json's `dtype` with them (None: as they are).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    copied = is_lora(model)
    if copied:
        model.save_pretrained(directory / "adapter", safe_serialization=True)
        model = copy.deepcopy(model).merge_and_unload()
    if dtype is not None and any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
        # Cast a copy: the caller's model keeps its weights (a run returns it, and may train on).
        model = model if copied else copy.deepcopy(model)
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.to(dtype)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def final_dtype(setting: str, precision: str, model) -> torch.dtype | None:
    """The dtype of final/'s weights (`model.save_dtype`); None: the weights' own.

    auto: a run that computes in bf16 saves in the dtype the loaded checkpoint was published in
    (`published_dtype`, bf16 for most models), the size vLLM and transformers then load and serve; a
    run computing in fp32, or a model given in memory, keeps its weights' dtype.
    """
    if setting != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[setting]
    base = model.get_base_model() if is_lora(model) else model
    published = getattr(base, "published_dtype", None)
    return published if precision == "bf16" and published is not None else None


def published_dtype(path: str) -> torch.dtype | None:
    """The floating dtype a model's config.json names (`dtype`, or the older `torch_dtype`), or None."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(path)
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


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
