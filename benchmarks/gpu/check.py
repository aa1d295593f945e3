"""The GPU check: one command that shows what only a GPU can show, in about five minutes on one H100.

    torchrun --standalone --nproc_per_node 1 benchmarks/gpu/check.py [--out gpu-check.json]

(`--nproc_per_node N` for N GPUs; every part works with one process and with several.) No network and no
weights: every model is random, built from a config (the families' configs and templates are the small
text files in tests/data/families). It writes one JSON summary to --out and prints it; the last line is
`ALL PASSED` or `FAILED: <parts>`, and the exit status is 0 only for ALL PASSED. Each part records
`passed`, its numbers and its seconds; a part that raises is recorded as failed with its error and the
others still run; a part skipped for a reason (vLLM not installed) records `skipped` and counts as passed.
Parts that would start after --budget-s (default 300 s) are recorded as failed, not run, so the command
stays bounded.

Parts (`parts` in the JSON, in the order they run):
  families         for each family in tests/data/families (Qwen2.5, Qwen3, Llama-3.1, Gemma-3, Olmo-3): a
                   random model of its architecture on the device, its output head biased so it writes only
                   a filler word or one stop id (benchmarks/gpu/fidelity.py, shared with
                   tests/test_families.py). Rollouts through the decode loop (sampling.decode.generate with
                   models.stop_token_ids, in the run's precision) stop right after that id, for every id
                   the family stops on; the stop ids are the family's; demonstrations end with the token
                   that ends the family's assistant turn; student and teacher prompts are the family's
                   chat template tokenized once.
  teacher_buffers  for every method with a teacher x teacher kind x teacher.precision (fp32, bf16, auto),
                   as tests/test_teacher_buffers.py: a student with rotary tables (θ = 1e6) on the device,
                   the method built from it; the teacher's buffers are the student's (fp32 `inv_freq`, bit
                   for bit), its weights are on the device, a bf16 frozen teacher stores its head in bf16,
                   and its cos/sin tables for 1,000 positions under autocast equal the student's.
  dcp_resume       SDFT full fine-tuning (EMA teacher) under torchrun: 4 steps with a checkpoint every 2
                   (sharded, DCP); the same run's directory with its newest checkpoint and final/ removed,
                   resumed: steps 3-4 give the uninterrupted run's losses (relative tolerance 1e-5 in fp32
                   on a CPU, 1e-3 in bf16 on a GPU, where CUDA's atomic-add backward kernels change the last
                   bits from the first resumed step's update on) and its final weights (max |difference|
                   1e-5 on a CPU, 1e-3 on a GPU).
  lora_reload      SDFT with a LoRA adapter, 2 steps in fp32 (TF32 off, so the comparison is exact);
                   final/adapter reloads with PEFT over the base weights and gives the trained model's
                   logits (max |difference| <= 1e-4 x max |logit|), and final/'s merged weights give them
                   within 1e-3 x max |logit| (merging rounds differently).
  speed            SDFT/SFT steps through the training loop with FSDP2 in bf16 on random Qwen2.5 shapes:
                   1.5B full fine-tuning SDFT (EMA teacher) and SFT, saved to disk once and loaded by name
                   (under torchrun built on the meta device, filled shard by shard); 7B LoRA SDFT (rank 16,
                   bf16 base, EMA teacher) in memory; 7B full fine-tuning SDFT with --layers-7b layers (the
                   whole 7B with an fp32 EMA teacher needs ~137 GB). Per case: the step-time split
                   (rollout, teacher, student forward, backward, teacher update), tokens/s, MFU against the
                   GPU's bf16 peak, GPU memory after set-up and at the peak, and whether every loss and
                   gradient norm was finite and every step with loss tokens had a non-zero gradient.
                   Cut to fit five minutes (the earlier check took 3-4 minutes on an H200 for this part
                   alone): the completions are 64 tokens instead of 128, the 7B LoRA case with a frozen
                   teacher is gone (the frozen teacher's bf16 path is in teacher_buffers), and the
                   checkpoint the loop writes after its last step is skipped (18-48 GB per case; dcp_resume
                   checks checkpoints); 3 steps per case (the first is warm-up), 8 prompts per process of
                   256 tokens, as before.
  vllm             where vLLM is installed: 2 SDFT steps with rollout.engine=vllm (vllm_eager, so no CUDA
                   graph capture at start) on a small model: finite losses, a weight sync before every
                   rollout, importance ratios near 1 (mean within [0.5, 2]). Skipped with the reason where
                   vLLM is not installed. Runs after speed, so the engine's memory is not in its numbers.
  plan_vs_measured `selfdistill.plan(cfg, processes=N, gpu_memory=<this GPU's GiB>)` for the configs
                   dcp_resume, lora_reload and speed train (computed on rank 0 in a child process outside
                   torchrun's group, alongside the other parts), beside `torch.cuda.max_memory_allocated()`
                   measured over the training steps (the peak counter is reset when set-up ends, so the
                   set-up, such as a whole model built on the device before sharding, is recorded apart as
                   `setup_gib`), with measured / planned peak. Passes when every plan was computed and, on a
                   GPU, every ratio lies in [0.5, 1.1]: the plan does not underestimate by more than 10%,
                   nor overestimate twofold. On a CPU nothing is measured (ratios null).

`environment` records torch, CUDA, the GPU, the number of processes and the settings the runs used, read from
the config (`distributed` in full: all-gather precision, shard size, timeout; model precision and TF32; the
vLLM engine's settings), so a reader knows which defaults the numbers were taken with.

A CPU run of the same code (tests/test_distributed.py runs it), about a minute on two cores:

    torchrun --standalone --nproc_per_node 1 benchmarks/gpu/check.py --device cpu --tiny

(--tiny: 2-layer models, a few tokens; fp32 on the CPU; the speed part's cases on the tiny shape.)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks.gpu.fidelity, and the library from this checkout

PARTS = ["families", "teacher_buffers", "dcp_resume", "lora_reload", "speed", "vllm", "plan_vs_measured"]

# Published architectures (config.json of the Instruct models), and small ones for the checks that need
# no size: `small` on a GPU (head size 64, which vLLM's attention takes), `tiny` on a CPU.
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
    "small": dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
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
PLAN_RATIO_BAND = (0.5, 1.1)  # measured / planned peak that passes


@dataclass
class Context:
    """What every part shares: the arguments, where this process stands, the work directory."""

    args: argparse.Namespace
    device: object  # torch.device
    rank: int
    world: int
    torchrun: bool
    work: Path
    started: float
    precision: str  # the runs' compute precision: bf16 on a GPU, fp32 on a CPU
    measured: dict = field(default_factory=dict)  # run name -> GPU memory measured (GiB)
    plan_jobs: list = field(default_factory=list)  # what plan_vs_measured compares
    plan_child: object = None  # the planning child process (rank 0)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# Processes


def join_processes(args):
    """Under torchrun, join the process group (nccl on GPUs, gloo on CPUs) before any part runs, so that parts
    can meet at barriers; the training loop then uses this group. A plain process has none."""
    import datetime

    import torch
    import torch.distributed as dist

    torchrun = "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no GPU is visible (use --device cpu --tiny for the CPU run)")
        torch.cuda.set_device(device)
    if torchrun and not dist.is_initialized():
        # Long enough for the slowest part on one rank while the others wait at its end.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10))
    rank, world = (dist.get_rank(), dist.get_world_size()) if torchrun else (0, 1)
    return device, rank, world, torchrun


def barrier(ctx: Context) -> None:
    import torch.distributed as dist

    if ctx.torchrun:
        dist.barrier()


def from_rank0(ctx: Context, value):
    """Rank 0's `value` on every process (decisions every process must take alike)."""
    import torch.distributed as dist

    if not ctx.torchrun:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(ctx: Context, fn):
    """`fn()` on rank 0, its value on every process; where it raises, every process raises, so that no process
    is left waiting at a collective the others have passed."""
    value, error = None, None
    if ctx.rank == 0:
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - raised below, on every process
            error = f"on rank 0: {_error(exc)}"
    value, error = from_rank0(ctx, (value, error))
    if error:
        raise RuntimeError(error)
    return value


