"""selfdistill: continual learning from demonstrations with Self-Distillation Fine-Tuning (SDFT).

The Python API (each `sdft` command as one call, with the command's defaults):

    Config(...)               every training setting, typed and checked when built
                              (sections as mappings: Config(method="sft", train={"lr": 1e-4}))
    load_config(path, overrides)   a Config from a YAML file plus `section.key=value` overrides
    train(config, records=...)     train one method (`sdft train`); returns a TrainResult
    evaluate(model, task)          score a model on a task (`sdft eval --task`); returns the summary
    run_stream(config)             train and evaluate a stream of tasks (`sdft continual`)
    diagnose(task)                 teacher vs student on the student's own samples (`sdft diagnose`)
    plan(config, processes=N)      memory per process of a torchrun launch, before renting GPUs (`sdft plan`)
    METHODS                        the training methods and what each does
    UserError, RunFailed, RunStopped   bad input / a run that could not go on / a deliberate stop

Importing the package is quick: each name loads its module on first use.

`selfdistill.diagnose` is also the name of the package that implements it; that package is made
callable (calling it runs the API function above), so both `selfdistill.diagnose("tooluse")` and
`import selfdistill.diagnose` work.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it; loaded on first attribute access.
_EXPORTS = {
    "Config": "selfdistill.config",
    "load_config": "selfdistill.config",
    "train": "selfdistill.api",
    "evaluate": "selfdistill.api",
    "run_stream": "selfdistill.api",
    "diagnose": "selfdistill.api",  # via the callable package selfdistill.diagnose
    "plan": "selfdistill.api",
    "METHODS": "selfdistill.registry",
    "UserError": "selfdistill.errors",
    "RunFailed": "selfdistill.errors",
    "RunStopped": "selfdistill.errors",
}

__all__ = [
    "Config",
    "load_config",
    "train",
    "evaluate",
    "run_stream",
    "diagnose",
    "plan",
    "METHODS",
    "UserError",
    "RunFailed",
    "RunStopped",
    "__version__",
]

if TYPE_CHECKING:  # for editors and type checkers; at run time the names load lazily
    from selfdistill.api import diagnose, evaluate, plan, run_stream, train
    from selfdistill.config import Config, load_config
    from selfdistill.errors import RunFailed, RunStopped, UserError
    from selfdistill.registry import METHODS


_CALLABLE_MODULES = ("diagnose",)  # subpackages that share their name with an API function


def _make_callable(module: types.ModuleType, name: str) -> None:
    """Let `module` be called as the API function `name` (its attributes stay the module's)."""

    def __call__(self, *args, **kwargs):
        from selfdistill import api

        return getattr(api, name)(*args, **kwargs)

    __call__.__doc__ = f"selfdistill.{name}(...): see selfdistill.api.{name}."
    module.__class__ = type(f"_Callable_{name}", (types.ModuleType,), {"__call__": __call__})


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # The import system sets `selfdistill.diagnose` to the subpackage once it is imported, whoever imports it.
        if name in _CALLABLE_MODULES and isinstance(value, types.ModuleType) and not callable(value):
            _make_callable(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in _CALLABLE_MODULES:
        return importlib.import_module(f"selfdistill.{name}")  # made callable as it is set on the package
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'selfdistill' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
