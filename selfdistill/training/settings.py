"""The settings of `sdft train` and `selfdistill.train` beyond the training config, with their defaults
and checks (see selfdistill.options)."""

from __future__ import annotations

from dataclasses import dataclass

from selfdistill.options import check_types, setting


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """How `selfdistill.training.loop` and `sdft train` run a config (the Config holds every training setting)."""

    resume: bool = setting(
        False,
        "Continue from the newest checkpoint in the run directory (none yet: start from step 0, with a warning).",
    )
    overwrite: bool = setting(False, "Replace a different run already in the run directory.")

    def __post_init__(self) -> None:
        check_types(self)
