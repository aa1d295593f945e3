"""Training methods: each turns a batch of records into a loss; the loop in training/loop.py is shared.

A method is one module of this folder ending with its registry entry (`METHOD = MethodInfo(...)`),
which `selfdistill.registry` finds; `build_method` builds one with the parts its entry declares.
"""

from selfdistill.methods.base import Method, TrainItem
from selfdistill.methods.build import build_method
from selfdistill.registry import method_class as get_method

__all__ = ["Method", "TrainItem", "build_method", "get_method"]
