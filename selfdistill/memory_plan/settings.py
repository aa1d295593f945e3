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


# The defaults describe nodes of 8 H100 SXM GPUs. NVLink 4 moves 450 GB/s per direction (900 GB/s both
# ways); NCCL's all-gather and reduce-scatter reach a bus bandwidth of roughly 80% of that on such a node,
# so 360 GB/s is taken. Between nodes each GPU has a 400 Gb/s InfiniBand NIC (50 GB/s); 80% of it, 40 GB/s,
# is taken as achievable. 989 TFLOP/s is the H100 SXM's dense bf16 peak; LLM training commonly reaches
# 30-50% of it (model FLOPs utilisation), 40% is taken.
@dataclass(frozen=True, kw_only=True)
class Hardware:
    """The machines a plan's communication and compute times are for."""

    gpus_per_node: int = setting(
        8,
        "GPUs (processes) per node: --processes over several nodes crosses the inter-node link, and "
        "distributed.shard_size 0 shards within one node's processes (hybrid sharding).",
    )
    intra_node_bandwidth: float = setting(
        360.0, "GB/s per GPU that collectives achieve within a node (bus bandwidth; NVLink 4: 80% of 450)."
    )
    inter_node_bandwidth: float = setting(
        40.0, "GB/s per GPU that collectives achieve between nodes (bus bandwidth; 400 Gb/s InfiniBand: 80% of 50)."
    )
    gpu_tflops: float = setting(989.0, "Peak dense TFLOP/s of one GPU in the compute dtype (H100 SXM, bf16: 989).")
    mfu: float = setting(0.4, "Fraction of --gpu-tflops that training achieves (model FLOPs utilisation).")

    def __post_init__(self) -> None:
        check_types(self)
        check_at_least("--gpus-per-node", self.gpus_per_node, 1)
        for option, value in (
            ("--intra-node-bandwidth", self.intra_node_bandwidth),
            ("--inter-node-bandwidth", self.inter_node_bandwidth),
            ("--gpu-tflops", self.gpu_tflops),
        ):
            if not value > 0:
                raise UserError(f"{option} must be more than 0, got {value}.")
        if not 0 < self.mfu <= 1:
            raise UserError(f"--mfu must lie in (0, 1], got {self.mfu}.")
