"""The teacher: the same network as the student, with its own weights.

- `ema` (default): teacher <- (1 − a) teacher + a student after every optimizer step (a = 0.01).
- `frozen`: the student's weights at the start of training — copied from the in-memory student,
  never reloaded from disk (a reload could pick up different weights or precision).
- `live`: the current student itself (no copy).

With LoRA the student's weight is W0 + ΔW with ΔW = scale · B·A. `frozen` is then simply the
adapter switched off (W0). `ema` must average the weight the adapter adds, ΔW — averaging A and
B separately is not an average of their product. The teacher therefore keeps a plain copy of
the model whose adapted layers hold W0 + EMA(ΔW), updated as
    W_T <- (1 − a) W_T + a (W0 + ΔW_student),
which is the same thing because W0 is constant. It costs one copy of the adapted weights.

Precision: an EMA teacher is kept in fp32 whatever the student's weights were loaded in (at
a = 0.01 a bf16 copy would round most updates away); a frozen full-weight teacher may be kept
in bf16 (`frozen_dtype`) when the run computes in bf16, since it never changes. Only parameters
are cast: buffers (rotary tables and any other non-parameter state) stay as the student's.

Under FSDP2 the teacher module is sharded with the student's plan (`shard`), so the update is an
elementwise operation on this process's shards; with LoRA each layer's weight delta needs the
whole (small) A factor, gathered once per layer and step.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from selfdistill.distillation.losses import output_head
from selfdistill.models.distributed import is_sharded, local, reshard_all
from selfdistill.models.lora import is_lora, lora_factors, merged_weight


def _lora_layers(student):
    from peft.tuners.lora import LoraLayer

    for name, module in student.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _cast_parameters(module, dtype: torch.dtype) -> None:
    """Cast the parameters only; buffers keep the student's dtype.

    `module.to(dtype)` / `module.float()` cast floating buffers too: rotary frequencies (`inv_freq`)
    rounded to bf16 move positions by over 1 rad at 1,000 tokens (θ = 1e6), so the teacher would
    encode positions differently from the student it is compared with. Assigning `.data` keeps each
    Parameter object, so tied weights stay tied (and a meta parameter stays on meta).
    """
    for param in module.parameters():
        param.data = param.data.to(dtype)


def _plain_name(peft_name: str) -> str:
    """PEFT module name -> the same module's name in the unwrapped model."""
    prefix = "base_model.model."
    return peft_name[len(prefix) :] if peft_name.startswith(prefix) else peft_name


class Teacher:
    def __init__(self, student, kind: str = "ema", ema_rate: float = 0.01, frozen_dtype: torch.dtype | None = None):
        if kind not in ("ema", "frozen", "live"):
            raise ValueError(f"unknown teacher kind {kind!r}")
        self.kind = kind
        self.ema_rate = ema_rate
        self.lora = is_lora(student)
        self.module = None
        if kind == "ema" or (kind == "frozen" and not self.lora):
            if self.lora:
                self.module = copy.deepcopy(student).merge_and_unload()
            else:
                self.module = copy.deepcopy(student)
            if kind == "ema":
                _cast_parameters(self.module, torch.float32)
            elif frozen_dtype is not None:
                _cast_parameters(self.module, frozen_dtype)
            self.module.eval()
            self.module.requires_grad_(False)

    @contextmanager
    def scoring(self, student):
        """The teacher for one loss computation, as a context yielding a `TeacherView`.

        Run the teacher's forwards inside `view.weights()`: for a LoRA-frozen teacher (the student
        with its adapter switched off) only there is the adapter off, so the student's own forward,
        run outside it, keeps its adapter and its gradients. A teacher copy stays gathered until the
        context ends (the chunked loss applies its head after the student's forward).
        """
        if self.module is not None:
            try:
                yield TeacherView(self.module, adapter_off=False)
            finally:
                reshard_all(self.module)  # it never runs backward, so its gathered weights can go now
        else:  # live, or LoRA-frozen: W0 is the student without its adapter
            yield TeacherView(student, adapter_off=self.kind == "frozen")

    @torch.no_grad()
    def update(self, student) -> None:
        """One EMA step after an optimizer step (no-op for frozen and live teachers)."""
        if self.kind != "ema" or self.ema_rate == 0.0:
            return
        a = self.ema_rate
        if not self.lora:
            for t, s in zip(self.module.parameters(), student.parameters()):
                local(t).lerp_(local(s).detach().to(t.dtype), a)
            return
        teacher_modules = dict(self.module.named_modules())
        sharded = is_sharded(student)
        for name, layer in _lora_layers(student):
            target = teacher_modules[_plain_name(name)]
            base = local(layer.base_layer.weight).detach()
            effective = merged_weight(layer, base, torch.float32, _local_factors if sharded else lora_factors)
            local(target.weight).lerp_(effective.to(target.weight.dtype), a)

    def shard(self, shard_fn) -> None:
        """Shard the teacher's own copy with the student's plan (a no-op for live and LoRA-frozen)."""
        if self.module is not None:
            self.module = shard_fn(self.module)

    def save(self, path: Path) -> None:
        if self.module is not None:
            from safetensors.torch import save_model

            save_model(self.module, str(path))

    def load(self, path: Path) -> None:
        if self.module is not None:
            from safetensors.torch import load_model

            load_model(self.module, str(path))


@dataclass(frozen=True)
class TeacherView:
    """How a loss computation reaches the teacher: `model` for its forwards (run inside `weights()`),
    `head` for its output head."""

    model: torch.nn.Module
    adapter_off: bool  # LoRA-frozen: the teacher is `model` with its adapter switched off

    @contextmanager
    def weights(self):
        """The teacher's weights in place (the adapter off, for LoRA-frozen), without gradients."""
        with torch.no_grad():
            if self.adapter_off:
                with self.model.disable_adapter():
                    yield self.model
            else:
                yield self.model

    @property
    def head(self):
        """hidden states -> the teacher's logits; for LoRA-frozen, an adapted head's base layer (W0)."""
        return output_head(self.model, without_adapter=self.adapter_off)


def _local_factors(layer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the whole A, this process's rows of B) of a sharded LoRA linear layer: their product is this
    process's rows of B·A.

    B [out, r] is sharded along its rows exactly as the base weight [out, in] is (both split dim 0
    into the same pieces), so the local rows of B times the whole A give the local rows of the delta.
    """
    from torch.distributed.tensor import DTensor

    if getattr(layer, "fan_in_fan_out", False):
        raise NotImplementedError("EMA of a LoRA delta under FSDP2 supports plain linear layers only")
    a, b = lora_factors(layer, adapter)
    return (a.full_tensor() if isinstance(a, DTensor) else a), local(b)
