"""One side of a benchmark, in its own process: train a few steps of selfdistill and print a JSON line.

python -m benchmarks.worker '{"method": "sdft", "length": 64, ...}'
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


def main(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec.get("threads", 2))
    from benchmarks.common import SPLIT, fixed_records
    from selfdistill.config import load_config
    from selfdistill.data.records import Record
    from selfdistill.models import load_model
    from selfdistill.training.loop import train

    model, tokenizer = load_model("smollm2-135m", torch.float32)
    length, prompts = spec.get("length", 64), spec.get("prompts", 8)
    steps = spec.get("steps", 4)
    records = [
        Record(prompt=r["prompt"], demonstration=r["demonstration"])
        for r in fixed_records(prompts * steps, length, tokenizer)
    ]
    with tempfile.TemporaryDirectory() as out:
        overrides = {
            "method": spec["method"],
            "model": {"precision": spec.get("precision", "fp32")},
            "data": {"teacher_template": spec.get("teacher_template", "paper")},
            "rollout": {"ignore_eos": True, "max_new_tokens": length, "batch_size": prompts},
            "loss": {
                "top_k": spec.get("top_k"),
                "chunk_size": spec.get("chunk", 256),
                "skip_first_tokens": spec.get("skip_first", 0),
            },
            "teacher": {"kind": spec.get("teacher", "ema"), "ema_rate": 0.01},
            "train": {
                "batch_size": prompts,
                "micro_batch_size": spec.get("micro", prompts),
                "max_steps": steps,
                "lr": 1e-5,
                "save_every": 0,
                "output_dir": out,
                "warmup_ratio": 0.0,
                "activation_checkpointing": spec.get("checkpointing", False),
            },
        }
        for key, value in spec.get("extra", {}).items():  # e.g. {"offline": {"loss": "divergence"}}
            overrides.setdefault(key, {}).update(value)
        cfg = load_config(None, overrides)
        for name, value in spec.get("toggles", {}).items():  # A/B switches of an optimization
            _toggle(name, value)
        start = time.perf_counter()
        result = train(cfg, records=records, model=model, tokenizer=tokenizer, save_final=False)
        total = time.perf_counter() - start
    warmup = spec.get("warmup", 1)  # steps still settling (benchmarks/warmup.py), left out
    metrics = result.metrics[warmup:] or result.metrics
    keys = [
        "time_step",
        *SPLIT,
        "loss_tokens",
        "tokens_per_s",
        "loss",
        "importance_ratio_mean",
        "importance_ratio_min",
        "importance_ratio_max",
        "importance_clipped_fraction",
    ]
    per_step = {k: [m.get(k) for m in metrics] for k in keys}
    return {
        "spec": spec,
        "per_step": per_step,
        "losses": [m["loss"] for m in result.metrics],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "total_s": total,
        "examples_per_step": prompts,
        "torch": torch.__version__,
    }


def _toggle(name: str, value) -> None:
    # (The teacher_inference_mode toggle was removed with the switch itself: it measured no gain.)
    if name == "teacher_bf16_weights" and value:
        _teacher_bf16_weights()
        return
    raise ValueError(f"unknown toggle {name}")


def _teacher_bf16_weights() -> None:
    """Time an EMA teacher that computes from a bf16 copy of its weights (residual stream in bf16 too),
    refreshed from its fp32 EMA weights after every update: what its forward would cost, not a method."""
    import copy
    from contextlib import contextmanager

    import torch

    from selfdistill.distillation import teacher as teacher_module

    init, update = teacher_module.Teacher.__init__, teacher_module.Teacher.update

    def patched_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.compute = copy.deepcopy(self.module)
        teacher_module._cast_parameters(self.compute, torch.bfloat16)

    def patched_update(self, student):
        update(self, student)
        with torch.no_grad():
            for target, source in zip(self.compute.parameters(), self.module.parameters()):
                target.copy_(source)

    @contextmanager
    def scoring(self, student):
        yield teacher_module.TeacherView(self.compute, adapter_off=False)

    teacher_module.Teacher.__init__ = patched_init
    teacher_module.Teacher.update = patched_update
    teacher_module.Teacher.scoring = scoring


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    # Also kept on disk, so a suite cut short still leaves every finished run behind.
    raw = Path(__file__).resolve().parent / "results" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / f"{time.strftime('%H%M%S')}-{os.getpid()}-{result['spec']['method']}.json").write_text(json.dumps(result))
    print(json.dumps(result))
