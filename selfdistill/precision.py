"""The compute precision of a run, chosen at run time from the device.

'auto' means:
- CUDA GPUs with bf16 support: bf16 compute over fp32 master weights.
- CPUs: fp32, whatever their instructions. Without bf16 matrix instructions (AVX2 only) bf16 runs
  many times slower than fp32; with them (AVX512-BF16, AMX) the student's forward and backward and
  the teacher's forward gain, but rollouts lose (autocast casts every weight again for each decoded
  token), and rollouts dominate an SDFT step on a CPU. Measurements: benchmarks/README.md,
  `python -m benchmarks.run precision` and `precision_train`. Choose `bf16` explicitly to use it anyway.
"""

from __future__ import annotations

import functools
import os
from contextlib import nullcontext
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


# oneDNN's instruction-set caps (ONEDNN_MAX_CPU_ISA) below the first with bf16 dot products.
_ISA_CAPS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_instructions() -> bool:
    """True when torch's bf16 matrix products here use AMX-BF16 or AVX512-BF16.

    The CPU's flags come from /proc/cpuinfo (False where unknown). oneDNN, which runs torch's bf16
    products on a CPU, can be capped below them (ONEDNN_MAX_CPU_ISA=AVX2, or DNNL_MAX_CPU_ISA):
    then bf16 runs as it would on an AVX2-only CPU, and this says False too.
    Not used by the run's 'auto' (fp32 on every CPU, see above); used by the teacher's (see
    `teacher_precision`), and the benchmarks report it beside their numbers.
    """
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    if cap.strip().upper() in _ISA_CAPS_WITHOUT_BF16:
        return False
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
    return "fp32"  # CPUs (see above) and other devices


def autocast_context(device: torch.device | str, precision: str, cache: bool = True):
    """bf16 autocast when the run's precision (resolved for this device, see `resolve_precision`) is bf16.

    `cache=False` for training forwards: autocast otherwise keeps the bf16 copy of every weight it
    cast until the region ends, so a sharded model's forward would hold a bf16 copy of all its
    gathered layers at once (12 GiB at 7B) instead of one layer's. Decoding keeps the cache: it
    uses every weight once per token.
    """
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, cache_enabled=cache)
    return nullcontext()


def teacher_precision(choice: str, model_choice: str, run_precision: str, device: torch.device | str) -> str:
    """The precision of the teacher's forward (`teacher.precision`): 'fp32' or 'bf16'.

    'auto' follows the run's precision, except on a CPU with bf16 instructions when the run's
    precision was left to 'auto' (so it computes in fp32): there the teacher's forward, which
    needs no gradient, runs in bf16 (its output head too): faster, with a loss that moves by a
    fraction of a percent (benchmarks/README.md, `python -m benchmarks.teacher_precision`). A
    precision set explicitly in model.precision is kept for the teacher too, so an fp32 run stays
    fp32 throughout unless teacher.precision says otherwise.
    """
    if choice != "auto":
        return choice
    if model_choice == "auto" and torch.device(device).type == "cpu" and cpu_has_bf16_instructions():
        return "bf16"
    return run_precision


def set_fp32_matmuls(device: torch.device | str, tf32: bool) -> None:
    """On CUDA, fp32 matrix products on TF32 tensor cores or not (`model.tf32`); nothing elsewhere.

    An fp32 product on TF32 rounds its inputs to a 10-bit mantissa and sums in fp32, several times
    faster than full fp32 on A100/H100. In a bf16 run it is the output head and the loss's fp32
    products; in an fp32 run, all of them. CPUs are left alone: there the same setting may select
    bf16-based kernels.
    """
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
