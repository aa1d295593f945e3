"""`plan()`: build the student, method and teacher as the trainer does, shard them, trace one step and a rollout."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from selfdistill.config import Config, load_config, merge
from selfdistill.errors import UserError
from selfdistill.memory_plan.architectures import architecture_config, type_name
from selfdistill.memory_plan.figures import GIB, MemoryPlan
from selfdistill.memory_plan.settings import Hardware
from selfdistill.memory_plan.trace import MemoryTrace, _labelled_forwards, _labelled_fsdp
from selfdistill.registry import METHOD_INFO, Step, engine_class

if TYPE_CHECKING:
    from selfdistill.sampling.base import EngineMemory

# What a method's step computes is read from its registry entry (selfdistill.registry.Step): whether it
# samples from the student, which teacher it holds and what that teacher is shown, whether a weight adds
# a forward over the demonstrations. Work done once before training (sft_replay's replay answers,
# offline_distill's teacher answers) is not planned: it generates before any gradient or optimizer state
# exists (a vLLM engine started for it is closed before the first step). A method with two phases is
# planned at the step it declares, the heavier one (sft_reinvoke: its rollouts and teacher, not its SFT).


@dataclass
class _Shapes:
    prompts_per_process: int
    items: int  # sequences per process and step
    micro: int  # sequences per micro-batch
    micro_batches: int
    prompt: int
    teacher_prompt: int | None
    completion: int
    rollout_rows: int


def _step(cfg: Config) -> Step:
    """The method's declared step (selfdistill.registry.Step), or a UserError saying that it is missing."""
    step = METHOD_INFO[cfg.method].step
    if step is None:
        raise UserError(
            f"method {cfg.method}: `sdft plan` traces a step from what the method's registry entry declares it "
            "computes, and this entry declares nothing: give its MethodInfo a `step=Step(...)` (selfdistill.registry: "
            "what it trains on, whether it samples from the student, its teacher and what the teacher is shown)."
        )
    return step


def _shapes(cfg: Config, processes: int) -> _Shapes:
    step = _step(cfg)
    prompts = math.ceil(cfg.train.batch_size / processes)  # dealt round-robin: the busiest process
    samples = cfg.rollout.num_rollouts if step.trains_on == "rollouts" else 1
    items = prompts * samples
    micro = min(cfg.train.micro_batch_size, items)
    prompt, completion = cfg.data.max_prompt_tokens, cfg.rollout.max_new_tokens
    if step.trains_on == "documents":  # a piece of data.max_prompt_tokens: its first token is the prompt
        prompt, completion = 1, max(1, cfg.data.max_prompt_tokens - 1)
    teacher_prompt = None
    if step.teacher_runs(cfg):
        shown = {"demonstration": cfg.data.max_teacher_prompt_tokens, "prompt": cfg.data.max_prompt_tokens}
        teacher_prompt = shown[step.teacher_sees]
    return _Shapes(
        prompts_per_process=prompts,
        items=items,
        micro=micro,
        micro_batches=math.ceil(items / micro),
        prompt=prompt,
        teacher_prompt=teacher_prompt,
        completion=completion,
        rollout_rows=min(cfg.rollout.batch_size, items) if step.trains_on == "rollouts" else 0,
    )


def _bytes(tensors) -> int:
    from selfdistill.models.distributed import local

    return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)


def _gathered_sizes(model) -> tuple[list[int], dict[str, set], int]:
    """(bytes of each FSDP unit gathered, root first; the dtypes the root, the decoder layers and any
    smaller units (the layers' norms) are gathered in; bytes of the largest single parameter gathered whole
    in its own dtype, as the vLLM weight sync gathers it)."""
    from selfdistill.models.distributed import decoder_layers, fsdp_units

    layers = {id(layer) for layer in decoder_layers(model)}
    units, largest = [], 0
    dtypes: dict[str, set] = {"root": set(), "layers": set(), "norms": set()}
    for unit in fsdp_units(model):
        group = unit._get_fsdp_state()._fsdp_param_group
        if group is None:
            units.append(0)
            continue
        size, kinds = 0, set()
        for f in group.fsdp_params:
            # FSDP2 all-gathers in the unit's mixed-precision dtype (param_dtype, None where it is the
            # parameter's own); a sharded parameter (DTensor) has the whole parameter's shape
            dtype = getattr(f, "param_dtype", None) or group.mp_policy.param_dtype or f.sharded_param.dtype
            if not f.sharded_param.dtype.is_floating_point:
                dtype = f.sharded_param.dtype
            size += f.sharded_param.numel() * dtype.itemsize
            kinds.add(_dtype_name(dtype))
            largest = max(largest, f.sharded_param.numel() * f.sharded_param.element_size())
        part = "root" if unit is model else "layers" if id(unit) in layers else "norms"
        units.append(size)
        dtypes[part] |= kinds
    return units, dtypes, largest


