"""Multi-process training with FSDP2 (`torch.distributed.fsdp.fully_shard`), launched by torchrun.

One process (no torchrun) trains the plain model. Under torchrun every process holds a shard
of the student, of its gradients, of the AdamW state and of the teacher:

- Shard plan: each decoder layer is one FSDP unit, the rest (embeddings, final norm, output
  head) is the root unit. The head stays in the root on purpose: the chunked loss calls it once
  per chunk after the backbone's forward, and ranks have different numbers of chunks, so the
  head must not gather on its own (a collective per chunk would deadlock). The root keeps its
  weights gathered from its forward until the end of the backward.
- The methods call the backbone (`model.get_decoder()`) directly; that bypasses the root's
  forward hooks, so `shard_model` registers `backbone_forward` as an FSDP forward method and
  `backbone(model)` is what the methods call.
- Gradients are summed, not averaged, across processes: the loop already divides every
  process's loss by the step's global number of loss tokens, so a sum gives exactly what one
  process computes on the same global batch.
- A model given by name is built on the meta device, sharded while empty, and each process then
  allocates and reads only its own shards (`selfdistill.models.sharded`); no process ever holds
  the whole model. The teacher is a copy made before sharding (of the empty student, so free),
  sharded with the same plan, so its EMA update is an elementwise operation on local shards.
- Rollouts need the full weights for many small forwards whose number differs between ranks:
  `full_weights` gathers every unit once, decodes without further collectives, and frees them.
- Checkpoints: `save_sharded` / `load_sharded` write and read this process's shards with
  `torch.distributed.checkpoint`; `final/` is written one gathered parameter at a time
  (`selfdistill.models.sharded.write_final`).
"""

from __future__ import annotations

import atexit
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    """Where this process stands: its rank among `world` processes, its device, and whether the
    model is sharded (every run launched by torchrun, even with one process; never a plain one).

    `mesh` is the device mesh the model is sharded over: one dimension ("shard") when every process
    holds a shard of one copy, two ("replicate", "shard") for hybrid sharding (a copy per group of
    `shard_size` processes, usually one node). None for a plain process and for one built by hand,
    where `shard_model` uses all processes as one shard group.
    """

    rank: int
    world: int
    device: torch.device
    sharded: bool = False
    mesh: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def local_rank(self) -> int:
        """This process's place on its machine (torchrun's LOCAL_RANK; 0 for a plain process)."""
        return int(os.environ.get("LOCAL_RANK", "0")) if self.sharded else 0


def default_device() -> torch.device:
    """This process's GPU when there is one (torchrun's LOCAL_RANK picks it), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def setup_processes(settings=None) -> Processes:
    """Join torchrun's process group (gloo on CPUs, nccl on GPUs) and build the device mesh the model
    is sharded over; a plain process needs neither. `settings`: the config's `distributed` section
    (defaults when None)."""
    from selfdistill.config import DistributedConfig

    settings = settings or DistributedConfig()
    device = default_device()
    # Only a launcher (torchrun and those built on it) makes a run multi-process. A process group
    # that something else in this process set up, such as the in-process vLLM engine of an earlier
    # run, does not: sharding a plain run over it would turn its weights into DTensors.
    if "WORLD_SIZE" not in os.environ:
        return Processes(0, 1, device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=settings.timeout_minutes)
        )
        # Leave the group before the interpreter tears down: a process that exits with the group (and
        # its background threads) still alive can abort in their destructors ("terminate called
        # without an active exception"), failing a run that had finished.
        atexit.register(_leave_process_group)
    world = dist.get_world_size()
    mesh = device_mesh(device, world, shard_group_size(settings.shard_size, world))
    return Processes(dist.get_rank(), world, device, sharded=True, mesh=mesh)


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_group_size(setting: int, world: int) -> int:
    """How many processes shard one copy of the model: `distributed.shard_size`, or for 0 the processes
    of one node (torchrun's LOCAL_WORLD_SIZE), never more than all of them."""
    from selfdistill.errors import UserError

    size = setting or min(int(os.environ.get("LOCAL_WORLD_SIZE", world)), world)
    if size > world or world % size:
        raise UserError(
            f"distributed.shard_size {size}"
            + (" (the processes of one node)" if not setting else "")
            + f" must divide the number of processes, {world}: each group of shard_size processes holds one "
            "copy of the model. Set distributed.shard_size to a divisor of it."
        )
    return size


def device_mesh(device: torch.device, world: int, shard_size: int):
    """The mesh of `world` processes on `device`'s type: ("shard",) when one group shards the model,
    ("replicate", "shard") for world / shard_size groups of `shard_size` (ranks 0..shard_size-1 the first;
    torchrun numbers a node's processes consecutively, so a group is a node)."""
    from torch.distributed.device_mesh import init_device_mesh

    if shard_size == world:
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def barrier(procs: Processes) -> None:  # (the helpers below are no-ops for a plain process)
    if procs.sharded:
        dist.barrier()


def sum_across(procs: Processes, values: list[float]) -> list[float]:
    """Element-wise sums over all processes (float64, so token counts stay exact)."""
    if not procs.sharded:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device(procs))
    dist.all_reduce(tensor)
    return tensor.tolist()


