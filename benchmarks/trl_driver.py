"""TRL's SDFT trainer on the same model, records, lengths, batch and steps as benchmarks.worker.

Run with benchmarks/.venv-trl/bin/python (see setup_trl.sh); prints one JSON line like the worker.
Equivalent configuration (TRL 1.16.0 names): EMA teacher (`teacher_model_kind="ema"`,
`teacher_update_rate=0.01`, every step), full-vocabulary forward KL (`distillation_mode="full_logits"`,
`distillation_alpha=0.0`), one generation per prompt, fixed-length completions (`min_new_tokens`
= `max_completion_length` = length, the counterpart of our `rollout.ignore_eos`), no skipped
tokens, per-device batch = prompts, no accumulation, fp32 on the CPU. The teacher prompt uses
the plain template wording, as our side's `data.teacher_template=plain`.
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


def main(spec: dict) -> dict:
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
            generation_kwargs={"min_new_tokens": length},
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
        )
        trainer = SDFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[StepTimer()]
        )
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start
    measured = times[1:] or times
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