# The reserve: what a process needs beyond what the trace sees. Estimates, not measured here (no GPU):
# - the CUDA context with the kernels and cuBLAS/cuDNN workspaces torch loads: 0.5-1 GiB per process on
#   recent GPUs and CUDA 12; the upper end is taken;
# - NCCL's buffers (4 MiB per channel and peer by default, up to 32 channels, plus its work queues): a few
#   hundred MiB per process on one 8-GPU node; none with one process;
# - the caching allocator's rounding (blocks of 2 MiB and up) and fragmentation: reserved memory is
#   commonly 5-15% above what is allocated in LLM training; 10% of the peak is taken.
CUDA_CONTEXT = 2**30
NCCL_BUFFERS = 2**29
FRAGMENTATION = 0.10


def plan(
    cfg: Config,
    processes: int,
    gpu_memory: float | None = None,
    suggest: bool = True,
    hardware: Hardware | None = None,
) -> MemoryPlan:
    """The memory per process of training `cfg` under torchrun with `processes` processes (see the package doc),
    and the bytes and seconds each process communicates and computes per optimizer step on `hardware`
    (its defaults: nodes of 8 H100s); with `gpu_memory` (GiB per process) a verdict: whether it fits, and if
    not which changes would make it fit (`suggest`)."""
    hardware = hardware or Hardware()
    _check(cfg, processes)
    if gpu_memory is not None and not gpu_memory > 0:
        raise UserError(f"--gpu-memory must be more than 0 GiB, got {gpu_memory}.")
    started = time.perf_counter()
    config, where = architecture_config(cfg.model.name, cfg.model.trust_remote_code)
    precision = "bf16" if cfg.model.precision == "auto" else cfg.model.precision
    shapes = _shapes(cfg, processes)
    shard_size = _shard_size(cfg, processes, hardware)
    try:
        traced = _trace(_planning_config(cfg, precision), config, processes, shapes, cfg.rollout.engine, shard_size)
    except (NotImplementedError, RuntimeError) as exc:  # fake collectives came after the trainer's torch floor
        unsupported = type(exc).__name__ == "UnsupportedOperatorException" or "fake impl" in str(exc)
        if not unsupported:
            raise
        raise UserError(
            f"sdft plan traces the training step on fake tensors, which needs fake kernels for torch's collectives: "
            f"torch {torch.__version__} lacks them ({str(exc).splitlines()[0][:120]}). Training runs on it; to plan, "
            "use torch 2.13 or later (for example in a separate environment)."
        ) from None
    result = _memory_plan(cfg, processes, where, type_name(config), precision, shapes, traced)
    _engine(result, cfg, config, gpu_memory)
    _reserve(result)
    _communication(result, cfg, shapes, traced, hardware, shard_size)
    _verdict(result, cfg, gpu_memory, suggest, hardware)
    result.seconds = time.perf_counter() - started
    return result


def _shard_size(cfg: Config, processes: int, hardware: Hardware) -> int:
    """How many processes shard one copy of the model, as the trainer decides it
    (selfdistill.models.distributed.shard_group_size): distributed.shard_size, or for 0 the processes of one
    node (--gpus-per-node here, torchrun's LOCAL_WORLD_SIZE there)."""
    size = cfg.distributed.shard_size or min(hardware.gpus_per_node, processes)
    if size > processes or processes % size:
        raise UserError(
            f"distributed.shard_size {size}"
            + (
                f" (the processes of one node, --gpus-per-node {hardware.gpus_per_node})"
                if not cfg.distributed.shard_size
                else ""
            )
            + f" must divide --processes {processes}: each group of shard_size processes holds one copy of the model."
        )
    return size


def _engine_memory(cfg: Config, result: MemoryPlan) -> EngineMemory | None:
    """What the run's rollout engine holds on the GPU beside training, as the engine itself says
    (`Sampler.gpu_memory`); None without rollouts or for an engine that samples with the trainer's model."""
    if result.rollout_engine is None:
        return None
    return engine_class(result.rollout_engine).gpu_memory(cfg, result.precision)


