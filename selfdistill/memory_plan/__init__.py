"""`sdft plan`: how much memory each process of a torchrun launch needs for one training config, and
how many bytes it communicates and FLOPs it computes per optimizer step.

Answered before renting GPUs, on a CPU, in seconds, without weights: the model is built from its
architecture config alone (`config.json` of a local directory, or one shipped under
`selfdistill/resources/architectures/`) on the meta device, with LoRA applied as the trainer
applies it, the method (and its teacher copy) built from it as the trainer builds them, and both
sharded with the product's own plan (`selfdistill.models.distributed.shard_model`, over its device mesh:
groups of `distributed.shard_size` processes, one node's by default, replicated across groups) for N
processes in this one process: a fake process group (`fake` backend, the process is rank 0 of N) and fake tensors
(`FakeTensorMode`: every tensor has a shape, a dtype and a size, and no memory).

Every registered method is planned from what its registry entry declares a step computes
(`selfdistill.registry.Step`: rollouts from the student, a teacher and what it is shown, a second
forward over the demonstrations); a method that declares nothing is refused, naming what is missing.

Traced (the product's own code run on fake tensors, every tensor's storage counted as it is
created, resized and freed, as torch's `FSDPMemTracker` counts them):
- this process's shards of the weights, the teacher, the gradients and the AdamW state;
- a training step in steady state (AdamW's moments exist, and for a step of several micro-batches
  so do the step's gradients): the method's loss on one micro-batch of the longest sequences
  (SDFT: the teacher's forward, the student's forward, the chunked loss) and its backward, with
  activation checkpointing as configured and the other way; then gradient clipping, AdamW
  (`foreach`, torch's choice on GPUs) and the teacher's EMA update. Every gathered FSDP unit,
  all-gather buffer, autocast weight copy, activation and temporary is included;
- the start of a rollout: the whole model gathered (`full_weights`), the prefill of one decode
  batch and one decoded token.
Computed (what fake tensors do not reach in reasonable time): the KV cache's growth over the rest
of the completion (the decode loop would run `rollout.max_new_tokens` steps), and for
`rollout.engine: vllm` the engine's weights (the whole model in its dtype) and one longest
sequence's KV cache, and with a GPU size its share (`rollout.vllm_gpu_memory` of it; refused when
smaller than those). With `rollout.vllm_sleep` the engine sleeps through the training step, so its
share adds to what training keeps resident during rollouts, not to the step's peak.

Communication: every collective the traced code issues is recorded (kind, bytes, dtype, process
group; whose weights, which pass), counted once per micro-batch for the step's forwards and
backwards (the loop gathers and reduces again for each) and once per step for the update and a
decode rollout; the vLLM weight sync (each parameter gathered whole) is computed from the shard
plan. Per process, ring algorithm: (n-1)/n of the whole for an all-gather or reduce-scatter,
2(n-1)/n for an all-reduce; seconds at the given intra- and inter-node bandwidths (`Hardware`).
Compute: 2 FLOPs per parameter and token for a forward, 4 more for a backward (2 for LoRA).

A stated reserve (planner.CUDA_CONTEXT, NCCL_BUFFERS, FRAGMENTATION) stands for the CUDA context,
NCCL's buffers and the allocator's rounding and fragmentation; with a GPU size the plan ends with
a verdict, `fits` or `does not fit` and the changes that make it fit, each planned again. Not included:
`train.demonstration_logp_every`'s forward without gradients.
`model.precision: auto` is planned as bf16 (what it means on GPUs with bf16); lengths are the
configured limits (`data.max_prompt_tokens`, `data.max_teacher_prompt_tokens`,
`rollout.max_new_tokens`, which is also the length planned for SFT's demonstrations and the teacher's
answers; cpt's document pieces: `data.max_prompt_tokens`).
"""

from selfdistill.memory_plan.architectures import (
    ARCHITECTURES_DIR,
    architecture_config,
    shipped_architectures,
    type_name,
)
from selfdistill.memory_plan.figures import COMPUTED, GIB, SHARD_PLAN, TRACED, MemoryPlan
from selfdistill.memory_plan.planner import plan
from selfdistill.memory_plan.trace import MemoryTrace

__all__ = [
    "ARCHITECTURES_DIR",
    "COMPUTED",
    "GIB",
    "SHARD_PLAN",
    "TRACED",
    "MemoryPlan",
    "MemoryTrace",
    "architecture_config",
    "plan",
    "shipped_architectures",
    "type_name",
]
