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
                ("rollout: vLLM engine (its share, rollout.vllm_gpu_memory, not included)", None, ""),
                ("  weight sync: the largest parameter gathered", self.rollout_gather, SHARD_PLAN),
                ("  peak", self.rollout_peak, f"{TRACED} + {SHARD_PLAN}"),
            ]
        engine = " (+ the vLLM engine's share of the GPU)" if self.rollout_engine == "vllm" else ""
        rows.append((f"peak per process{engine}", self.peak, "the largest peak"))
        return rows

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
        """Every field (bytes), plus `rows`: the table's lines with GiB and how each was obtained."""
        data = dataclasses.asdict(self)
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
            "  shard plan: from the FSDP units' sizes; computed: arithmetic. Not included: the CUDA context",
            f"  (~0.5-1 GiB), the allocator's rounding and fragmentation, NCCL's buffers. ({self.seconds:.0f} s)",
        ]
        return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"
