"""Training methods: each turns a batch of records into a loss; the loop in train.py is shared."""

from selfdistill.methods.base import Method, TrainItem
from selfdistill.methods.sdft import SDFT
from selfdistill.methods.sft import SFT

REGISTRY: dict[str, type[Method]] = {"sdft": SDFT, "sft": SFT}


def get_method(name: str) -> type[Method]:
    return REGISTRY[name]


__all__ = ["Method", "TrainItem", "REGISTRY", "get_method"]
