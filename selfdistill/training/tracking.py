"""Experiment tracking: every step's metrics to TensorBoard and/or Weights & Biases, as asked.

`metrics.jsonl` in the run directory is always written by the training loop; this adds the
tools people watch runs in, chosen with `train.report_to` (e.g. `[tensorboard, wandb]`):

- tensorboard: event files in RUN/tensorboard/ (torch.utils.tensorboard; needs the `tensorboard`
  package), every numeric metric as a scalar `train/<name>`, the run's settings as hparams and as
  a text summary.
- wandb: a W&B run in RUN/wandb/ with the settings as its config. Without a network, set
  WANDB_MODE=offline; the run is stored locally and `wandb sync RUN/wandb/offline-run-*` uploads
  it later.

Only the main process logs (`is_main`); the others get a tracker that does nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from selfdistill.errors import UserError

# Which package each backend needs, and how to get it.
REQUIREMENTS = {"tensorboard": "tensorboard", "wandb": "wandb"}
INSTALL_HINT = (
    "pip install {package} (or, in a selfdistill checkout, pip install -e '.[tracking]'; make env installs it)"
)


def require_backends(report_to: list[str]) -> None:
    """A UserError naming the missing package for any asked-for backend that is not installed (no side effects),
    so a run can check it with its other inputs, before it writes anything."""
    for name in report_to:
        package = REQUIREMENTS[name]
        if importlib.util.find_spec(package) is None:
            raise UserError(
                f"train.report_to includes {name!r}, but the {package!r} package is not installed: "
                f"{INSTALL_HINT.format(package=package)}, or remove {name!r} from train.report_to."
            )


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4}; values TensorBoard's hparams cannot hold become text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = json.dumps(value)
    return flat


def numeric(record: dict) -> dict[str, float]:
    """The record's numbers (booleans as 0/1), without the step counter itself."""
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


class Tracker:
    """Sends each step's metrics to the opened backends; `close()` flushes and ends them."""

    def __init__(self, backends: list | None = None):
        self.backends = backends or []

    def log(self, record: dict, step: int) -> None:
        values = numeric(record)
        for backend in self.backends:
            backend.log(values, step)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _TensorBoard:
    def __init__(self, directory: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(directory))
        # The settings as hparams (the HParams tab, with train/loss as its metric) and as readable text.
        for summary in hparams(flatten(config), {"train/loss": 0.0}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", global_step=0)

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"train/{name}", value, global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class _WandB:
    def __init__(self, directory: Path, config: dict, name: str):
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "selfdistill"),
            name=name,
            dir=str(directory),
            config=config,
            settings=wandb.Settings(silent=True),
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_tracker(cfg, output_dir: str | Path, is_main: bool = True) -> Tracker:
    """The tracker of a run: the backends `cfg.train.report_to` asks for, writing under `output_dir`."""
    report_to = list(getattr(cfg.train, "report_to", []) or [])
    if not is_main or not report_to:
        return Tracker()
    require_backends(report_to)
    out = Path(output_dir)
    config = cfg.to_dict()
    backends: list = []
    try:
        if "tensorboard" in report_to:
            backends.append(_TensorBoard(out / "tensorboard", config))
        if "wandb" in report_to:
            backends.append(_WandB(out, config, out.resolve().name))
    except BaseException:
        Tracker(backends).close()
        raise
    return Tracker(backends)
