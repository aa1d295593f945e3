"""The compute precision of a run, chosen at run time from the device.

'auto' means bf16 where the hardware computes it fast and fp32 elsewhere:
- CUDA GPUs with bf16 support: bf16 compute over fp32 master weights.
- CPUs with bf16 matrix instructions (AMX-BF16 or AVX512-BF16): bf16.
- Other CPUs (AVX2 only): fp32. There bf16 matrix products are emulated and run many times
  slower than fp32 (a 1024x1024 product ~85x, the 135M model's forward ~4x, a whole training
  step ~20x, measured on a 2-core AVX2 machine).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_instructions() -> bool:
    """True when the CPU has AMX-BF16 or AVX512-BF16 (read from /proc/cpuinfo; False where unknown)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: torch.device | str) -> Literal["fp32", "bf16"]:
    """'fp32' or 'bf16' for this device: 'auto' is decided here, explicit choices are kept."""
    if precision != "auto":
        return precision  # type: ignore[return-value]
    device_type = torch.device(device).type
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device_type == "cpu":
        return "bf16" if cpu_has_bf16_instructions() else "fp32"
    return "fp32"
