"""The one training loop, shared by every method.

Per optimizer step: take the step's prompts (this process's share), let the method build the
step's items (SDFT: rollouts), count the step's loss tokens across all processes, accumulate
Σ per-token loss / total tokens over micro-batches (so every counted token of the step weighs
the same, whatever the micro-batching or the number of processes), sum gradients across
processes, clip, step AdamW and the cosine schedule, then let the method update its teacher.

Gradients are summed across processes explicitly (one flat all-reduce) instead of through a
DDP wrapper: the methods run the model's backbone and output head separately, and the
global-token normalisation above already gives each process's loss its share, so a plain sum
makes N processes compute exactly what one process computes on the same global batch.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from selfdistill.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from selfdistill.config import Config
from selfdistill.data import PromptBuilder, Record, load_records
from selfdistill.errors import UserError
from selfdistill.methods import get_method
from selfdistill.models import apply_lora, load_model, save_model, stop_token_id
from selfdistill.progress import progress_bar
from selfdistill.rollout import rollout_seed

log = logging.getLogger(__name__)


class TrainingStopped(UserError):
    """The run stopped on purpose (signal) or because it could not go on (non-finite steps)."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_dir: Path | None
    metrics: list[dict] = field(default_factory=list)
    model: object = None
    tokenizer: object = None


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_records: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_records, generator=generator).tolist()


def data_order(num_records: int, seed: int, position: int) -> int:
    """Record index at stream position `position`: epochs are successive seeded permutations."""
    epoch, offset = divmod(position, num_records)
    return _epoch_permutation(num_records, seed, epoch)[offset]


def total_steps(cfg: Config, num_records: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * num_records / cfg.train.batch_size))


def _fingerprint(cfg: Config) -> dict:
    """What identifies a run: an output directory holding a different run is not reused silently."""
    data = cfg.to_dict()
    data["train"] = {k: v for k, v in data["train"].items() if k not in ("output_dir", "save_every", "keep_last")}
    return data


def prepare_output_dir(cfg: Config, resume: bool, overwrite: bool) -> Path:
    out = Path(cfg.train.output_dir)
    run_file = out / "run.json"
    if run_file.is_file() and not overwrite:
        previous = json.loads(run_file.read_text())
        if previous.get("config") != _fingerprint(cfg):
            raise UserError(
                f"{out} already holds a different run (its run.json has other settings). "
                "Choose another train.output_dir, or pass --overwrite to replace it."
            )
        if not resume and latest_checkpoint(out) is not None:
            raise UserError(f"{out} already holds checkpoints of this run. Pass --resume to continue it, or --overwrite to start again.")
    if overwrite and out.exists():
        import shutil

        for child in ("checkpoints", "final", "metrics.jsonl", "run.json"):
            target = out / child
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    tmp = run_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"config": _fingerprint(cfg), "full_config": cfg.to_dict()}, indent=2))
    tmp.replace(run_file)
    return out


def _sum_across(accelerator: Accelerator, values: list[float]) -> list[float]:
    if accelerator.num_processes == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction="sum").tolist()


