"""`plan()`: build the student, method and teacher as the trainer does, shard them, trace one step and a rollout."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from dataclasses import dataclass

import torch

from selfdistill.config import Config, load_config, merge
from selfdistill.errors import UserError
from selfdistill.memory_plan.architectures import architecture_config, type_name
from selfdistill.memory_plan.figures import GIB, MemoryPlan
from selfdistill.memory_plan.trace import MemoryTrace, _labelled_forwards, _labelled_fsdp

# sft_replay trains exactly as SFT does (its replay answers are written before training, with less
# memory than a step); sft_kl adds the frozen starting model, shown the student prompt; SDFT with
# loss.sft_weight adds a second student forward over the demonstrations (planned at the completion length).
PLANNED_METHODS = ("sdft", "sft", "dft", "sft_replay", "sft_kl")


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


def _shapes(cfg: Config, processes: int) -> _Shapes:
    prompts = math.ceil(cfg.train.batch_size / processes)  # dealt round-robin: the busiest process
    samples = cfg.rollout.num_rollouts if cfg.method == "sdft" else 1
    items = prompts * samples
    micro = min(cfg.train.micro_batch_size, items)
    return _Shapes(
        prompts_per_process=prompts,
        items=items,
        micro=micro,
        micro_batches=math.ceil(items / micro),
        prompt=cfg.data.max_prompt_tokens,
        teacher_prompt={"sdft": cfg.data.max_teacher_prompt_tokens, "sft_kl": cfg.data.max_prompt_tokens}.get(
            cfg.method
        ),
        completion=cfg.rollout.max_new_tokens,
        rollout_rows=min(cfg.rollout.batch_size, items) if cfg.method == "sdft" else 0,
    )


def _bytes(tensors) -> int:
    from selfdistill.models.distributed import local

    return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)


def _gathered_sizes(model) -> tuple[list[int], int]:
    """(bytes of each FSDP unit gathered, root first; bytes of the largest single parameter gathered)."""
    from selfdistill.models.distributed import fsdp_units

    units, largest = [], 0
    for unit in fsdp_units(model):
        group = unit._get_fsdp_state()._fsdp_param_group
        if group is None:
            units.append(0)
            continue
        # a sharded parameter (DTensor) has the whole parameter's shape
        sizes = [f.sharded_param.numel() * f.sharded_param.element_size() for f in group.fsdp_params]
        units.append(sum(sizes))
        largest = max([largest, *sizes])
    return units, largest


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


def plan(cfg: Config, processes: int, gpu_memory: float | None = None, suggest: bool = True) -> MemoryPlan:
    """The memory per process of training `cfg` under torchrun with `processes` processes (see the package doc);
    with `gpu_memory` (GiB per process) a verdict: whether it fits, and if not which changes would make it fit
    (`suggest`)."""
    _check(cfg, processes)
    if gpu_memory is not None and not gpu_memory > 0:
        raise UserError(f"--gpu-memory must be more than 0 GiB, got {gpu_memory}.")
    started = time.perf_counter()
    config, where = architecture_config(cfg.model.name, cfg.model.trust_remote_code)
    precision = "bf16" if cfg.model.precision == "auto" else cfg.model.precision
    shapes = _shapes(cfg, processes)
    try:
        traced = _trace(_planning_config(cfg, precision), config, processes, shapes, cfg.rollout.engine)
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
    _engine(result, cfg, config, precision, gpu_memory)
    _reserve(result)
    _verdict(result, cfg, gpu_memory, suggest)
    result.seconds = time.perf_counter() - started
    return result


def _engine(result: MemoryPlan, cfg: Config, config, precision: str, gpu_memory: float | None) -> None:
    """vLLM's share of the GPU: it holds the whole model (every process's engine has all of it, LoRA merged)
    in its own dtype and at least one longest sequence's KV cache, or it does not start. The engine does not
    use vLLM's sleep mode, so its share stays taken through the training step."""
    if result.rollout_engine != "vllm":
        return
    wanted = precision if cfg.rollout.vllm_precision == "auto" else cfg.rollout.vllm_precision
    element = 2 if wanted == "bf16" else 4
    result.engine_dtype = "bf16" if element == 2 else "fp32"
    parameters = result.parameters - (result.trainable_parameters if result.lora else 0)
    result.engine_weights = parameters * element
    result.engine_kv_minimum = (result.prompt_tokens + result.completion_tokens) * _kv_per_token(config, element)
    if gpu_memory is None:
        return
    result.engine_share = int(cfg.rollout.vllm_gpu_memory * gpu_memory * GIB)
    minimum = result.engine_weights + result.engine_kv_minimum
    if result.engine_share < minimum:
        raise UserError(
            f"rollout.vllm_gpu_memory {cfg.rollout.vllm_gpu_memory} gives the vLLM engine "
            f"{result.engine_share / GIB:.1f} of {gpu_memory:.1f} GiB, less than its {result.engine_dtype} weights "
            f"and one sequence's KV cache need ({minimum / GIB:.1f} GiB): set it to at least "
            f"{math.ceil(minimum / (gpu_memory * GIB) * 100) / 100:.2f}."
        )


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
    result.needed = result.peak + result.engine_share + result.reserve