def _engine(result: MemoryPlan, cfg: Config, config, gpu_memory: float | None) -> None:
    """The share of the GPU of an engine with weights of its own (vLLM): it holds the whole model (every
    process's engine has all of it, LoRA merged) in its own dtype and at least one longest sequence's KV
    cache, or it does not start. An engine that sleeps (rollout.vllm_sleep, the default) frees its share
    through the training step (its weights in host memory, its KV cache freed), so its share is taken only
    while it syncs and samples; otherwise it stays taken throughout."""
    memory = _engine_memory(cfg, result)
    if memory is None:
        return
    result.engine_label, result.engine_setting = memory.label, memory.setting
    result.engine_sleeps = memory.sleeps
    element = 2 if memory.precision == "bf16" else 4
    result.engine_dtype = "bf16" if element == 2 else "fp32"
    parameters = result.parameters - (result.trainable_parameters if result.lora else 0)
    result.engine_weights = parameters * element
    result.engine_kv_minimum = (result.prompt_tokens + result.completion_tokens) * _kv_per_token(config, element)
    if gpu_memory is None:
        return
    result.engine_share = int(memory.share * gpu_memory * GIB)
    minimum = result.engine_weights + result.engine_kv_minimum
    if result.engine_share < minimum:
        raise UserError(
            f"{memory.setting} {memory.share} gives the {memory.label} engine "
            f"{result.engine_share / GIB:.1f} of {gpu_memory:.1f} GiB, less than its {result.engine_dtype} weights "
            f"and one sequence's KV cache need ({minimum / GIB:.1f} GiB): set it to at least "
            f"{math.ceil(minimum / (gpu_memory * GIB) * 100) / 100:.2f}."
        )


def _communication(
    result: MemoryPlan, cfg: Config, shapes: _Shapes, traced: dict, hardware: Hardware, shard_size: int
) -> None:
    """Bytes each process moves per optimizer step, by collective, from the collectives the trace issued
    (one micro-batch, counted once per micro-batch; the update and a decode rollout once per step) and for
    the vLLM weight sync from the shard plan; seconds from the link bandwidths; compute from FLOPs."""
    result.gpus_per_node = hardware.gpus_per_node
    result.nodes = math.ceil(result.processes / hardware.gpus_per_node)
    result.shard_size = shard_size
    result.replicas = result.processes // shard_size
    result.intra_node_bandwidth = hardware.intra_node_bandwidth
    result.inter_node_bandwidth = hardware.inter_node_bandwidth
    result.gpu_tflops = hardware.gpu_tflops
    result.mfu = hardware.mfu
    rows = _traced_collectives(result, shapes, traced)
    if result.engine_dtype is not None:  # an engine with weights of its own is synced every step
        rows[(result.rollout_engine, "all-gather", "step")] = _sync_row(result, shard_size)
    result.communication = _timed(rows.values(), result, hardware, shard_size)
    result.communication_bytes = sum(row["traffic"] for row in result.communication)
    result.communication_seconds = sum(row["seconds"] for row in result.communication)
    result.compute_parts = _flops(result, cfg, shapes)
    result.compute_flops = sum(result.compute_parts.values())
    result.compute_seconds = result.compute_flops / (hardware.gpu_tflops * 1e12 * hardware.mfu)


def _traced_collectives(result: MemoryPlan, shapes: _Shapes, traced: dict) -> dict[tuple, dict]:
    """The traced collectives as table rows, one per (what, collective, phase), bytes and ring traffic summed."""
    # The loop runs every micro-batch's forward and backward with FSDP2's defaults: each gathers the
    # weights again and reduces its gradients at once (no gradient accumulation without sync), so the
    # micro-batch's collectives repeat micro_batches times per step.
    step = traced["steps"][result.activation_checkpointing]["collectives"]
    rows: dict[tuple, dict] = {}
    for phase, times, records in (
        ("micro-batch", shapes.micro_batches, step),
        ("step", 1, traced["update_collectives"]),
        ("step", 1, traced["rollout_collectives"]),
    ):
        for record in records:
            what = _collective_name(record, phase, result)
            row = rows.setdefault(
                (what, record["kind"], phase),
                {
                    "what": what,
                    "collective": record["kind"],
                    "per": phase,
                    "times": times,
                    "bytes": 0,
                    "dtypes": {},
                    "traffic": 0.0,
                    "group": record["group"],
                },
            )
            row["bytes"] += record["bytes"]
            dtype = _dtype_name(record["dtype"])
            row["dtypes"][dtype] = row["dtypes"].get(dtype, 0) + record["bytes"]
            row["traffic"] += times * _ring_factor(record["kind"], record["group"]) * record["bytes"]
    return rows


