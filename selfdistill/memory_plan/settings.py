"""The settings of `selfdistill.plan` and `sdft plan` beyond the training config (see selfdistill.options)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from selfdistill.errors import UserError
from selfdistill.options import check_at_least, check_types, setting


@dataclass(frozen=True, kw_only=True)
class PlanSettings:
    """The launch planned for and where its figures go."""

    processes: int = setting(help="Processes of the torchrun launch (GPUs), e.g. 8 for --nproc_per_node 8.")
    gpu_memory: float | None = setting(
        None,
        "GiB of GPU memory per process (e.g. 79 for an 80 GB card): ends the plan with a verdict, 'fits' or "
        "'does not fit' and what would make it fit.",
    )
    json_file: Path | None = setting(None, "Also write the figures (bytes) to this JSON file.")

    def __post_init__(self) -> None:
        check_types(self)
        check_at_least("--processes", self.processes, 1)
        if self.gpu_memory is not None and not self.gpu_memory > 0:
            raise UserError(f"--gpu-memory must be more than 0 GiB, got {self.gpu_memory}.")