def _verdict(result: MemoryPlan, cfg: Config, gpu_memory: float | None, suggest: bool) -> None:
    """Fits or not; for a plan that does not fit, each change that could make it fit, planned again with the
    change (a change's figure is a plan of its own, not an estimate: under LoRA, say, the rollout gathers a bf16
    base instead of fp32 weights, which no arithmetic on this plan's rows would know)."""
    if gpu_memory is None:
        return
    result.gpu_memory = int(gpu_memory * GIB)
    result.fits = result.needed <= result.gpu_memory
    if result.fits or not suggest:
        return
    for change, overrides, processes in _changes(result, cfg):
        try:
            changed = plan(load_config(overrides=merge(cfg.to_dict(), overrides)), processes, gpu_memory, suggest=False)
        except UserError:  # e.g. an engine share the change leaves too small: not a way to fit
            continue
        result.suggestions.append({"change": change, "needed": changed.needed, "fits": bool(changed.fits)})


def _changes(result: MemoryPlan, cfg: Config) -> list[tuple[str, dict, int]]:
    """(change as the user would write it, config overrides, processes): the levers, in the order to try them."""
    out = []
    if not result.lora:  # no gradients, moments or full teacher copy; a bf16 base where precision is bf16
        out.append(("model.lora.enabled=true", {"model": {"lora": {"enabled": True}}}, result.processes))
    if cfg.train.batch_size >= 2 * result.processes:  # every sharded part halves
        out.append((f"--processes {2 * result.processes}", {}, 2 * result.processes))
    if not result.activation_checkpointing:
        out.append(
            ("train.activation_checkpointing=true", {"train": {"activation_checkpointing": True}}, result.processes)
        )
    if result.micro_batch > 1:
        out.append(("train.micro_batch_size=1", {"train": {"micro_batch_size": 1}}, result.processes))
    if result.rollout_engine == "vllm" and result.gpu_memory:
        minimum = result.engine_weights + result.engine_kv_minimum
        fraction = math.ceil(minimum / result.gpu_memory * 100) / 100
        if fraction < cfg.rollout.vllm_gpu_memory:  # the smallest share that starts: less KV cache
            out.append(
                (
                    f"rollout.vllm_gpu_memory={fraction:.2f}",
                    {"rollout": {"vllm_gpu_memory": fraction}},
                    result.processes,
                )
            )
    return out


def _check(cfg: Config, processes: int) -> None:
    import torch.distributed as dist

    if processes < 1:
        raise UserError(f"--processes must be at least 1, got {processes}.")
    if cfg.method not in PLANNED_METHODS:
        raise UserError(
            f"method {cfg.method}: `sdft plan` covers {', '.join(PLANNED_METHODS)}; plan an sdft or sft config "
            "with the same model, lengths and micro-batch instead."
        )
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
        teacher={"sdft": cfg.teacher.kind, "sft_kl": "frozen"}.get(cfg.method),
        precision=precision,
        weights_dtype=_dtype_name(traced["weights_dtype"]),
        micro_batch=shapes.micro,
        micro_batches=shapes.micro_batches,
        prompt_tokens=shapes.prompt,
        teacher_prompt_tokens=shapes.teacher_prompt,
        completion_tokens=shapes.completion,
        activation_checkpointing=configured,
        rollout_engine=cfg.rollout.engine if cfg.method == "sdft" else None,
        rollout_rows=shapes.rollout_rows,
        weights=traced["weights"],
        gradients=traced["gradients"],
        optimizer=traced["optimizer"],
        teacher_weights=traced["teacher"],
        largest_unit=traced["largest_unit"],
        largest_unit_name=traced["largest_unit_name"],
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