def _sync_row(result: MemoryPlan, shard_size: int) -> dict:
    """Every step syncs the engine: each (merged) weight cast to the engine's dtype on its shard, then
    gathered whole, one at a time (selfdistill.models.sharded.merged_weights)."""
    whole = result.engine_weights
    return {
        "what": (
            f"rollout: {result.engine_label} weight sync, each weight gathered whole (in the engine's "
            f"{result.engine_dtype})"
        ),
        "collective": "all-gather",
        "per": "step",
        "times": 1,
        "bytes": whole,
        "dtypes": {result.engine_dtype: whole},
        "traffic": _ring_factor("all-gather", shard_size) * whole,
        "group": shard_size,
    }


def _timed(rows, result: MemoryPlan, hardware: Hardware, shard_size: int) -> list[dict]:
    """The rows that cross a link, each with its link and seconds at that link's bandwidth."""
    out = []
    for row in rows:
        if row["traffic"] == 0 and row["group"] <= 1:  # one process: nothing crosses a link
            continue
        # All-gathers and reduce-scatters run within a shard group (consecutive ranks: one node's processes
        # unless shard_size is larger); an all-reduce runs across the replicas or over all processes, and
        # crosses nodes whenever there are several.
        if row["collective"] == "all-reduce":
            crosses = result.nodes > 1
        else:
            crosses = shard_size > hardware.gpus_per_node
        row["link"] = "inter-node" if crosses else "intra-node"
        bandwidth = hardware.inter_node_bandwidth if crosses else hardware.intra_node_bandwidth
        row["traffic"] = int(row["traffic"])
        row["seconds"] = row["traffic"] / (bandwidth * 1e9)
        out.append(row)
    return out


def _ring_factor(kind: str, group: int) -> float:
    """Bytes each process sends per byte of the whole tensor, ring algorithm over `group` processes."""
    if group <= 1:
        return 0.0
    return (2 if kind == "all-reduce" else 1) * (group - 1) / group


def _collective_name(record: dict, phase: str, result: MemoryPlan) -> str:
    """What a traced collective moves, for the communication table."""
    kind, origin, step = record["kind"], record["origin"], record["pass"]
    if phase == "step" and kind == "all-gather":
        return "rollout: the whole model gathered once (decode)"
    if phase == "step":
        return "clipping: the gradients' norm"
    if kind == "reduce-scatter":
        return "gradients: reduce-scatter within the shard group"
    if kind == "all-reduce" and step == "backward":
        return "gradients: all-reduce of the shards across replicas"
    if kind != "all-gather":
        return f"{kind} ({origin}, {step})"
    if origin == "teacher":
        return "teacher forward: its copy gathered"
    if step == "backward":
        return "student backward: each layer gathered again"
    if step == "forward without gradients":
        return "teacher forward on the student's weights: gathered"
    return "student forward: every unit gathered"


def _flops(result: MemoryPlan, cfg: Config, shapes: _Shapes) -> dict[str, float]:
    """FLOPs per process and step at the configured lengths (an upper bound: shorter sequences cost less),
    2 per parameter and token for a forward, as many again for the backward's input gradients and for its
    weight gradients (none for LoRA's frozen base); attention's own FLOPs are left out (a few percent at
    these lengths)."""
    n = result.parameters
    step = _step(cfg)
    sequences = shapes.items * (2 if step.adds_demonstration_forward(cfg) else 1)  # + demonstrations
    tokens = sequences * (shapes.prompt + shapes.completion)
    parts = {"student forward and backward": (4 if result.lora else 6) * n * tokens}
    if result.activation_checkpointing:
        parts["student forward again (activation checkpointing)"] = 2 * n * tokens
    if shapes.teacher_prompt is not None:
        parts["teacher forward"] = 2 * n * shapes.items * (shapes.teacher_prompt + shapes.completion)
    if step.trains_on == "rollouts":
        parts["rollout: prefill and decode"] = 2 * n * shapes.items * (shapes.prompt + shapes.completion)
    return parts


