"""LoRA adapters through PEFT, and the weight an adapted layer computes with (W0 + scale·B·A)."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from selfdistill.errors import UserError


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def apply_lora(model, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0, target_modules="all-linear"):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():
        # PEFT reads transformers' deprecated `is_gradient_checkpointing` attribute while wrapping; the
        # FutureWarning that prints on every LoRA run is about PEFT's code, and nothing a user can change.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def lora_factors(layer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one adapter of a LoRA layer, as the layer holds them."""
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight


def merged_weight(
    layer,
    base: torch.Tensor,
    dtype: torch.dtype,
    factors: Callable[[object, str], tuple[torch.Tensor, torch.Tensor]] = lora_factors,
) -> torch.Tensor:
    """W0 + scale·B·A of one LoRA layer (summed over its active adapters), as a new tensor in `dtype`.

    The one merge of the package: the vLLM engine's weights (`selfdistill.models.sharded.merged_weights`,
    in W0's dtype, as PEFT's merge adds it) and the EMA teacher's target (`selfdistill.distillation.teacher`, in fp32).
    `base` is W0, or this process's rows of it; `factors(layer, adapter)` gives (A, B) with B's rows
    matching `base`'s (under FSDP2: the whole A and this process's rows of B, or both gathered whole).
    Each product is computed in the factors' dtype, widened to `dtype` where that is wider (PEFT keeps
    the factors in fp32). A layer whose adapters are switched off (`disable_adapter()`) gives W0.
    """
    merged = base.detach().to(dtype, copy=True)
    if getattr(layer, "disable_adapters", False):
        return merged
    for adapter in layer.active_adapters:
        a, b = factors(layer, adapter)
        wide = torch.promote_types(b.dtype, dtype)
        delta = (b.detach().to(wide) @ a.detach().to(wide)) * layer.scaling[adapter]
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T
        merged += delta
    return merged


_UNSTACKABLE = {
    "use_dora": lambda v: bool(v),
    "modules_to_save": lambda v: bool(v),
    "bias": lambda v: v not in (None, "none"),
    "rank_pattern": lambda v: bool(v),
    "alpha_pattern": lambda v: bool(v),
    "fan_in_fan_out": lambda v: bool(v),
}


def stack_adapters(directories: list[Path], out: Path, base_model: str | None = None) -> Path:
    """One PEFT LoRA adapter equal to the adapters in `directories` applied one after the other.

    Each adapter adds scale_i·B_i·A_i to a layer's weight, so their sum is [s_1·B_1 … s_n·B_n] · [A_1; …; A_n]:
    one adapter of rank Σ r_i with scale 1 (lora_alpha = r), exactly, in fp32. A layer that only some of the
    adapters adapt gets zero factors from the others. Adapters that are not plain LoRA (DoRA, trained
    modules, biases, per-layer ranks) are refused: their sum is no LoRA adapter. `base_model`: the model the
    stacked adapter applies to, written into its config.
    """
    from safetensors.torch import load_file, save_file

    a_parts: dict[str, list] = {}
    b_parts: dict[str, list] = {}
    ranks, config = [], {}
    for i, directory in enumerate(directories):
        config = json.loads((directory / "adapter_config.json").read_text())
        for key, unstackable in _UNSTACKABLE.items():
            if unstackable(config.get(key)):
                raise UserError(f"{directory / 'adapter_config.json'}: {key}={config[key]!r} cannot be stacked")
        rank = int(config["r"])
        scale = float(config["lora_alpha"]) / (math.sqrt(rank) if config.get("use_rslora") else rank)
        for key, tensor in load_file(str(directory / "adapter_model.safetensors")).items():
            module, factor = key.rsplit(".lora_", 1)
            parts = a_parts if factor.startswith("A.") else b_parts
            parts.setdefault(module, {})[i] = tensor.float() * (1.0 if parts is a_parts else scale)
        ranks.append(rank)
    stacked = {}
    for module in sorted(a_parts):
        some_a, some_b = next(iter(a_parts[module].values())), next(iter(b_parts[module].values()))
        a = [a_parts[module].get(i, some_a.new_zeros(r, some_a.shape[1])) for i, r in enumerate(ranks)]
        b = [b_parts[module].get(i, some_b.new_zeros(some_b.shape[0], r)) for i, r in enumerate(ranks)]
        stacked[f"{module}.lora_A.weight"] = torch.cat(a, dim=0).contiguous()
        stacked[f"{module}.lora_B.weight"] = torch.cat(b, dim=1).contiguous()
    total = sum(ranks)
    targets = sorted({module.rsplit(".", 1)[-1] for module in a_parts})
    config.update(
        r=total, lora_alpha=total, use_rslora=False, target_modules=targets, rank_pattern={}, alpha_pattern={}
    )
    if base_model is not None:
        config["base_model_name_or_path"] = base_model
    out.mkdir(parents=True, exist_ok=True)
    save_file(stacked, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out
