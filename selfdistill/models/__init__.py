"""Loading any causal LM (hub id, local directory, GGUF file, the embedded default), LoRA, saving."""

from selfdistill.models.loading import EMBEDDED_MODELS, load_model, load_tokenizer, stop_token_ids
from selfdistill.models.lora import apply_lora, is_lora
from selfdistill.models.saving import save_model

__all__ = ["EMBEDDED_MODELS", "load_model", "load_tokenizer", "stop_token_ids", "apply_lora", "is_lora", "save_model"]
