"""GPU check: SDFT and SFT steps with FSDP2 in bf16 on random-initialised Qwen2.5 shapes.

No weights can reach the GPU machine, so the models are built from a config (the shapes of
Qwen2.5-1.5B-Instruct and Qwen2.5-7B-Instruct) with random weights; that is enough to measure
speed, memory, and that the distributed and precision paths give finite losses and gradients.
The prompts are random token ids of fixed length; rollouts ignore the end-of-turn token so every
completion has the configured length.

On one H200 (about 3-4 minutes in all):

    torchrun --standalone --nproc_per_node 1 benchmarks/gpu/check.py

runs, each for --steps optimizer steps through the library's own training loop:
  1.5b  full fine-tuning, SDFT (EMA teacher) and SFT, saved to disk and loaded by name: under
        torchrun built on the meta device and filled shard by shard (sharded loading)
  7b    LoRA (rank 16, bf16 base weights) SDFT, all 28 layers, EMA and frozen teacher
  7b    full fine-tuning SDFT with --layers-7b layers (the whole 7B with an fp32 EMA teacher needs
        ~18 bytes per parameter, ~137 GB: more than one GPU holds; per-layer cost scales linearly)

For each it prints the GPU memory when set-up is done (`setup_gib`) and at the peak, the step-time split (rollout, teacher, student forward, backward, teacher
update), tokens/s, MFU against the GPU's bf16 peak, peak GPU memory, and whether every loss and
gradient norm was finite and whether every step with loss tokens had a non-zero gradient (it
learned). The last lines are `ALL FINITE` / `NOT FINITE` and `ALL LEARNED` / `NOT ALL LEARNED`.
Gradients are summed with a forced SUM reduction on every backend and process count (NCCL here),
and bf16 is autocast over fp32 weights, the same computation as one plain process.

A CPU smoke run of the same code (a test runs it):

    torchrun --standalone --nproc_per_node 1 benchmarks/gpu/check.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# Published architectures (config.json of the Instruct models).
SHAPES = {
    "1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=True,
    ),
}
# Dense bf16 peak FLOP/s by GPU name (tensor cores, no sparsity).
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def build_model(shape: str, layers: int | None, device):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    dims = dict(SHAPES[shape])
    if layers:
        dims["num_hidden_layers"] = layers
    config = Qwen2Config(
        **dims,
        max_position_embeddings=4096,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
    )  # the word tokenizer's ids
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the device: seconds, not minutes, for 7B
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def tokenizer_for(vocab_words: int = 200):
    from selfdistill.models.tiny import tiny_tokenizer

    return tiny_tokenizer([f"w{i}" for i in range(vocab_words)])


def records(count: int, prompt_words: int, demo_words: int, seed: int = 0):
    import random

    from selfdistill.data.records import Record

    rng = random.Random(seed)
    words = [f"w{i}" for i in range(200)]
    return [
        Record(
            prompt=" ".join(rng.choice(words) for _ in range(prompt_words)),
            demonstration=" ".join(rng.choice(words) for _ in range(demo_words)),
        )
        for _ in range(count)
    ]


def flops_per_step(params: int, prompt: int, completion: int, sequences: int, method: str, lora: bool) -> float:
    """Model FLOPs of one optimizer step: 2·P per token forward, 4·P more for the backward.

    SDFT: rollout (prefill + decode), teacher forward over teacher prompt + completion, student
    forward + backward. SFT: student forward + backward. With LoRA the backward skips the weight
    gradients of the frozen base (about 2·P per token instead of 4·P).
    """
    backward = 2 if lora else 4
    student_tokens = sequences * (prompt + completion)
    if method == "sft":
        return (2 + backward) * params * student_tokens
    teacher_tokens = sequences * (prompt + 2 * completion)  # the teacher prompt also holds the demonstration
    rollout_tokens = sequences * (prompt + completion)
    return 2 * params * (rollout_tokens + teacher_tokens) + (2 + backward) * params * student_tokens


def run_case(
    name: str, args, shape: str, method: str, lora: bool = False, layers: int | None = None, teacher: str = "ema"
) -> dict:
    import torch

    from selfdistill.config import load_config
    from selfdistill.models.distributed import setup_processes
    from selfdistill.training.loop import train

    procs = setup_processes()
    device = procs.device if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        import gc

        gc.collect()  # the previous case's model, teacher and optimizer
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    model = build_model(shape, layers, device)
    params = sum(p.numel() for p in model.parameters())
    tok = tokenizer_for()
    prompt_words, completion = args.prompt_tokens, args.completion_tokens
    by_name = shape in args.load_by_name
    with tempfile.TemporaryDirectory() as tmp:
        if by_name:  # saved, then loaded by name: under torchrun built empty and filled shard by shard
            if lora and device.type == "cuda":
                model = model.to(torch.bfloat16)
            model.save_pretrained(Path(tmp) / "model", safe_serialization=True)
            tok.save_pretrained(Path(tmp) / "model")
            model = tok = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
        memory = _memory_marks(device)
        cfg = load_config(
            overrides={
                "method": method,
                "model": {
                    **({"name": str(Path(tmp) / "model")} if by_name else {}),
                    "precision": "bf16" if device.type == "cuda" else "fp32",
                    "load_dtype": "bf16" if (lora and device.type == "cuda") else "fp32",
                    "lora": {"enabled": lora, "rank": 16, "alpha": 32.0},
                },
                "data": {
                    "teacher_template": "plain",
                    "max_prompt_tokens": 4 * prompt_words,
                    "max_teacher_prompt_tokens": 8 * prompt_words,
                },
                "rollout": {"max_new_tokens": completion, "ignore_eos": True, "batch_size": args.prompts},
                "teacher": {"kind": teacher},
                "train": {
                    "output_dir": str(Path(tmp) / "run"),
                    "batch_size": args.prompts * procs.world,
                    "micro_batch_size": args.micro,
                    "max_steps": args.steps,
                    "lr": 1e-5,
                    "warmup_ratio": 0.0,
                    "activation_checkpointing": args.activation_checkpointing,
                },
            }
        )
        if lora and device.type == "cuda" and model is not None:
            model = model.to(torch.bfloat16)  # the frozen base in bf16, as model.load_dtype=auto loads it
        predicted = _planned_peak(args, cfg, model, Path(tmp), procs.world)
        result = train(
            cfg,
            records=records(args.prompts * procs.world * args.steps, prompt_words, completion),
            model=model,
            tokenizer=tok,
            save_final=False,
        )
    metrics = result.metrics[1:] or result.metrics  # the first step includes warm-up
    mean = {
        k: sum(m.get(k, 0.0) for m in metrics) / len(metrics)
        for k in (
            "time_step",
            "time_rollout",
            "time_teacher",
            "time_student_forward",
            "time_student_backward",
            "time_teacher_update",
            "loss_tokens",
        )
    }
    finite = all(m["finite"] and math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in result.metrics)
    # Learning, not only finite numbers: every step with loss tokens had a gradient (a LoRA student
    # computed with its adapter off, for one, gives exactly 0 and would still look finite).
    learned = all(m["grad_norm"] > 0 for m in result.metrics if m["loss_tokens"]) and not result.metrics[-1].get(
        "zero_grad_steps"
    )
    sequences = args.prompts * procs.world
    flops = flops_per_step(params, prompt_words, completion, sequences, method, lora)  # one token per word
    peak = next(
        (v for k, v in BF16_PEAK.items() if device.type == "cuda" and k in torch.cuda.get_device_name(device)),
        args.peak_tflops * 1e12 if args.peak_tflops else None,
    )
    row = {
        "case": name,
        "params_b": params / 1e9,
        "layers": layers or SHAPES[shape]["num_hidden_layers"],
        "steps": len(result.metrics),
        "s_step": mean["time_step"],
        "s_rollout": mean["time_rollout"],
        "s_teacher": mean["time_teacher"],
        "s_student_fwd": mean["time_student_forward"],
        "s_backward": mean["time_student_backward"],
        "s_teacher_update": mean["time_teacher_update"],
        "tokens_per_s": mean["loss_tokens"] / mean["time_step"],  # trained (loss) tokens per second
        "mfu": (flops / mean["time_step"] / peak / procs.world) if peak else None,
        "loaded": "by name, sharded" if by_name else "in memory",
        "setup_gib": memory.get("setup"),
        "plan_step_gib": predicted.get("step"),
        "plan_peak_gib": predicted.get("peak"),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "finite": finite,
        "learned": learned,
        "grad_norms": [round(m["grad_norm"], 4) for m in result.metrics],
        "losses": [round(m["loss"], 4) for m in result.metrics],
        "wall_s": time.perf_counter() - started,
    }
    del result, model
    return row


def _planned_peak(args, cfg, model, tmp: Path, processes: int) -> dict:
    """`sdft plan`'s prediction for this case (GiB): the training step's peak and the overall peak.

    The planner sets up a fake process group of its own, so it runs in a child process outside
    torchrun's group, on the main process only (the others wait at the run's first collective).
    """
    import dataclasses
    import os
    import subprocess

    import torch.distributed as dist

    if not args.plan or (dist.is_initialized() and dist.get_rank() != 0):
        return {}
    settings = dataclasses.asdict(cfg)
    if model is not None:  # in memory: plan from its config
        (model.get_base_model() if hasattr(model, "peft_config") else model).config.save_pretrained(tmp / "arch")
        settings["model"]["name"] = str(tmp / "arch")
    (tmp / "plan.json").write_text(json.dumps(settings))
    launcher = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("TORCHELASTIC")}
    command = [sys.executable, "-m", "selfdistill.cli", "plan", str(tmp / "plan.json"), "--processes", str(processes)]
    done = subprocess.run(command + ["--json", str(tmp / "planned.json")], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr[-300:]}
    planned = json.loads((tmp / "planned.json").read_text())
    return {"step": planned["step_peak"] / 2**30, "peak": planned["peak"] / 2**30}


def _memory_marks(device) -> dict:
    """Peak GPU memory when the run's set-up is done, recorded by wrapping the loop's set-up."""
    import torch

    import selfdistill.training.loop as train_mod

    marks: dict = {}
    real = getattr(train_mod.setup, "__wrapped__", train_mod.setup)

    def setup(*args, **kwargs):
        run = real(*args, **kwargs)
        if device.type == "cuda":
            marks["setup"] = torch.cuda.max_memory_allocated(device) / 2**30
        return run

    setup.__wrapped__ = real
    train_mod.setup = setup
    return marks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model only (the CPU smoke run)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per case (the first is warm-up)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step and process")
    parser.add_argument("--micro", type=int, default=4, help="sequences per forward/backward")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="prompt length (one token per word)")
    parser.add_argument("--completion-tokens", type=int, default=128)
    parser.add_argument("--layers-7b", type=int, default=8, help="layers of the full fine-tuning 7B case")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak when the GPU is not known")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--load-by-name",
        nargs="*",
        default=["1.5b", "tiny"],
        help="shapes saved to disk first and loaded by name (the sharded loading path); the others are passed in memory",
    )
    parser.add_argument(
        "--no-plan", dest="plan", action="store_false", help="skip sdft plan's prediction beside each case's memory"
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.prompt_tokens, args.completion_tokens, args.prompts, args.micro = 8, 4, 2, 1
        cases = [
            ("tiny sdft full", "tiny", "sdft", False, None),
            ("tiny sft full", "tiny", "sft", False, None),
            ("tiny sdft lora", "tiny", "sdft", True, None),
            ("tiny sdft lora frozen", "tiny", "sdft", True, None, "frozen"),
        ]
    else:
        cases = [
            ("1.5b sdft full", "1.5b", "sdft", False, None),
            ("1.5b sft full", "1.5b", "sft", False, None),
            ("7b sdft lora", "7b", "sdft", True, None),
            ("7b sdft lora frozen", "7b", "sdft", True, None, "frozen"),
            (f"7b sdft full {args.layers_7b} layers", "7b", "sdft", False, args.layers_7b),
        ]
    import torch.distributed as dist

    rows = []
    for case in cases:
        try:
            rows.append(run_case(case[0], args, *case[1:]))
        except Exception as exc:  # noqa: BLE001 - report the case and go on to the next one
            rows.append({"case": case[0], "error": f"{type(exc).__name__}: {exc}"[:500], "finite": False})
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(json.dumps(rows[-1]), flush=True)
    if not dist.is_initialized() or dist.get_rank() == 0:
        _print_table(rows)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        print("ALL FINITE" if all(r.get("finite") for r in rows) else "NOT FINITE", flush=True)
        print("ALL LEARNED" if all(r.get("learned") for r in rows) else "NOT ALL LEARNED", flush=True)
    return 0 if all(r.get("finite") and r.get("learned") for r in rows) else 1


def _print_table(rows: list[dict]) -> None:
    columns = [
        "case",
        "params_b",
        "s_step",
        "s_rollout",
        "s_teacher",
        "s_student_fwd",
        "s_backward",
        "s_teacher_update",
        "tokens_per_s",
        "mfu",
        "peak_gib",
        "finite",
        "learned",
        "loaded",
        "setup_gib",
        "plan_step_gib",
        "plan_peak_gib",
    ]
    print(" | ".join(columns))
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            cells.append(
                f"{value:.3g}"
                if isinstance(value, float)
                else str(value if value is not None else row.get("error", "-"))
            )
        print(" | ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
