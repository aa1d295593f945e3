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
    rollout_engine: str | None  # decode / vllm, None for methods without rollouts
    rollout_rows: int  # sequences decoded together
    # Bytes per process
    weights: int
    gradients: int
    optimizer: int
    teacher_weights: int
    largest_unit: int
    largest_unit_name: str
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
    engine_dtype: str | None = None  # vLLM: the engine's dtype (rollout.vllm_precision)
    engine_weights: int = 0  # vLLM: the whole model in the engine's dtype (every process's engine holds it all)
    engine_kv_minimum: int = 0  # vLLM: the KV cache of one sequence of the longest length
    engine_share: int = 0  # vLLM: rollout.vllm_gpu_memory x gpu_memory (0 without --gpu-memory)
    needed: int = 0  # peak + engine share + reserve
    gpu_memory: int | None = None  # bytes per process the verdict is for; None: no verdict
    fits: bool | None = None
    suggestions: list[dict] = field(default_factory=list)  # for a plan that does not fit: {"change", "needed", "fits"}
    seconds: float = 0.0

    def rows(self) -> list[tuple[str, int | None, str]]:
        """(what, bytes or None for a heading, how) for the table."""
        ac = "on" if self.activation_checkpointing else "off"
        other = "off" if self.activation_checkpointing else "on"
        copies = f"{self.precision} copies of the weights autocast keeps"
        step = f"training step: micro-batch {self.micro_batch} x {self.prompt_tokens + self.completion_tokens} tokens"
        rows = [
            (f"weights ({self._weights_kind()})", self.weights, TRACED),
            (f"gradients ({'adapter, fp32' if self.lora else 'fp32'})", self.gradients, TRACED),
            ("optimizer state (AdamW: 2 moments, fp32)", self.optimizer, TRACED),
        ]
        if self.teacher is not None:
            rows.append((f"teacher ({self._teacher_kind()})", self.teacher_weights, TRACED))
        rows += [
            (f"largest gathered unit ({self.largest_unit_name})", self.largest_unit, SHARD_PLAN),
            (f"{step}, checkpointing {ac}", None, ""),
            ("  activations of the student's forward", self.activations, TRACED),
        ]
        if self.weight_copies:
            rows.append((f"  {copies} in that forward", self.weight_copies, TRACED))
        rows += [
            ("  peak", self.step_peak, TRACED),
            (f"{step}, checkpointing {other}", None, ""),
            ("  activations of the student's forward", self.activations_other, TRACED),
            ("  peak", self.step_peak_other, TRACED),
        ]
        if self.rollout_engine == "decode":
            tokens = self.prompt_tokens + self.completion_tokens
            rows += [
                (f"rollout: {self.rollout_rows} sequences x {tokens} tokens", None, ""),
                (f"  whole model gathered ({self._weights_kind(whole=True)})", self.rollout_gather, TRACED),
            ]
            if self.rollout_weight_copies:
                rows.append((f"  {copies}", self.rollout_weight_copies, TRACED))
            rows += [
                ("  KV cache", self.rollout_kv_cache, COMPUTED),
                ("  peak", self.rollout_peak, f"{TRACED} + {COMPUTED}"),
            ]
        elif self.rollout_engine == "vllm":
            rows += [
                ("rollout: vLLM engine in this process", None, ""),
                ("  weight sync: the largest parameter gathered", self.rollout_gather, SHARD_PLAN),
                ("  peak (training's side)", self.rollout_peak, f"{TRACED} + {SHARD_PLAN}"),
                (f"  engine's weights (whole model, {self.engine_dtype})", self.engine_weights, COMPUTED),
                ("  engine's KV cache for one longest sequence (its minimum)", self.engine_kv_minimum, COMPUTED),
            ]
            if self.gpu_memory is not None:
                # The engine does not use vLLM's sleep mode: its share stays taken through the training step.
                rows.append(
                    ("  engine's share (rollout.vllm_gpu_memory, held throughout)", self.engine_share, COMPUTED)
                )
        rows.append(("peak per process (training and rollouts)", self.peak, "the largest peak"))
        rows.append(("reserve: what no trace sees", None, ""))
        rows += [(f"  {what}", size, COMPUTED) for what, size in self.reserve_parts.items()]
        engine = " + engine's share" if self.rollout_engine == "vllm" and self.gpu_memory is not None else ""
        rows.append((f"needed per process (peak{engine} + reserve)", self.needed, COMPUTED))
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

    def _weights_kind(self, whole: bool = False) -> str:
        kind = f"{self.weights_dtype} base + fp32 adapter" if self.lora else self.weights_dtype
        if whole:
            return kind
        return f"{'shards' if self.processes > 1 else 'all of it'}, {kind}"

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
        lines += [
            "",
            f"  traced: this config's own code run on fake tensors with a fake process group of {self.processes};",
            "  shard plan: from the FSDP units' sizes; computed: arithmetic. The reserve stands for the CUDA context,",
            f"  NCCL's buffers and the allocator's rounding and fragmentation, which no trace sees. ({self.seconds:.0f} s)",
            "",
            self.verdict(),
        ]
        return "\n".join(lines)


def _suggestion(suggestion: dict) -> str:
    return f"{suggestion['change']} ({suggestion['needed'] / GIB:.1f} GiB)"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"