def _kv_per_token(config, element: int) -> int:
    """Bytes of keys and values per token, all layers, `element` bytes per value."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * element


def _reserve(result: MemoryPlan) -> None:
    result.reserve_parts = {
        "CUDA context and libraries": CUDA_CONTEXT,
        "NCCL buffers": NCCL_BUFFERS if result.processes > 1 else 0,
        f"allocator rounding and fragmentation ({FRAGMENTATION:.0%} of the peak)": int(FRAGMENTATION * result.peak),
    }
    result.reserve = sum(result.reserve_parts.values())
    if result.engine_sleeps:
        # The engine's share is taken only during rollouts, beside what training keeps resident then
        # (shards, optimizer state, teacher, one gathered parameter): the training step has the rest.
        result.needed = max(result.step_peak, result.rollout_peak + result.engine_share) + result.reserve
    else:
        result.needed = result.peak + result.engine_share + result.reserve


def _verdict(result: MemoryPlan, cfg: Config, gpu_memory: float | None, suggest: bool, hardware: Hardware) -> None:
    """Fits or not; for a plan that does not fit, each change that could make it fit, planned again with the
    change (a change's figure is a plan of its own, not an estimate: under LoRA, say, the rollout gathers a bf16
    base instead of fp32 weights, which no arithmetic on this plan's rows would know)."""
    if gpu_memory is None:
        return
    result.gpu_memory = int(gpu_memory * GIB)
    result.fits = result.needed <= result.gpu_memory
    if result.fits or not suggest:
        return
    for change, overrides, processes in _changes(result, cfg, hardware):
        try:
            changed = plan(
                load_config(overrides=merge(cfg.to_dict(), overrides)), processes, gpu_memory, False, hardware
            )
        except UserError:  # e.g. an engine share the change leaves too small: not a way to fit
            continue
        result.suggestions.append({"change": change, "needed": changed.needed, "fits": bool(changed.fits)})


def _changes(result: MemoryPlan, cfg: Config, hardware: Hardware) -> list[tuple[str, dict, int]]:
    """(change as the user would write it, config overrides, processes): the levers, in the order to try them."""
    out = []
    if not result.lora:  # no gradients, moments or full teacher copy; a bf16 base where precision is bf16
        out.append(("model.lora.enabled=true", {"model": {"lora": {"enabled": True}}}, result.processes))
    more = 2 * result.processes
    if cfg.train.batch_size >= more:  # every sharded part halves, if the model is sharded over all of them
        if _shard_size(cfg, more, hardware) == 2 * result.shard_size:
            out.append((f"--processes {more}", {}, more))
        else:  # hybrid sharding would keep the shards' size: shard over all processes (across nodes)
            shard = 2 * result.shard_size
            change = f"--processes {more} --set distributed.shard_size={shard}"
            out.append((change, {"distributed": {"shard_size": shard}}, more))
    if not result.activation_checkpointing:
        out.append(
            ("train.activation_checkpointing=true", {"train": {"activation_checkpointing": True}}, result.processes)
        )
    if result.micro_batch > 1:
        out.append(("train.micro_batch_size=1", {"train": {"micro_batch_size": 1}}, result.processes))
    memory = _engine_memory(cfg, result)
    if memory is not None and result.gpu_memory:
        minimum = result.engine_weights + result.engine_kv_minimum
        fraction = math.ceil(minimum / result.gpu_memory * 100) / 100
        if fraction < memory.share:  # the smallest share that starts: less KV cache
            section, _, key = memory.setting.partition(".")
            out.append((f"{memory.setting}={fraction:.2f}", {section: {key: fraction}}, result.processes))
    return out


def _check(cfg: Config, processes: int) -> None:
    import torch.distributed as dist

    if processes < 1:
        raise UserError(f"--processes must be at least 1, got {processes}.")
    _step(cfg)
    if cfg.train.batch_size < processes:
        raise UserError(
            f"train.batch_size {cfg.train.batch_size} is smaller than the number of processes ({processes}): "
            "every process needs at least one prompt per step."
        )
    if dist.is_initialized():
        raise UserError(
            "sdft plan sets up a fake process group of its own: run it outside torchrun, in a process "
            "that has not joined a process group."
        )


def _memory_plan(
    cfg: Config, processes: int, where: str, model_class: str, precision: str, shapes: _Shapes, traced: dict
) -> MemoryPlan:
    """The plan from what the trace measured: the configured activation checkpointing's step, the other's beside it."""
    configured = cfg.train.activation_checkpointing
    main, other = traced["steps"][configured], traced["steps"][not configured]
    update = traced["update_peak"]
    step_peak = max(main["peak"], update)
    return MemoryPlan(
        model=cfg.model.name,
        architecture=where,
        model_class=model_class,
        parameters=traced["parameters"],
        trainable_parameters=traced["trainable"],
        processes=processes,
        method=cfg.method,
        lora=cfg.model.lora.enabled,
        teacher=cfg.teacher.kind if _step(cfg).teacher else None,  # the config holds the kind the method runs
        precision=precision,
        weights_dtype=_dtype_name(traced["weights_dtype"]),
        micro_batch=shapes.micro,
        micro_batches=shapes.micro_batches,
        prompt_tokens=shapes.prompt,
        teacher_prompt_tokens=shapes.teacher_prompt,
        completion_tokens=shapes.completion,
        activation_checkpointing=configured,
        rollout_engine=cfg.rollout.engine if _step(cfg).trains_on == "rollouts" else None,
        rollout_rows=shapes.rollout_rows,
        weights=traced["weights"],
        gradients=traced["gradients"],
        optimizer=traced["optimizer"],
        teacher_weights=traced["teacher"],
        largest_unit=traced["largest_unit"],
        largest_unit_name=traced["largest_unit_name"],
        gather_dtypes=traced["gather_dtypes"],
        activations=main["activations"],
        weight_copies=main["weight_copies"],
        step_peak=step_peak,
        activations_other=other["activations"],
        step_peak_other=max(other["peak"], update),
        rollout_gather=traced["rollout_gather"],
        rollout_weight_copies=traced["rollout_weight_copies"],
        rollout_kv_cache=traced["rollout_kv_cache"],
        rollout_peak=traced["rollout_peak"],
        peak=max(step_peak, traced["rollout_peak"]),
        step_peak_parts=main["parts"] if main["peak"] >= update else traced["update_parts"],
        rollout_peak_parts=traced["rollout_parts"],
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _planning_config(cfg: Config, precision: str) -> Config:
    """The config the trace builds with: the precision decided, and the decode loop (a vLLM engine is not
    part of the trace, and the method need not import it)."""
    data = copy.deepcopy(cfg.to_dict())
    data["model"]["precision"] = precision
    data["rollout"]["engine"] = "decode"
    return Config(**data)


def _set_checkpointing(model, enabled: bool) -> None:
    """Activation checkpointing on or off, as selfdistill.training.loop._build_model turns it on."""
    if enabled:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def _build(cfg: Config, config, processes: int, shard_size: int):
    """Student and method (with its teacher) as the trainer builds them, sharded while still on the meta device
    over the trainer's device mesh: groups of `shard_size` processes, replicated across groups."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from selfdistill.methods.build import build_method
    from selfdistill.models import apply_lora
    from selfdistill.models.distributed import Processes, device_mesh, shard_model
    from selfdistill.models.loading import weights_dtype

    dtype = weights_dtype(cfg.model.load_dtype, cfg.model.precision, cfg.model.lora.enabled)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            copy.deepcopy(config), dtype=dtype, trust_remote_code=cfg.model.trust_remote_code
        )
        if cfg.model.lora.enabled:
            lora = cfg.model.lora
            model = apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.target_modules)
    model.train()  # as selfdistill.training.loop._build_model sets the model up
    model.config.use_cache = False
    if cfg.train.activation_checkpointing:
        _set_checkpointing(model, True)
    dist.init_process_group("fake", store=_fake_store(), rank=0, world_size=processes)
    mesh = device_mesh(torch.device("cpu"), processes, shard_size)
    procs = Processes(0, processes, torch.device("cpu"), sharded=True, mesh=mesh)
    shard = functools.partial(shard_model, procs=procs, gather=cfg.distributed.gather, warm_up=False)
    # The student is sharded in the planning config's precision (fp32 or bf16), the teacher in its own.
    method = build_method(cfg, model, None, None, [], 0, [], procs=procs, shard=shard)
    model = method.model
    return model, method, procs, dtype


def _fake_store():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    return FakeStore()


def _trace(
    cfg: Config, config, processes: int, shapes: _Shapes, engine: str, shard_size: int | None = None, fake: bool = True
) -> dict:
    """Build, shard and trace in this process (sharded over groups of `shard_size` processes, replicated
    across groups; None: over all). `fake=False` runs the same on real (uninitialised) tensors, which the
    tests compare with (a fake process group still: collectives move no data)."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with _quiet():
            model, method, procs, dtype = _build(cfg, config, processes, shard_size or processes)
            mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
            with mode if fake else contextlib.nullcontext():
                return _trace_steps(cfg, engine, model, method, procs, dtype, shapes, mode)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _teacher_module(method):
    teacher = getattr(method, "teacher", None)
    return None if teacher is None else teacher.module


def _items(cfg: Config, shapes: _Shapes) -> list:
    """One micro-batch of the longest sequences the config allows (token ids do not matter)."""
    from selfdistill.methods.base import TrainItem

    step = _step(cfg)
    skips = step.skips_first_tokens and step.teacher_runs(cfg)
    return [
        TrainItem(
            record_index=0,
            prompt_ids=[0] * shapes.prompt,
            completion=[0] * shapes.completion,
            loss_start=min(cfg.loss.skip_first_tokens, shapes.completion) if skips else 0,
            teacher_prompt_ids=[0] * shapes.teacher_prompt if shapes.teacher_prompt else None,
            extra={"demonstration": [0] * shapes.completion, "sft_scale": 1.0}
            if step.adds_demonstration_forward(cfg)
            else {},
        )
        for _ in range(shapes.micro)
    ]


def _trace_steps(cfg, engine: str, model, method, procs, dtype, shapes: _Shapes, fake) -> dict:
    from selfdistill.models.distributed import reshard_all

    teacher = _teacher_module(method)
    _materialise(model, teacher, procs)
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach: torch's default on GPUs (its step holds one temporary the size of the moments)
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, foreach=True)
    trace = _weights_trace(fake, model, teacher)
    out, largest_parameter = _static_sizes(model, teacher, params, dtype)
    items = _items(cfg, shapes)
    tokens = float(shapes.items * max(1, shapes.completion - items[0].loss_start))
    with trace, _labelled_fsdp(trace, {"student": model, "teacher": teacher}):
        out["optimizer"] = _steady_state_moments(optimizer, params, trace)
        out.update(_trace_rollout(cfg, engine, model, method, trace, shapes, dtype, largest_parameter))
        for checkpointing in (cfg.train.activation_checkpointing, not cfg.train.activation_checkpointing):
            _set_checkpointing(model, checkpointing)
            if shapes.micro_batches > 1:  # a later micro-batch: the step's gradients already exist
                for p in params:
                    p.grad = torch.zeros_like(p)
                    trace.add(p.grad, "gradients")
            trace.marks.clear()
            with trace.measuring("micro-batch"), _labelled_forwards(trace, model, teacher):
                with trace.labelled("loss and backward"):
                    loss, _ = method.loss(items)
                    (loss * (1.0 / tokens)).backward()
                for p in params:
                    if p.grad is not None:
                        trace.add(p.grad, "gradients")
            peak, parts = trace.peaks["micro-batch"]
            after = trace.marks.get("after the student's forward", {})
            out["steps"][checkpointing] = {
                "peak": peak,
                "parts": parts,
                "activations": after.get("activations", 0),
                "weight_copies": after.get("weight copies (autocast)", 0),
                "collectives": trace.collectives["micro-batch"],
            }
            out.setdefault("gradients", _bytes(p.grad for p in params))
            reshard_all(model)
            if checkpointing == cfg.train.activation_checkpointing:
                with trace.measuring("update"), trace.labelled("clipping, AdamW, teacher update"):
                    torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm or float("inf"), foreach=True)
                    optimizer.step()
                    method.after_step()
                out["update_peak"], out["update_parts"] = trace.peaks["update"]
                out["update_collectives"] = trace.collectives["update"]
            optimizer.zero_grad(set_to_none=True)
    return out