def _build(cfg: Config, config, processes: int):
    """Student and method (with its teacher) as the trainer builds them, sharded while still on the meta device."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from selfdistill.methods import get_method
    from selfdistill.models import apply_lora
    from selfdistill.models.distributed import Processes, shard_model
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
    method = get_method(cfg.method)(cfg, model, None, None, [], 0, [])
    dist.init_process_group("fake", store=_fake_store(), rank=0, world_size=processes)
    procs = Processes(0, processes, torch.device("cpu"), sharded=True)
    shard = functools.partial(shard_model, procs=procs, gather=cfg.distributed.gather, warm_up=False)
    model = shard(model, precision=cfg.model.precision)  # the planning config's precision: fp32 or bf16
    method.model = model
    method.shard(shard)
    return model, method, procs, dtype


def _fake_store():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    return FakeStore()


def _trace(cfg: Config, config, processes: int, shapes: _Shapes, engine: str, fake: bool = True) -> dict:
    """Build, shard and trace in this process. `fake=False` runs the same on real (uninitialised) tensors,
    which the tests compare with (a fake process group still: collectives move no data)."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with _quiet():
            model, method, procs, dtype = _build(cfg, config, processes)
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

    return [
        TrainItem(
            record_index=0,
            prompt_ids=[0] * shapes.prompt,
            completion=[0] * shapes.completion,
            loss_start=min(cfg.loss.skip_first_tokens, shapes.completion) if cfg.method == "sdft" else 0,
            teacher_prompt_ids=[0] * shapes.teacher_prompt if shapes.teacher_prompt else None,
            extra={"demonstration": [0] * shapes.completion} if cfg.method == "sdft" and cfg.loss.sft_weight else {},
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
    with trace, _labelled_fsdp(trace, [model, teacher]):
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
            }
            out.setdefault("gradients", _bytes(p.grad for p in params))
            reshard_all(model)
            if checkpointing == cfg.train.activation_checkpointing:
                with trace.measuring("update"), trace.labelled("clipping, AdamW, teacher update"):
                    torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm or float("inf"), foreach=True)
                    optimizer.step()
                    method.after_step()
                out["update_peak"], out["update_parts"] = trace.peaks["update"]
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
    units, largest_parameter = _gathered_sizes(model)
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
    """Rollout figures: traced up to the first decoded token, the KV cache's growth after it computed."""
    from selfdistill.sampling.decode import generate

    if cfg.method != "sdft":
        return {
            "rollout_gather": 0,
            "rollout_weight_copies": 0,
            "rollout_kv_cache": 0,
            "rollout_peak": 0,
            "rollout_parts": {},
        }
    if engine == "vllm":  # the engine gets the weights one parameter at a time
        return {
            "rollout_gather": largest_parameter,
            "rollout_weight_copies": 0,
            "rollout_kv_cache": 0,
            "rollout_peak": trace.total + largest_parameter,
            "rollout_parts": trace.now(),
        }
    gathered = []  # what the gathered model holds while it decodes (its gathering briefly holds more)
    hook = model.get_decoder().register_forward_pre_hook(
        lambda *_: gathered.append(trace.now().get("gathered weights", 0)) if not gathered else None
    )
    with trace.measuring("rollout"), trace.labelled("rollout"), contextlib.ExitStack() as stack:
        stack.callback(hook.remove)
        generate(
            model,
            [[0] * shapes.prompt] * shapes.rollout_rows,
            stop_token_ids=[],
            pad_token_id=0,
            max_new_tokens=2,
            temperature=0.0,
            batch_size=shapes.rollout_rows,
            precision=method.precision,
        )
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
    }
