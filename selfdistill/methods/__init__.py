"""Training methods: each turns a batch of records into a loss; the loop in train.py is shared.

The list of methods lives in `selfdistill.registry` (names, descriptions, classes).
"""

from selfdistill.methods.base import Method, TrainItem
from selfdistill.registry import METHODS, method_class

REGISTRY: dict[str, type[Method]] = {name: method_class(name) for name in METHODS}


def get_method(name: str) -> type[Method]:
    return REGISTRY[name]


__all__ = ["Method", "TrainItem", "REGISTRY", "get_method"]