def _materialise(model, teacher, procs) -> None:
    """Student and teacher (uninitialised) on the device, as the trainer's first forward leaves them."""
    from selfdistill.models.distributed import first_forward

    for module in (model, teacher):
        if module is not None:
            module.to_empty(device=procs.device)
            first_forward(module, procs)


def _weights_trace(fake, model, teacher) -> MemoryTrace:
    """A trace that already holds the student's and the teacher's weights."""
    trace = MemoryTrace(fake)
    for p in list(model.parameters()) + list(model.buffers()):
        trace.add(p, "weights")
    if teacher is not None:
        for p in list(teacher.parameters()) + list(teacher.buffers()):
            trace.add(p, "teacher")
    return trace


def _static_sizes(model, teacher, params: list, dtype) -> tuple[dict, int]:
    """Parameter counts and the sizes of the weights, the teacher and the largest gathered unit (the trace's
    result so far, `steps` still empty); and the bytes of the largest single parameter gathered."""
    units, dtypes, largest_parameter = _gathered_sizes(model)
    out = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in params),
        "weights_dtype": dtype,
        "weights": _bytes(model.parameters()) + _bytes(model.buffers()),
        "teacher": _bytes(teacher.parameters()) + _bytes(teacher.buffers()) if teacher is not None else 0,
        "largest_unit": max(units, default=0),
        "largest_unit_name": (
            "root: embeddings, final norm, output head" if units and units[0] >= max(units) else "one decoder layer"
        ),
        "gather_dtypes": {part: sorted(kinds) for part, kinds in dtypes.items() if kinds},
        # every parameter whole, in its own dtype: what the vLLM weight sync gathers (DTensors: whole shapes)
        "whole_parameters": sum(p.numel() * p.element_size() for p in model.parameters()),
        "steps": {},
    }
    return out, largest_parameter


