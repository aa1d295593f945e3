"""TRL's SDFT trainer on the same model, records, lengths, batch and steps as benchmarks.worker.

Run with benchmarks/.venv-trl/bin/python (see setup_trl.sh); prints one JSON line like the worker.
Equivalent configuration (TRL 1.16.0 names): EMA teacher (`teacher_model_kind="ema"`,
`teacher_update_rate=0.01`, every step), full-vocabulary forward KL (`distillation_mode="full_logits"`,
`distillation_alpha=0.0`), one generation per prompt, fixed-length completions (`min_new_tokens`
= `max_completion_length` = length, the counterpart of our `rollout.ignore_eos`), no skipped
tokens, per-device batch = prompts, no accumulation, fp32 on the CPU. The teacher prompt uses
the plain template wording, as our side's `data.teacher_template=plain`.

`"vllm": "colocate"` in the spec switches TRL's rollouts to its own vLLM sampler (`use_vllm=True`,
`vllm_mode="colocate"`: an in-process engine that receives the student's weights before each step's
rollout). It needs benchmarks/.venv-trl-vllm (setup_trl_vllm.sh); everything else stays as above.
Unmodified, it stops at the first weight sync on vLLM's CPU backend (see `reload_weight_sync`);
`"vllm_sync": "reload"` replaces that one method so the rest of TRL's vLLM path can run.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

MODEL_DIR = Path.home() / ".cache" / "selfdistill" / "models" / "smollm2-135m"
TEMPLATE = (
    "{prompt}\n\nThis is an example for a response to the question:\n{privileged_context}\n\n"
    "Now answer with a response of your own."
)


def vllm_options(spec: dict) -> dict:
    """SDFTConfig fields for TRL's vLLM sampler, and the environment vLLM needs on a CPU."""
    mode = spec.get("vllm")
    if not mode:
        return {}
    if mode != "colocate":
        raise ValueError(f"vllm: only 'colocate' is wired up, got {mode!r}")
    # The engine must run in this process: TRL's colocate weight sync reaches into
    # llm_engine.model_executor.driver_worker, which vLLM only exposes without its engine-core process.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # shared cores: no pinning
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache, as in our vLLM sides
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return {"use_vllm": True, "vllm_mode": mode}


def reload_weight_sync() -> None:
    """Makes TRL's colocate weight sync go through vLLM's `reload_weights`.

    TRL 1.16.0 (`VLLMGeneration.sync_weights`, colocate branch) hands each tensor to the engine
    model's `load_weights`. vLLM's CPU backend, once a model is loaded, swaps every linear layer's
    weight for an empty placeholder and computes with a repacked copy (oneDNN / packed GEMM), so
    that call fails ("'Parameter' object has no attribute 'weight_loader'"), and a copy into the
    placeholder would not reach the repacked weights anyway. `reload_weights` loads checkpoint-format
    tensors into the original layers and repacks them, which is what selfdistill's own vLLM engine
    does. Same tensors, same point in the step (before each rollout); only the transfer differs.

    A tied output head (SmolLM2's) receives no tensor of its own: vLLM puts its old repacked copy
    back and samples from the initial head's logits ever after. It is repacked from the (shared,
    reloaded) embedding after every sync. Checked on vllm-cpu 0.31.0 with a perturbed SmolLM2:
    the engine's log-probabilities were up to 3.1 nats off the perturbed model's after a plain
    reload, 0.26 after the repack (0.11 for the unperturbed model: the engine runs in bf16).
    """
    from trl.generation.vllm_generation import VLLMGeneration

    trl_sync = VLLMGeneration.sync_weights

    def sync_weights(self):
        if self.mode != "colocate" or self.enable_sleep_mode:
            return trl_sync(self)
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": self._iter_named_params(), "is_checkpoint_format": True}
        )
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        head = getattr(engine_model, "lm_head", None)
        embed = getattr(getattr(engine_model, "model", None), "embed_tokens", None)
        if head is not None and embed is not None and head.weight is embed.weight:
            head.quant_method.process_weights_after_loading(head)
        self.llm.reset_prefix_cache()

    VLLMGeneration.sync_weights = sync_weights


def main(spec: dict) -> dict:
    vllm = vllm_options(spec)
    if vllm and spec.get("vllm_sync") == "reload":
        reload_weight_sync()
    import torch

    torch.set_num_threads(spec.get("threads", 2))
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from benchmarks.common import fixed_records

    length, prompts, steps = spec.get("length", 64), spec.get("prompts", 8), spec.get("steps", 4)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    rows = fixed_records(prompts * steps, length, tokenizer)
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "privileged_context": r["demonstration"]} for r in rows]
    )

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as out:
        args = SDFTConfig(
            output_dir=out,
            per_device_train_batch_size=prompts,
            gradient_accumulation_steps=1,
            max_steps=steps,
            learning_rate=1e-5,
            lr_scheduler_type="cosine",
            warmup_steps=0,
            num_generations=1,
            max_completion_length=length,
            # transformers' generate and vLLM's SamplingParams name the minimum length differently.
            generation_kwargs={"min_tokens" if vllm else "min_new_tokens": length},
            temperature=1.0,
            teacher_model_kind="ema",
            teacher_update_rate=0.01,
            teacher_sync_steps=1,
            distillation_mode="full_logits",
            distillation_alpha=0.0,
            num_loss_tokens_to_skip=spec.get("skip_first", 0),
            teacher_prompt_template=TEMPLATE,
            use_cpu=True,
            bf16=False,
            fp16=False,
            save_strategy="no",
            logging_steps=1,
            report_to=[],
            seed=42,
            shuffle_dataset=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
            # TRL's default is on; the spec says which, so that both sides recompute or neither does.
            gradient_checkpointing=spec.get("checkpointing", True),
            **vllm,
        )
        trainer = SDFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[StepTimer()]
        )
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start
    measured = times[spec.get("warmup", 1) :] or times  # the same steps left out as benchmarks.worker
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "spec": spec,
        "per_step": {
            "time_step": measured,
            "loss_tokens": [prompts * (length - spec.get("skip_first", 0))] * len(measured),
            "tokens_per_s": [prompts * length / t for t in measured],
        },
        "losses": losses,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "total_s": total,
        "examples_per_step": prompts,
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    # Also kept on disk, so a suite cut short still leaves every finished run behind.
    raw = Path(__file__).resolve().parent / "results" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / f"{time.strftime('%H%M%S')}-{os.getpid()}-trl.json").write_text(json.dumps(result))
    print(json.dumps(result))
