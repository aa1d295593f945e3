"""LoRA adapters through PEFT, and the weight an adapted layer computes with (W0 + scale·B·A)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


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