def _steady_state_moments(optimizer, params: list, trace: MemoryTrace) -> int:
    """Steady state: the optimizer's moments exist from the first step on (AdamW's own state, as its
    first step creates it; the test compares with a real step). Returns their bytes."""
    for p in params:
        optimizer.state[p] = {
            "step": torch.tensor(1.0),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                trace.add(value, "optimizer")
    return sum(_bytes(v for v in state.values() if isinstance(v, torch.Tensor)) for state in optimizer.state.values())


def _trace_rollout(
    cfg, engine: str, model, method, trace: MemoryTrace, shapes: _Shapes, dtype, largest_parameter: int
) -> dict:
    """Rollout figures: traced up to the first decoded token, the KV cache's growth after it computed.

    An engine that samples with the trainer's model is traced as it samples (`sdft plan` assumes its
    memory is the decode loop's: the gathered model and a KV cache); one with weights of its own
    only has each weight gathered, one at a time, for its sync.
    """
    from selfdistill.sampling import SamplingSettings, make_sampler

    if _step(cfg).trains_on != "rollouts":
        return {
            "rollout_gather": 0,
            "rollout_weight_copies": 0,
            "rollout_kv_cache": 0,
            "rollout_peak": 0,
            "rollout_parts": {},
            "rollout_collectives": [],
        }
    if engine_class(engine).copies_weights:  # the engine gets the weights one parameter at a time
        return {
            "rollout_gather": largest_parameter,
            "rollout_weight_copies": 0,
            "rollout_kv_cache": 0,
            "rollout_peak": trace.total + largest_parameter,
            "rollout_parts": trace.now(),
            "rollout_collectives": [],  # computed from the shard plan (planner._communication)
        }
    gathered = []  # what the gathered model holds while it decodes (its gathering briefly holds more)
    hook = model.get_decoder().register_forward_pre_hook(
        lambda *_: gathered.append(trace.now().get("gathered weights", 0)) if not gathered else None
    )
    with trace.measuring("rollout"), trace.labelled("rollout"), contextlib.ExitStack() as stack:
        stack.callback(hook.remove)
        settings = SamplingSettings(
            2, (), 0, temperature=0.0, batch_size=shapes.rollout_rows, precision=method.precision
        )
        sampler = make_sampler(model, settings, engine=engine, cfg=cfg)
        sampler.generate([[0] * shapes.prompt] * shapes.rollout_rows, None)
    peak, parts = trace.peaks["rollout"]
    config = model.config
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = 2 if method.precision == "bf16" else dtype.itemsize  # keys and values in the compute dtype
    per_token = 2 * layers * kv_heads * head_dim * element
    kv = shapes.rollout_rows * (shapes.prompt + shapes.completion) * per_token
    # Traced: the prompt's cache and one token. The rest grows a token at a time, and each layer's
    # concatenation briefly holds its old and its new cache.
    growth = shapes.rollout_rows * (shapes.completion - 1) * per_token + kv // layers
    return {
        "rollout_gather": gathered[0] if gathered else 0,
        "rollout_weight_copies": parts.get("weight copies (autocast)", 0),
        "rollout_kv_cache": kv,
        "rollout_peak": peak + growth,
        "rollout_parts": parts,
        "rollout_collectives": trace.collectives["rollout"],
    }