def max_across(procs: Processes, value: int) -> int:
    if not procs.sharded:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_comm_device(procs))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def extremes_across(procs: Processes, stats: dict[str, float]) -> dict[str, float]:
    """`*_min` keys reduced by minimum and `*_max` keys by maximum over all processes (other keys: left out).

    Every process must hold the same keys; one that measured nothing sends +inf / -inf.
    """
    keys = sorted(k for k in stats if k.endswith(("_min", "_max")))
    if not procs.sharded or not keys:
        return {k: stats[k] for k in keys}
    # max(x) and -min(x) in one MAX reduction
    signed = [stats[k] if k.endswith("_max") else -stats[k] for k in keys]
    tensor = torch.tensor(signed, dtype=torch.float64, device=_comm_device(procs))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return {k: v if k.endswith("_max") else -v for k, v in zip(keys, tensor.tolist())}


def _comm_device(procs: Processes) -> torch.device:
    return procs.device if procs.device.type == "cuda" else torch.device("cpu")


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def processes_sharing(model) -> int:
    """How many processes train this model together: the world of a sharded model, else 1."""
    return dist.get_world_size() if is_sharded(model) else 1


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded (DTensor) parameter; a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def backbone(model):
    """The callable that returns the backbone's final hidden states (`.last_hidden_state`)."""
    return getattr(model, "backbone_forward", None) or model.get_decoder()


def _backbone_forward(self, **kwargs):
    return self.get_decoder()(**kwargs)


def decoder_layers(model) -> list[torch.nn.Module]:
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers found to shard (expected get_decoder().layers)")
    return list(layers)


def gather_dtype(setting: str, precision: str) -> torch.dtype | None:
    """The dtype a module's weights are all-gathered in (`distributed.gather`): bf16 for a module that
    computes in bf16 unless the setting is 'fp32'; None (their own dtype) otherwise."""
    return torch.bfloat16 if setting == "auto" and precision == "bf16" else None