def _sum_gradients(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> None:
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = accelerator.reduce(flat, reduction="sum")
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


class _StopFlag:
    """SIGINT / SIGTERM ask the loop to checkpoint and stop at the end of the current step."""

    def __init__(self):
        self.requested = None
        self.previous = {}

    def __enter__(self):
        def handler(signum, frame):
            self.requested = signal.Signals(signum).name

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self.previous.items():
            signal.signal(sig, old)


def train(cfg: Config, *, records: list[Record] | None = None, model=None, tokenizer=None, resume: bool = False,
          overwrite: bool = False, save_final: bool = True) -> TrainResult:
    """Train `cfg.method` on the records (or `cfg.data.train`). Pass `model`/`tokenizer` to train in memory."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(cfg.train.seed)
    out = prepare_output_dir(cfg, resume, overwrite) if accelerator.is_main_process else Path(cfg.train.output_dir)
    accelerator.wait_for_everyone()

    if records is None:  # read the data first: a bad file should not wait for a model load
        if not cfg.data.train:
            raise UserError("No training data: set data.train (a .jsonl file, a dataset directory, hf:NAME or builtin:NAME).")
        records = load_records(cfg.data.train, cfg.data.columns, cfg.data.split)
    if model is None:
        model, tokenizer = load_model(cfg.model.name, torch.float32, cfg.model.trust_remote_code)
    if cfg.model.lora.enabled:
        lora = cfg.model.lora
        model = apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.target_modules)
    model.to(accelerator.device)
    model.train()
    model.config.use_cache = False  # training forwards need no cache; generation turns it on itself

    stop_id = stop_token_id(model, tokenizer)
    builder = PromptBuilder(
        tokenizer, cfg.data.teacher_template, cfg.data.system_prompt, cfg.data.max_prompt_tokens,
        cfg.data.max_teacher_prompt_tokens, cfg.data.overlong, stop_id,
    )
    encoded = builder.encode_all(records)
    method = get_method(cfg.method)(cfg, model, tokenizer, builder, stop_id, tokenizer.pad_token_id, records)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    examples = method.training_examples(encoded)
    steps = method.total_steps(total_steps(cfg, len(examples)))
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.train.warmup_ratio * steps), steps)

    start_step = 0
    metrics_path = out / "metrics.jsonl"
    if resume:
        checkpoint = latest_checkpoint(out)
        if checkpoint is not None:
            state = load_checkpoint(checkpoint, model, method, optimizer, scheduler)
            start_step = state["step"]
            log.info("resumed from %s (step %d of %d)", checkpoint, start_step, steps)
            if accelerator.is_main_process and metrics_path.is_file():  # drop lines logged after that checkpoint
                kept = [l for l in metrics_path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= start_step]
                metrics_path.write_text("".join(k + "\n" for k in kept))
    elif accelerator.is_main_process and metrics_path.exists():
        metrics_path.unlink()
    method.setup(examples)
    if builder.skipped:
        log.warning("%d records skipped for being over the prompt limits", len(builder.skipped))

    rank, world = accelerator.process_index, accelerator.num_processes
    batch, micro = cfg.train.batch_size, cfg.train.micro_batch_size
    history: list[dict] = []
    nonfinite_in_row = 0
    bar = progress_bar(total=steps, desc=f"{cfg.method} training") if accelerator.is_main_process else None
    if bar:
        bar.update(start_step)
    with _StopFlag() as stop:
        for step in range(start_step, steps):
            step_start = time.perf_counter()
            positions = list(range(step * batch, (step + 1) * batch))[rank::world]
            mine = [examples[data_order(len(examples), cfg.train.seed, p)] for p in positions]
            seeds = [rollout_seed(cfg.train.seed, p, r) for p in positions for r in range(cfg.rollout.num_rollouts)]
            items, build_stats = method.build_items(mine, seeds, step)
            local_tokens = sum(i.loss_tokens for i in items)
            (global_tokens,) = _sum_across(accelerator, [float(local_tokens)])

            loss_sum, loss_stats, backward_time = 0.0, {}, 0.0
            for start in range(0, len(items), micro):
                loss, stats = method.loss(items[start:start + micro])
                if loss.requires_grad and global_tokens > 0:
                    t0 = time.perf_counter()
                    (loss / global_tokens).backward()
                    backward_time += time.perf_counter() - t0
                loss_sum = loss_sum + loss.detach().double()  # stays on the device; read once per step, below
                for k, v in stats.items():
                    loss_stats[k] = loss_stats.get(k, 0.0) + v
            _sum_gradients(accelerator, params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm or float("inf"))
            keys = sorted(set(loss_stats) | set(build_stats))
            totals = _sum_across(accelerator, [float(loss_sum)] + [float(loss_stats.get(k, build_stats.get(k, 0.0))) for k in keys])
            loss_total, summed = totals[0], dict(zip(keys, totals[1:]))

            finite = math.isfinite(loss_total) and bool(torch.isfinite(grad_norm))
            update_time = 0.0
            if finite:
                optimizer.step()
                t0 = time.perf_counter()
                method.after_step()
                update_time = time.perf_counter() - t0
                nonfinite_in_row = 0
            else:
                nonfinite_in_row += 1
                log.warning("step %d: non-finite loss or gradient; step skipped (teacher not updated)", step + 1)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            elapsed = time.perf_counter() - step_start
            record = _step_metrics(step + 1, loss_total, global_tokens, summed, scheduler, grad_norm, elapsed,
                                   backward_time, update_time, finite)
            history.append(record)
            if accelerator.is_main_process:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
            if nonfinite_in_row > cfg.train.max_nonfinite_steps:
                raise TrainingStopped(
                    f"Training stopped: {nonfinite_in_row} steps in a row had a non-finite loss or gradient "
                    f"(limit train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}). The last good checkpoint in "
                    f"{out / 'checkpoints'} is intact; lower train.lr or use model.precision=fp32."
                )
            done = step + 1
            periodic = cfg.train.save_every and done % cfg.train.save_every == 0 and done < steps
            if periodic or stop.requested:
                _save(accelerator, out, done, steps, model, tokenizer, method, optimizer, scheduler, cfg)
            if stop.requested:
                if bar:
                    bar.close()
                raise TrainingStopped(f"Stopped by {stop.requested} after step {done}; checkpoint written. "
                                      "Run the same command with --resume to continue.")
    if bar:
        bar.close()
    final_dir = None
    if start_step < steps or latest_checkpoint(out) is None:
        _save(accelerator, out, steps, steps, model, tokenizer, method, optimizer, scheduler, cfg)
    if save_final and accelerator.is_main_process:
        final_dir = out / "final"
        tmp = out / ".final.tmp"
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tokenizer, tmp)
        shutil.rmtree(final_dir, ignore_errors=True)
        tmp.replace(final_dir)
    accelerator.wait_for_everyone()
    return TrainResult(output_dir=out, steps=steps, final_dir=final_dir, metrics=history, model=model, tokenizer=tokenizer)


def _save(accelerator, out, done, steps, model, tokenizer, method, optimizer, scheduler, cfg):
    if accelerator.is_main_process:
        save_checkpoint(out, done, model, tokenizer, method, optimizer, scheduler,
                        {"total_steps": steps, "method": cfg.method}, cfg.train.keep_last)
    accelerator.wait_for_everyone()


def _step_metrics(step, loss_total, tokens, summed, scheduler, grad_norm, elapsed, backward_time, update_time, finite):
    per_token = max(tokens, 1.0)
    sequences = max(summed.pop("sequences", 0.0), 1.0)
    record = {
        "step": step,
        "loss": loss_total / per_token,
        "loss_tokens": int(tokens),
        "lr": scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm),
        "finite": finite,
        "time_step": elapsed,
        "time_teacher_update": update_time,
        "time_student_backward": backward_time,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
    }
    for name in ("divergence", "teacher_minus_student_logp", "teacher_entropy", "demonstration_logp"):
        if name in summed:
            record[name] = summed.pop(name) / per_token
    if "completion_tokens" in summed:
        record["completion_length"] = summed.pop("completion_tokens") / sequences
        record["clipped_ratio"] = summed.pop("clipped", 0.0) / sequences
    for name, value in summed.items():  # timings: summed over processes, reported per process
        record[name] = value
    return record
