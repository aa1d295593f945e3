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
    Learner(workdir)               a model that keeps learning: add, round, status, rollback, export
                                   (`sdft learn`; Learner.init(workdir, model=..., method=...) creates one)
    METHODS                        the training methods and what each does
    UserError, RunFailed, RunStopped   bad input / a run that could not go on / a deliberate stop

Importing the package is quick: each name loads its module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it; loaded on first attribute access.
_EXPORTS = {
    "Config": "selfdistill.config",
    "load_config": "selfdistill.config",
    "train": "selfdistill.api",
    "evaluate": "selfdistill.api",
    "run_stream": "selfdistill.api",
    "diagnose": "selfdistill.api",
    "plan": "selfdistill.api",
    "METHODS": "selfdistill.registry",
    "Learner": "selfdistill.learner",
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
    "Learner",
    "UserError",
    "RunFailed",
    "RunStopped",
    "__version__",
]

if TYPE_CHECKING:  # for editors and type checkers; at run time the names load lazily
    from selfdistill.api import diagnose, evaluate, plan, run_stream, train
    from selfdistill.config import Config, load_config
    from selfdistill.errors import RunFailed, RunStopped, UserError
    from selfdistill.learner import Learner
    from selfdistill.registry import METHODS


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'selfdistill' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