def gathered(ctx: Context, value) -> list:
    import torch.distributed as dist

    if not ctx.torchrun:
        return [value]
    out = [None] * ctx.world
    dist.all_gather_object(out, value)
    return out


# ---------------------------------------------------------------------------------------------
# Models, data and training runs


def model_config(shape: str, layers: int | None = None):
    from transformers import Qwen2Config

    dims = dict(SHAPES[shape])
    if layers:
        dims["num_hidden_layers"] = layers
    # bos None, eos 2, pad 0: the word tokenizer's ids
    return Qwen2Config(
        **dims,
        max_position_embeddings=4096,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
    )


def build_model(shape: str, layers: int | None, device, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # initialised on the device: seconds, not minutes, for 7B
        return AutoModelForCausalLM.from_config(model_config(shape, layers), dtype=dtype or torch.float32)


def tokenizer_for():
    from selfdistill.models.tiny import tiny_tokenizer

    return tiny_tokenizer([f"w{i}" for i in range(200)])


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


@dataclass
class TrainingRun:
    """One training run of the check: its config (as overrides), its model and its records."""

    name: str
    shape: str
    layers: int | None
    overrides: dict
    records: list
    by_name: bool = False  # saved to disk and loaded by name (sharded loading under torchrun)
    bf16_base: bool = False  # LoRA on a GPU: the frozen base in bf16, as model.load_dtype=auto loads it

    def with_output(self, out: Path) -> dict:
        import copy

        overrides = copy.deepcopy(self.overrides)
        overrides["train"]["output_dir"] = str(out)
        return overrides


def training_run(
    ctx: Context,
    name: str,
    shape: str,
    *,
    method: str = "sdft",
    lora: bool = False,
    teacher: str = "ema",
    precision: str | None = None,
    prompts: int,
    micro: int,
    prompt_words: int,
    completion: int,
    steps: int,
    save_every: int = 0,
    layers: int | None = None,
    by_name: bool = False,
    model: dict | None = None,
    rollout: dict | None = None,
    train: dict | None = None,
) -> TrainingRun:
    """A run of `steps` optimizer steps, `prompts` prompts per process and step, fixed-length completions.

    The prompt limits are the records' own longest prompts, so `sdft plan` (which plans the configured
    limits) plans the lengths that are trained."""
    from selfdistill.data import PromptBuilder

    precision = precision or ctx.precision
    data = records(prompts * ctx.world * steps, prompt_words, completion)
    builder = PromptBuilder(tokenizer_for(), template="plain")
    encoded = [builder.encode(r) for r in data]
    bf16_base = lora and ctx.cuda and precision == "bf16"
    overrides = {
        "method": method,
        "model": {
            "precision": precision,
            "load_dtype": "bf16" if bf16_base else "fp32",
            "lora": {"enabled": lora, "rank": 16, "alpha": 32.0},
            **(model or {}),
        },
        "data": {
            "teacher_template": "plain",
            "max_prompt_tokens": max(len(e.student_ids) for e in encoded),
            "max_teacher_prompt_tokens": max(len(e.teacher_ids) for e in encoded),
        },
        "rollout": {"max_new_tokens": completion, "ignore_eos": True, "batch_size": prompts, **(rollout or {})},
        "teacher": {"kind": teacher},
        "train": {
            "output_dir": "",  # set per run (with_output)
            "batch_size": prompts * ctx.world,
            "micro_batch_size": micro,
            "max_steps": steps,
            "lr": 1e-5,
            "warmup_ratio": 0.0,
            "save_every": save_every,
            "activation_checkpointing": ctx.args.activation_checkpointing,
            **(train or {}),
        },
    }
    return TrainingRun(name, shape, layers, overrides, data, by_name, bf16_base)


def training_runs(ctx: Context) -> dict[str, TrainingRun]:
    """Every run the check trains, by part; built first so their plans can be computed alongside."""
    args = ctx.args
    small = "tiny" if args.tiny else "small"
    sizes = dict(prompts=2, micro=1, prompt_words=8, completion=4) if args.tiny else {}
    little = sizes or dict(prompts=4, micro=2, prompt_words=32, completion=16)
    speed = sizes or dict(
        prompts=args.prompts, micro=args.micro, prompt_words=args.prompt_tokens, completion=args.completion_tokens
    )
    runs = {
        "dcp_resume": training_run(ctx, "dcp_resume", small, steps=4, save_every=2, **little),
        # fp32 and full fp32 products: the reloaded adapter's logits are compared exactly. A large rate, so
        # that the adapter moves the logits well past the comparison's tolerance.
        "lora_reload": training_run(
            ctx,
            "lora_reload",
            small,
            lora=True,
            precision="fp32",
            steps=2,
            model={"tf32": False},
            train={"lr": 1e-3},
            **little,
        ),
    }
    if args.tiny:
        speed_cases = [
            ("tiny sdft full", "tiny", dict(by_name=True)),
            ("tiny sft full", "tiny", dict(method="sft", by_name=True)),
            ("tiny sdft lora", "tiny", dict(lora=True, by_name=True)),
        ]
    else:
        speed_cases = [
            ("1.5b sdft full", "1.5b", dict(by_name=True)),
            ("1.5b sft full", "1.5b", dict(method="sft", by_name=True)),
            ("7b sdft lora", "7b", dict(lora=True)),
            (f"7b sdft full {args.layers_7b} layers", "7b", dict(layers=args.layers_7b)),
        ]
    for name, shape, options in speed_cases:
        runs[f"speed/{name}"] = training_run(ctx, name, shape, steps=args.steps, **speed, **options)
    runs["vllm"] = training_run(  # the small shape even with --tiny: vLLM's attention takes head size 64
        ctx,
        "vllm",
        "small",
        steps=2,
        rollout={"engine": "vllm", "vllm_eager": True, "vllm_gpu_memory": 0.2},
        **little,
    )
    return runs


def _setup_marks() -> dict:
    """GPU memory when a run's set-up is done, and the peak counter reset there, so that the peak measured
    after the run is the training steps' (what `sdft plan` predicts). Recorded by wrapping the loop's set-up;
    without it (the loop renamed) the peak covers the whole run and `setup_gib` stays null."""
    import torch

    import selfdistill.training.loop as loop

    marks: dict = {}
    real = getattr(loop, "setup", None)
    if real is None:
        return marks
    real = getattr(real, "__wrapped__", real)

    def setup(*args, **kwargs):
        run = real(*args, **kwargs)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            marks["setup_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        return run

    setup.__wrapped__ = real
    loop.setup = setup
    return marks


SETUP_MARKS: dict = {}


def train_run(ctx: Context, run: TrainingRun, out: Path, model=None, tokenizer=None, **kwargs):
    """Train `run` through the library's training loop (selfdistill.training.loop.train), every process; the
    GPU memory it took is kept under the run's name."""
    import torch

    from selfdistill.config import load_config
    from selfdistill.training.loop import train

    if ctx.cuda:
        gc.collect()  # the previous run's model, teacher and optimizer
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)
    SETUP_MARKS.clear()
    cfg = load_config(overrides=run.with_output(out))
    result = train(cfg, records=run.records, model=model, tokenizer=tokenizer, **kwargs)
    measured = {"setup_gib": SETUP_MARKS.get("setup_gib"), "steps_gib": None}
    if ctx.cuda:
        measured["steps_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
    ctx.measured.setdefault(run.name, measured)  # the first run of a name (dcp_resume: the uninterrupted one)
    return result, cfg


def run_settings(cfg) -> dict:
    """The settings a reader needs beside the numbers, read from the config the run used."""
    settings = cfg.to_dict()
    return {
        "distributed": settings.get("distributed"),
        "model": {k: v for k, v in settings["model"].items() if k != "name"},
        "rollout": {k: v for k, v in settings["rollout"].items() if k == "engine" or k.startswith("vllm")},
        "teacher": settings.get("teacher"),
    }


def finite_and_learned(metrics: list[dict]) -> tuple[bool, bool]:
    finite = all(m["finite"] and math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
    # Learning, not only finite numbers: every step with loss tokens had a gradient (a LoRA student
    # computed with its adapter off, for one, gives exactly 0 and would still look finite).
    learned = all(m["grad_norm"] > 0 for m in metrics if m["loss_tokens"]) and not metrics[-1].get("zero_grad_steps")
    return finite, learned


# ---------------------------------------------------------------------------------------------
# Parts


def part_families(ctx: Context, runs) -> dict:
    from benchmarks.gpu.fidelity import FAMILIES, FILLER, RECORD, emit_only, family_model, family_tokenizer
    from selfdistill.data import PromptBuilder
    from selfdistill.data.prompts import end_of_turn_token_id
    from selfdistill.models import stop_token_ids
    from selfdistill.sampling.decode import generate

    rows = {}
    for name, family in FAMILIES.items():
        problems: list[str] = []
        tok = family_tokenizer(name, ctx.work / f"families-rank{ctx.rank}" / name)
        model = family_model(name).to(ctx.device)
        stops = stop_token_ids(model, tok)
        if stops != family.stops:
            problems.append(f"stop ids {stops}, the family's {family.stops}")
        # Demonstrations end with the token the template ends an assistant turn with.
        encoded = PromptBuilder(tok, template="plain").encode(RECORD)
        demonstration = tok.encode(RECORD.demonstration, add_special_tokens=False)
        if end_of_turn_token_id(tok) != family.turn_end:
            problems.append(f"end of turn {end_of_turn_token_id(tok)}, the family's {family.turn_end}")
        if encoded.demonstration_ids != demonstration + [family.turn_end]:
            problems.append(f"demonstration ids {encoded.demonstration_ids} do not end with {family.turn_end}")
        # Student and teacher prompts are the family's template, tokenized once.
        builder = PromptBuilder(tok, template="paper")
        paper = builder.encode(RECORD)
        for role, ids, messages in (
            ("student", paper.student_ids, builder.student_messages(RECORD)),
            ("teacher", paper.teacher_ids, builder.teacher_messages(RECORD)),
        ):
            tokens = tok.convert_ids_to_tokens(ids)
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            if ids != tok.encode(text, add_special_tokens=False):
                problems.append(f"the {role} prompt is not the template's text tokenized once")
            if tokens[: len(family.prompt_start)] != family.prompt_start:
                problems.append(f"the {role} prompt starts {tokens[:5]}, not {family.prompt_start}")
            if tokens[-len(family.generation_prompt) :] != family.generation_prompt:
                problems.append(f"the {role} prompt ends {tokens[-5:]}, not {family.generation_prompt}")
        # Rollouts on the device: a model that writes only the filler or `stop` stops right after `stop`.
        filler = tok.convert_tokens_to_ids(FILLER)
        lengths = []
        for stop in family.stops:
            emit_only(model, [filler, stop])
            out = generate(
                model,
                [encoded.student_ids] * 8,
                stop_token_ids=stops,
                pad_token_id=tok.pad_token_id,
                max_new_tokens=32,
                temperature=1.0,
                seeds=list(range(8)),
                batch_size=8,
                precision=ctx.precision,
            )
            for ids, finished in zip(out.ids, out.finished):
                if not finished or ids[-1] != stop or ids[:-1] != [filler] * (len(ids) - 1):
                    problems.append(f"stop {stop}: the rollout {ids[:12]} (finished {finished})")
                    break
            lengths += [len(ids) for ids in out.ids]
        if max(lengths) <= 1:  # the filler never came first: stopping after other tokens was not shown
            problems.append("every rollout was its stop token alone")
        rows[name] = {
            "passed": not problems,
            "problems": problems[:6],
            "stop_ids": stops,
            "turn_end": family.turn_end,
            "rollout_lengths": [min(lengths), max(lengths)],
            "vocab_size": model.config.vocab_size,
        }
        del model
    return {"passed": all(r["passed"] for r in rows.values()), "precision": ctx.precision, "families": rows}


def part_teacher_buffers(ctx: Context, runs) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.gpu.fidelity import buffer_mismatches, method_teacher_kinds
    from selfdistill.config import load_config
    from selfdistill.data import PromptBuilder
    from selfdistill.methods.build import build_method
    from selfdistill.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        rope_theta=1e6,  # where a bf16 inv_freq is off by over 1 rad at 1,000 tokens
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    positions = torch.arange(1000, device=ctx.device)[None]
    hidden = torch.zeros(1, 1000, config.hidden_size, device=ctx.device)
    cases, failures, bf16_frozen = 0, [], 0
    for method, kind in method_teacher_kinds():
        for teacher_precision in ("fp32", "bf16", "auto"):
            torch.manual_seed(0)
            student = LlamaForCausalLM(config).to(ctx.device)
            cfg = load_config(
                overrides={
                    "method": method,
                    "model": {"precision": ctx.precision},
                    "teacher": {"kind": kind, "precision": teacher_precision},
                    "train": {"output_dir": str(ctx.work / "teacher-buffers")},
                }
            )
            built = build_method(cfg, student, tok, PromptBuilder(tok), [tok.eos_token_id], tok.pad_token_id)
            problems = []
            with built.teacher.weights(student) as model:
                problems += buffer_mismatches(model, student)
                if {p.device.type for p in model.parameters()} != {ctx.device.type}:
                    problems.append("teacher weights are not on the device")
                if kind == "frozen" and built.teacher.precision == "bf16":
                    bf16_frozen += 1
                    if model.lm_head.weight.dtype != torch.bfloat16:
                        problems.append(f"a bf16 frozen teacher's head is {model.lm_head.weight.dtype}")
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.precision == "bf16"):
                    ours = model.model.rotary_emb(hidden, positions)
                    theirs = student.model.rotary_emb(hidden, positions)
                if not all(torch.equal(a, b) for a, b in zip(ours, theirs)):
                    problems.append("the teacher's cos/sin tables differ from the student's")
            cases += 1
            if problems:
                failures.append(
                    {"method": method, "kind": kind, "teacher.precision": teacher_precision, "problems": problems[:4]}
                )
    return {
        "passed": not failures and bf16_frozen > 0,
        "cases": cases,
        "bf16_frozen_cases": bf16_frozen,
        "model.precision": ctx.precision,
        "failures": failures[:10],
    }


def part_dcp_resume(ctx: Context, runs) -> dict:
    import torch
    from safetensors.torch import load_file

    run = runs["dcp_resume"]
    straight_dir, resumed_dir = ctx.work / "dcp" / "straight", ctx.work / "dcp" / "resumed"
    straight, cfg = train_run(ctx, run, straight_dir, build_model(run.shape, run.layers, ctx.device), tokenizer_for())
    barrier(ctx)

    def interrupted() -> None:  # the run as if it had died after step 2: its newest checkpoint and final/ gone
        shutil.copytree(straight_dir, resumed_dir)
        checkpoints = sorted(p for p in (resumed_dir / "checkpoints").iterdir() if not p.name.startswith("."))
        shutil.rmtree(checkpoints[-1])
        shutil.rmtree(resumed_dir / "final")

    on_rank0(ctx, interrupted)
    resumed, _ = train_run(
        ctx, run, resumed_dir, build_model(run.shape, run.layers, ctx.device), tokenizer_for(), resume=True
    )
    tolerance = {"loss_rel": 1e-3, "weights_abs": 1e-3} if ctx.cuda else {"loss_rel": 1e-5, "weights_abs": 1e-5}
    losses_straight = [m["loss"] for m in straight.metrics]
    losses_resumed = [m["loss"] for m in resumed.metrics]
    steps = [m["step"] for m in resumed.metrics]
    loss_rel = max(
        (abs(a - b) / max(abs(a), 1e-12) for a, b in zip(losses_straight[2:], losses_resumed)), default=math.inf
    )
    # What the resumed run read: a sharded (DCP) checkpoint under torchrun.
    dcp = (resumed_dir / "checkpoints" / "step-000002" / "shards" / ".metadata").is_file()

    def weights_difference() -> float:
        a = load_file(str(straight_dir / "final" / "model.safetensors"))
        b = load_file(str(resumed_dir / "final" / "model.safetensors"))
        return max(float((a[k].float() - b[k].float()).abs().max()) for k in a) if a.keys() == b.keys() else math.inf

    weights_abs = on_rank0(ctx, weights_difference)
    problems = []
    if steps != [3, 4]:
        problems.append(f"the resumed run trained steps {steps}, not [3, 4]")
    if not loss_rel <= tolerance["loss_rel"]:
        problems.append(f"resumed losses differ by {loss_rel:.3g} (relative)")
    if not weights_abs <= tolerance["weights_abs"]:
        problems.append(f"final weights differ by {weights_abs:.3g}")
    if ctx.torchrun and not dcp:
        problems.append("no sharded (DCP) checkpoint at step 2")
    if not ctx.torchrun:
        problems.append("not under torchrun: the checkpoint is not the sharded (DCP) one; run the check with torchrun")
    del straight, resumed
    torch.cuda.empty_cache() if ctx.cuda else None
    return {
        "passed": not problems,
        "problems": problems,
        "processes": ctx.world,
        "dcp_checkpoint": dcp,
        "losses_uninterrupted": losses_straight,
        "losses_resumed": losses_resumed,
        "loss_max_rel_difference": loss_rel,
        "weights_max_abs_difference": weights_abs,
        "tolerance": tolerance,
        "settings": run_settings(cfg),
    }


def part_lora_reload(ctx: Context, runs) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = runs["lora_reload"]
    out, base_dir = ctx.work / "lora" / "run", ctx.work / "lora" / "base"
    model, tok = build_model(run.shape, run.layers, ctx.device), tokenizer_for()
    # The base weights the adapter is reloaded over (LoRA leaves them as they are).
    on_rank0(ctx, lambda: model.save_pretrained(base_dir, safe_serialization=True))
    result, cfg = train_run(ctx, run, out, model, tok)
    ids = torch.tensor([tok.encode(run.records[0].prompt + " " + run.records[0].demonstration)], device=ctx.device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # exact fp32 products
    try:
        trained = result.model
        trained.eval()
        with torch.no_grad():  # every process: under torchrun the trained model is sharded
            logits = trained(input_ids=ids).logits.float()

        def compare() -> dict:
            adapter = out / "final" / "adapter"
            base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(ctx.device)
            reloaded = PeftModel.from_pretrained(base, adapter).eval()
            merged = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).to(ctx.device).eval()
            with torch.no_grad():
                from_adapter = reloaded(input_ids=ids).logits.float()
                from_merged = merged(input_ids=ids).logits.float()
            scale = float(logits.abs().max())
            numbers = {
                "adapter_files": sorted(p.name for p in adapter.iterdir()),
                "max_abs_logit": scale,
                "adapter_max_abs_difference": float((from_adapter - logits).abs().max()),
                "merged_max_abs_difference": float((from_merged - logits).abs().max()),
            }
            # The adapter moved the logits: the comparison is not of the base model with itself.
            with torch.no_grad(), reloaded.disable_adapter():
                numbers["adapter_effect"] = float((reloaded(input_ids=ids).logits.float() - logits).abs().max())
            numbers["passed"] = (
                numbers["adapter_max_abs_difference"] <= 1e-4 * scale
                and numbers["merged_max_abs_difference"] <= 1e-3 * scale
                and numbers["adapter_effect"] > 1e-3 * scale
            )
            return numbers

        numbers = on_rank0(ctx, compare)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return {
        **numbers,
        "tolerance": {"adapter": "1e-4 x max |logit|", "merged": "1e-3 x max |logit|"},
        "steps": len(result.metrics),
        "settings": run_settings(cfg),
    }


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


@contextlib.contextmanager
def _no_final_checkpoint():
    """The training loop writes a checkpoint after its last step; for the speed cases that is 18-48 GB each (AdamW
    state and an fp32 EMA teacher), a minute or more of the check's five for nothing it measures (dcp_resume
    checks checkpoints). Switched off by replacing the loop's checkpoint call; where the loop no longer has
    it, the checkpoint is written (and removed after the case)."""
    import selfdistill.training.loop as loop

    real = getattr(loop, "save_checkpoint_now", None)
    if real is not None:
        loop.save_checkpoint_now = lambda run, done: None
    try:
        yield
    finally:
        if real is not None:
            loop.save_checkpoint_now = real


def speed_case(ctx: Context, run: TrainingRun) -> dict:
    import torch

    started = time.perf_counter()
    out = ctx.work / "speed" / run.name.replace(" ", "-")
    # A LoRA run's frozen base in bf16, as model.load_dtype=auto loads it (built so: 7B in fp32 would be 30 GB).
    dtype = torch.bfloat16 if run.bf16_base else torch.float32
    model, tok = build_model(run.shape, run.layers, ctx.device, dtype), tokenizer_for()
    params = sum(p.numel() for p in model.parameters())
    if run.by_name:  # saved once, then loaded by name: under torchrun built empty and filled shard by shard
        weights = ctx.work / "weights" / f"{run.shape}-{run.layers or 'all'}"

        def save(built, tokenizer) -> None:
            if not weights.is_dir():  # the SDFT and SFT cases of a shape share it
                built.save_pretrained(weights, safe_serialization=True)
                tokenizer.save_pretrained(weights)

        on_rank0(ctx, functools.partial(save, model, tok))
        run.overrides["model"]["name"] = str(weights)
        model = tok = None
    with _no_final_checkpoint():
        result, cfg = train_run(ctx, run, out, model, tok, save_final=False)
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
    finite, learned = finite_and_learned(result.metrics)
    lora, method = cfg.model.lora.enabled, cfg.method
    prompt, completion = len(run.records[0].prompt.split()), cfg.rollout.max_new_tokens  # one token per word
    flops = flops_per_step(params, prompt, completion, cfg.train.batch_size, method, lora)
    peak = next(
        (v for k, v in BF16_PEAK.items() if ctx.cuda and k in torch.cuda.get_device_name(ctx.device)),
        ctx.args.peak_tflops * 1e12 if ctx.args.peak_tflops else None,
    )
    measured = ctx.measured.get(run.name, {})
    steps = len(result.metrics)
    del result, model
    barrier(ctx)
    if ctx.rank == 0:  # the run directory (metrics; a checkpoint where the loop wrote one anyway)
        shutil.rmtree(out, ignore_errors=True)
    return {
        "case": run.name,
        "params_b": params / 1e9,
        "layers": run.layers or SHAPES[run.shape]["num_hidden_layers"],
        "steps": steps,
        "s_step": mean["time_step"],
        "s_rollout": mean["time_rollout"],
        "s_teacher": mean["time_teacher"],
        "s_student_fwd": mean["time_student_forward"],
        "s_backward": mean["time_student_backward"],
        "s_teacher_update": mean["time_teacher_update"],
        "tokens_per_s": mean["loss_tokens"] / mean["time_step"],  # trained (loss) tokens per second
        "mfu": (flops / mean["time_step"] / peak / ctx.world) if peak else None,
        "loaded": "by name, sharded" if run.by_name and ctx.torchrun else ("by name" if run.by_name else "in memory"),
        "setup_gib": measured.get("setup_gib"),
        "peak_gib": measured.get("steps_gib"),
        "finite": finite,
        "learned": learned,
        "wall_s": time.perf_counter() - started,
    }


def part_speed(ctx: Context, runs) -> dict:
    rows = []
    for name, run in runs.items():
        if not name.startswith("speed/"):
            continue
        try:
            rows.append(speed_case(ctx, run))
        except Exception as exc:  # noqa: BLE001 - record the case and go on to the next one
            rows.append({"case": run.name, "error": _error(exc), "finite": False, "learned": False})
    return {"passed": all(r.get("finite") and r.get("learned") for r in rows), "cases": rows}


def part_vllm(ctx: Context, runs) -> dict:
    if importlib.util.find_spec("vllm") is None:
        return {"passed": True, "skipped": "vLLM is not installed in this environment (rollout.engine=vllm needs it)"}
    run = runs["vllm"]
    result, cfg = train_run(
        ctx, run, ctx.work / "vllm", build_model(run.shape, run.layers, ctx.device), tokenizer_for()
    )
    finite, learned = finite_and_learned(result.metrics)
    syncs = [m.get("time_weight_sync", 0.0) for m in result.metrics]
    ratios = [m.get("importance_ratio_mean") for m in result.metrics]
    ratios_near_one = all(r is not None and 0.5 <= r <= 2.0 for r in ratios)
    return {
        "passed": finite and learned and all(s > 0 for s in syncs) and ratios_near_one,
        "finite": finite,
        "learned": learned,
        "s_weight_sync": syncs,
        "importance_ratio_mean": ratios,
        "s_step": [m["time_step"] for m in result.metrics],
        "s_rollout": [m.get("time_rollout") for m in result.metrics],
        "settings": run_settings(cfg),
    }


# `selfdistill.plan` sets up a fake process group of its own, so it cannot run inside torchrun's group: it runs
# in this child process, started at the beginning so that it plans while the other parts train.
PLAN_CHILD = """
import json, sys
import selfdistill
jobs = json.loads(open(sys.argv[1]).read())
out = {}
for job in jobs:
    try:
        plan = selfdistill.plan(job["config"], processes=job["processes"], gpu_memory=job["gpu_memory"])
        out[job["name"]] = {k: getattr(plan, k) for k in ("step_peak", "peak", "needed", "fits", "seconds")}
    except Exception as exc:
        out[job["name"]] = {"error": f"{type(exc).__name__}: {exc}"[:600]}
open(sys.argv[2], "w").write(json.dumps(out))
"""


def gpu_memory_gib(ctx: Context) -> float:
    """This GPU's memory (GiB) for the plan's verdict; on a CPU an 80 GiB GPU stands in."""
    import torch

    return torch.cuda.get_device_properties(ctx.device).total_memory / 2**30 if ctx.cuda else 80.0


def start_plans(ctx: Context, runs: dict[str, TrainingRun]) -> None:
    """On rank 0: write each planned run's config (its architecture as a config.json, no weights) and start
    the child that plans them."""
    jobs = []
    for name, run in runs.items():
        if name == "vllm":  # the engine's memory is vLLM's own, outside torch's counter
            continue
        arch = ctx.work / "arch" / f"{run.shape}-{run.layers or 'all'}"
        if ctx.rank == 0:
            model_config(run.shape, run.layers).save_pretrained(arch)
        config = run.with_output(ctx.work / "plan-run")
        config["model"]["name"] = str(arch)
        jobs.append({"name": run.name, "config": config, "processes": ctx.world, "gpu_memory": gpu_memory_gib(ctx)})
    ctx.plan_jobs = jobs
    if ctx.rank != 0:
        return
    (ctx.work / "plan-jobs.json").write_text(json.dumps(jobs))
    launcher = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("TORCHELASTIC")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # planning needs no GPU; it should not take memory on one
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    ctx.plan_child = subprocess.Popen(
        [sys.executable, "-c", PLAN_CHILD, str(ctx.work / "plan-jobs.json"), str(ctx.work / "plans.json")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(ctx.work / "plan-stderr.txt", "w"),
    )


def part_plan_vs_measured(ctx: Context, runs) -> dict:
    if ctx.rank != 0:
        return {"passed": True}  # rank 0 plans and compares; its record is the part's
    wait = max(30.0, ctx.args.budget_s + 60 - (time.perf_counter() - ctx.started))
    ctx.plan_child.wait(timeout=wait)
    if ctx.plan_child.returncode != 0:
        raise RuntimeError(f"the planning child failed: {(ctx.work / 'plan-stderr.txt').read_text()[-1500:]}")
    plans = json.loads((ctx.work / "plans.json").read_text())
    rows, passed = [], True
    low, high = PLAN_RATIO_BAND
    for job in ctx.plan_jobs:
        planned, measured = plans.get(job["name"], {"error": "not planned"}), ctx.measured.get(job["name"], {})
        row = {"run": job["name"], "plan_error": planned.get("error")}
        if "error" not in planned:
            row.update(
                plan_step_peak_gib=planned["step_peak"] / 2**30,
                plan_peak_gib=planned["peak"] / 2**30,
                plan_needed_gib=planned["needed"] / 2**30,
                plan_fits=planned["fits"],
                plan_seconds=planned["seconds"],
            )
        row["measured_setup_gib"] = measured.get("setup_gib")
        row["measured_steps_gib"] = measured.get("steps_gib")
        ratio = None
        if row["measured_steps_gib"] is not None and row.get("plan_peak_gib"):
            ratio = row["measured_steps_gib"] / row["plan_peak_gib"]
        row["ratio_measured_to_planned"] = ratio
        row["passed"] = row["plan_error"] is None and (not ctx.cuda or (ratio is not None and low <= ratio <= high))
        passed = passed and row["passed"]
        rows.append(row)
    return {
        "passed": passed,
        "processes": ctx.world,
        "gpu_memory_gib": gpu_memory_gib(ctx),
        "ratio_band": list(PLAN_RATIO_BAND),
        "measured": "torch.cuda.max_memory_allocated() over the training steps" if ctx.cuda else None,
        "runs": rows,
    }


# ---------------------------------------------------------------------------------------------
# The command


def environment(ctx: Context) -> dict:
    import platform

    import torch
    import transformers

    from selfdistill.config import load_config

    def version(package: str):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    defaults = load_config(overrides={"model": {"precision": ctx.precision}})
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(ctx.device) if ctx.cuda else None,
        "gpu_memory_gib": gpu_memory_gib(ctx) if ctx.cuda else None,
        "device": str(ctx.device),
        "processes": ctx.world,
        "torchrun": ctx.torchrun,
        "python": platform.python_version(),
        "transformers": transformers.__version__,
        "peft": version("peft"),
        "vllm": version("vllm"),
        "tiny": ctx.args.tiny,
        "precision": ctx.precision,
        # The defaults every run started from (each part records what it changed).
        "settings": run_settings(defaults),
    }


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:800] + "\n" + "".join(traceback.format_exc().splitlines(True)[-6:])[-1200:]


def run_part(ctx: Context, name: str, runs) -> dict:
    """One part on every process: its record (rank 0's, failed where any process failed), with its seconds."""
    started = time.perf_counter()
    out_of_time = from_rank0(ctx, started - ctx.started > ctx.args.budget_s)
    if out_of_time:
        record = {"passed": False, "error": f"not run: the check's {ctx.args.budget_s:.0f} s budget was spent"}
    else:
        try:
            record = globals()[f"part_{name}"](ctx, runs)
        except Exception as exc:  # noqa: BLE001 - record the part as failed and go on to the next one
            record = {"passed": False, "error": _error(exc)}
    records = gathered(ctx, record)
    merged = dict(records[0])
    merged["passed"] = all(r.get("passed") for r in records)
    others = {rank: r["error"] for rank, r in enumerate(records) if rank and r.get("error")}
    if others:
        merged["errors_other_ranks"] = others
    merged["seconds"] = time.perf_counter() - started
    return merged


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="where the JSON summary goes")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models and lengths only (the CPU run)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="parts that would start later are not run")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per speed case (the first is warm-up)")
    parser.add_argument("--prompts", type=int, default=8, help="speed: prompts per step and process")
    parser.add_argument("--micro", type=int, default=4, help="speed: sequences per forward/backward")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="speed: prompt length (one token per word)")
    parser.add_argument("--completion-tokens", type=int, default=64, help="speed: completion length")
    parser.add_argument("--layers-7b", type=int, default=8, help="layers of the full fine-tuning 7B speed case")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak when the GPU is not known")
    parser.add_argument("--keep-work", action="store_true", help="keep the work directory (runs, plans)")
    parser.add_argument("--only", nargs="*", choices=PARTS, default=None, help="run only these parts")
    args = parser.parse_args(argv)
    os.environ.setdefault("SELFDISTILL_PROGRESS", "0")  # no progress bars in the check's output

    started = time.perf_counter()
    device, rank, world, torchrun = join_processes(args)
    ctx = Context(args, device, rank, world, torchrun, Path(), started, "bf16" if device.type == "cuda" else "fp32")
    ctx.work = Path(from_rank0(ctx, tempfile.mkdtemp(prefix="gpu-check-") if rank == 0 else None))
    global SETUP_MARKS
    SETUP_MARKS = _setup_marks()
    summary = {"environment": environment(ctx), "parts": {}}
    runs = training_runs(ctx)
    parts = args.only or PARTS
    if "plan_vs_measured" in parts:
        start_plans(ctx, runs)
    for name in parts:
        summary["parts"][name] = run_part(ctx, name, runs)
        if rank == 0:
            state = "skipped" if summary["parts"][name].get("skipped") else summary["parts"][name]["passed"]
            print(f"[gpu check] {name}: {state} ({summary['parts'][name]['seconds']:.1f} s)", flush=True)
    failures = [name for name, record in summary["parts"].items() if not record["passed"]]
    summary["failures"] = failures
    summary["seconds"] = time.perf_counter() - started
    summary["result"] = "ALL PASSED" if not failures else "FAILED: " + ", ".join(failures)
    if rank == 0:
        text = json.dumps(summary, indent=1, default=str)
        args.out.write_text(text + "\n")
        print(text)
        if ctx.plan_child is not None and ctx.plan_child.poll() is None:
            ctx.plan_child.kill()
        if not args.keep_work:
            shutil.rmtree(ctx.work, ignore_errors=True)
        print(summary["result"], flush=True)
    barrier(ctx)
    if torchrun:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
