"""The settings of `selfdistill.plan` and `sdft plan` beyond the training config (see selfdistill.options)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from selfdistill.options import check_at_least, check_types, setting


@dataclass(frozen=True, kw_only=True)
class PlanSettings:
    """The launch planned for and where its figures go."""

    processes: int = setting(help="Processes of the torchrun launch (GPUs), e.g. 8 for --nproc_per_node 8.")
    json_file: Path | None = setting(None, "Also write the figures (bytes) to this JSON file.")

    def __post_init__(self) -> None:
        check_types(self)
        check_at_least("--processes", self.processes, 1)
