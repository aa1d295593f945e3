"""Training methods: each turns a batch of records into a loss; the loop in training/loop.py is shared.

The list of methods lives in `selfdistill.registry` (names, descriptions, classes, what each
reads); a method's module is imported only when a run asks for it.
"""

from selfdistill.methods.base import Method, TrainItem
from selfdistill.registry import method_class


def get_method(name: str) -> type[Method]:
    """The Method subclass registered under `name`."""
    return method_class(name)


__all__ = ["Method", "TrainItem", "get_method"]
