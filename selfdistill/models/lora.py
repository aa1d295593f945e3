"""LoRA adapters through PEFT."""

from __future__ import annotations


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def apply_lora(model, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0, target_modules="all-linear"):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)
