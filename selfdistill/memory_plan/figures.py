"""The plan's result: `MemoryPlan` (bytes per figure and what they were planned for), as a table or JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

GIB = 2**30

# How each figure is obtained, for the table and the JSON.
TRACED = "traced"
COMPUTED = "computed"
SHARD_PLAN = "shard plan"


@dataclass
class MemoryPlan:
    """The memory one process needs, in bytes, and what it was planned for (see the package docstring)."""

    model: str
    architecture: str  # where the architecture config came from
    model_class: str
    parameters: int  # the student's, LoRA adapter included
    trainable_parameters: int
    processes: int
    method: str
    lora: bool
    teacher: str | None  # ema / frozen / live, None for methods without a teacher
    precision: str
    weights_dtype: str
    micro_batch: int
    micro_batches: int  # per process and optimizer step
    prompt_tokens: int
    teacher_prompt_tokens: int | None
    completion_tokens: int
    activation_checkpointing: bool
    rollout_engine: str | None  # rollout.engine (decode, vllm, ...), None for methods without rollouts
    rollout_rows: int  # sequences decoded together
    # Bytes per process
    weights: int
    gradients: int
    optimizer: int
    teacher_weights: int
    largest_unit: int  # in the dtype it is gathered in
    largest_unit_name: str
    # what FSDP2 all-gathers each part in: "root" (embeddings, final norm, head), "layers" (distributed.gather)
    # and "norms" (the layers' norms, units of their own when the layers gather in bf16)
    gather_dtypes: dict[str, list[str]]
    activations: int  # the student's forward of one micro-batch, activation checkpointing as configured
    weight_copies: int  # compute-dtype copies of the student's weights that autocast keeps during that forward
    step_peak: int
    activations_other: int  # the same with activation checkpointing the other way
    step_peak_other: int
    rollout_gather: int
    rollout_weight_copies: int
    rollout_kv_cache: int
    rollout_peak: int
    peak: int
    step_peak_parts: dict[str, int] = field(default_factory=dict)  # what was alive at the step's peak, by kind
    rollout_peak_parts: dict[str, int] = field(default_factory=dict)  # at the traced part of a rollout's peak
    # What no trace sees, and the verdict (planner._reserve, planner._engine, planner._verdict)
    reserve: int = 0  # the sum of reserve_parts
    reserve_parts: dict[str, int] = field(default_factory=dict)  # CUDA context, NCCL, fragmentation
    # An engine with weights of its own (vLLM; None otherwise): what it is called and the setting of its share
    engine_label: str | None = None
    engine_setting: str | None = None
    engine_dtype: str | None = None  # vLLM: the engine's dtype (rollout.vllm_precision)
    engine_weights: int = 0  # vLLM: the whole model in the engine's dtype (every process's engine holds it all)
    engine_kv_minimum: int = 0  # vLLM: the KV cache of one sequence of the longest length
    engine_share: int = 0  # vLLM: rollout.vllm_gpu_memory x gpu_memory (0 without --gpu-memory)
    engine_sleeps: bool = False  # vLLM: rollout.vllm_sleep, the share is taken during rollouts only
    # peak + engine share + reserve; with a sleeping engine max(step peak, rollout peak + engine share) + reserve
    needed: int = 0
    gpu_memory: int | None = None  # bytes per process the verdict is for; None: no verdict
    fits: bool | None = None
    suggestions: list[dict] = field(default_factory=list)  # for a plan that does not fit: {"change", "needed", "fits"}
    # Communication and compute per process and optimizer step (planner._communication)
    gpus_per_node: int = 8
    nodes: int = 1
    shard_size: int = 1  # processes that shard one copy of the model (distributed.shard_size)
    replicas: int = 1  # copies of the model: processes / shard_size (hybrid sharding when more than 1)
    intra_node_bandwidth: float = 0.0  # GB/s per GPU, achievable bus bandwidth
    inter_node_bandwidth: float = 0.0
    gpu_tflops: float = 0.0
    mfu: float = 0.0
    # one row per collective: {"what", "collective", "per" (micro-batch / step), "times" (per step),
    # "bytes" (the whole tensors of one occurrence), "dtypes" (those bytes by dtype), "group" (processes),
    # "traffic" (bytes this process sends per step, ring algorithm), "link", "seconds"}
    communication: list[dict] = field(default_factory=list)
    communication_bytes: int = 0  # per step: the sum of the rows' traffic
    communication_seconds: float = 0.0
    compute_parts: dict[str, float] = field(default_factory=dict)  # FLOPs per step by part
    compute_flops: float = 0.0
    compute_seconds: float = 0.0  # at gpu_tflops x mfu
    seconds: float = 0.0

    def rows(self) -> list[tuple[str, int | None, str]]:
        """(what, bytes or None for a heading, how) for the table."""
        rows = [
            (f"weights ({self._weights_kind()})", self.weights, TRACED),
            (f"gradients ({'adapter, fp32' if self.lora else 'fp32'})", self.gradients, TRACED),
            ("optimizer state (AdamW: 2 moments, fp32)", self.optimizer, TRACED),
        ]
        if self.teacher is not None:
            rows.append((f"teacher ({self._teacher_kind()})", self.teacher_weights, TRACED))
        rows.append((f"largest gathered unit ({self.largest_unit_name})", self.largest_unit, SHARD_PLAN))
        rows += self._step_rows() + self._rollout_rows()
        rows.append(("peak per process (training and rollouts)", self.peak, "the largest peak"))
        rows.append(("reserve: what no trace sees", None, ""))
        rows += [(f"  {what}", size, COMPUTED) for what, size in self.reserve_parts.items()]
        if self.engine_dtype is not None and self.gpu_memory is not None:
            if self.engine_sleeps:
                how = "the larger of the step's peak and the rollout's + engine's share, + reserve"
            else:
                how = "peak + engine's share + reserve"
        else:
            how = "peak + reserve"
        rows.append((f"needed per process ({how})", self.needed, COMPUTED))
        return rows

    def _copies(self) -> str:
        return f"{self.precision} copies of the weights autocast keeps"

    def _step_rows(self) -> list[tuple[str, int | None, str]]:
        """The training step with activation checkpointing as configured, then the other way."""
        ac = "on" if self.activation_checkpointing else "off"
        other = "off" if self.activation_checkpointing else "on"
        step = f"training step: micro-batch {self.micro_batch} x {self.prompt_tokens + self.completion_tokens} tokens"
        rows = [
            (f"{step}, checkpointing {ac}", None, ""),
            ("  activations of the student's forward", self.activations, TRACED),
        ]
        if self.weight_copies:
            rows.append((f"  {self._copies()} in that forward", self.weight_copies, TRACED))
        return rows + [
            ("  peak", self.step_peak, TRACED),
            (f"{step}, checkpointing {other}", None, ""),
            ("  activations of the student's forward", self.activations_other, TRACED),
            ("  peak", self.step_peak_other, TRACED),
        ]

    def _rollout_rows(self) -> list[tuple[str, int | None, str]]:
        """The rollout: the decode loop's gathered model and KV cache, or the share of an engine with weights of
        its own (vLLM)."""
        if self.rollout_engine is None:
            return []
        if self.engine_dtype is None:  # sampled with the trainer's model
            tokens = self.prompt_tokens + self.completion_tokens
            rows = [
                (f"rollout: {self.rollout_rows} sequences x {tokens} tokens", None, ""),
                (f"  whole model gathered ({self._gather_kind()})", self.rollout_gather, TRACED),
            ]
            if self.rollout_weight_copies:
                rows.append((f"  {self._copies()}", self.rollout_weight_copies, TRACED))
            return rows + [
                ("  KV cache", self.rollout_kv_cache, COMPUTED),
                ("  peak", self.rollout_peak, f"{TRACED} + {COMPUTED}"),
            ]
        rows = [
            (f"rollout: {self.engine_label} engine in this process", None, ""),
            ("  weight sync: the largest parameter gathered", self.rollout_gather, SHARD_PLAN),
            ("  peak (training's side)", self.rollout_peak, f"{TRACED} + {SHARD_PLAN}"),
            (f"  engine's weights (whole model, {self.engine_dtype})", self.engine_weights, COMPUTED),
            ("  engine's KV cache for one longest sequence (its minimum)", self.engine_kv_minimum, COMPUTED),
        ]
        if self.gpu_memory is not None:
            when = "during rollouts: it sleeps through the step" if self.engine_sleeps else "held throughout"
            rows.append((f"  engine's share ({self.engine_setting}, {when})", self.engine_share, COMPUTED))
        return rows

    def verdict(self) -> str:
        """One line: `fits: ...`, `does not fit: ...`, or how to get a verdict."""
        if self.gpu_memory is None:
            return f"no verdict: {self.needed / GIB:.1f} GiB per process needed; give --gpu-memory GIB for one."
        if self.fits:
            return (
                f"fits: {self.needed / GIB:.1f} of {self.gpu_memory / GIB:.1f} GiB per process "
                f"({(self.gpu_memory - self.needed) / GIB:.1f} GiB to spare)"
            )
        line = f"does not fit: {self.needed / GIB:.1f} GiB per process needed, {self.gpu_memory / GIB:.1f} available."
        fitting = [s for s in self.suggestions if s["fits"]]
        if fitting:
            line += " Would fit: " + "; ".join(_suggestion(s) for s in fitting) + "."
        others = [s for s in self.suggestions if not s["fits"]]
        if others:
            line += (" Not enough alone" if fitting else " No single change fits; each helps") + ": "
            line += "; ".join(_suggestion(s) for s in others) + "."
        return line

    def _weights_kind(self) -> str:
        kind = f"{self.weights_dtype} base + fp32 adapter" if self.lora else self.weights_dtype
        return f"{'shards' if self.processes > 1 else 'all of it'}, {kind}"

    def _gather_kind(self) -> str:
        """The dtypes the FSDP units are gathered in: 'bf16 layers, fp32 norms and root', or one dtype for all."""
        parts: dict[str, list[str]] = {}
        for part in ("layers", "norms", "root"):
            for dtype in self.gather_dtypes.get(part, []):
                parts.setdefault(dtype, []).append(part)
        if len(parts) == 1:
            return next(iter(parts))
        return ", ".join(f"{dtype} {' and '.join(names)}" for dtype, names in parts.items())

    def _teacher_kind(self) -> str:
        if self.teacher is None:
            return "none"
        if self.teacher == "ema":
            return "EMA copy, fp32" + (", W0 + EMA(BA)" if self.lora else "")
        if self.teacher == "frozen":
            return "frozen: the adapter switched off, no copy" if self.lora else f"frozen copy, {self._frozen_dtype()}"
        return "live: the student itself, no copy"

    def _frozen_dtype(self) -> str:
        return "bf16" if self.precision == "bf16" else self.weights_dtype

    def to_dict(self) -> dict:
        """Every field (bytes), plus `rows`: the table's lines with GiB and how each was obtained, and `verdict`."""
        data = dataclasses.asdict(self)
        data["verdict"] = self.verdict()
        data["rows"], heading = [], ""
        for what, size, how in self.rows():
            if size is None:
                heading = what
                continue
            if what.startswith("  "):
                what = f"{heading}: {what.strip()}"
            data["rows"].append({"what": what, "bytes": size, "gib": round(size / GIB, 3), "how": how})
        return data

    def table(self) -> str:
        """The plan as text: what was planned, one line per figure (GiB) and how it was obtained."""
        tokens = self.prompt_tokens + self.completion_tokens
        lines = [
            f"sdft plan: {self.model} ({self.model_class}, {_count(self.parameters)} parameters, "
            f"{_count(self.trainable_parameters)} trainable; architecture from {self.architecture})",
            f"  {self.processes} process{'es' if self.processes > 1 else ''} (torchrun, FSDP2); {self.method}, "
            f"{'LoRA' if self.lora else 'full fine-tuning'}"
            + (f", teacher {self.teacher}" if self.teacher else "")
            + f"; precision {self.precision}, weights stored in {self.weights_dtype}",
            f"  micro-batch {self.micro_batch} x {tokens} tokens ({self.prompt_tokens} prompt + "
            f"{self.completion_tokens} completion)"
            + (
                f", teacher {self.micro_batch} x {self.teacher_prompt_tokens + self.completion_tokens}"
                if self.teacher_prompt_tokens
                else ""
            )
            + f"; {self.micro_batches} micro-batch{'es' if self.micro_batches > 1 else ''} per step per process",
            "",
        ]
        rows = self.rows()
        width = max(len(what) for what, _, _ in rows) + 2
        lines.append(f"  {'per process':<{width}}{'GiB':>7}  how")
        for what, size, how in rows:
            lines.append(f"  {what:<{width}}{'' if size is None else f'{size / GIB:.2f}':>7}  {how}")
        lines += ["", *self.communication_table()]
        lines += [
            "",
            f"  traced: this config's own code run on fake tensors with a fake process group of {self.processes};",
            "  shard plan: from the FSDP units' sizes; computed: arithmetic. The reserve stands for the CUDA context,",
            f"  NCCL's buffers and the allocator's rounding and fragmentation, which no trace sees. ({self.seconds:.0f} s)",
            "",
            self.verdict(),
        ]
        return "\n".join(lines)

    def communication_table(self) -> list[str]:
        """The communication block: bytes each process sends per step by collective, and the times."""
        nodes = f"{self.nodes} node{'s' if self.nodes > 1 else ''} of {self.gpus_per_node}"
        layout = (
            f"sharded over all {self.processes}"
            if self.replicas == 1
            else f"sharded within groups of {self.shard_size}, {self.replicas} replicas (hybrid)"
        )
        lines = [
            f"  communication per optimizer step, per process ({self.processes} process"
            f"{'es' if self.processes > 1 else ''} on {nodes}; model {layout})"
        ]
        if not self.communication:
            lines.append("    none: one process")
        else:
            width = max(len(row["what"]) for row in self.communication) + 2
            lines.append(
                f"    {'collective':<{width}}{'per':<13}{'whole GiB':>10}{'sent GiB':>10}  {'link':<11}{'s':>7}"
            )
            for row in self.communication:
                per = f"{row['per']} x{row['times']}" if row["per"] == "micro-batch" else row["per"]
                # (the layers' fp32 norms are a few kB: shown in the JSON, not here)
                dtypes = ", ".join(f"{k} {v / GIB:.2f}" for k, v in row["dtypes"].items() if v >= GIB / 200)
                lines.append(
                    f"    {row['what']:<{width}}{per:<13}{row['bytes'] / GIB:>10.2f}{row['traffic'] / GIB:>10.2f}  "
                    f"{row['link']:<11}{row['seconds']:>7.3f}"
                    + (f"  ({dtypes})" if "," in dtypes else f"  ({dtypes.split()[0]})" if dtypes else "")
                )
            lines.append(
                f"    {'total':<{width}}{'':<13}{'':>10}{self.communication_bytes / GIB:>10.2f}  {'':<11}"
                f"{self.communication_seconds:>7.3f}"
            )
            lines += [
                "    sent: what this process sends, ring algorithm: (n-1)/n of the whole for an all-gather or",
                "    reduce-scatter over n processes, 2(n-1)/n for an all-reduce; seconds at "
                f"{self.intra_node_bandwidth:g} GB/s within a node, {self.inter_node_bandwidth:g} GB/s between nodes",
            ]
        parts = ", ".join(f"{what} {flops / 1e12:.0f}" for what, flops in self.compute_parts.items())
        lines += [
            f"  compute per optimizer step, per process: {self.compute_flops / 1e12:.0f} TFLOP = "
            f"{self.compute_seconds:.1f} s at {self.gpu_tflops:g} TFLOP/s x {self.mfu:.0%} MFU",
            f"    ({parts})",
            "    FSDP2 overlaps the collectives with compute: a step takes about the larger of the two. Decoding",
            "    is bound by memory bandwidth, not FLOPs, and takes longer than its FLOPs say.",
        ]
        return lines


def _suggestion(suggestion: dict) -> str:
    return f"{suggestion['change']} ({suggestion['needed'] / GIB:.1f} GiB)"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"