def mixed_precision(gather: torch.dtype | None, root: bool = False):
    """FSDP2's policy for one unit: weights gathered in `gather` (None: their own dtype), gradients
    reduced in fp32 whatever the run's precision, inputs never cast.

    bf16 runs compute in bf16 through autocast (`selfdistill.precision.autocast_context`), in one
    process and in many alike: the backbone's matrix products in bf16; its residual stream, norms,
    the student's output head, the loss and every gradient buffer in fp32.

    - gather=bf16 (`distributed.gather: auto`, the default of a bf16 run): each decoder layer's
      matrices travel and are held in bf16, half the bytes of fp32. Their products compute exactly
      what autocast computes from the fp32 weights (autocast rounds them to bf16 the same way), and
      their gradients, computed in bf16 either way, are reduced in fp32. Norm weights are not
      matrix-product inputs: autocast leaves them fp32, and rounded to bf16 a small update to a
      weight near 1 would not show at all (bf16's step there is 2^-7). So each norm is a unit of its
      own gathered in fp32 (a few kB; two more small all-gathers per layer, three for Qwen3's
      per-head norms). The root unit (embeddings, final norm, output head) is gathered in its own
      dtype too: the head computes the logits in fp32 and sums its gradient over the loss's chunks
      in fp32. Inputs are never cast (`cast_forward_inputs=False`), so the residual stream between
      layers stays fp32, as in one process. Measured on the CPU tests: 2 processes against 1 in
      bf16, the same difference as with the fp32 gather.
    - gather=None (`distributed.gather: fp32`): every unit gathers the fp32 master weights, and N
      processes compute what one does up to the order of the gradient sums; at twice the bytes.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(
        param_dtype=None if root else gather, reduce_dtype=torch.float32, cast_forward_inputs=False
    )


def _norms(layer) -> list[torch.nn.Module]:
    """The layer's submodules whose weights are all vectors and that have no submodules of their own: its
    norms (RMSNorm / LayerNorm, and Qwen3's per-head q_norm / k_norm)."""
    return [
        module
        for module in layer.modules()
        if module is not layer
        and not list(module.children())
        and (own := list(module.parameters(recurse=False)))
        and all(p.dim() == 1 for p in own)
    ]


def shard_model(model, procs: Processes, *, precision: str = "fp32", gather: str = "auto", warm_up: bool = True):
    """Shard `model` in place with the plan above over `procs.mesh`; returns it (now an FSDP module).

    `precision` is what the module computes in ('fp32' or 'bf16'; a teacher's may differ from the
    student's) and `gather` the `distributed.gather` setting: together they choose the dtype its
    weights are all-gathered in (`gather_dtype`). `warm_up=False` for a model whose parameters are
    still on the meta device (nothing to compute with yet): call `first_forward(model, procs)` once
    its shards hold their weights.
    """
    import types

    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    # Always an explicit mesh on this process's device: left to itself torch builds its default mesh on
    # the accelerator it was compiled for (cuda on every CUDA wheel), even for gloo processes on CPUs.
    mesh = procs.mesh if procs.mesh is not None else device_mesh(procs.device, procs.world, procs.world)
    dtype = gather_dtype(gather, precision)
    model.gathered_precision = "bf16" if dtype == torch.bfloat16 else "fp32"  # what its forwards must run under
    for layer in decoder_layers(model):
        if dtype is not None:
            for norm in _norms(layer):  # their own small units, gathered in their own dtype (see mixed_precision)
                fully_shard(norm, mesh=mesh, mp_policy=mixed_precision(None))
        fully_shard(layer, mesh=mesh, mp_policy=mixed_precision(dtype))
    fully_shard(model, mesh=mesh, mp_policy=mixed_precision(dtype, root=True))
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # A plain sum on every backend and process count: each process's loss already carries
            # its share. Left to itself, torch reduces with PREMUL_SUM on several GPUs, AVG on one
            # (which its own code warns may be wrong for one process on NCCL), and gloo has neither.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    model.backbone_forward = types.MethodType(_backbone_forward, model)
    register_fsdp_forward_method(model, "backbone_forward")
    if warm_up:
        first_forward(model, procs)
    return model


@torch.no_grad()
def first_forward(model, procs: Processes) -> None:
    """FSDP sets up its root on the first forward through the root; do it now, with one token,
    so that gathering weights for a rollout (the first thing an SDFT step does) finds it ready."""
    from selfdistill.precision import autocast_context

    was_training = model.training
    model.eval()
    # Layers gathered in bf16 compute only under autocast, as every forward of the run does.
    with autocast_context(procs.device, getattr(model, "gathered_precision", "fp32")):
        model.backbone_forward(input_ids=torch.zeros((1, 1), dtype=torch.long, device=procs.device))
    model.train(was_training)
    reshard_all(model)


def fsdp_units(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard_all(model) -> None:
    """Free every gathered weight of a sharded model (a no-op for a plain model)."""
    for unit in fsdp_units(model) if is_sharded(model) else []:
        unit.reshard()


@contextmanager
def full_weights(model):
    """Every unit gathered once on entry and kept (no collectives inside), all freed on exit.

    Used around the decode loop: each rank runs a different number of decode steps, so any
    collective inside would hang.
    """
    if not is_sharded(model):
        yield model
        return
    units = fsdp_units(model)
    for unit in units[1:]:  # units[0] is the root, which stays gathered after its forward anyway
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units[1:]:
            unit.set_reshard_after_forward(True, recurse=False)
        for unit in units:
            unit.reshard()


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0's CPU (empty on other ranks); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(directory: Path, model, optimizer, teacher_module, trainable_only: bool) -> None:
    """Every process writes its shards of the student, the optimizer and the teacher into `directory`."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_sharded_state(model, optimizer, teacher_module, trainable_only), checkpoint_id=str(directory))


def load_sharded(directory: Path, model, optimizer, teacher_module, trainable_only: bool) -> None:
    """Read back what `save_sharded` wrote, into the sharded model, optimizer and teacher in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _sharded_state(model, optimizer, teacher_module, trainable_only)
    dcp.load(state, checkpoint_id=str(directory))
    options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options
    )
    if teacher_module is not None:
        teacher_module.load_state_dict(state["teacher"])


def _sharded_state(model, optimizer, teacher_module, trainable_only: bool) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # LoRA: the frozen base weights never change, so only the adapter is stored.
    model_state, optim_state = get_state_dict(
        model, optimizer, options=StateDictOptions(ignore_frozen_params=trainable_only)
    )
    state = {"model": model_state, "optimizer": optim_state}
    if teacher_module is not None:
        state["teacher"] = teacher_module.state_dict()
    return state
